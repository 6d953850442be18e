"""Sharded datasets read as streams: webdataset tar shards, saved Hugging Face ``datasets`` and latent caches.

A recipe selects one with its ``dataset`` string:

* ``shards:/data/{00000..00099}.tar``: webdataset tar shards (brace ranges and globs; several patterns joined by
  ``::``), one sample per key: an image (``jpg``, ``jpeg``, ``png``, ``webp``) and a caption (``txt``, or a
  ``json`` object's "caption" / "text" / "prompt"). The tar members are read by ``webdataset``'s tar iterators.
* ``hf:/path/to/saved``: a folder written by ``datasets.Dataset.save_to_disk`` (memory-mapped Arrow), or any local
  folder ``datasets.load_dataset(path, streaming=True)`` reads (parquet / json files, an image folder with
  metadata.jsonl); columns "image" / "text" (or "caption", "prompt") unless ``image_key`` / ``caption_key`` name
  others.
* ``latents:/dir``: a ``stepdistill cache`` folder (see :mod:`stepdistill.data.cache`).

Every process and every dataloader worker reads its own part of each epoch, and the parts cover the epoch exactly
once: the shard order of epoch e is a permutation seeded by (seed, e), the same on every process; slot
``rank * workers + worker`` of ``S = processes x workers`` takes the shards at positions slot, slot + S, ... (with
fewer shards than slots, every slot reads every shard and keeps the sample at offset o of the shard at position p
when (o + p) % S is its slot). Inside a shard, windows of ``shuffle_window`` samples are permuted, seeded by
(seed, epoch, shard, window). A worker's position (epoch, shard position, window start, samples taken from the
window) comes back with each batch; the main process keeps the last one per worker and the checkpoint stores them,
so a resumed run goes on with the next sample each worker would have read (and with the worker whose turn it
was: torch's loader takes batches from its workers in turn).

Bad data (an image that does not decode, a sample without image or caption, an empty shard, a shard that cannot be
opened or breaks off) is skipped with a :class:`BadDataWarning` naming the shard and the key, and counted (once
per shard and key); past ``max_bad_samples`` per process the run stops with one ``DataError`` line.
"""

from __future__ import annotations

import glob
import json
import os
import warnings

import torch

from ..config import ConfigError, DataError
from .folders import decode_image

STREAM_PREFIXES = ("shards:", "hf:", "latents:")
TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TAR_CAPTION_KEYS = ("txt", "json")
HF_IMAGE_KEYS = ("image", "img", "jpg", "png")
HF_CAPTION_KEYS = ("text", "caption", "prompt", "txt")
JSON_CAPTION_FIELDS = ("caption", "text", "prompt")
HF_READ_ROWS = 64  # rows fetched from Arrow at a time


class BadDataWarning(UserWarning):
    """A sample or shard that was skipped."""


class BadSample(Exception):
    """Why one sample cannot be used (the reader skips it)."""


def is_stream_spec(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(STREAM_PREFIXES)


def _keys(value: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip()) if value else default


def expand_shards(pattern: str, key: str = "dataset") -> list[str]:
    """The shard files of ``pattern``: ``::``-separated parts, each with brace ranges (``{000..099}``) and glob
    wildcards; every file named by a range must exist."""
    from braceexpand import braceexpand

    files: list[str] = []
    for part in pattern.split("::"):
        for name in braceexpand(part.strip()):
            if glob.has_magic(name):
                found = sorted(glob.glob(name))
                if not found:
                    raise ConfigError(f"{key}: no shard matches {name!r}")
                files.extend(found)
            elif not os.path.isfile(name):
                raise ConfigError(f"{key}: shard {name!r} does not exist (from {pattern!r})")
            else:
                files.append(name)
    if not files:
        raise ConfigError(f"{key}: {pattern!r} names no shard")
    return files


# --------------------------------------------------------------------------------------------------------------
# sources: a list of shards, each read as (key, fields) in a fixed order
# --------------------------------------------------------------------------------------------------------------


class TarShards:
    """webdataset tar shards; ``fields`` of a sample: ``{"image": bytes, "caption": str}``."""

    def __init__(self, files: list[str], image_key: str = "", caption_key: str = ""):
        self.names = list(files)
        self.image_keys = () if image_key == "none" else _keys(image_key, TAR_IMAGE_KEYS)
        self.caption_keys = _keys(caption_key, TAR_CAPTION_KEYS)

    def __len__(self):
        return len(self.names)

    def read(self, i: int, start: int = 0):
        """Yield ``(offset, key, fields)`` of shard ``i`` from sample offset ``start`` on; a shard that cannot be
        opened or read raises (OSError, tarfile's errors)."""
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        path = self.names[i]
        with open(path, "rb") as f:
            files = ({**member, "__url__": path} for member in tar_file_iterator(f))
            for offset, sample in enumerate(group_by_keys(files)):
                if offset >= start:
                    yield offset, sample["__key__"], sample

    def fields(self, raw: dict) -> dict:
        image = next((raw[k] for k in self.image_keys if k in raw), None)
        if image is None and self.image_keys:
            raise BadSample(f"no image ({', '.join('.' + k for k in self.image_keys)})")
        caption = None
        for k in self.caption_keys:
            if k not in raw:
                continue
            text = raw[k].decode("utf-8", errors="replace")
            if k == "json":
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    raise BadSample(f".json is not JSON ({e})") from None
                caption = next((obj[f] for f in JSON_CAPTION_FIELDS if isinstance(obj, dict) and f in obj), None)
                if caption is None:
                    continue
            else:
                caption = text
            break
        return {"image": image, "caption": None if caption is None else str(caption).strip()}


def _pick_columns(columns: list[str], image_key: str, caption_key: str, path: str) -> tuple[str, str | None]:
    """The image and caption columns: the named ones (a ConfigError if absent) or the first default present."""

    def pick(wanted: str, defaults, what):
        names = _keys(wanted, defaults)
        found = next((n for n in names if n in columns), None)
        if found is None and wanted:
            raise ConfigError(f"{what}: column {wanted!r} not in hf:{path} (columns: {', '.join(columns)})")
        return found

    if image_key == "none":
        return None, pick(caption_key, HF_CAPTION_KEYS, "caption_key")
    image = pick(image_key, HF_IMAGE_KEYS, "image_key")
    if image is None:
        raise ConfigError(f"image_key: no image column in hf:{path} (columns: {', '.join(columns)}); set image_key")
    return image, pick(caption_key, HF_CAPTION_KEYS, "caption_key")


class _Columns:
    """``fields`` of a row with an image column (bytes / path / PIL image) and a caption column."""

    def fields(self, raw: dict) -> dict:
        image = raw.get(self.image_col) if self.image_col else None
        if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes", "path"}
            image = image.get("bytes") or image.get("path")
        if image is None and self.image_col:
            raise BadSample(f"no image in column {self.image_col!r}")
        caption = raw.get(self.caption_col) if self.caption_col else None
        return {"image": image, "caption": None if caption is None else str(caption).strip()}


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


class HFStreamShards(_Columns):
    """A local folder that ``datasets.load_dataset(path, streaming=True)`` reads (parquet / json / csv files, an
    image folder with metadata.jsonl, ...); its shards are the data files ``datasets`` streams separately."""

    def __init__(self, path: str, image_key: str = "", caption_key: str = "", key: str = "dataset"):
        import datasets

        try:
            ds = datasets.load_dataset(path, split="train", streaming=True)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a folder it cannot read
            raise ConfigError(f"{key}: hf:{path} cannot be loaded by datasets.load_dataset ({e})") from None
        columns = list(ds.features) if ds.features else list(next(iter(ds)))
        self.image_col, self.caption_col = _pick_columns(columns, image_key, caption_key, path)
        self.ds = ds.decode(False)  # images as {"bytes", "path"}: decoded (or skipped) one by one by us
        self.names = [f"{path}[part {i} of {ds.n_shards}]" for i in range(ds.n_shards)]

    def __len__(self):
        return len(self.names)

    def read(self, i: int, start: int = 0):
        part = self.ds.shard(num_shards=len(self.names), index=i)
        offset = 0
        # .iter(), not iter(): inside a loader worker, datasets would split the part over the workers once more
        for chunk in part.iter(batch_size=HF_READ_ROWS):
            for j in range(len(next(iter(chunk.values())))):
                if offset >= start:
                    row = {c: chunk[c][j] for c in chunk}
                    image = row.get(self.image_col)
                    path = image.get("path") if isinstance(image, dict) else None
                    yield offset, os.path.basename(path) if path else f"{i}/{offset}", row
                offset += 1


class HFShards(_Columns):
    """A saved Hugging Face dataset (``datasets.load_from_disk``), memory-mapped; shards are blocks of rows."""

    def __init__(self, path: str, image_key: str = "", caption_key: str = "", key: str = "dataset"):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ConfigError(f"{key}: hf:{path} is not a saved datasets folder (save_to_disk): {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"{key}: hf:{path} has no 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        self.image_col, self.caption_col = _pick_columns(list(ds.column_names), image_key, caption_key, path)
        # decoded by us, so that a bad image is one bad sample
        if self.image_col and isinstance(ds.features[self.image_col], datasets.Image):
            ds = ds.cast_column(self.image_col, datasets.Image(decode=False))
        self.ds = ds.select_columns([c for c in (self.image_col, self.caption_col) if c is not None])
        n = len(ds)
        rows = max(1, min(1000, n // 64))
        self.bounds = [(a, min(a + rows, n)) for a in range(0, n, rows)]
        self.names = [f"{path}[rows {a}:{b}]" for a, b in self.bounds]

    def __len__(self):
        return len(self.bounds)

    def read(self, i: int, start: int = 0):
        a, b = self.bounds[i]
        for lo in range(a + start, b, HF_READ_ROWS):
            chunk = self.ds[lo : min(lo + HF_READ_ROWS, b)]
            for j in range(len(next(iter(chunk.values())))):
                row = lo + j
                yield row - a, str(row), {c: chunk[c][j] for c in chunk}


# --------------------------------------------------------------------------------------------------------------
# decoding one sample
# --------------------------------------------------------------------------------------------------------------


class ImageDecoder:
    """Fields -> ``{"image": (3, R, R) in [-1, 1], "caption": str}`` (picklable: it runs in loader workers)."""

    def __init__(self, resolution: int, center_crop: bool = True, need_caption: bool = True, images: bool = True):
        self.resolution, self.center_crop, self.need_caption = resolution, center_crop, need_caption
        self.images = images  # False: captions only (prompt-only methods), no image is read

    def __call__(self, fields: dict) -> dict:
        if self.need_caption and not fields.get("caption"):
            raise BadSample("no caption")
        if not self.images:
            return {"caption": fields["caption"]}
        try:
            image = decode_image(fields["image"], self.resolution, self.center_crop)
        except (OSError, ValueError, SyntaxError) as e:
            raise BadSample(f"image does not decode ({e})") from None
        return {"image": image, "caption": fields.get("caption") or ""}


def collate_items(items: list[dict]) -> dict:
    """Stack tensors (dicts of tensors key by key), keep strings as lists; ``_n`` holds the sample keys."""
    out = {"_n": [it["_key"] for it in items]}
    for k, v in items[0].items():
        if k == "_key":
            continue
        if torch.is_tensor(v):
            out[k] = torch.stack([it[k] for it in items])
        elif isinstance(v, dict):
            out[k] = {kk: torch.stack([it[k][kk] for it in items]) for kk in v}
        else:
            out[k] = [it[k] for it in items]
    return out


# --------------------------------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """A sharded dataset as the trainers see it: ``has_images``, ``captions`` (not listed: streamed),
    ``labels`` (None), ``example(n)``, ``collate``, and ``reader(...)``, the loader the base trainer iterates
    (its ``consumed`` is the reading position that checkpoints carry).

    ``on_batch`` (main process) turns a collated batch into a training batch (e.g. VAE-encodes the images)."""

    has_images = True
    labels = None

    def __init__(
        self,
        source,
        decode,
        *,
        spec: str = "",
        workers: int = 2,
        shuffle_window: int = 256,
        max_bad: int = 100,
        on_batch=None,
    ):
        if len(source) == 0:
            raise DataError(f"dataset: {spec!r} has no shard")
        self.source, self.decode, self.spec = source, decode, spec
        self.workers, self.shuffle_window, self.max_bad = workers, max(1, shuffle_window), max_bad
        self.on_batch = on_batch
        self.has_images = getattr(decode, "images", True)
        self.captions = ()  # streamed: never listed in full
        # set per run by the reader (before the loader forks its workers)
        self.batch_size, self.rank, self.world, self.seed = 1, 0, 1, 0
        self.rotate, self.starts, self.bad_start = 0, {}, {}

    def __len__(self):
        raise TypeError("a streamed dataset has no length")

    def collate(self, items):
        return collate_items(items)

    # ---------------------------------------------------------------- one worker's samples
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.source), generator=g).tolist()

    def _window(self, epoch: int, shard: int, start: int, members: list) -> list:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + shard) * 1_000_037 + start)
        return [members[i] for i in torch.randperm(len(members), generator=g).tolist()]

    def samples(self, slot: int, slots: int, state=None, seen_bad=None):
        """Yield ``(position, item)`` (item: a decoded sample) or ``(position, None)`` for a bad one, forever,
        for ``slot`` of ``slots``; ``state`` (a position) resumes after the sample it names. ``seen_bad`` (a set)
        collects (shard, key) of the bad samples."""
        n, K = len(self.source), self.shuffle_window
        epoch, cursor, start, taken = state if state else (0, 0, 0, 0)
        seen_bad = set() if seen_bad is None else seen_bad
        while True:
            order = self._order(epoch)
            mine = order[slot::slots] if n >= slots else order
            good = 0
            for pos in range(cursor, len(mine)):
                shard = mine[pos]
                name = self.source.names[shard]

                def keep(offset, pos=pos):
                    return n >= slots or (offset + pos) % slots == slot

                window, w_start, read = [], start, 0
                try:
                    for offset, key, raw in self.source.read(shard, start):
                        read += 1
                        if offset >= w_start + K:
                            for j, member in enumerate(self._window(epoch, shard, w_start, window)):
                                if j >= taken:
                                    item = self._decode(name, member, seen_bad)
                                    good += item is not None
                                    yield (epoch, pos, w_start, j + 1), item
                            window, taken = [], 0
                            w_start += (offset - w_start) // K * K
                        if keep(offset):
                            window.append((key, raw))
                except Exception as e:  # noqa: BLE001 - any failure to read a shard (OSError, tarfile, Arrow)
                    self._bad(seen_bad, name, "", f"cannot be read ({type(e).__name__}: {e}); the rest is skipped")
                    yield (epoch, pos, w_start, taken), None
                else:
                    if read == 0 and start == 0:
                        self._bad(seen_bad, name, "", "is empty")
                        yield (epoch, pos, w_start, taken), None
                for j, member in enumerate(self._window(epoch, shard, w_start, window)):
                    if j >= taken:
                        item = self._decode(name, member, seen_bad)
                        good += item is not None
                        yield (epoch, pos, w_start, j + 1), item
                start, taken = 0, 0
            if good == 0 and cursor == 0:
                raise DataError(
                    f"dataset: no readable sample in the {len(mine)} shard(s) of {self.spec!r} that slot {slot} of "
                    f"{slots} reads in epoch {epoch} ({len(seen_bad)} bad samples or shards)"
                )
            epoch, cursor = epoch + 1, 0

    def _decode(self, shard_name, member, seen_bad):
        key, raw = member
        try:
            item = self.decode(self.source.fields(raw))
        except BadSample as e:
            self._bad(seen_bad, shard_name, key, str(e))
            return None
        item["_key"] = key
        return item

    def _bad(self, seen_bad, shard_name, key, why):
        if (shard_name, key) in seen_bad:
            return
        seen_bad.add((shard_name, key))
        where = f"shard {shard_name}" + (f" key {key!r}" if key else "")
        # one line naming the data, not this source line (loader workers print it on stderr)
        warnings.warn_explicit(f"skipped bad data: {where}: {why}", BadDataWarning, "stepdistill", 0)

    # ---------------------------------------------------------------- batches (in a loader worker)
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        logical = ((info.id if info is not None else 0) + self.rotate) % workers
        slot, slots = self.rank * workers + logical, self.world * workers
        seen_bad: set = set(tuple(x) for x in self.bad_start.get(logical, ()))
        items, pos = [], None
        try:
            for pos, item in self.samples(slot, slots, self.starts.get(logical), seen_bad):
                if len(seen_bad) > self.max_bad:
                    break
                if item is not None:
                    items.append(item)
                if len(items) == self.batch_size:
                    batch = self.collate(items)
                    batch["_state"] = (logical, tuple(pos), sorted(seen_bad))
                    yield batch
                    items = []
        except DataError as e:
            yield {"_error": str(e)}
            return
        yield {"_error": _too_many(len(seen_bad), self.max_bad, self.spec)}

    def reader(self, batch_size: int, rank: int, world: int, seed: int) -> "StreamReader":
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        return StreamReader(self)

    # ---------------------------------------------------------------- a fixed batch (sample grids, probes)
    def example(self, n: int, generator=None):
        """The first ``n`` good samples of the shards in sorted order (always the same ones), collated."""
        cached = getattr(self, "_example", None)
        if cached is None or len(cached) < n:
            cached, seen = [], set()
            for shard in range(len(self.source)):
                try:
                    for _, key, raw in self.source.read(shard):
                        item = self._decode(self.source.names[shard], (key, raw), seen)
                        if item is not None:
                            cached.append(item)
                        if len(cached) >= n:
                            break
                except Exception as e:  # noqa: BLE001
                    self._bad(seen, self.source.names[shard], "", f"cannot be read ({e})")
                if len(cached) >= n:
                    break
            if not cached:
                raise DataError(f"dataset: no readable sample in {self.spec!r}")
            self._example = cached
        items = [cached[i % len(cached)] for i in range(n)]
        batch = self.collate(items)
        return self.on_batch(batch) if self.on_batch is not None else batch


def _too_many(count: int, limit: int, spec: str) -> str:
    return (
        f"dataset: more than max_bad_samples={limit} bad samples or shards in {spec!r} ({count} on this process, "
        "each named in a warning above); fix or remove them, or raise max_bad_samples"
    )


class StreamReader:
    """The loader of a :class:`ShardStream` on one process: a torch DataLoader over ``workers`` processes whose
    batches carry their worker's reading position; ``consumed`` (checkpointed) is the position of every worker, whose
    turn is next, and the bad samples seen."""

    def __init__(self, stream: ShardStream):
        self.stream = stream
        self.state = {"workers": stream.workers, "batches": 0, "pos": {}, "bad": {}}

    @property
    def consumed(self) -> dict:
        s = self.state
        return {
            "workers": s["workers"],
            "batches": s["batches"],
            "pos": {str(k): list(v) for k, v in s["pos"].items()},
            "bad": {str(k): [list(x) for x in v] for k, v in s["bad"].items()},
        }

    @consumed.setter
    def consumed(self, value):
        if not isinstance(value, dict):
            raise ConfigError(
                "resume: the checkpoint's data position is a sample count (a map-style dataset), but the dataset "
                f"is now streamed ({self.stream.spec!r}); resume with the dataset it was trained on"
            )
        if value["workers"] != self.stream.workers:
            raise ConfigError(f"resume: data_workers was {value['workers']}, now {self.stream.workers}")
        self.state = {
            "workers": value["workers"],
            "batches": value["batches"],
            "pos": {int(k): tuple(v) for k, v in value["pos"].items()},
            "bad": {int(k): [tuple(x) for x in v] for k, v in value["bad"].items()},
        }

    def __iter__(self):
        st, s = self.stream, self.state
        workers = st.workers
        st.rotate = s["batches"] % max(workers, 1)
        st.starts, st.bad_start = dict(s["pos"]), dict(s["bad"])
        loader = torch.utils.data.DataLoader(st, batch_size=None, num_workers=workers)
        for batch in loader:
            if "_error" in batch:
                raise DataError(batch["_error"])
            logical, pos, bad = batch.pop("_state")
            s["pos"][logical], s["bad"][logical] = tuple(pos), [tuple(x) for x in bad]
            s["batches"] += 1
            total = sum(len(v) for v in s["bad"].values())
            if total > st.max_bad:
                raise DataError(_too_many(total, st.max_bad, st.spec))
            yield st.on_batch(batch) if st.on_batch is not None else batch

    def __len__(self):
        return 2**62


def open_stream(spec: str, *, image_key="", caption_key="", key="dataset"):
    """The source of a ``shards:`` / ``hf:`` spec."""
    if spec.startswith("shards:"):
        return TarShards(expand_shards(spec[len("shards:") :], key), image_key, caption_key)
    if spec.startswith("hf:"):
        path = spec[len("hf:") :]
        if not os.path.isdir(path):
            raise ConfigError(f"{key}: hf:{path} does not exist (expected a datasets folder)")
        cls = HFShards if _is_saved_dataset(path) else HFStreamShards
        return cls(path, image_key, caption_key, key)
    raise ConfigError(f"{key}: {spec!r} is not a shards: or hf: dataset")
