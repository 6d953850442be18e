"""Load a denoiser network and its schedule from a diffusers pipeline folder, a bare model folder, or a hub
id, through diffusers' own classes (safetensors preferred, never remote code)."""

from __future__ import annotations

import json
import os
import re

import diffusers

from ..schedules import NoiseSchedule, from_diffusers
from .denoiser import SUPPORTED_NETWORKS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(path: str) -> str:
    """A local folder that exists, or something shaped like a hub id ``org/name``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"model path {path!r} is a file; expected a diffusers folder or a hub id")
    if _HUB_ID.match(path) and not path.startswith((".", "/")):
        return path
    raise FileNotFoundError(f"model path {path!r} does not exist (and is not a hub id like 'org/name')")


def _read_json(path, name, subfolder=None, **hub_kw):
    if os.path.isdir(path):
        f = os.path.join(path, subfolder or "", name)
        if not os.path.isfile(f):
            return None
        with open(f) as fh:
            return json.load(fh)
    from huggingface_hub import hf_hub_download

    try:
        f = hf_hub_download(path, name, subfolder=subfolder, **hub_kw)
    except Exception:  # noqa: BLE001 - missing file on the hub means "not this layout"
        return None
    with open(f) as fh:
        return json.load(fh)


def load_network(
    path: str, subfolder: str | None = None, *, torch_dtype=None, revision=None, variant=None, local_files_only=None
):
    """Returns (network, schedule, prediction_type). ``subfolder`` defaults to ``unet`` or ``transformer``
    (whichever the pipeline folder has); a bare model folder (config.json at the top) needs a sibling or
    nested ``scheduler/``."""
    path = check_model_path(path)
    hub_kw = {k: v for k, v in dict(revision=revision).items() if v is not None}
    if subfolder is None:
        for cand in ("unet", "transformer"):
            if _read_json(path, "config.json", cand, **hub_kw) is not None:
                subfolder = cand
                break
    cfg = _read_json(path, "config.json", subfolder, **hub_kw)
    if cfg is None:
        raise FileNotFoundError(f"no network config.json in {path!r} (looked in unet/, transformer/ and the top)")
    cls_name = cfg.get("_class_name")
    own = _own_network_classes()
    if cls_name not in SUPPORTED_NETWORKS and cls_name not in own:
        supported = ", ".join(SUPPORTED_NETWORKS + tuple(own))
        raise ValueError(f"unsupported network class {cls_name!r} in {path!r}; supported: {supported}")
    cls = own.get(cls_name) or getattr(diffusers, cls_name)
    kw = dict(subfolder=subfolder, torch_dtype=torch_dtype, variant=variant, use_safetensors=None, **hub_kw)
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    net = cls.from_pretrained(path, **{k: v for k, v in kw.items() if v is not None})
    sched_cfg = _read_json(path, "scheduler_config.json", "scheduler", **hub_kw)
    if sched_cfg is None:
        raise FileNotFoundError(
            f"no scheduler/scheduler_config.json in {path!r}: the schedule of the network is unknown"
        )
    schedule: NoiseSchedule = from_diffusers(sched_cfg)
    pred = sched_cfg.get("prediction_type") or ("flow" if schedule.kind == "flow" else "epsilon")
    return net, schedule, pred


def _own_network_classes() -> dict:
    from .guided_unet import GuidedUNet2DModel
    from .toy import ToyMLP

    return {"ToyMLP": ToyMLP, "GuidedUNet2DModel": GuidedUNet2DModel}
