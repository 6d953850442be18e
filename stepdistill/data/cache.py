"""The latent and text-embedding cache: ``stepdistill cache --teacher T --dataset SPEC --out DIR``.

Every image of a ``shards:`` / ``hf:`` dataset is encoded once with the teacher's VAE (the posterior mean, scaled
as the trainers scale it) and every caption with its text encoders; a run with ``dataset: latents:DIR`` then reads
latents and embeddings and never runs the VAE encoder or the text encoders on the data.

``DIR/NNNNN.safetensors`` holds source shard NNNNN: ``latents`` (n, C, h, w), ``emb.<name>`` (n, ...) per text
embedding (SD: ehs; SDXL / SD3: ehs, pooled), and in its metadata the sample keys, the captions and the
fingerprint. ``DIR/index.json`` lists the shards and the fingerprint: sha256 digests of the VAE's weights, of the
text encoders' weights and tokenizers, and the preprocessing (pixel size, centre crop, latent scaling). A run whose
teacher or resolution gives another fingerprint refuses the cache (stale) with the difference named.

The command is resumable (a shard file whose fingerprint matches is kept) and runs on several processes under
``accelerate launch`` (shard i on process i mod n).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .. import io
from ..config import ConfigError, DataError

INDEX = "index.json"
FORMAT = "stepdistill-latent-cache"
VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _digest_modules(modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest_tokenizers(tokenizers) -> str:
    h = hashlib.sha256()
    for tok in tokenizers:
        if tok is None:
            continue
        vocab = sorted(tok.get_vocab().items())
        h.update(json.dumps([type(tok).__name__, int(tok.model_max_length), vocab]).encode())
    return h.hexdigest()


def fingerprint(vae, conditioner, pixels: int, center_crop: bool = True) -> dict:
    """What the cached tensors depend on: the VAE, the text encoders and tokenizers, the preprocessing."""
    text = None
    if conditioner is not None:
        text = _digest_modules(conditioner.text_encoders) + _digest_tokenizers(conditioner.tokenizers)
        text = hashlib.sha256(text.encode()).hexdigest()
    return {
        "vae": _digest_modules([vae]),
        "text_encoders": text,
        "preprocessing": {
            "pixels": int(pixels),
            "center_crop": bool(center_crop),
            "latent": "posterior mean",
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        },
    }


def _fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def load_encoders(teacher_path: str, pixels: int = 0):
    """(vae, text conditioner or None, pixels) of a teacher folder; ``pixels`` 0: the network's sample size."""
    from diffusers import AutoencoderKL

    from ..models.conditioning import TextConditioner
    from .validate import _network_config

    try:
        vae = AutoencoderKL.from_pretrained(teacher_path, subfolder="vae")
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher: {teacher_path!r} has no VAE to encode latents with ({e})") from None
    vae.requires_grad_(False).eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if not pixels:
        cfg = _network_config(teacher_path) or {}
        side = cfg.get("sample_size")
        side = side if isinstance(side, int) else (side or [0])[0]
        if not side:
            raise ConfigError(f"teacher: cannot read the sample size of {teacher_path!r}; pass --resolution")
        pixels = side * scale
    conditioner = None
    index_file = os.path.join(teacher_path, "model_index.json")
    if os.path.isfile(index_file) and any(k.startswith("text_encoder") for k in json.load(open(index_file))):
        conditioner = TextConditioner.from_pretrained(teacher_path, resolution=pixels)
    return vae, conditioner, pixels


def read_index(root: str, key: str = "dataset") -> dict:
    path = os.path.join(root, INDEX)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        raise ConfigError(
            f"{key}: latents:{root} is not a finished latent cache (no readable {INDEX}); make it with "
            "`stepdistill cache --teacher <teacher> --dataset <spec> --out <dir>` (it resumes where it stopped)"
        ) from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ConfigError(f"{key}: {path} is not a stepdistill latent cache (format {FORMAT} v{VERSION})")
    return index


def check_cache(index: dict, fp: dict, root: str, key: str = "dataset") -> None:
    """Refuse a cache made with other encoders or preprocessing (a stale cache), naming what differs."""
    old = index["fingerprint"]
    why = [name for name in ("vae", "text_encoders") if old.get(name) != fp.get(name)]
    why += [
        f"{k} {old['preprocessing'].get(k)!r} -> {v!r}"
        for k, v in fp["preprocessing"].items()
        if old["preprocessing"].get(k) != v
    ]
    if why:
        raise ConfigError(
            f"{key}: the latent cache latents:{root} is stale: made by {index.get('teacher')!r}, it differs from "
            f"this run's teacher / preprocessing ({', '.join(w if ' ' in w else w + ' weights' for w in why)}); "
            "re-run `stepdistill cache` with this teacher and resolution into a new folder"
        )


class LatentShards:
    """The shards of a latent cache: ``fields`` = ``{"latent", "caption", "emb": {name: tensor}}``."""

    def __init__(self, root: str, key: str = "dataset"):
        self.root = root
        self.index = read_index(root, key)
        shards = [s for s in self.index["shards"] if s["samples"] > 0]
        self.files = [os.path.join(root, s["file"]) for s in shards]
        self.names = list(self.files)

    def __len__(self):
        return len(self.files)

    def read(self, i: int, start: int = 0, chunk: int = 64):
        from safetensors import safe_open

        with safe_open(self.files[i], framework="pt") as f:
            meta = f.metadata()
            keys, captions = json.loads(meta["keys"]), json.loads(meta["captions"])
            emb_names = [k for k in f.keys() if k.startswith("emb.")]
            for lo in range(start, len(keys), chunk):
                hi = min(lo + chunk, len(keys))
                lat = f.get_slice("latents")[lo:hi]
                emb = {k[4:]: f.get_slice(k)[lo:hi] for k in emb_names}
                for j in range(hi - lo):
                    row = {"latent": lat[j], "caption": captions[lo + j], "emb": {k: v[j] for k, v in emb.items()}}
                    yield lo + j, keys[lo + j], row

    def fields(self, raw: dict) -> dict:
        return raw


class LatentDecoder:
    """Cached fields -> a training sample (fp32 latents as ``image``, embeddings under ``emb``)."""

    def __call__(self, fields: dict) -> dict:
        item = {"image": fields["latent"].float(), "caption": fields["caption"]}
        if fields["emb"]:
            item["emb"] = {k: v.float() for k, v in fields["emb"].items()}
        return item


def _shard_meta(path: str) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            n = len(json.loads(meta.get("keys", "[]")))
            shape = list(f.get_slice("latents").get_shape()[1:]) if "latents" in f.keys() else None
            return {"fingerprint": meta.get("fingerprint"), "samples": n, "shape": shape}
    except Exception:  # noqa: BLE001 - a file cut by a kill: redo it
        return None


def _encode_shard(stream, i, seen_bad, vae, cond, batch_size, dtype):
    """The tensors and metadata of source shard ``i``: its good samples encoded in batches (bad ones skipped with
    a warning; a shard that breaks off keeps what was read)."""
    from ..trainers.student import _encode_images

    source = stream.source
    keys, captions, latents, embs, pending = [], [], [], [], []

    def flush():
        images = torch.stack([it["image"] for it in pending]).to(dtype)
        latents.append(_encode_images(vae, images).to(dtype))
        if cond is not None:
            with torch.no_grad():
                rows = cond._encode_rows([it["caption"] for it in pending])
            embs.append({k: v.detach().to("cpu", dtype) for k, v in rows.items()})
        keys.extend(it["_key"] for it in pending)
        captions.extend(it["caption"] for it in pending)
        pending.clear()

    try:
        for _, key, raw in source.read(i):
            item = stream._decode(source.names[i], (key, raw), seen_bad)
            if item is not None:
                pending.append(item)
            if len(pending) == batch_size:
                flush()
    except Exception as e:  # noqa: BLE001 - a shard that cannot be read: what was read is kept
        stream._bad(seen_bad, source.names[i], "", f"cannot be read ({type(e).__name__}: {e}); the rest is skipped")
    if pending:
        flush()
    tensors = {"latents": torch.cat(latents) if latents else torch.zeros(0, dtype=dtype)}
    for k in embs[0] if embs else ():
        tensors[f"emb.{k}"] = torch.cat([e[k] for e in embs])
    return tensors, {"keys": json.dumps(keys), "captions": json.dumps(captions)}


def write_cache(
    teacher: str,
    spec: str,
    out: str,
    *,
    pixels: int = 0,
    batch_size: int = 16,
    dtype: str = "fp32",
    image_key: str = "",
    caption_key: str = "",
    max_bad: int = 100,
    progress: bool = True,
) -> dict:
    """Encode ``spec`` (a ``shards:`` / ``hf:`` dataset) with ``teacher``'s VAE and text encoders into ``out``;
    returns the index. Shard i goes to process i mod n under accelerate; finished shards are kept."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .shards import ImageDecoder, ShardStream, is_stream_spec, open_stream

    if not is_stream_spec(spec) or spec.startswith("latents:"):
        raise ConfigError(f"--dataset: {spec!r} is not a shards:<pattern> or hf:<folder> dataset")
    if image_key == "none":
        raise ConfigError("--image-key none: the cache encodes images (a prompt-only run reads the captions directly)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from accelerate.utils import parse_flag_from_env

    # PartialState reads no ACCELERATE_USE_CPU (AcceleratorState does): without it a CPU launch is n lone processes
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    vae, cond, pixels = load_encoders(teacher, pixels)
    fp = fingerprint(vae, cond, pixels)  # of the fp32 weights: a bf16 cache serves the same fp32 teacher
    fp_id = _fingerprint_id(fp)
    vae.to(state.device, DTYPES[dtype])
    if cond is not None:
        cond.to(state.device, DTYPES[dtype])
    old_index = os.path.join(out, INDEX)
    if os.path.isfile(old_index):
        check_cache(read_index(out, "--out"), fp, out, "--out")
    os.makedirs(out, exist_ok=True)
    source = open_stream(spec, image_key=image_key, caption_key=caption_key, key="--dataset")
    stream = ShardStream(source, ImageDecoder(pixels, need_caption=cond is not None), spec=spec, max_bad=max_bad)
    seen_bad: set = set()
    mine = [i for i in range(len(source)) if i % state.num_processes == state.process_index]
    bar = tqdm(mine, desc="stepdistill cache", disable=not (progress and state.is_main_process), unit="shard")
    kept = 0
    for i in bar:
        path = os.path.join(out, f"{i:05d}.safetensors")
        meta = _shard_meta(path) if os.path.isfile(path) else None
        if meta is not None and meta["fingerprint"] == fp_id:
            kept += 1
            continue  # done by an earlier run
        tensors, metadata = _encode_shard(stream, i, seen_bad, vae, cond, batch_size, DTYPES[dtype])
        metadata["fingerprint"] = fp_id
        if len(seen_bad) > max_bad:
            raise DataError(
                f"--dataset: more than {max_bad} bad samples or shards in {spec!r} ({len(seen_bad)}, each named in a "
                "warning above); fix or remove them, or raise --max-bad-samples"
            )
        io.save_safetensors(tensors, path, metadata=metadata)
    print(
        f"stepdistill cache: process {state.process_index} of {state.num_processes}: {len(mine) - kept} shard(s) "
        f"encoded, {kept} kept from an earlier run",
        flush=True,
    )
    state.wait_for_everyone()
    index = None
    if state.is_main_process:
        shards = []
        for i in range(len(source)):
            meta = _shard_meta(os.path.join(out, f"{i:05d}.safetensors"))
            if meta is None or meta["fingerprint"] != fp_id:
                raise DataError(f"--out: shard {i:05d} of {out} is missing after the run; run the command again")
            shards.append({"file": f"{i:05d}.safetensors", "samples": meta["samples"], "source": source.names[i]})
        shape = next((m for m in (_shard_meta(os.path.join(out, s["file"])) for s in shards) if m["samples"]), None)
        if shape is None:
            raise DataError(f"--dataset: no readable sample in {spec!r}")
        index = {
            "format": FORMAT,
            "version": VERSION,
            "teacher": teacher,
            "dataset": spec,
            "dtype": dtype,
            "fingerprint": fp,
            "fingerprint_id": fp_id,
            "latent_shape": shape["shape"],
            "samples": sum(s["samples"] for s in shards),
            "shards": shards,
        }
        io.write_json(os.path.join(out, INDEX), index, indent=1)
    state.wait_for_everyone()
    return index
