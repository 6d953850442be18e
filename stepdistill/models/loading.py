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


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` (two parts, no leading ``.``, ``/`` or ``~``): what a hub id looks like."""
    path = os.fspath(path)
    return bool(_HUB_ID.match(path)) and not path.startswith((".", "/", "~"))


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint accepts a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_path(path, *, allow_download: bool | None = None, key: str = "model") -> str:
    """Where to load a model from, decided before anything loads.

    * an existing folder: itself; an existing file: an error (a diffusers folder is expected);
    * a missing path that is not shaped like a hub id (``org/name``): "path does not exist";
    * a hub id already in the local hub cache: its cached snapshot folder (no network access at all);
    * another hub id: the id itself when downloading is allowed (``allow_download`` true, or None = "auto":
      unless ``HF_HUB_OFFLINE`` is set, when the hub answers within 3 s); otherwise an error that says the
      local path does not exist AND the hub id is not cached / not reachable, and how to allow the download.

    ``key`` names the setting in messages (e.g. "teacher")."""
    from ..config import ConfigError

    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ConfigError(f"{key}: {path!r} is a file; expected a diffusers folder (model_index.json or config.json)")
    if not looks_like_hub_id(path):
        raise FileNotFoundError(f"{key}: path {path!r} does not exist (and is not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or a broken cache entry): decide on downloading below
        pass
    where = f"there is no local folder {path!r} and the hub id {path!r} is not in the local hub cache"
    if allow_download is False:
        raise FileNotFoundError(f"{key}: {where}; set allow_download: true (or --allow-download) to download it")
    if hub_offline():
        raise FileNotFoundError(f"{key}: {where}, and HF_HUB_OFFLINE is set: download it on a machine with access")
    if allow_download is None and not _hub_reachable():
        raise FileNotFoundError(
            f"{key}: {where}, and the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is not "
            "reachable from here; download it elsewhere and pass the local folder"
        )
    return path


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
    path = resolve_model_path(path, allow_download=None if local_files_only is None else not local_files_only)
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
    if schedule.kind == "edm" and pred == "epsilon":  # diffusers' EDM "epsilon": x0 = c_skip x + c_out F (EDM's F)
        pred = "edm"
    return net, schedule, pred


def _own_network_classes() -> dict:
    from .guided_unet import GuidedUNet2DModel
    from .toy import ToyMLP

    return {"ToyMLP": ToyMLP, "GuidedUNet2DModel": GuidedUNet2DModel}
