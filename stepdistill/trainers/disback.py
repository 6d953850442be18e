"""DisBack: distribution backtracking (Zhang et al., ICLR 2025, arXiv 2408.15991) on DMD2 / SIM / VSD.

Score distillation compares the generator's score with the teacher's from the first step, although the initial
generator's distribution is far from the teacher's. DisBack first records a path between the two, then walks the
generator back along it:

* **stage 1, degradation recording** (``degradation_steps`` iterations): the generator is frozen (G0, the initial
  generator: the teacher copy, or ``init_generator``); the fake score, a copy of the teacher, is fitted to G0's
  samples by the base method's own fake-score loss (denoising score matching; plus the discriminator when the GAN
  is on), and a snapshot of it is written every ``degradation_steps / degradation_nodes`` iterations (rounded down;
  the last one at the end of stage 1) to
  ``<output_dir>/degradation/node_0001.safetensors`` ... ``node_N``: the path from the teacher (node 0) to the
  score of G0's distribution (node N, also where the fake score is when stage 2 starts);
* **stage 2, backtracking** (the rest of ``max_steps``): the base method's training (``base_method``: dmd2, sim
  or vsd; its phase rule, losses and keys) with the real score of its loss replaced by node N-1 first, then every
  ``backtrack_every`` iterations one node nearer the teacher (N-2, ..., 1), and the teacher itself after node 1
  until the end. The swap is :meth:`~stepdistill.trainers.student.StudentTrainer.swap_real_score`: strict load of
  the node's weights into one frozen copy of the fake score's network, in the teacher's ``teacher_dtype`` /
  ``teacher_offload`` state; checkpoints record the node in use (path and sha256) for an exact resume.

``degradation_dir`` reuses the nodes of an earlier run (``degradation_steps: 0``): the fake score starts from its
last node and stage 2 starts at step 0. Generator updates: stage 2's only, so a DisBack run of ``max_steps`` makes
as many generator updates as the base method run for ``max_steps - degradation_steps``.

What the official code (SYZhang0805/DisBack, SDXL only, a DMD2 fork) gets wrong and this does not copy: its swap
loads prefixed keys non-strictly (so it loads nothing); its switch test compares a node number with the step (so it
backtracks only the last ~10% of the path). Here the load is strict (prefixes stripped) and the schedule explicit.

Settings taken from the official SDXL scripts [code]: 25,000 degradation iterations, a node every 100 (250 nodes),
a switch every 1,000 iterations, the DMD2 base (GAN on, ratio 5). **Unverified**: the paper's node counts and
intervals for its CIFAR-10 / FFHQ / ImageNet (EDM) experiments and their base loss (the public EDM code has no
backtracking); the LoRA fake-score variant is not in the paper and not offered (``fake_score_mode: full``).

Example::

    stepdistill train --config recipes/disback/digits.yaml
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from .. import io
from ..config import ConfigError
from ..models.denoiser import _unwrap
from ..models.frozen import match_keys, read_weights
from .dmd2 import DMD2Trainer
from .sim import SIMConfig, SIMTrainer
from .student import TEACHER_DTYPES, _AnchorRamp
from .vsd import VSDTrainer

NODE_DIR = "degradation"
BASE_METHODS = ("dmd2", "sim", "vsd")


def node_name(i: int) -> str:
    return f"node_{i:04d}.safetensors"


@dataclass
class DisBackConfig(SIMConfig):
    """DisBack settings on top of the base method's (DMD2's keys, and SIM's for ``base_method: sim``; a VSD base
    keeps these classes' defaults, so its recipe sets VSD's own values: see recipes/disback/).

    base_method (`str`, `"dmd2"`): the score-distillation loss of stage 2: "dmd2", "sim" (SIM / SiD) or "vsd".
    dfake_gen_update_ratio (`int`, `5`): as the base method's (DMD2: 5; set 1 for SIM / VSD).
    degradation_steps (`int`, `200`): stage-1 iterations (fake score only; the official SDXL script: 25000).
    degradation_nodes (`int`, `10`): snapshots written in stage 1, evenly (official SDXL: one every 100: 250).
    backtrack_every (`int`, `30`): stage-2 iterations per node (official SDXL: 1000).
    degradation_dir (`str`, `""`): the ``degradation`` folder of an earlier run (its node_0001 ... node_N) to
        backtrack along instead of recording one (needs ``degradation_steps: 0``; the same teacher and G0).
    node_dtype (`str`, `"fp32"`): the dtype the snapshots are written in ("fp32", "bf16", "fp16"); an SDXL node
        is 10 GB in fp32.
    """

    base_method: str = "dmd2"
    dfake_gen_update_ratio: int = 5
    degradation_steps: int = 200
    degradation_nodes: int = 10
    backtrack_every: int = 30
    degradation_dir: str = ""
    node_dtype: str = "fp32"

    def check(self):
        super().check()
        self.check_disback()

    def check_disback(self):
        """DisBack's own keys (also run by the trainer's ``validate``: object-API configs skip ``check``)."""
        if self.base_method not in BASE_METHODS:
            raise ConfigError(f"base_method must be one of {list(BASE_METHODS)}, got {self.base_method!r}")
        if self.fake_score_mode != "full":
            raise ConfigError(
                "DisBack snapshots the fake score as full networks: set fake_score_mode: full (the LoRA variant is "
                "not in the paper)"
            )
        if self.node_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"node_dtype must be one of {sorted(TEACHER_DTYPES)}, got {self.node_dtype!r}")
        if self.backtrack_every < 1:
            raise ConfigError(f"backtrack_every must be >= 1, got {self.backtrack_every}")
        if self.degradation_dir:
            if self.degradation_steps != 0:
                raise ConfigError(
                    f"degradation_dir={self.degradation_dir!r} reuses recorded nodes: set degradation_steps: 0 (got "
                    f"{self.degradation_steps})"
                )
            if not os.path.isdir(self.degradation_dir):
                raise ConfigError(f"degradation_dir: folder {self.degradation_dir!r} does not exist")
            recorded_nodes(self.degradation_dir)
        else:
            if self.degradation_nodes < 1:
                raise ConfigError(f"degradation_nodes must be >= 1, got {self.degradation_nodes}")
            if self.degradation_steps < self.degradation_nodes:
                raise ConfigError(
                    f"degradation_steps={self.degradation_steps} must be at least degradation_nodes="
                    f"{self.degradation_nodes} (one snapshot every degradation_steps // degradation_nodes iterations)"
                )
        if self.degradation_steps >= self.max_steps:
            raise ConfigError(
                f"degradation_steps={self.degradation_steps} leaves no backtracking: max_steps={self.max_steps} "
                "counts both stages"
            )
        if self.base_method == "vsd" and self.fake_guidance_scale != 1.0:
            raise ConfigError("base_method: vsd reads its fake score with real_guidance_scale; fake_guidance_scale: 1")


def recorded_nodes(folder: str) -> list[str]:
    """The node files of a degradation folder, node_0001 ... node_N in order (a ConfigError when none or a gap)."""
    files = sorted(glob.glob(os.path.join(folder, "node_*.safetensors")))
    want = [os.path.join(folder, node_name(i)) for i in range(1, len(files) + 1)]
    if not files or files != want:
        raise ConfigError(
            f"degradation_dir: {folder!r} holds no complete node_0001 ... node_N.safetensors sequence (found "
            f"{len(files)} node files)"
        )
    return files


class _ShiftedRamp(_AnchorRamp):
    """The generator's teacher-term ramp counted from the first generator update (stage 2), not from step 0."""

    def __init__(self, trainer, steps: int, start: int):
        super().__init__(trainer, steps)
        self.start = start

    def __call__(self) -> float:
        trainer = self.trainer()
        step = trainer.global_step - self.start if trainer is not None else self.steps
        return max(0.0, 1.0 - max(step, 0) / self.steps) if self.steps > 0 else 0.0


class DisBackTrainer(DMD2Trainer):
    """Degradation recording, then backtracking on the ``base_method``'s loss (see the module docstring).
    ``DisBackTrainer(config)`` is an instance of the variant for ``config.base_method`` (DMD2, SIM or VSD)."""

    config_class = DisBackConfig
    method_name = "DisBack"

    def __new__(cls, config=None, *args, **kwargs):
        if cls is DisBackTrainer:
            cls = _VARIANTS.get(getattr(config, "base_method", "dmd2"), cls)
        return super().__new__(cls)

    # ---------------------------------------------------------------- setup
    def validate(self):
        self.config.check_disback()
        super().validate()

    def build(self):
        super().build()
        c = self.config
        n, s1 = c.degradation_nodes, c.degradation_steps
        self.node_steps = {} if c.degradation_dir else {i * s1 // n: i for i in range(1, n + 1)}  # node N at s1
        if c.degradation_dir:
            self.nodes = recorded_nodes(c.degradation_dir)
            sd = read_weights(self.nodes[-1], "degradation_dir")
            net = _unwrap(self.fake.net)
            with torch.no_grad():
                net.load_state_dict(match_keys(sd, net.state_dict(), "degradation_dir", self.nodes[-1]))
        else:
            folder = os.path.abspath(os.path.join(c.output_dir, NODE_DIR))
            self.nodes = [os.path.join(folder, node_name(i)) for i in range(1, c.degradation_nodes + 1)]
        ramp = self.generator.anchor_weight
        if isinstance(ramp, _AnchorRamp) and c.degradation_steps:  # the generator is frozen in stage 1
            self.generator.anchor_weight = _ShiftedRamp(self, ramp.steps, c.degradation_steps)
        self.current_node = 0  # the node the real score is (0: the teacher)

    def prediction_warmup_limit(self):
        c = self.config
        return c.max_steps - c.degradation_steps

    def setup(self):
        super().setup()
        self._follow_schedule(self.global_step)

    # ---------------------------------------------------------------- the schedule
    def node_at(self, step: int) -> int:
        """The node whose score is the real one at ``step`` (0: the teacher): none but the teacher in stage 1,
        then N-1, N-2, ..., 1, each for ``backtrack_every`` iterations, then the teacher."""
        c = self.config
        if step < c.degradation_steps:
            return 0
        return max(len(self.nodes) - 1 - (step - c.degradation_steps) // c.backtrack_every, 0)

    def _follow_schedule(self, step: int) -> None:
        k = self.node_at(step)
        if k == self.current_node:
            return
        self.swap_real_score(self.nodes[k - 1] if k else None, like="fake", key="degradation node")
        self.current_node = k

    def phase(self, step):
        c = self.config
        if step < c.degradation_steps:  # stage 1: the fake score (and the head) fit G0
            return [("fake_score", "head") if self.use_gan else ("fake_score",)]
        return super().phase(step - c.degradation_steps)

    def on_step_end(self, step):
        super().on_step_end(step)
        c = self.config
        done = step + 1
        if done in self.node_steps:
            self._save_node(self.node_steps[done])
            if done == c.degradation_steps:
                self.accelerator.wait_for_everyone()  # every process reads the nodes from here on
        self._follow_schedule(done)

    def _save_node(self, i: int) -> None:
        if not self.accelerator.is_main_process:
            return
        dtype = TEACHER_DTYPES[self.config.node_dtype]
        sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
              for k, v in self._inner("fake_score").state_dict().items()}
        os.makedirs(os.path.dirname(self.nodes[i - 1]), exist_ok=True)
        io.save_safetensors(sd, self.nodes[i - 1])  # temp file, fsync, rename

    # ---------------------------------------------------------------- checkpoints
    def extra_state(self):
        tensors, meta = super().extra_state()
        return tensors, {**meta, "disback_node": self.current_node}

    def load_extra_state(self, tensors, meta):
        super().load_extra_state(tensors, meta)
        self.current_node = int(meta.get("disback_node", 0))


class DisBackDMD2Trainer(DisBackTrainer):
    """DisBack on DMD2's loss (the official code's base)."""


class DisBackSIMTrainer(DisBackTrainer, SIMTrainer):
    """DisBack on SIM / SiD's loss."""


class DisBackVSDTrainer(DisBackTrainer, VSDTrainer):
    """DisBack on VSD's loss."""


_VARIANTS = {"dmd2": DisBackDMD2Trainer, "sim": DisBackSIMTrainer, "vsd": DisBackVSDTrainer}
