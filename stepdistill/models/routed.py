"""K class-conditional ``UNet2DModel`` students behind one routing table (Multi-Student Distillation).

``RoutedUNet2DModel(students=[cfg_0, ..., cfg_{K-1}], routing=[k(label 0), ..., k(label C-1)])`` is a diffusers
``ModelMixin``: it saves as one ``config.json`` (the K students' UNet2DModel configs and the routing table) plus
one safetensors file (``nets.<k>.<param>``), and loads with ``RoutedUNet2DModel.from_pretrained``. It is
called like a class-conditional ``UNet2DModel``, ``net(sample, timestep, class_labels=labels).sample``: each row
goes through exactly one student, the one its label routes to (one network evaluation per row), and the rows
come back in their input order. Labels without a student (the null class of classifier-free guidance) are an
error: a routed model has no unconditional branch. The config repeats ``sample_size``, ``in_channels``,
``out_channels`` and ``num_class_embeds`` (C + 1: the null row, as the teacher's) so that
:class:`~stepdistill.pipelines.StepDistillClassPipeline` drives it as it drives one UNet2DModel.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


class RoutedOutput(BaseOutput):
    sample: torch.Tensor


def _plain_config(config) -> dict:
    """A UNet2DModel config as a JSON-able dict (no private ``_`` keys)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


class RoutedUNet2DModel(ModelMixin, ConfigMixin):
    """K ``UNet2DModel`` students; ``routing[label]`` is the student of class ``label`` (see the module doc)."""

    @register_to_config
    def __init__(
        self,
        students: list | None = None,
        routing: list | None = None,
        sample_size=None,  # the four below are derived from the students (stored for pipelines), never read
        in_channels=None,
        out_channels=None,
        num_class_embeds=None,
    ):
        super().__init__()
        students = list(students or [])
        routing = [int(k) for k in (routing or [])]
        if not students:
            raise ValueError("RoutedUNet2DModel needs at least one student config")
        if not routing or min(routing) < 0 or max(routing) >= len(students):
            raise ValueError(f"routing must map every label to a student in [0, {len(students) - 1}], got {routing}")
        self.nets = nn.ModuleList(UNet2DModel.from_config(dict(cfg)) for cfg in students)
        first = self.nets[0].config
        for k, s in enumerate(self.nets):
            for key in ("sample_size", "in_channels", "out_channels"):
                if s.config[key] != first[key]:
                    raise ValueError(f"student {k}: {key}={s.config[key]} differs from student 0's {first[key]}")
            if not s.config.num_class_embeds or s.config.num_class_embeds <= len(routing) - 1:
                raise ValueError(
                    f"student {k}: num_class_embeds={s.config.num_class_embeds} cannot take {len(routing)} labels"
                )
        table = torch.full((int(first.num_class_embeds),), -1, dtype=torch.long)  # -1: no student (the null row)
        table[: len(routing)] = torch.tensor(routing)
        self.register_buffer("route_table", table, persistent=False)
        # what a UNet2DModel caller reads from the config
        self.register_to_config(
            sample_size=first.sample_size,
            in_channels=first.in_channels,
            out_channels=first.out_channels,
            num_class_embeds=first.num_class_embeds,
        )

    @classmethod
    def from_students(cls, students, routing) -> RoutedUNet2DModel:
        """The routed model holding (copies of) the weights of the given UNet2DModel instances."""
        model = cls(students=[_plain_config(s.config) for s in students], routing=list(routing))
        for mine, given in zip(model.nets, students):
            mine.load_state_dict(given.state_dict())
        return model.to(next(students[0].parameters()).device)

    @property
    def num_students(self) -> int:
        return len(self.nets)

    def partition(self) -> list[list[int]]:
        """The labels of each student."""
        routing = list(self.config.routing)
        return [[c for c, r in enumerate(routing) if r == k] for k in range(len(self.nets))]

    def route(self, class_labels: torch.Tensor) -> torch.Tensor:
        """The student index of each label (a ValueError for labels without a student)."""
        labels = torch.as_tensor(class_labels).reshape(-1).long()
        table = self.route_table.to(labels.device)
        bad = (labels < 0) | (labels >= len(table))
        if not bad.any():
            bad = table[labels] < 0
        if bad.any():
            raise ValueError(
                f"labels {sorted(set(labels[bad].tolist()))} have no student (routing covers labels "
                f"0..{len(self.config.routing) - 1}; the null class has no unconditional branch)"
            )
        return table[labels]

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True, **kwargs):
        if class_labels is None:
            raise ValueError("RoutedUNet2DModel routes by class label: pass class_labels")
        n = sample.shape[0]
        labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1).long()
        if labels.numel() == 1 and n > 1:
            labels = labels.expand(n)
        route = self.route(labels)
        t = torch.as_tensor(timestep, device=sample.device)
        per_row = t.ndim > 0 and t.numel() == n and n > 1
        parts, order = [], []
        for k, student in enumerate(self.nets):
            idx = (route == k).nonzero().flatten()
            if idx.numel() == 0:  # a student without rows is not called: its weights get no gradient
                continue
            tk = t[idx] if per_row else t
            parts.append(student(sample[idx], tk, class_labels=labels[idx], **kwargs).sample)
            order.append(idx)
        out = torch.cat(parts)[torch.argsort(torch.cat(order))]
        if not return_dict:
            return (out,)
        return RoutedOutput(sample=out)
