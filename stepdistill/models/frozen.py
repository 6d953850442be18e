"""A swappable frozen score: the "real" score of a score-distillation loss when it is not the teacher.

DMD2, SIM / SiD and VSD compare the fake score with a frozen "real" score, normally the teacher. Some methods
replace it during training: DisBack (stepdistill/trainers/disback.py) distils against the snapshots of a
fine-tuned teacher copy in turn, a two-stage recipe distils against an earlier stage's fake score. The trainers
read the real score as ``trainer.real_score`` (the teacher unless replaced) and replace it with
``trainer.swap_real_score(source)``:

* ``source``: a ``.safetensors`` file, a stepdistill checkpoint folder (``checkpoints/step_N``: its
  ``fake_score.safetensors``), a diffusers model folder (``diffusion_pytorch_model*.safetensors``, or a pipeline
  with ``unet/`` / ``transformer/``), a state dict, or None (back to the teacher);
* the weights load **strictly** into a frozen copy of a template network (the teacher's by default; DisBack's
  nodes use the fake score's), after stripping whatever wrapper prefix they carry (``module.``, ``_orig_mod.``,
  DMD2-style ``fake_unet.``, ...): a file whose keys do not fit raises a one-line ConfigError naming the key;
* the copy is frozen as the teacher is, in the teacher's ``teacher_dtype`` and ``teacher_offload`` state, and it
  reads its output as the template does (a fake score reinterpreted as the student's type keeps its anchor);
* checkpoints record it (``extra_state``): a file source by path and sha256 (a resume refuses a changed or
  missing file), a state-dict source by its tensors, so a resume restores the score that was in use.

Cost: one more frozen network in memory (once; later swaps copy into the same tensors).
"""

from __future__ import annotations

import copy
import glob
import os

import torch

from ..config import ConfigError
from .denoiser import Denoiser, _unwrap
from .generator import TeacherAnchor
from .teacher import Teacher

CHECKPOINT_NETWORK = "fake_score"  # the network a stepdistill checkpoint folder gives as a frozen score
EXTRA_PREFIX = "real_score."  # the tensors of a state-dict source in a checkpoint's extra.safetensors


class FrozenScore(TeacherAnchor, Teacher):
    """A frozen copy of a template network whose weights are replaced by :meth:`load_weights`; called exactly as
    a :class:`Teacher` (``predict``, ``raw``, ``predict_with_input_grad``). ``source`` names its weights."""

    source: str = ""

    @classmethod
    def copy_of(cls, template: Denoiser, teacher: Teacher) -> "FrozenScore":
        """A frozen deep copy of ``template``'s network (its prediction type, CFG convention and teacher anchor),
        placed, cast and offloaded as ``teacher`` is."""
        inner = _unwrap(template.net)
        if not isinstance(inner, torch.nn.Module) or not any(True for _ in inner.parameters()):
            raise ConfigError(
                f"real_score: the network {type(inner).__name__} has no weights to replace (a plain callable); a "
                "swappable score needs a network with parameters"
            )
        if getattr(template, "shares_base", False) or getattr(template, "adapter_name", None) is not None:
            raise ConfigError(
                "real_score: the network carries LoRA adapters of a trainable student / fake score (generator_mode "
                "or fake_score_mode: lora); a swapped real score needs full networks"
            )
        net = copy.deepcopy(inner)
        net.to("cpu" if teacher.offload_device is not None else _device(template))  # offloaded: stays on the host
        score = cls(net, template.schedule, template.prediction_type, cfg_convention=template.cfg_convention)
        if isinstance(template, TeacherAnchor) and template.anchor is not None:
            score.set_anchor(template.anchor, None)  # a fake score's reading of its output (weight 1)
        if teacher.weight_dtype is not None:
            score.cast_weights(teacher.weight_dtype)
        if teacher.offload_device is not None:
            score.offload(teacher.offload_device)
        return score

    def _forward(self, x_t, t, kwargs):
        return self._anchored(super()._forward(x_t, t, kwargs), x_t, t, kwargs)

    @torch.no_grad()
    def load_weights(self, state_dict: dict, source: str = "", key: str = "real_score") -> None:
        """Copy ``state_dict`` into the network in place (strict; wrapper prefixes stripped): each tensor keeps
        its dtype (``teacher_dtype``) and device (host for ``teacher_offload``)."""
        net = _unwrap(self.net)
        own = net.state_dict()
        sd = match_keys(state_dict, own, key=key, source=source)
        for name, value in sd.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ConfigError(
                    f"{key}: {source or 'the state dict'} has {name} of shape {tuple(value.shape)}, the network's is "
                    f"{tuple(own[name].shape)}"
                )
        for name, target in own.items():
            target.copy_(sd[name].to(dtype=target.dtype))
        self.source = source


def match_keys(state_dict: dict, expected: dict, key: str = "real_score", source: str = "") -> dict:
    """``state_dict`` with the one prefix stripped under which its keys are exactly ``expected``'s (keys under
    other prefixes, e.g. a DMD2 guidance model's ``real_unet.``, are dropped), else a ConfigError naming a missing
    or unexpected key."""
    want = set(expected)
    have = set(state_dict)
    if have == want:
        return state_dict
    what = source or "the state dict"
    probe = max(want, key=len) if want else ""
    prefixes = {k[: len(k) - len(probe)] for k in have if probe and k.endswith(probe)}
    fits = []
    for p in sorted(prefixes, key=len):
        sub = {k[len(p) :] for k in have if k.startswith(p)}
        if sub == want:
            fits.append(p)
    if len(fits) > 1:  # e.g. a DMD2 guidance checkpoint with fake_unet. and real_unet.
        raise ConfigError(
            f"{key}: {what} holds the network's weights under several prefixes ({', '.join(fits)}); save the one "
            "network alone"
        )
    if fits:
        p = fits[0]
        return {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}
    missing = sorted(want - have)
    unexpected = sorted(have - want)
    detail = f"missing {missing[0]!r}" if missing else ""
    if unexpected:
        detail += (", " if detail else "") + f"unexpected {unexpected[0]!r}"
    raise ConfigError(
        f"{key}: the weights in {what} do not fit the network ({len(missing)} missing, {len(unexpected)} unexpected "
        f"keys: {detail})"
    )


def read_weights(path: str, key: str = "real_score") -> dict:
    """The state dict of a frozen-score source path (see the module docstring), as CPU tensors."""
    from safetensors.torch import load_file

    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ConfigError(f"{key}: {path!r} is not a .safetensors file")
        files = [path]
    elif os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "trainer_state.json")):  # a stepdistill checkpoint folder
            files = [os.path.join(path, f"{CHECKPOINT_NETWORK}.safetensors")]
            if not os.path.isfile(files[0]):
                raise ConfigError(f"{key}: checkpoint {path!r} has no {CHECKPOINT_NETWORK}.safetensors")
        else:
            sub = next((d for d in ("unet", "transformer") if os.path.isdir(os.path.join(path, d))), None)
            folder = os.path.join(path, sub) if sub else path
            files = sorted(glob.glob(os.path.join(folder, "diffusion_pytorch_model*.safetensors")))
            if not files:
                raise ConfigError(
                    f"{key}: {path!r} is neither a .safetensors file, a checkpoint folder nor a diffusers model folder"
                )
    else:
        raise ConfigError(f"{key}: {path!r} does not exist")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except Exception as e:  # noqa: BLE001 - an unreadable file is the user's input
            raise ConfigError(f"{key}: cannot read {f!r} ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return sd


def _device(model: Denoiser) -> torch.device:
    for p in _unwrap(model.net).parameters():
        return p.device
    return torch.device("cpu")


class RealScoreSlot:
    """What a trainer's real score is: the teacher (no source) or a :class:`FrozenScore` with its source. Owned
    by :class:`~stepdistill.trainers.student.StudentTrainer` (``swap_real_score``, ``real_score``)."""

    def __init__(self):
        self.score: FrozenScore | None = None  # the copy (kept for later swaps)
        self.active = False
        self.like = "teacher"  # the template: "teacher" or a trainer attribute holding a Denoiser ("fake")
        self.sha256 = ""
        self.tensors: dict | None = None  # a state-dict source (checkpointed as tensors)

    def swap(self, trainer, source, like: str = "teacher", key: str = "real_score") -> None:
        from .. import io

        if source is None:
            self.active, self.tensors, self.sha256 = False, None, ""
            return
        template = trainer.teacher if like == "teacher" else getattr(trainer, like)
        if self.score is None or self.like != like:
            self.score = FrozenScore.copy_of(template, trainer.teacher)
            self.like = like
        if isinstance(source, dict):
            self.score.load_weights(source, "<state dict>", key)
            self.tensors = {k: v.detach().cpu() for k, v in source.items()}
            self.sha256 = ""
        else:
            path = os.fspath(source)
            self.score.load_weights(read_weights(path, key), path, key)
            self.tensors = None
            file = path if os.path.isfile(path) else None
            self.sha256 = io.sha256_file(file) if file else ""
        self.active = True

    def state(self) -> tuple[dict, dict]:
        """(tensors, meta) for a checkpoint's extra state."""
        if not self.active:
            return {}, {}
        meta = {"source": self.score.source, "like": self.like, "sha256": self.sha256}
        tensors = {EXTRA_PREFIX + k: v for k, v in (self.tensors or {}).items()}
        return tensors, {"real_score": meta}

    def restore(self, trainer, tensors: dict, meta: dict) -> None:
        rec = meta.get("real_score")
        if not rec:
            self.swap(trainer, None)
            return
        if rec["source"] == "<state dict>":
            sd = {k[len(EXTRA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
            self.swap(trainer, sd, rec["like"])
            return
        from .. import io

        path = rec["source"]
        if not os.path.exists(path):
            raise ConfigError(f"resume: the checkpoint's real score {path!r} no longer exists")
        if rec.get("sha256") and os.path.isfile(path) and io.sha256_file(path) != rec["sha256"]:
            raise ConfigError(f"resume: the checkpoint's real score {path!r} has changed since (sha256 differs)")
        self.swap(trainer, path, rec["like"])
