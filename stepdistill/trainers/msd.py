"""Multi-Student Distillation (MSD; Song et al. 2024, arXiv:2410.23274): K one-step students over a partition of
the class labels or of the prompts, with DMD2's losses; inference routes each label or prompt to its student.

There is no official code; the choices made here (the paper's partition rule and per-student recipe are
marked unverified in shared/reference/seed_methods_2.md section 3):

* Partition (``partition`` / ``num_students``): explicit label lists (each label 0..C-1 in exactly one list),
  else the balanced automatic split into ``num_students`` contiguous blocks of the sorted labels whose sizes
  differ by at most one (K = 2 on ten digits: 0-4 / 5-9; K = 5: {0,1}, {2,3}, ...).
* Prompt partition (text-conditional UNet2DConditionModel teachers: SD1.5 / SD2.1; SDXL untested): k-means with
  ``num_students`` clusters on the teacher's text embeddings of the training prompts (the dataset's distinct
  captions, at most ``kmeans_prompts`` of them, a seeded random subset beyond). A prompt's feature is the token
  mean of the teacher text encoder's ``encoder_hidden_states``, unit length (cosine k-means: k-means++ seeding,
  ``kmeans_iters`` Lloyd iterations, an empty cluster re-seeded with the worst-served prompt); the K unit
  centres are the routing table. Every process computes the same centres (same prompts, same seed). Explicit
  prompt lists are not supported.
* Training: all K students train in one run, each on its own labels, by routing: the generator is a
  :class:`~stepdistill.models.routed.RoutedUNet2DModel` (by label; ``RoutedToyMLP`` for a class-conditional toy
  teacher's ToyMLP; ``RoutedUNet2DConditionModel`` by prompt: the nearest centre) that sends every row of a batch
  (labels drawn from the whole dataset) through the one student its label routes to. The loss of each student is then
  exactly DMD2's (distribution matching against the teacher, optional GAN, optional DMD v1 regression: the
  :class:`~stepdistill.trainers.dmd2.DMD2Trainer` code, unchanged) restricted to its rows; a student with no row in a
  batch is not called, gets no gradient and is not stepped (AdamW skips parameters without a gradient: no weight
  decay, no momentum step). Each student sees about B |S_k| / C rows per step, as K separate runs of batch B |S_k| / C
  would, and the students share the generator update schedule (``dfake_gen_update_ratio``). Object API: ``generator=``
  (a class-conditional UNet2DModel or ToyMLP) is what every student starts as instead of the teacher's network (so a
  callable teacher, such as the exact mixture of stepdistill.models.analytic, can be distilled); ``fake_score=``
  likewise for the fake score(s).
* Fake score (``fake_score_per_student``): one fake score shared by all students (default; one teacher-size
  copy, conditioned on the label, the paper's cheaper variant) or one per student (K copies, each fitted only
  to its student's samples, routed like the generator; K times the fake-score memory). Per-student fake
  scores cannot take the null label (no fake CFG, no ``fake_cond_dropout``) nor the GAN head (its bottleneck
  belongs to one network).
* Smaller students (``student_block_out_channels`` / ``student_layers_per_block``): each student is a
  UNet2DModel (UNet2DConditionModel) of the teacher's config with these widths, randomly initialised and pre-trained for
  ``student_pretrain_steps`` AdamW steps by regression (mean squared error) of student(z) onto teacher samples
  from z (DMD v1's pairs: ``regression_pairs`` pairs made with ``regression_steps`` teacher DDIM steps), the
  paper's regression initialisation; full-width students start as copies of the teacher.

DDP (``accelerate launch --multi_gpu``): nothing is sharded but the batch. Every process holds the teacher, all
K students, the fake score(s), the GAN head and their AdamW states in full (DDP replicates them); the global batch
is split into per-process rows, each process routes its own rows to their students, and the gradients are
averaged over the processes, so every process takes the step a 1-process run of the global batch takes. A
student with rows on some processes only gets the average (the others contribute zeros, as rows of other labels
contribute nothing in one process); a student with no row on any process keeps its gradient at None (the trainer
sets ``find_unused_parameters``, and DDP leaves a globally unused parameter's gradient alone), so AdamW does not
step it. Tested on 2 CPU processes (tests/test_msd.py: parity with one process; an idle student unchanged bit for
bit under weight decay). FSDP would shard the routed model's flat parameters across processes; not tried.

Export: one pipeline folder (StepDistillClassPipeline) whose ``unet/`` is the RoutedUNet2DModel (the K
students' configs and the routing table in its config.json, all weights in one safetensors file);
``pipe(class_labels=[...])`` routes each row to its student, one network evaluation per image. A text teacher's
export is a StepDistillSDPipeline whose ``unet/`` is the RoutedUNet2DConditionModel (the centres in its
config.json): a plain ``pipe(prompt=...)`` routes each prompt by its embeddings, one network evaluation per image.
A toy teacher's export is a StepDistillToyPipeline whose ``unet/`` is the RoutedToyMLP: ``pipe(class_labels=[...])``.

Example::

    stepdistill train --config recipes/msd/digits.yaml num_students=5
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ConfigError, ObjectError
from ..losses import denoising_loss
from ..models import FakeScore, Generator
from ..models.conditioning import ClassConditioner, TextConditioner
from ..models.denoiser import _unwrap
from ..models.routed import RoutedToyMLP, RoutedUNet2DConditionModel, RoutedUNet2DModel
from ..models.toy import ToyMLP
from .dmd2 import DMD2Config, DMD2Trainer


@dataclass
class MSDConfig(DMD2Config):
    """MSD settings; every DMD2 key (:class:`~stepdistill.trainers.dmd2.DMD2Config`) applies to each student.

    > Students
    num_students (`int`, `2`): K, the number of one-step students.
    partition (`list[list[int]]`, `[]`): the labels of each student (every class label in exactly one list);
        empty: K contiguous blocks of the sorted labels, sizes differing by at most one.
    fake_score_per_student (`bool`, `false`): one fake score per student (K copies of the teacher) instead of
        one shared fake score.
    > Smaller students
    student_block_out_channels (`list[int]`, `[]`: the teacher's architecture, initialised from its weights):
        the widths of each student's UNet2DModel (the teacher's config otherwise); such students start random.
    student_layers_per_block (`int`, `0`: the teacher's).
    student_pretrain_steps (`int`, `0`): regression steps of each smaller student onto teacher samples before
        distillation (``regression_pairs`` / ``regression_steps`` / ``regression_batch`` pairs).
    student_pretrain_lr (`float`, `0.0`: the generator's learning rate): the pre-training AdamW's rate.
    > Prompt partition (text-conditional teachers)
    kmeans_prompts (`int`, `10000`): at most this many distinct training prompts are clustered.
    kmeans_iters (`int`, `50`): Lloyd iterations of the cosine k-means.
    """

    num_students: int = 2
    partition: list = field(default_factory=list)
    fake_score_per_student: bool = False
    student_block_out_channels: list[int] = field(default_factory=list)
    student_layers_per_block: int = 0
    student_pretrain_steps: int = 0
    student_pretrain_lr: float = 0.0
    kmeans_prompts: int = 10000
    kmeans_iters: int = 50

    def check(self):
        super().check()
        if self.num_students < 1:
            raise ConfigError(f"num_students must be >= 1, got {self.num_students}")
        if self.partition:
            if not all(isinstance(p, list) and p and all(isinstance(v, int) for v in p) for p in self.partition):
                raise ConfigError(f"partition must be a list of non-empty lists of class labels, got {self.partition}")
            if len(self.partition) != self.num_students:
                raise ConfigError(
                    f"partition has {len(self.partition)} lists but num_students is {self.num_students}; "
                    "set num_students to the number of lists"
                )
        if self.generator_mode != "full":
            raise ConfigError("MSD trains K separate students: generator_mode must be 'full'")
        if self.fake_score_per_student:
            if self.fake_score_mode != "full":
                raise ConfigError("fake_score_per_student=true needs fake_score_mode: full")
            for key, bad in (
                ("fake_guidance_scale", self.fake_guidance_scale != 1.0),
                ("fake_cond_dropout", self.fake_cond_dropout > 0),
                ("gan_generator_weight", self.gan_generator_weight > 0),
                ("init_fake_score", bool(self.init_fake_score)),
            ):
                if bad:
                    raise ConfigError(
                        f"{key}={getattr(self, key)!r} does not work with fake_score_per_student=true (routed fake "
                        "scores have no null label, no single bottleneck and a checkpoint layout of their own); "
                        "leave it at its default or share the fake score"
                    )
        if self.student_pretrain_steps < 0:
            raise ConfigError(f"student_pretrain_steps must be >= 0, got {self.student_pretrain_steps}")
        for key in ("kmeans_prompts", "kmeans_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.student_pretrain_lr < 0:
            raise ConfigError(f"student_pretrain_lr must be >= 0, got {self.student_pretrain_lr}")
        if self.student_pretrain_steps and not self.student_block_out_channels:
            raise ConfigError(
                "student_pretrain_steps > 0 pre-trains smaller students; set student_block_out_channels (full-width "
                "students start as the teacher)"
            )


def balanced_partition(num_classes: int, k: int) -> list[list[int]]:
    """K contiguous blocks of 0..num_classes-1, sizes differing by at most one (the larger blocks first)."""
    if not 1 <= k <= num_classes:
        raise ConfigError(f"num_students={k} must be between 1 and the number of class labels ({num_classes})")
    size, extra = divmod(num_classes, k)
    out, start = [], 0
    for i in range(k):
        n = size + (1 if i < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def routing_table(partition: list[list[int]], num_classes: int) -> list[int]:
    """label -> student index; a ConfigError unless every label 0..num_classes-1 is in exactly one list."""
    route = [-1] * num_classes
    for k, labels in enumerate(partition):
        for c in labels:
            if not 0 <= c < num_classes:
                raise ConfigError(f"partition: label {c} is not a class label of the teacher (0..{num_classes - 1})")
            if route[c] >= 0:
                raise ConfigError(f"partition: label {c} is in lists {route[c]} and {k}; give each label one student")
            route[c] = k
    missing = [c for c, r in enumerate(route) if r < 0]
    if missing:
        raise ConfigError(f"partition: labels {missing} have no student; every class label needs one")
    return route


def kmeans_centres(features: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Cosine k-means of unit ``features`` (N, D): k-means++ seeding (seeded), ``iters`` Lloyd iterations; an
    empty cluster takes the point least similar to its centre. Returns (k, D) unit centres."""
    feats = features.float()
    n = len(feats)
    g = torch.Generator().manual_seed(seed)
    centres = [feats[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        dist = (1 - feats @ torch.stack(centres).T).min(dim=1).values.clamp_min(0)
        if float(dist.sum()) <= 0:
            raise ConfigError(f"num_students={k}: the prompts have fewer than {k} distinct text embeddings")
        centres.append(feats[int(torch.multinomial(dist, 1, generator=g))])
    c = torch.stack(centres)
    for _ in range(iters):
        sim = feats @ c.T
        assign = sim.argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, feats)
        for j in range(k):
            if not (assign == j).any():  # re-seed with the worst-served point
                new[j] = feats[int(sim.max(dim=1).values.argmin())]
        new = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if torch.equal(new, c):
            break
        c = new
    return c


class MSDTrainer(DMD2Trainer):
    """DMD2 with K routed one-step students (see the module doc for the choices)."""

    config_class = MSDConfig
    method_name = "MSD"

    def __init__(self, config, accelerator=None, **objects):
        for name in ("generator", "fake_score"):  # the network every student (per-student fake score) copies
            given = objects.get(name)
            if given is not None and type(_unwrap(given)).__name__ not in ("UNet2DModel", "ToyMLP"):
                raise ObjectError(
                    f"{name}: MSD's students (and per-student fake scores) start as copies of one UNet2DModel or "
                    f"ToyMLP, the given one or the teacher's; got {type(_unwrap(given)).__name__}"
                )
        super().__init__(config, accelerator, **objects)

    # ---------------------------------------------------------------- partition
    def by_prompt(self) -> bool:
        """True for a text-conditional teacher (k-means prompt partition), False for class labels."""
        if isinstance(self.conditioner, ClassConditioner):
            return False
        if isinstance(self.conditioner, TextConditioner):
            if self.config.partition:
                raise ConfigError("partition: explicit lists are class labels; a text teacher's prompts are k-means")
            return True
        raise ConfigError(
            "MSD partitions class labels or prompts: the teacher must be class-conditional (UNet2DModel) or "
            "text-conditional (UNet2DConditionModel); unconditional teachers are not supported"
        )

    def partition(self) -> list[list[int]]:
        """The labels of each student (explicit ``partition``, else the balanced contiguous split)."""
        if self.by_prompt():
            raise ConfigError("a text teacher's students are routed by prompt (centres()), not by label lists")
        c = self.config
        n = self.conditioner.num_classes
        parts = [list(p) for p in c.partition] if c.partition else balanced_partition(n, c.num_students)
        routing_table(parts, n)
        return parts

    def routing(self) -> list[int]:
        return routing_table(self.partition(), self.conditioner.num_classes)

    def centres(self) -> torch.Tensor:
        """The K unit k-means centres of the training prompts' features (computed once; see the module doc)."""
        if getattr(self, "_centres", None) is not None:
            return self._centres
        from ..models.routed import prompt_features

        c = self.config
        prompts = list(dict.fromkeys(self.dataset.captions or ()))
        if len(prompts) < c.num_students:
            raise ConfigError(
                f"num_students={c.num_students}: the dataset has {len(prompts)} distinct prompts to cluster "
                "(streamed datasets list none); give at least one per student"
            )
        if len(prompts) > c.kmeans_prompts:
            keep = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(c.seed + 13))
            prompts = [prompts[int(i)] for i in keep[: c.kmeans_prompts]]
        feats = []
        for s in range(0, len(prompts), 256):  # not through the conditioner's cache
            rows = self.conditioner._encode_rows(prompts[s : s + 256])
            feats.append(prompt_features(rows["ehs"]).cpu())
        self._centres = kmeans_centres(torch.cat(feats), c.num_students, c.kmeans_iters, c.seed)
        sizes = torch.bincount((torch.cat(feats) @ self._centres.T).argmax(1), minlength=c.num_students)
        if self.accelerator.is_main_process:
            print(f"MSD: {len(prompts)} prompts in {c.num_students} k-means clusters of {sizes.tolist()} prompts")
        return self._centres

    # ---------------------------------------------------------------- students
    def _teacher_unet(self):
        """The teacher's network, checked to be one MSD routes: by prompt a UNet2DConditionModel, by class label a
        UNet2DModel or a (class-conditional) ToyMLP."""
        from diffusers import UNet2DConditionModel, UNet2DModel

        net = _unwrap(self.teacher.net)
        want = (UNet2DConditionModel,) if self.by_prompt() else (UNet2DModel, ToyMLP)
        if type(net) not in want:
            raise ConfigError(
                f"MSD's students are {' or '.join(w.__name__ for w in want)}s routed by "
                f"{'prompt' if self.by_prompt() else 'class label'}; the teacher's network is {type(net).__name__}"
            )
        return net

    def _routed(self, nets):
        if self.by_prompt():
            return RoutedUNet2DConditionModel.from_students(nets, self.centres())
        routed = RoutedToyMLP if isinstance(nets[0], ToyMLP) else RoutedUNet2DModel
        return routed.from_students(nets, self.routing())

    def _student_nets(self):
        c = self.config
        net = _unwrap(self.generator_object) if self.generator_object is not None else self._teacher_unet()
        if not c.student_block_out_channels:
            return [net] * c.num_students  # copied by the routed model's from_students
        if isinstance(net, ToyMLP):
            raise ConfigError(
                "student_block_out_channels: smaller students are narrower UNets; a ToyMLP teacher's students are "
                "copies of it (leave the key empty)"
            )
        cfg = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
        widths = list(c.student_block_out_channels)
        if len(widths) != len(cfg["block_out_channels"]):
            raise ConfigError(
                f"student_block_out_channels={widths}: the teacher's UNet has {len(cfg['block_out_channels'])} "
                "levels; give one width per level"
            )
        cfg["block_out_channels"] = widths
        groups = cfg.get("norm_num_groups") or 32
        if any(w % groups for w in widths):
            raise ConfigError(f"student_block_out_channels={widths}: each width must be a multiple of {groups}")
        if c.student_layers_per_block:
            cfg["layers_per_block"] = c.student_layers_per_block
        nets = []
        for k in range(c.num_students):
            torch.manual_seed(c.seed * 1000 + k)
            nets.append(type(net).from_config(cfg))
        return nets

    def make_generator(self, timesteps, *, sampler: str = "consistency", w_embedding_dim: int = 0) -> Generator:
        """The K students behind one routing table (overrides the single copy of the teacher)."""
        routed = self._routed(self._student_nets())
        gen = self.wrap_object(Generator, routed, timesteps=timesteps, sampler=sampler)
        return self.apply_student_prediction(gen, self.student_prediction(timesteps))  # as one DMD2 student

    def build(self):
        super().build()  # teacher, routed generator, a shared fake score, the GAN head
        c = self.config
        if c.fake_score_per_student:
            given = self.fake_score_object
            net = _unwrap(given) if given is not None else self._teacher_unet()
            routed = self._routed([net] * c.num_students)
            self.fake = self.wrap_object(FakeScore, routed)

    def on_prepared(self):
        super().on_prepared()
        if self.config.student_pretrain_steps and not self.config.resume:  # a resume loads trained students
            self.pretrain_students()

    @torch.enable_grad()
    def pretrain_students(self) -> list[float]:
        """Regression of the (smaller) students onto teacher samples: student(z) ~ teacher's sample from z, on DMD
        v1's pairs; its own AdamW (learning_rate), before distillation. Returns the losses."""
        c = self.config
        noise, images, batch = self._make_regression_pairs()
        params = self.generator_params()
        opt = torch.optim.AdamW(params, lr=c.student_pretrain_lr or c.generator_lr or c.learning_rate, weight_decay=0.0)
        g = torch.Generator().manual_seed(c.seed + 11)
        losses = []
        for _ in range(c.student_pretrain_steps):
            idx = torch.randint(len(noise), (min(c.regression_batch, len(noise)),), generator=g)
            cond = self._cond_batch(
                {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in batch.items() if k != "_n"}
            )
            x = self.generator(self.generator.initial_noise(noise[idx]), cond, self.gen_times[0].expand(len(idx)))
            loss = denoising_loss(x, images[idx])
            opt.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        self.pretrain_losses = losses
        return losses

    def student_parameter_counts(self) -> list[int]:
        net = _unwrap(self.generator.net)
        return [sum(p.numel() for p in s.parameters()) for s in net.nets]


# --------------------------------------------------------------------------------------------------------
# export: StepDistillClassPipeline around the RoutedUNet2DModel
# --------------------------------------------------------------------------------------------------------

_ROUTED_LOOP = """import json
import os

import torch
from diffusers import UNet2DModel, {scheduler_class}
from safetensors.torch import load_file

folder = "{folder}"
with open(os.path.join(folder, "unet", "config.json")) as f:
    config = json.load(f)  # "students": K UNet2DModel configs, "routing": the student of each class label
weights = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
students = []
for k, student_config in enumerate(config["students"]):
    student = UNet2DModel.from_config(student_config).eval()
    prefix = f"nets.{{k}}."
    student.load_state_dict({{n[len(prefix):]: w for n, w in weights.items() if n.startswith(prefix)}})
    students.append(student)
route = torch.tensor(config["routing"])
scheduler = {scheduler_class}.from_pretrained(folder, subfolder="scheduler")
scheduler.set_timesteps({set_timesteps})
labels = torch.tensor({labels})
generator = torch.Generator().manual_seed(0)
size = config["sample_size"]
x = torch.randn(len(labels), config["in_channels"], size, size, generator=generator)
with torch.no_grad():
    for t in scheduler.timesteps:
        out = torch.empty_like(x)
        for k, student in enumerate(students):  # each row through the student of its label
            rows = route[labels] == k
            if rows.any():
                out[rows] = student(x[rows], t, class_labels=labels[rows]).sample
        x = scheduler.step(out, t, x, generator=generator).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)  # (N, C, H, W) in [0, 1]"""


def routed_pipeline_card(net, scheduler, timesteps, path, kind) -> dict:
    """StepDistillClassPipeline around MSD's RoutedUNet2DModel, with a stock-diffusers loop over the K
    UNet2DModel students (the export's model card; :func:`stepdistill.export.export_generator`)."""
    from ..export import _LABELS, _plain, _set_timesteps_arg
    from ..pipelines import StepDistillClassPipeline

    pipe = StepDistillClassPipeline(unet=net, scheduler=scheduler, trained_timesteps=timesteps)
    parts = "; ".join(f"student {k}: labels {p}" for k, p in enumerate(net.partition()))
    call = f'pipe(class_labels={_LABELS}, generator=torch.Generator().manual_seed(0), output_type="pt")'
    plain = _plain(path, f"images = {call}.images  # (N, C, H, W) in [0, 1]: the same images as the loop")
    loop = _ROUTED_LOOP.format(
        folder=path,
        scheduler_class=type(scheduler).__name__,
        set_timesteps=_set_timesteps_arg(kind, timesteps),
        labels=_LABELS,
    )
    note = (
        f"a loop over the {net.num_students} `UNet2DModel` students of this multi-student (MSD) generator and the "
        f"scheduler. Each class label has one student ({parts}); `unet/config.json` holds the students' configs and "
        "this routing table, `unet/` one safetensors file with student k's weights under `nets.k.`. Each image "
        "costs one network evaluation per step (of its own student). The pipeline's `unet` is stepdistill's "
        "`RoutedUNet2DModel`, which does the same routing."
    )
    return {
        "pipe": pipe,
        "plain_call": plain,
        "pipeline_tag": "unconditional-image-generation",
        "stock_call": loop,
        "stock_note": note,
    }


def routed_text_card(teacher_path, net, scheduler, timesteps, path, kind, w) -> dict:
    """StepDistillSDPipeline around MSD's RoutedUNet2DConditionModel (routing by prompt): stepdistill required."""
    from ..export import _text_pipeline

    card = _text_pipeline(teacher_path, net, scheduler, timesteps, path, kind, w)
    card.pop("stock_call")
    card.pop("stock_note")
    card["needs_note"] = (
        f"The `unet` is stepdistill's `RoutedUNet2DConditionModel`: {net.num_students} `UNet2DConditionModel` "
        "students of a multi-student (MSD) generator and a routing table of k-means centres of the training "
        "prompts' text embeddings (`unet/config.json`: the students' configs and `centres`; one safetensors file "
        "with student k's weights under `nets.k.`). Each prompt goes to the student whose centre is nearest to its "
        "feature, the token mean of the text encoder's output scaled to unit length (the largest dot product), "
        "so the plain call routes by itself; each image costs one evaluation of its own student per step."
    )
    return card


def routed_toy_card(net, scheduler, timesteps, path, kind, w=None) -> dict:
    """StepDistillToyPipeline around MSD's RoutedToyMLP (K ToyMLP students of a class-conditional toy teacher)."""
    from ..export import _plain, _toy_pipeline

    card = _toy_pipeline(net, scheduler, timesteps, path, kind, w)
    parts = "; ".join(f"student {k}: labels {p}" for k, p in enumerate(net.partition()))
    call = (
        "points = pipe(class_labels=[0, 1, 2, 3, 4, 5, 6, 7], "
        "generator=torch.Generator().manual_seed(0)).samples  # (N, 2)"
    )
    card["plain_call"] = _plain(path, call)
    card["needs_note"] = (
        f"A toy 2-D multi-student (MSD) generator: its network is stepdistill's `RoutedToyMLP`, {net.num_students} "
        f"`ToyMLP` students and a routing table ({parts}); `unet/config.json` holds the students' configs and the "
        "table, `unet/` one safetensors file with student k's weights under `nets.k.`. `class_labels` picks each "
        "point's class, and its student draws it (one network evaluation per point and step); without them point "
        "i takes label i mod the number of classes. No stock diffusers class loads it. "
        "`stepdistill sample --model <this folder>` draws a scatter plot of all classes."
    )
    return card
