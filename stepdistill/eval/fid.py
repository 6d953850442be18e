"""FID and KID through torchmetrics, with Inception weights from a local file and cached reference statistics.

Library choice
--------------
Both distances are computed by torchmetrics (``FrechetInceptionDistance`` and ``KernelInceptionDistance``),
not by clean-fid, pytorch-fid or torch-fidelity's ``calculate_metrics``:

* torchmetrics accepts any ``nn.Module`` as the feature extractor. We extract features once per image set
  (Inception, or a small module in tests) and hand the metrics an identity module, so FID, KID and
  precision/recall share one forward pass, and cached reference statistics can be loaded into the metric.
* its FID keeps the feature sums and the covariance sums in float64;
* it is already the engine of FD-digits (``stepdistill.eval.fd_digits``), so every Frechet distance in this
  project comes from the same code.

torchmetrics' Inception is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-FID Inception, 2048-d
pool3 features), wrapped as ``torchmetrics.image.fid.NoTrainInceptionV3``; torch-fidelity is therefore a
dependency. We build that wrapper ourselves because torchmetrics' ``KernelInceptionDistance`` does not
forward ``feature_extractor_weights_path``.

Inception weights
-----------------
The file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (``INCEPTION_WEIGHTS_URL``).
The file is opened here with ``torch.load(weights_only=True)`` (or safetensors for a ``.safetensors`` file)
and its state dict is handed to the module: torch-fidelity's own loader would unpickle it with
``weights_only=False``, which can run code from a tampered file. Resolution order
(``resolve_inception_weights``):

1. an explicit path (``--inception-weights PATH``); a missing file is a ``FileNotFoundError`` naming it;
2. the torch hub cache, ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where
   torch-fidelity's own download puts it (so a file downloaded once is found offline later);
3. with ``allow_download=True`` (``--allow-download``) it is downloaded into that cache (then loaded as above).

``allow_download`` defaults to False: an evaluation should never reach for the network implicitly, and
offline machines get an immediate ``FileNotFoundError`` that names the file, where to put it and which
flag to pass, instead of a network timeout.

Preprocessing (fixed, documented protocol)
------------------------------------------
* Generated images in [-1, 1] are quantised to uint8 with ROUNDING (``stepdistill.utils.to_uint8``, the EDM
  convention); uint8 images and image files are used as they are. 1-channel images are repeated to RGB.
* The resize to 299x299 (``resize``, ``--resize``):

  - "torchmetrics" (default): torchmetrics' own ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=True)`` (its default since 1.8). It is NOT the resize of the original TF1 FID: TF1's bilinear
    resize samples at ``x * in / out`` (no half-pixel offset) and never antialiases, so the two differ when
    upsampling small images too (by pixels' worth of intensity near edges, not by a rounding error), and
    by much more when downsampling large images. FIDs computed this way are comparable with each other,
    not with published TF1 / torch-fidelity / clean-fid-legacy numbers.
  - "tf1": torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x`` (the TF1 resize; torchmetrics'
    ``antialias=False``): the features equal those of torch-fidelity's ``FeatureExtractorInceptionV3`` for the
    same weights file (tested). Use it to compare with published FIDs.
* Optional COCO-style protocol (DMD2's evaluator): ``center_crop_resize(images, size)`` crops the centre
  square of the long side and resizes it to ``size`` with PIL ``LANCZOS`` on uint8 images; applied to the
  generated AND the reference images before the Inception resize.

Statistics and sample counts
----------------------------
* Reference statistics are ``.npz`` files with ``mu`` (float64), ``sigma`` (float64), ``n`` and, for KID and
  precision/recall, the raw ``features`` (float32), plus a JSON ``meta`` string holding a sha256
  ``checksum`` of the inputs (file names and bytes, or tensor bytes) and of the protocol (feature
  extractor id, crop size). The cache file name carries the checksum prefix, so changed inputs get a new
  file; a loaded file whose checksum does not match is rejected as stale (``StaleCacheError``).
* FID needs at least ``num_features + 1`` images per set (a full-rank covariance): 2049 for Inception.
* KID (unbiased MMD with the cubic polynomial kernel) uses ``subsets`` random subsets of ``subset_size``
  images from each set; default ``subset_size = min(1000, n_real, n_fake)`` (clean-fid's choice).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, DataError
from ..utils import to_uint8

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_FEATURE_DIM = 2048
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
CACHE_FORMAT_VERSION = 1


class StaleCacheError(DataError):
    """Cached reference statistics that do not belong to the current inputs or protocol."""


# --------------------------------------------------------------------------------------------------------
# Inception weights and feature extractor
# --------------------------------------------------------------------------------------------------------


def default_inception_weights_path() -> Path:
    """Where torch hub (and so torch-fidelity's download) keeps the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(path=None, allow_download: bool = False) -> str | None:
    """Local path of the Inception weights, or None when the library should download them.

    Raises FileNotFoundError when ``path`` does not exist, or when no path is given, the hub cache does
    not hold the file and downloading is not allowed.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found: {path} (expected torch-fidelity's {INCEPTION_WEIGHTS_FILE}, "
                f"from {INCEPTION_WEIGHTS_URL})"
            )
        return str(path)
    cached = default_inception_weights_path()
    if cached.is_file():
        return str(cached)
    if allow_download:
        return None
    raise FileNotFoundError(
        f"Inception weights {INCEPTION_WEIGHTS_FILE} not found. Download {INCEPTION_WEIGHTS_URL} on a machine "
        f"with internet access, then either pass its path with --inception-weights PATH "
        f"(inception_weights=PATH) or put it at {cached}; or pass --allow-download (allow_download=True) "
        f"to let torch-fidelity download it into that cache."
    )


def _file_digest(path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


RESIZES = ("torchmetrics", "tf1")


def load_inception_state_dict(path) -> dict:
    """The Inception weights file as a state dict, without unpickling code: ``torch.load(weights_only=True)``
    (safetensors for ``.safetensors``). A file that holds anything but tensors is refused, naming it."""
    from ..config import DataError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refused, truncated or not a weights file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"Inception weights {path} cannot be loaded as plain tensors ({first})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DataError(f"Inception weights {path} are not a state dict of tensors")
    return state


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the TF-FID Inception (torchmetrics' ``NoTrainInceptionV3``).

    ``forward`` takes images (N, C, H, W) as uint8 in [0, 255] or floats in [-1, 1] (quantised with
    rounding), C in {1, 3}, any size (resized to 299 by ``resize``: "torchmetrics", antialiased bilinear, or
    "tf1", torch-fidelity's TF1 bilinear; see the module docstring) and returns float32 features (N, 2048).
    ``antialias`` is the older spelling of the resize (True: "torchmetrics", False: "tf1").
    """

    def __init__(self, weights_path=None, allow_download: bool = False, antialias: bool = True, resize=None):
        super().__init__()
        import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
        from torchmetrics.image.fid import NoTrainInceptionV3

        from ..config import ConfigError

        if resize is None:
            resize = "torchmetrics" if antialias else "tf1"
        if resize not in RESIZES:
            raise ConfigError(f"resize must be one of {RESIZES}, got {resize!r}")
        if "antialias" not in inspect.signature(NoTrainInceptionV3.__init__).parameters:
            import torchmetrics

            raise ImportError(
                f"torchmetrics {torchmetrics.__version__} has no antialias option for its Inception resize; "
                "the documented FID protocol needs torchmetrics >= 1.8 (pip install -U torchmetrics)"
            )
        resolved = resolve_inception_weights(weights_path, allow_download)
        if resolved is None:  # allowed to download: into torch hub's cache, then loaded like a local file
            target = default_inception_weights_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(target))
            resolved = str(target)
        state = load_inception_state_dict(resolved)
        # torch-fidelity loads weights in its constructor: hand it the state dict loaded above (its download hook
        # is the one path that takes a state dict rather than a file to unpickle)
        original = tf_inception.load_state_dict_from_url
        tf_inception.load_state_dict_from_url = lambda *args, **kwargs: state
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(INCEPTION_FEATURE_DIM)],
                feature_extractor_weights_path=None,
                antialias=resize == "torchmetrics",
            )
        finally:
            tf_inception.load_state_dict_from_url = original
        self.num_features = INCEPTION_FEATURE_DIM
        self.resize = resize
        digest = _file_digest(resolved)
        kind = "antialias" if resize == "torchmetrics" else "tf1-bilinear"
        self.feature_id = f"torchmetrics-inception-v3-compat-pool3-{kind}-{digest}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = prepare_images(images).to(next(self.net.parameters()).device)
        return self.net(x).float()


def feature_extractor_id(module: nn.Module) -> str:
    """Identifier of a feature extractor for cache checksums: its ``feature_id`` attribute if it has one,
    otherwise the class name plus a hash of its parameters and buffers."""
    fid = getattr(module, "feature_id", None)
    if isinstance(fid, str):
        return fid
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return f"{type(module).__name__}-{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------------------
# Image preprocessing and folders
# --------------------------------------------------------------------------------------------------------


def prepare_images(images) -> torch.Tensor:
    """Images as uint8 (N, 3, H, W): floats are taken to be in [-1, 1] and quantised with rounding
    (``to_uint8``); uint8 passes through; 1-channel images are repeated to 3 channels."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected images of shape (N, 1 or 3, H, W), got {tuple(getattr(images, 'shape', ())) or type(images)}"
        )
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"expected uint8 images or floats in [-1, 1], got dtype {images.dtype}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf values")
        images = to_uint8(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def center_crop_resize(images, size: int) -> torch.Tensor:
    """COCO-style protocol (DMD2's evaluator): centre square crop of the long side, then PIL LANCZOS resize to
    ``size`` x ``size``, on uint8 data (a crop offset of (long - short) // 2). Accepts a tensor (N, C, H, W)
    (uint8, or floats in [-1, 1] quantised with rounding) or a list of PIL images; returns uint8 (N, 3, S, S).
    """
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if torch.is_tensor(images):
        arr = prepare_images(images).permute(0, 2, 3, 1).cpu().numpy()
        pils = [Image.fromarray(a) for a in arr]
    else:
        pils = [im.convert("RGB") for im in images]
    out = []
    for im in pils:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        if s != size:
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
    if not out:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.stack(out)


def list_image_files(folder) -> list[Path]:
    """Image files directly under ``folder``, sorted by name (lossy formats are accepted with a warning)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    lossy = [p.name for p in files if p.suffix.lower() in LOSSY_EXTENSIONS]
    if lossy:
        warnings.warn(
            f"{len(lossy)} lossy image file(s) in {folder} (e.g. {lossy[0]}): JPEG artefacts move FID; prefer PNG",
            stacklevel=2,
        )
    return files


def check_same_size(files) -> tuple[int, int]:
    """(width, height) shared by all image files; DataError naming two files of different sizes."""
    first_size, first = None, None
    for path in files:
        with _open_image(path) as im:
            size = im.size
        if first_size is None:
            first_size, first = size, path
        elif size != first_size:
            raise DataError(
                f"images of different sizes: {first} is {first_size[0]}x{first_size[1]} but {path} is "
                f"{size[0]}x{size[1]}; resize them to one size, or use the centre-crop protocol "
                f"(center_crop_size / --center-crop-size) which brings every image to one size"
            )
    return first_size


def verify_images(files) -> None:
    """PIL's integrity check (``Image.verify``: no full decode) of every file; a DataError naming the first
    unreadable one, so that a bad file stops an evaluation before anything is sampled or extracted."""
    for path in files:
        with _open_image(path) as im:
            try:
                im.verify()
            except Exception as e:  # noqa: BLE001 - PIL raises assorted types for truncated / corrupt data
                raise DataError(f"cannot read image {path} ({e}); fix or remove it") from e


def _open_image(path):
    from PIL import Image

    try:
        return Image.open(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError and friends
        raise DataError(f"cannot read image {path} ({e}); fix or remove it") from e


def load_images(files, mode: str = "RGB", center_crop_size: int | None = None) -> torch.Tensor:
    """Image files as uint8 (N, C, H, W) (C = 3 for mode "RGB", 1 for "L"). Without ``center_crop_size``
    all files must have the same size; with it, each image goes through ``center_crop_resize``. An image that
    cannot be decoded is a DataError naming it."""
    files = list(files)
    if center_crop_size is None:
        check_same_size(files)
    out = []
    for path in files:
        with _open_image(path) as im:
            try:
                im = im.convert(mode)
            except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated or corrupt data
                raise DataError(f"cannot read image {path} ({e}); fix or remove it") from e
            if center_crop_size is not None:
                t = center_crop_resize([im], center_crop_size)[0]
                if mode == "L":
                    t = t[:1]
            else:
                t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
                t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
        out.append(t)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------------
# Features, checksums and reference statistics
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(images, feature_extractor: nn.Module, batch_size: int = 50) -> torch.Tensor:
    """Features (N, D) float32 on the CPU of uint8 (or [-1, 1] float) images (N, C, H, W), in batches.
    Images are quantised and made RGB (``prepare_images``) before the extractor sees them."""
    images = prepare_images(images)
    try:
        device = next(feature_extractor.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    feats = [feature_extractor(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)]
    if not feats:
        raise ValueError("no images to extract features from")
    out = torch.cat(feats)
    if out.dim() != 2 or out.shape[0] != images.shape[0]:
        raise ValueError(f"feature extractor must return (N, D) features, got {tuple(out.shape)}")
    return out


def protocol_meta(feature_extractor: nn.Module, center_crop_size: int | None = None) -> dict:
    """The parts of the protocol that change reference features (they enter the cache checksum)."""
    return {
        "format": CACHE_FORMAT_VERSION,
        "feature_extractor": feature_extractor_id(feature_extractor),
        "center_crop_size": center_crop_size,
        "quantisation": "uint8, round((x + 1) * 127.5)",
    }


def _checksum_start(protocol: dict):
    h = hashlib.sha256()
    h.update(json.dumps(protocol, sort_keys=True).encode())
    return h


def checksum_folder(folder, protocol: dict) -> str:
    """sha256 of the protocol and of every image file (name and bytes) under ``folder``."""
    h = _checksum_start(protocol)
    for path in list_image_files(folder):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def checksum_tensor(images: torch.Tensor, protocol: dict) -> str:
    """sha256 of the protocol and of the images' dtype, shape and bytes."""
    h = _checksum_start(protocol)
    t = images.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class ReferenceStats:
    """Gaussian fit (mu, sigma, n) of reference features, optionally the features themselves."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: torch.Tensor, meta: dict | None = None, keep_features: bool = True):
        f = torch.as_tensor(features).double()
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"need features of shape (N >= 2, D), got {tuple(f.shape)}")
        mu = f.mean(0)
        sigma = torch.cov(f.T).reshape(f.shape[1], f.shape[1])
        kept = torch.as_tensor(features).float().cpu().numpy() if keep_features else None
        return cls(mu.numpy(), sigma.numpy(), int(f.shape[0]), kept, dict(meta or {}))

    @property
    def num_features(self) -> int:
        return int(self.mu.shape[0])

    @property
    def checksum(self) -> str | None:
        return self.meta.get("checksum")

    def save(self, path) -> str:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.asarray(self.n, dtype=np.int64)}
        if self.features is not None:
            arrays["features"] = self.features
        arrays["meta"] = np.asarray(json.dumps(self.meta, sort_keys=True))
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return str(path)

    @classmethod
    def load(cls, path, expected_checksum: str | None = None, expected_protocol: dict | None = None):
        """Load an ``.npz``; StaleCacheError when ``expected_checksum`` differs from the stored one or a key of
        ``expected_protocol`` differs from the stored protocol."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise DataError(f"{path} is not a reference-statistics file: missing {missing}")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            features = z["features"] if "features" in z.files else None
            n = int(z["n"]) if "n" in z.files else (len(features) if features is not None else 0)
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        stats = cls(mu, sigma, n, features, meta)
        if expected_checksum is not None and stats.checksum != expected_checksum:
            raise StaleCacheError(
                f"stale reference statistics {path}: stored checksum {stats.checksum} != {expected_checksum} of the "
                f"current inputs (the images or the protocol changed); delete the file to recompute it"
            )
        if expected_protocol and "protocol" not in meta:
            warnings.warn(
                f"{path} carries no protocol metadata (not written by stepdistill): cannot check that it was computed "
                f"with the same feature extractor and preprocessing; using it as it is",
                stacklevel=2,
            )
            expected_protocol = None
        for key, want in (expected_protocol or {}).items():
            have = meta.get("protocol", {}).get(key)
            if have != want:
                raise StaleCacheError(
                    f"reference statistics {path} were computed with {key}={have!r}, but this evaluation uses "
                    f"{key}={want!r}; recompute them from the reference images"
                )
        return stats


def default_cache_dir() -> Path:
    """``$STEPDISTILL_CACHE`` or ``$XDG_CACHE_HOME/stepdistill`` (default ``~/.cache/stepdistill``), + fid_stats."""
    root = os.environ.get("STEPDISTILL_CACHE")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "stepdistill")
    return Path(root) / "fid_stats"


def reference_stats(
    source,
    feature_extractor: nn.Module,
    *,
    cache_dir=None,
    center_crop_size: int | None = None,
    batch_size: int = 50,
    keep_features: bool = True,
    name: str | None = None,
) -> tuple[ReferenceStats, str]:
    """Reference statistics of a folder of images or an image tensor, computed once and cached.

    The cache file is ``<cache_dir>/<name>-<checksum[:16]>.npz``, where the checksum covers the input
    images and ``protocol_meta``; changed inputs therefore never hit an old file, and a file whose stored
    checksum does not match is rejected (StaleCacheError). A cached file without features is recomputed
    when ``keep_features`` asks for them. Returns ``(stats, cache_path)``.
    """
    protocol = protocol_meta(feature_extractor, center_crop_size)
    if torch.is_tensor(source):
        checksum, label, source_desc = checksum_tensor(source, protocol), name or "tensor", "tensor"
    else:
        folder = Path(source)
        checksum = checksum_folder(folder, protocol)
        label, source_desc = name or folder.resolve().name, str(folder.resolve())
    cache_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{label}-{checksum[:16]}.npz"
    if cache_path.is_file():
        stats = ReferenceStats.load(cache_path, expected_checksum=checksum)
        if stats.features is not None or not keep_features:
            return stats, str(cache_path)
    if torch.is_tensor(source):
        images = source if center_crop_size is None else center_crop_resize(source, center_crop_size)
    else:
        images = load_images(list_image_files(source), "RGB", center_crop_size)
    features = extract_features(images, feature_extractor, batch_size)
    meta = {"checksum": checksum, "protocol": protocol, "source": source_desc, "num_images": int(len(images))}
    stats = ReferenceStats.from_features(features, meta, keep_features)
    stats.save(cache_path)
    return stats, str(cache_path)


def verify_reference_source(stats: ReferenceStats, path) -> bool:
    """For statistics loaded from an explicit ``.npz``: if the folder they were computed from still exists,
    recompute its checksum and raise StaleCacheError when the folder changed. Returns whether it checked."""
    source = stats.meta.get("source")
    protocol = stats.meta.get("protocol")
    if not source or source == "tensor" or protocol is None or not Path(source).is_dir():
        return False
    current = checksum_folder(source, protocol)
    if current != stats.checksum:
        raise StaleCacheError(
            f"stale reference statistics {path}: the folder {source} changed since they were computed "
            f"(checksum {stats.checksum} -> {current}); recompute them"
        )
    return True


# --------------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------------


class _PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor': the metrics receive features that were extracted beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_min_samples(num_features: int) -> int:
    """Fewest images per set for FID: num_features + 1 (a full-rank covariance estimate)."""
    return int(num_features) + 1


def _check_fid_count(n: int, num_features: int, what: str) -> None:
    need = fid_min_samples(num_features)
    if n < need:
        raise ConfigError(
            f"FID with {num_features}-d features needs at least {need} {what} samples, got {n} "
            f"(the covariance estimate needs more samples than feature dimensions)"
        )


def _as_stats(reference) -> ReferenceStats:
    return reference if isinstance(reference, ReferenceStats) else ReferenceStats.from_features(reference)


def frechet_distance(reference, features: torch.Tensor) -> float:
    """FID between reference statistics (``ReferenceStats``, or reference features (N, D)) and generated
    features (M, D), computed by torchmetrics' ``FrechetInceptionDistance`` in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    ref = _as_stats(reference)
    feats = torch.as_tensor(features).double().cpu()
    d = ref.num_features
    if feats.dim() != 2 or feats.shape[1] != d:
        raise ValueError(f"generated features must have shape (M, {d}), got {tuple(feats.shape)}")
    if ref.n:  # n = 0: unknown (a foreign .npz with mu and sigma only)
        _check_fid_count(ref.n, d, "reference")
    _check_fid_count(feats.shape[0], d, "generated")
    # sync_on_compute=False: the features are complete on this process (run_eval scores on the main process only;
    # a torchmetrics sync there would wait for the other processes forever).
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(d), reset_real_features=False, sync_on_compute=False)
    mu = torch.from_numpy(ref.mu).double()
    sigma = torch.from_numpy(ref.sigma).double()
    # Load the reference Gaussian as the sums the metric accumulates; compute() recovers mu and sigma from them
    # for any n >= 2, so an unknown n is replaced by 2.
    n = ref.n if ref.n >= 2 else 2
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)
    metric.update(feats, real=False)
    return float(metric.compute())


def kid_subset_size(n_real: int, n_fake: int, subset_size: int | None = None) -> int:
    """Checked KID subset size: default min(1000, n_real, n_fake); ValueError naming both numbers when a given
    size exceeds a set."""
    if subset_size is None:
        subset_size = min(1000, n_real, n_fake)
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ConfigError(
            f"KID subset_size must be an int >= 2, got {subset_size!r} (n_real={n_real}, n_fake={n_fake})"
        )
    for n, what in ((n_real, "reference"), (n_fake, "generated")):
        if subset_size > n:
            raise ConfigError(
                f"KID subset_size={subset_size} is larger than the number of {what} samples ({n}); "
                f"pass subset_size <= {min(n_real, n_fake)}"
            )
    return subset_size


def kernel_distance(
    reference_features,
    features,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over ``subsets``) by torchmetrics' ``KernelInceptionDistance`` (cubic polynomial kernel,
    unbiased MMD^2), with subsets drawn from a torch RNG seeded with ``seed`` (the global RNG is untouched)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real = torch.as_tensor(reference_features).float().cpu()
    fake = torch.as_tensor(features).float().cpu()
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"KID needs features (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    size = kid_subset_size(real.shape[0], fake.shape[0], subset_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_PrecomputedFeatures(real.shape[1]),
            subsets=subsets,
            subset_size=size,
            reset_real_features=False,
            sync_on_compute=False,  # the features are complete on this process
        )
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
