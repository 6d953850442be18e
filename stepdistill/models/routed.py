"""K one-step students behind one router (Multi-Student Distillation): by class label or by prompt.

``RoutedUNet2DModel(students=[cfg_0, ..., cfg_{K-1}], routing=[k(label 0), ..., k(label C-1)])`` is a diffusers
``ModelMixin``: it saves as one ``config.json`` (the K students' UNet2DModel configs and the routing table) plus
one safetensors file (``nets.<k>.<param>``), and loads with ``RoutedUNet2DModel.from_pretrained``. It is
called like a class-conditional ``UNet2DModel``, ``net(sample, timestep, class_labels=labels).sample``: each row
goes through exactly one student, the one its label routes to (one network evaluation per row), and the rows
come back in their input order. Labels without a student (the null class of classifier-free guidance) are an
error: a routed model has no unconditional branch. The config repeats ``sample_size``, ``in_channels``,
``out_channels`` and ``num_class_embeds`` (C + 1: the null row, as the teacher's) so that
:class:`~stepdistill.pipelines.StepDistillClassPipeline` drives it as it drives one UNet2DModel.

``RoutedToyMLP(students=[cfg_0, ...], routing=[...])`` routes ``ToyMLP`` students (a class-conditional 2-D toy
teacher) the same way; it is called like a ToyMLP, ``net(x, timestep, cond)`` with the labels as ``cond``, and
exports as the ``unet`` of a :class:`~stepdistill.pipelines.StepDistillToyPipeline`. Called without labels (the toy
pipeline's plain call), row i takes label i mod C: the C classes in turn.

``RoutedUNet2DConditionModel(students=[cfg_0, ...], centres=[[...], ...])`` does the same for text-conditional
``UNet2DConditionModel`` students, routing by prompt: a row's prompt feature is the mean of its
``encoder_hidden_states`` over the tokens, scaled to unit length (:func:`prompt_features`), and the row goes to the
student whose centre (a k-means cluster centre of the training prompts' features, unit length, in the config) has
the largest dot product with it (the nearest on the sphere; ties: the lower index). Since the feature is computed
from the very embeddings the network is called with, a stock ``pipe(prompt=...)`` routes by itself, one student
evaluation per image; an empty or negative prompt routes like any other prompt.
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


def prompt_features(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, L, D) text embeddings -> (B, D) routing features: the token mean, unit length (float32)."""
    mean = encoder_hidden_states.float().mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _rows(value, idx: torch.Tensor, n: int):
    """The rows ``idx`` of a batch argument: tensors with ``n`` rows (and dicts of them) are indexed, the rest kept."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n and n > 1:
        return value[idx]
    if isinstance(value, dict):
        return {k: _rows(v, idx, n) for k, v in value.items()}
    return value


def _run_routed(nets, route: torch.Tensor, sample, timestep, kwargs: dict) -> torch.Tensor:
    """Each row through the student ``route`` names (students without rows are not called), rows in input order."""
    n = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device)
    per_row = t.ndim > 0 and t.numel() == n and n > 1
    parts, order = [], []
    for k, student in enumerate(nets):
        idx = (route == k).nonzero().flatten()
        if idx.numel() == 0:  # a student without rows is not called: its weights get no gradient
            continue
        tk = t[idx] if per_row else t
        kw = {key: _rows(v, idx, n) for key, v in kwargs.items()}
        out = student(sample[idx], tk, **kw)
        parts.append(out.sample if hasattr(out, "sample") else out)  # diffusers output or a plain tensor (ToyMLP)
        order.append(idx)
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


def _plain_config(config) -> dict:
    """A student's config as a JSON-able dict (no private ``_`` keys)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


class _Routed(ModelMixin, ConfigMixin):
    """What every routed model shares: building and checking the students, copying given ones in, the output."""

    def _build_students(self, student_class, students, same_keys) -> dict:
        """``self.nets`` from the student configs; the students must agree on ``same_keys``. Returns student 0's
        config."""
        students = list(students or [])
        if not students:
            raise ValueError(f"{type(self).__name__} needs at least one student config")
        self.nets = nn.ModuleList(student_class.from_config(dict(cfg)) for cfg in students)
        first = self.nets[0].config
        for k, s in enumerate(self.nets):
            for key in same_keys:
                if s.config.get(key) != first.get(key):
                    raise ValueError(
                        f"student {k}: {key}={s.config.get(key)} differs from student 0's {first.get(key)}"
                    )
        return first

    @classmethod
    def _copied(cls, students, **table):
        model = cls(students=[_plain_config(s.config) for s in students], **table)
        for mine, given in zip(model.nets, students):
            mine.load_state_dict(given.state_dict())
        return model.to(next(students[0].parameters()).device)

    @property
    def num_students(self) -> int:
        return len(self.nets)

    @staticmethod
    def _output(out: torch.Tensor, return_dict: bool):
        return RoutedOutput(sample=out) if return_dict else (out,)


class _LabelRouted(_Routed):
    """Routing by class label (UNet2DModel and ToyMLP students): ``routing[label]`` is the student of ``label``."""

    def _build_label_routed(self, student_class, students, routing, same_keys) -> dict:
        """The students and the routing table (a buffer of ``num_class_embeds`` rows; -1: no student, such as the
        null row of classifier-free guidance). Returns student 0's config."""
        routing = [int(k) for k in (routing or [])]
        first = self._build_students(student_class, students, same_keys)
        if not routing or min(routing) < 0 or max(routing) >= len(self.nets):
            raise ValueError(f"routing must map every label to a student in [0, {len(self.nets) - 1}], got {routing}")
        for k, s in enumerate(self.nets):
            if not s.config.num_class_embeds or s.config.num_class_embeds < len(routing):
                raise ValueError(
                    f"student {k}: num_class_embeds={s.config.num_class_embeds} cannot take {len(routing)} labels"
                )
        table = torch.full((int(first.num_class_embeds),), -1, dtype=torch.long)
        table[: len(routing)] = torch.tensor(routing)
        self.register_buffer("route_table", table, persistent=False)
        return first

    @classmethod
    def from_students(cls, students, routing):
        """The routed model holding (copies of) the weights of the given student networks."""
        return cls._copied(students, routing=list(routing))

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

    def _labels(self, class_labels, sample) -> torch.Tensor:
        """(B,) int64 labels on the sample's device; one label is repeated for every row."""
        n = sample.shape[0]
        labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1).long()
        return labels.expand(n) if labels.numel() == 1 and n > 1 else labels


class RoutedUNet2DModel(_LabelRouted):
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
        keys = ("sample_size", "in_channels", "out_channels")
        first = self._build_label_routed(UNet2DModel, students, routing, keys)
        # what a UNet2DModel caller reads from the config
        self.register_to_config(**{key: first[key] for key in (*keys, "num_class_embeds")})

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True, **kwargs):
        if class_labels is None:
            raise ValueError("RoutedUNet2DModel routes by class label: pass class_labels")
        labels = self._labels(class_labels, sample)
        out = _run_routed(self.nets, self.route(labels), sample, timestep, dict(kwargs, class_labels=labels))
        return self._output(out, return_dict)


class RoutedToyMLP(_LabelRouted):
    """K ``ToyMLP`` students (class-conditional 2-D toy teachers); called like a ToyMLP, ``net(x, timestep, cond)``
    with the labels as ``cond``, it returns the (B, dim) output tensor. ``cond=None`` (the toy pipeline's plain
    call, ``stepdistill sample``) gives row i the label i mod C: the C classes in turn, each through its student."""

    @register_to_config
    def __init__(
        self,
        students: list | None = None,
        routing: list | None = None,
        dim=None,  # the three below are derived from the students (stored for the toy pipeline), never read
        num_class_embeds=None,
        time_cond_proj_dim=None,
    ):
        from .toy import ToyMLP

        super().__init__()
        keys = ("dim", "time_cond_proj_dim")
        first = self._build_label_routed(ToyMLP, students, routing, keys)
        self.register_to_config(**{key: first.get(key) for key in (*keys, "num_class_embeds")})

    def forward(self, x, timestep, cond=None, timestep_cond=None) -> torch.Tensor:
        if cond is None:
            cond = torch.arange(x.shape[0], device=x.device) % len(self.config.routing)
        labels = self._labels(cond, x)
        kwargs = {"cond": labels} if timestep_cond is None else {"cond": labels, "timestep_cond": timestep_cond}
        return _run_routed(self.nets, self.route(labels), x, timestep, kwargs)


# what a StableDiffusion(XL)Pipeline reads from its unet's config
_PIPELINE_KEYS = ("sample_size", "in_channels", "out_channels", "time_cond_proj_dim", "cross_attention_dim")


class RoutedUNet2DConditionModel(_Routed):
    """K ``UNet2DConditionModel`` students routed by prompt: the nearest of ``centres`` (see the module doc)."""

    @register_to_config
    def __init__(
        self,
        students: list | None = None,
        centres: list | None = None,
        sample_size=None,  # the keys below are copied from student 0 (stored for pipelines), never read
        in_channels=None,
        out_channels=None,
        time_cond_proj_dim=None,
        cross_attention_dim=None,
    ):
        from diffusers import UNet2DConditionModel

        super().__init__()
        first = self._build_students(
            UNet2DConditionModel, students, ("sample_size", "in_channels", "out_channels", "cross_attention_dim")
        )
        centres = torch.as_tensor(centres if centres is not None else [], dtype=torch.float32)
        if centres.ndim != 2 or len(centres) != len(self.nets):
            raise ValueError(
                f"centres must be one vector per student ({len(self.nets)}), got shape {tuple(centres.shape)}"
            )
        width = first.cross_attention_dim
        if isinstance(width, int) and centres.shape[1] != width:
            raise ValueError(f"centres have {centres.shape[1]} features, the students' text width is {width}")
        self.register_buffer("centre_table", centres / centres.norm(dim=-1, keepdim=True), persistent=False)
        self.register_to_config(**{key: first.get(key) for key in _PIPELINE_KEYS})

    @classmethod
    def from_students(cls, students, centres) -> RoutedUNet2DConditionModel:
        """The routed model holding (copies of) the weights of the given UNet2DConditionModel instances."""
        return cls._copied(students, centres=torch.as_tensor(centres).float().tolist())

    @property
    def add_embedding(self):  # StableDiffusionXLPipeline reads unet.add_embedding.linear_1.in_features
        return self.nets[0].add_embedding

    def route(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The student index of each row: the centre with the largest dot product with its prompt feature."""
        feats = prompt_features(encoder_hidden_states)
        return (feats @ self.centre_table.to(feats.device).T).argmax(dim=-1)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict: bool = True, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("RoutedUNet2DConditionModel routes by prompt: pass encoder_hidden_states")
        route = self.route(encoder_hidden_states)
        kwargs = dict(kwargs, encoder_hidden_states=encoder_hidden_states)
        out = _run_routed(self.nets, route, sample, timestep, kwargs)
        return self._output(out, return_dict)
