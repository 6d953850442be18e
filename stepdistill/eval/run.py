"""``stepdistill eval``: sample an exported pipeline (or read a folder of images) and score it.

Sources (``pipeline``):

* an exported pipeline folder (``model_index.json``), loaded with ``DiffusionPipeline.from_pretrained``:
  class-conditional pipelines (``StepDistillClassPipeline``) get labels ``i % num_classes`` for sample ``i``
  (0..num_classes-1 in turn), unconditional ones no labels, text-to-image ones the prompts of the prompt
  file, cycled (sample ``i`` gets prompt ``i % len(prompts)``);
* a hub id (``org/name``, not a local path): its snapshot in the local hub cache, used as the folder above; with
  ``allow_download`` a hub id missing from the cache is downloaded by ``DiffusionPipeline.from_pretrained``;
* a folder of images without ``model_index.json``: its files sorted by name, the first ``num_samples`` of them
  (fewer is an error); prompts for CLIP are matched to files in that order, cycled.

References (``reference``): "digits" (the held-out digits: FD-digits through ``FDDigits``), a folder of
images (statistics computed once and cached, see ``stepdistill.eval.fid.reference_stats``), or a ``.npz`` of
cached statistics (rejected as stale when the folder it was computed from still exists and has changed, or
when it was computed with another feature extractor or crop protocol).

Metrics: "fd_digits" (reference "digits"), "fid", "kid", "pr" (improved precision/recall in the same
Inception feature space), "clip" (needs prompts and an open_clip model) and "diversity" (intra-class / intra-prompt
diversity, :mod:`stepdistill.eval.diversity`: mean pairwise feature distance and Vendi score among the samples of
each class label or prompt, in the FD-digits classifier's features with the digits reference, beside precision /
recall in those features; with another reference in the Inception features of fid / kid / pr, one of which it
needs). Default: ("fd_digits",) for the digits reference, else ("fid", "kid", "pr") plus "clip" when prompts and a
CLIP model are given.

Sampling convention (reproducible, independent of the number of processes):

* samples are produced in pipeline calls of ``batch_size`` images (chunk ``c`` holds samples
  ``c * batch_size ...``), images in [0, 1] from ``output_type="pt"`` mapped to [-1, 1] by ``x * 2 - 1``;
* class-conditional / unconditional pipelines draw all their noise from ONE ``torch.Generator()`` seeded with
  ``seed``, passed to every call in order: with the default ``batch_size=250`` this is exactly the sampling
  of ``stepdistill demo`` (``make demo``), so evaluating its exported pipeline against "digits" reproduces
  the demo's student@1 FD-digits. A process whose shard starts at chunk ``c > 0`` first advances its
  generator by replaying the draws of chunks ``0..c-1`` (initial noise, plus the LCMScheduler's noise
  between steps), without running the network;
* text-to-image pipelines use one generator per chunk, seeded ``seed * 1000003 + c``.

Multi-GPU: under ``accelerate launch`` each process takes a contiguous share of the chunks
(``Accelerator.split_between_processes``), samples them and computes their features / CLIP cosines; the
per-chunk results are gathered (``gather_object``) and scored on the main process; every process returns the
same metrics dict (broadcast). FD-digits scores the float samples (as the demo does); FID, KID,
precision/recall and CLIP see them quantised to uint8 with rounding.

Outputs in ``out_dir``: ``metrics.json``, ``samples.png`` (a grid of the first samples) and, with "clip",
``clip_per_sample.json`` (the per-sample cosines).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..config import ConfigError, DataError
from ..utils import save_image_grid, to_uint8, write_json

METRICS = ("fd_digits", "fid", "kid", "pr", "clip", "diversity")
INCEPTION_METRICS = ("fid", "kid", "pr")
DEMO_BATCH_SIZE = 250


def _not_distributed() -> bool:
    return False


def _validate_metrics(metrics, reference, prompts, clip_model) -> tuple[str, ...]:
    if metrics is None:
        if reference == "digits":
            return ("fd_digits",)
        extra = ("clip",) if prompts is not None and clip_model is not None else ()
        return INCEPTION_METRICS + extra
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"unknown metrics {unknown or metrics}; choose from {METRICS}")
    if "fd_digits" in metrics and reference != "digits":
        raise ConfigError(f"fd_digits needs reference='digits', got {reference!r}")
    scored = [m for m in metrics if m in INCEPTION_METRICS]
    if scored and reference == "digits":
        raise ConfigError(
            f"{scored} need a folder of reference images or a .npz of statistics, not 'digits' (use fd_digits)"
        )
    if scored and reference is None:
        raise ConfigError(f"{scored} need a reference (a folder of images or a .npz of statistics)")
    if "diversity" in metrics and reference != "digits" and not scored:
        raise ConfigError(f"diversity with reference {reference!r} uses the Inception features: add fid, kid or pr")
    if "clip" in metrics:
        if prompts is None:
            raise ConfigError("the clip metric needs a prompt file (prompts=...)")
        if clip_model is None:
            raise ConfigError("the clip metric needs an open_clip model name (clip_model=...)")
    return metrics


# --------------------------------------------------------------------------------------------------------
# sample sources
# --------------------------------------------------------------------------------------------------------


class _FolderSource:
    kind = "folder"

    def __init__(self, folder, num_samples: int, mode: str, center_crop_size):
        from .fid import check_same_size, list_image_files, verify_images

        files = list_image_files(folder)
        if len(files) < num_samples:
            raise DataError(f"{folder} holds {len(files)} images, fewer than num_samples={num_samples}")
        self.files = files[:num_samples]
        verify_images(self.files)
        self.mode, self.center_crop_size = mode, center_crop_size
        if center_crop_size is None:
            check_same_size(self.files)

    def images(self, chunk_index: int, start: int, stop: int, prompts) -> torch.Tensor:
        from .fid import load_images

        return load_images(self.files[start:stop], self.mode, self.center_crop_size)  # uint8


def _is_text_pipeline(pipe) -> bool:
    return getattr(pipe, "tokenizer", None) is not None or getattr(pipe, "text_encoder", None) is not None


class _PipelineSource:
    def __init__(self, folder, device, seed: int, batch_size: int, call_kwargs=None):
        """``folder``: an exported pipeline folder, or a hub id to download (``allow_download``); ``call_kwargs``:
        extra arguments of every pipeline call (e.g. hybrid sampling's ``teacher`` / ``teacher_steps``)."""
        from diffusers import DiffusionPipeline

        import stepdistill  # noqa: F401  (registers our pipeline classes with diffusers)

        self.pipe = DiffusionPipeline.from_pretrained(str(folder)).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.seed, self.batch_size = seed, batch_size
        self.call_kwargs = dict(call_kwargs or {})
        unet = getattr(self.pipe, "unet", None)
        if _is_text_pipeline(self.pipe):
            self.kind = "text"
        elif unet is not None and getattr(unet.config, "num_class_embeds", None):
            self.kind = "class"
            self.num_classes = int(unet.config.num_class_embeds) - 1  # the last embedding is the null class
        else:
            self.kind = "unconditional"
        self.generator = None

    @property
    def channels(self) -> int | None:
        unet = getattr(self.pipe, "unet", None)
        return None if unet is None or self.kind == "text" else int(unet.config.in_channels)

    def _advance(self, n_images: int) -> None:
        """Consume the generator as a class/unconditional pipeline call on ``n_images`` would."""
        from diffusers import LCMScheduler

        unet = self.pipe.unet
        size = unet.config.sample_size
        shape = (n_images, unet.config.in_channels, size, size)
        steps = len(self.pipe.config.trained_timesteps)
        if self.call_kwargs.get("teacher_steps"):
            raise RuntimeError("cannot reproduce the noise stream of hybrid sampling across processes; use one process")
        if steps > 1 and not isinstance(self.pipe.scheduler, LCMScheduler):
            raise RuntimeError(
                f"cannot reproduce the noise stream of a {steps}-step {type(self.pipe.scheduler).__name__} pipeline "
                "across processes; evaluate it with one process"
            )
        for _ in range(steps):  # initial noise + (steps - 1) LCM noise draws
            torch.randn(shape, generator=self.generator, dtype=unet.dtype)

    def start(self, chunks) -> None:
        """Prepare the noise stream for this process's first chunk."""
        if self.kind == "text" or not chunks:
            return
        self.generator = torch.Generator().manual_seed(self.seed)
        first = chunks[0][1]
        for s in range(0, first, self.batch_size):
            self._advance(min(self.batch_size, first - s))

    @torch.no_grad()
    def images(self, chunk_index: int, start: int, stop: int, prompts) -> torch.Tensor:
        n = stop - start
        if self.kind == "text":
            g = torch.Generator().manual_seed(self.seed * 1000003 + chunk_index)
            chunk_prompts = [prompts[i % len(prompts)] for i in range(start, stop)]
            out = self.pipe(prompt=chunk_prompts, generator=g, output_type="pt", **self.call_kwargs).images
        elif self.kind == "class":
            labels = torch.arange(start, stop) % self.num_classes
            out = self.pipe(class_labels=labels, generator=self.generator, output_type="pt", **self.call_kwargs).images
        else:
            out = self.pipe(num_images=n, generator=self.generator, output_type="pt", **self.call_kwargs).images
        return (out.float() * 2 - 1).cpu()


def _resolve_pipeline(pipeline, allow_download: bool) -> str:
    """A local folder as it is; a hub id as its cached snapshot folder, or (``allow_download``) the id itself;
    otherwise an error that names the path and says whether it is missing or not in the hub cache."""
    from ..models.loading import looks_like_hub_id, resolve_model_path

    if Path(pipeline).is_dir():
        return str(pipeline)
    if not looks_like_hub_id(str(pipeline)):
        raise FileNotFoundError(
            f"--pipeline: folder {str(pipeline)!r} does not exist (expected an exported pipeline, a hub id or a "
            "folder of images)"
        )
    return resolve_model_path(str(pipeline), allow_download=bool(allow_download), key="--pipeline")


def _open_source(pipeline, num_samples, mode, center_crop_size, device, seed, batch_size, call_kwargs=None):
    path = Path(pipeline)
    if not path.is_dir():  # a hub id allowed to download
        return _PipelineSource(str(pipeline), device, seed, batch_size, call_kwargs)
    if (path / "model_index.json").is_file():
        return _PipelineSource(path, device, seed, batch_size, call_kwargs)
    if call_kwargs:
        raise ConfigError(
            f"{pipeline} is a folder of images: pipeline call arguments {sorted(call_kwargs)} need a pipeline"
        )
    return _FolderSource(path, num_samples, mode, center_crop_size)


# --------------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------------


def _load_reference(reference, extractor, metrics, center_crop_size, cache_dir, batch_size):
    """(stats, info) of a folder or .npz reference for the Inception metrics."""
    from .fid import ReferenceStats, protocol_meta, reference_stats, verify_reference_source

    need_features = "kid" in metrics or "pr" in metrics
    path = Path(reference)
    if path.suffix == ".npz":
        protocol = protocol_meta(extractor, center_crop_size)
        expected = {k: protocol[k] for k in ("feature_extractor", "center_crop_size")}
        stats = ReferenceStats.load(path, expected_protocol=expected)
        verified = verify_reference_source(stats, path)
        if need_features and stats.features is None:
            raise DataError(f"{path} holds no features (needed by kid / pr); recompute it from the reference images")
        return stats, {"reference_kind": "npz", "reference_stats": str(path), "reference_source_verified": verified}
    if not path.is_dir():
        raise FileNotFoundError(f"reference not found: {path} (expected 'digits', a folder of images or a .npz)")
    stats, cache = reference_stats(
        path,
        extractor,
        cache_dir=cache_dir,
        center_crop_size=center_crop_size,
        batch_size=min(batch_size, 50),
        keep_features=need_features,
    )
    return stats, {"reference_kind": "folder", "reference_stats": cache}


def _precheck_reference(reference, metrics, num_samples, num_features, kid_subset_size, center_crop_size) -> None:
    """Before any model loads or any feature is extracted: the reference exists, a folder's images share one
    size (without centre crop), and both sets have enough samples for the metrics (FID: num_features + 1 each;
    KID: the subset size)."""
    import numpy as np

    from .fid import check_same_size, list_image_files

    path = Path(reference)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"--reference: statistics file {reference!r} does not exist")
        with np.load(path, allow_pickle=False) as z:
            n = int(z["n"]) if "n" in z.files else 0
    elif path.is_dir():
        files = list_image_files(path)
        if center_crop_size is None:
            check_same_size(files)
        n = len(files)
    else:
        raise FileNotFoundError(
            f"--reference: {reference!r} does not exist (expected 'digits', a folder of images or a .npz)"
        )
    if num_features is not None:
        _check_counts(SimpleNamespace(n=n, num_features=num_features), num_samples, metrics, kid_subset_size)
    elif "kid" in metrics and n:
        _check_counts(SimpleNamespace(n=n, num_features=0), num_samples, ("kid",), kid_subset_size)


def _check_counts(stats, num_samples, metrics, kid_subset_size) -> None:
    from .fid import _check_fid_count
    from .fid import kid_subset_size as checked_subset_size

    if "fid" in metrics:
        if stats.n:  # 0: unknown (a foreign .npz)
            _check_fid_count(stats.n, stats.num_features, "reference")
        _check_fid_count(num_samples, stats.num_features, "generated")
    if "kid" in metrics:
        checked_subset_size(stats.n, num_samples, kid_subset_size)


# --------------------------------------------------------------------------------------------------------
# run_eval
# --------------------------------------------------------------------------------------------------------


def run_eval(
    pipeline: str,
    reference: str | None,
    out_dir: str,
    *,
    prompts: str | None = None,
    num_samples: int = 1000,
    batch_size: int = DEMO_BATCH_SIZE,
    metrics=None,
    inception_weights: str | None = None,
    allow_download: bool = False,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    seed: int = 0,
    accelerator=None,
    center_crop_size: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    pr_k: int = 3,
    cache_dir: str | None = None,
    feature_extractor: torch.nn.Module | None = None,
    grid_size: int | None = None,
    resize: str = "torchmetrics",
    pipeline_kwargs: dict | None = None,
) -> dict:
    """Sample ``num_samples`` images from ``pipeline`` (or read them from a folder) and score them against
    ``reference``; write ``metrics.json`` and ``samples.png`` to ``out_dir`` and return the metrics.

    ``feature_extractor`` replaces Inception for fid / kid / pr (any module mapping uint8 images (N, 3, H, W)
    to (N, D) features; its metrics are then not comparable with Inception FID). ``resize``: Inception's
    resize to 299, "torchmetrics" or "tf1" (see :mod:`stepdistill.eval.fid`). ``allow_download`` lets the
    Inception weights, an open_clip pretrained tag and a hub-id ``pipeline`` download. See the module docstring
    for sources, references and the sampling convention. Paths, sample counts and settings are checked before
    any model loads. ``pipeline_kwargs``: extra arguments of every pipeline call (hybrid sampling:
    ``{"teacher": Teacher, "teacher_steps": k, "teacher_guidance_scale": w}``, see :mod:`stepdistill.hybrid`).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive int, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    from .fid import INCEPTION_FEATURE_DIM, RESIZES

    if resize not in RESIZES:
        raise ConfigError(f"resize must be one of {RESIZES}, got {resize!r}")
    reference = str(reference) if reference is not None else None
    metrics = _validate_metrics(metrics, reference, prompts, clip_model)
    prompt_list = None
    if prompts is not None:
        from ..data.folders import load_prompts

        prompt_list = load_prompts(prompts)  # FileNotFoundError / "empty prompt file" DataError
    if "clip" in metrics:
        from .clip_score import check_clip_weights

        check_clip_weights(clip_model, clip_pretrained, allow_download)
    pipeline = _resolve_pipeline(pipeline, allow_download)
    if any(m in INCEPTION_METRICS for m in metrics):
        dim = INCEPTION_FEATURE_DIM if feature_extractor is None else getattr(feature_extractor, "num_features", None)
        _precheck_reference(reference, metrics, num_samples, dim, kid_subset_size, center_crop_size)
    acc = accelerator if accelerator is not None else Accelerator()
    device = acc.device

    # Build models and check the reference before sampling anything (fail fast).
    extractor = None
    if any(m in INCEPTION_METRICS for m in metrics):
        if feature_extractor is not None:
            extractor = feature_extractor.to(device).eval()
        else:
            from .fid import InceptionFeatures

            extractor = InceptionFeatures(inception_weights, allow_download=allow_download, resize=resize).to(device)
    scorer = None
    if "clip" in metrics:
        from .clip_score import CLIPScorer

        scorer = CLIPScorer(
            clip_model, clip_pretrained, device=device, batch_size=min(batch_size, 64), allow_download=allow_download
        )
    ref_stats, info = None, {}
    if extractor is not None:

        def prepare_reference():
            stats_info = _load_reference(reference, extractor, metrics, center_crop_size, cache_dir, batch_size)
            _check_counts(stats_info[0], num_samples, metrics, kid_subset_size)
            return stats_info

        # main process only (it alone scores); the others learn whether it failed, so they do not wait forever
        ref_stats, info = _on_main_process(acc, prepare_reference, share_result=False) or (None, {})

    digits = "fd_digits" in metrics or ("diversity" in metrics and reference == "digits")  # digit images scored
    mode = "L" if digits else "RGB"
    source = _open_source(pipeline, num_samples, mode, center_crop_size, device, seed, batch_size, pipeline_kwargs)
    if source.kind == "text" and prompt_list is None:
        raise ConfigError(f"{pipeline} is a text-to-image pipeline: pass a prompt file (prompts=...)")
    if digits:
        from .fd_digits import load_classifier

        if source.kind == "text" or (source.kind != "folder" and source.channels != 1):
            raise ConfigError(f"{'/'.join(metrics)} need 1-channel digit images; {pipeline} produces other images")
    if "fd_digits" in metrics:
        need = int(load_classifier().num_features) + 1
        if num_samples < need:
            raise ConfigError(f"FD-digits needs at least {need} generated images, got num_samples={num_samples}")

    # Shard the chunks of sample indices between processes.
    chunks = [(c, s, min(s + batch_size, num_samples)) for c, s in enumerate(range(0, num_samples, batch_size))]
    if grid_size is None:
        grid_size = 100 if "fd_digits" in metrics else 64
    grid_size = min(grid_size, num_samples)
    t0 = time.perf_counter()
    with acc.split_between_processes(chunks) as mine:
        mine = list(mine)
        if isinstance(source, _PipelineSource):
            source.start(mine)
        results = []
        bar = tqdm(
            total=sum(stop - start for _, start, stop in mine),
            desc="eval: sampling" if source.kind != "folder" else "eval: reading",
            disable=not acc.is_local_main_process,
            unit="img",
        )
        for c, start, stop in mine:
            imgs = source.images(c, start, stop, prompt_list)
            res = {"start": start, "groups": _groups(source, start, stop, prompt_list)}
            if digits:
                res["digits"] = imgs if imgs.is_floating_point() else imgs.float() / 127.5 - 1
            u8 = imgs if imgs.dtype == torch.uint8 else to_uint8(imgs)
            if center_crop_size is not None and source.kind != "folder":  # folders are cropped when read
                from .fid import center_crop_resize

                u8 = center_crop_resize(u8, center_crop_size)
            if extractor is not None:
                from .fid import extract_features

                res["features"] = extract_features(u8, extractor, batch_size=min(batch_size, 50))
            if scorer is not None:
                res["clip"] = scorer.cosines(u8, [prompt_list[i % len(prompt_list)] for i in range(start, stop)])
            if start < grid_size:
                res["grid"] = u8[: grid_size - start].cpu()
            results.append(res)
            bar.update(stop - start)
        bar.close()
    header = {
        "pipeline": str(pipeline),
        "pipeline_kind": source.kind,
        "reference": reference,
        "metrics": list(metrics),
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "num_processes": acc.num_processes,
        "sampling_seconds": round(time.perf_counter() - t0, 3),
    }
    header["seconds_per_image"] = round(header["sampling_seconds"] / num_samples, 6)
    if extractor is not None and feature_extractor is None:
        header["inception_resize"] = resize
    run = SimpleNamespace(
        out_dir=out_dir,
        prompts=prompts,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        extractor=extractor,
        ref_stats=ref_stats,
        ref_info=info,
        center_crop_size=center_crop_size,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        pr_k=pr_k,
        seed=seed,
        grid_size=grid_size,
    )
    gathered = gather_object(results)
    return _on_main_process(acc, lambda: _score(gathered, metrics, header, run), share_result=True)


def _groups(source, start: int, stop: int, prompts) -> torch.Tensor:
    """The condition of each sample (diversity is measured within each): its class label, its prompt's index, or
    0 (unconditional pipelines, folders)."""
    index = torch.arange(start, stop)
    if getattr(source, "kind", None) == "class":
        return index % source.num_classes
    if getattr(source, "kind", None) == "text" and prompts:
        return index % len(prompts)
    return torch.zeros_like(index)


def _diversity(gathered, run: SimpleNamespace, space: str) -> dict:
    """Intra-condition diversity (stepdistill.eval.diversity) in the digits classifier's features (with
    precision / recall against the held-out digits in those features) or in the Inception features."""
    from .diversity import grouped_diversity

    groups = torch.cat([r["groups"] for r in gathered])
    out = {"feature_space": space}
    if space == "digits":
        from ..data.digits import load_digits_tensors
        from .fd_digits import load_classifier
        from .precision_recall import precision_recall

        net = load_classifier()
        images = torch.cat([r["digits"] for r in gathered])
        with torch.no_grad():
            feats = torch.cat([net.features(x) for x in images.split(500)])
            real = load_digits_tensors("test", int(images.shape[-1]))[0]
            real = torch.cat([net.features(x) for x in real.split(500)])
        pr = precision_recall(real, feats, k=run.pr_k)
        out.update({"precision": pr["precision"], "recall": pr["recall"], "pr_k": run.pr_k})
    else:
        feats = torch.cat([r["features"] for r in gathered])
    div = grouped_diversity(feats, groups)
    out.update(
        mean_pairwise_distance=div["mean_pairwise_distance"],
        mean_vendi=div["mean_vendi"],
        per_condition={str(g): v for g, v in div["per_group"].items()},
    )
    return out


def _on_main_process(acc, fn, share_result: bool):
    """Run ``fn`` on the main process; broadcast its exception (and its result if ``share_result``) so that
    every process raises the same error or returns the same value."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if acc.is_main_process:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every process
            error = e
    if acc.num_processes > 1:
        result_shared, error = broadcast_object_list([result if share_result else None, error])
        if not acc.is_main_process:
            result = result_shared
    if error is not None:
        raise error
    return result


def _score(gathered, metrics, header: dict, run: SimpleNamespace) -> dict:
    """Metrics of the gathered per-chunk results (main process); writes the outputs."""
    gathered = sorted(gathered, key=lambda r: r["start"])
    out = dict(header)
    if "fd_digits" in metrics:
        from .fd_digits import FDDigits

        digits = torch.cat([r["digits"] for r in gathered])
        fd = FDDigits(resolution=int(digits.shape[-1]))
        # Only the main process scores: stop torchmetrics from syncing its states with the other processes
        # (they are waiting in broadcast_object_list, so a sync would deadlock).
        fd.metric.distributed_available_fn = _not_distributed
        out["fd_digits"] = fd.score(digits)
        out["reference_kind"] = "digits (held-out test split)"
    if run.extractor is not None:
        from .fid import feature_extractor_id, frechet_distance, kernel_distance
        from .fid import kid_subset_size as checked_subset_size

        feats = torch.cat([r["features"] for r in gathered])
        out.update(run.ref_info)
        out["feature_extractor"] = feature_extractor_id(run.extractor)
        out["center_crop_size"] = run.center_crop_size
        out["reference_num_samples"] = run.ref_stats.n or None  # None: unknown (a foreign .npz)
        if "fid" in metrics:
            out["fid"] = frechet_distance(run.ref_stats, feats)
        if "kid" in metrics:
            size = checked_subset_size(run.ref_stats.n, len(feats), run.kid_subset_size)
            mean, std = kernel_distance(run.ref_stats.features, feats, run.kid_subsets, size, seed=run.seed)
            out["kid"] = {"mean": mean, "std": std, "subsets": run.kid_subsets, "subset_size": size}
        if "pr" in metrics:
            from .precision_recall import precision_recall

            pr = precision_recall(torch.from_numpy(run.ref_stats.features), feats, k=run.pr_k)
            out.update({"precision": pr["precision"], "recall": pr["recall"], "pr_k": run.pr_k})
    if "diversity" in metrics:
        out["diversity"] = _diversity(gathered, run, "digits" if "digits" in gathered[0] else "inception")
    if "clip" in metrics:
        from .clip_score import summarize_cosines

        clip = summarize_cosines(torch.cat([r["clip"] for r in gathered]))
        clip_path = os.path.join(run.out_dir, "clip_per_sample.json")
        write_json(clip.pop("per_sample"), clip_path)
        out["clip_per_sample"] = clip_path
        out.update(clip)
        out.update({"clip_model": run.clip_model, "clip_pretrained": run.clip_pretrained, "prompts": str(run.prompts)})
    grid = torch.cat([r["grid"] for r in gathered if "grid" in r])[: run.grid_size]
    nrow = 10 if "fd_digits" in metrics else None
    scale = 4 if grid.shape[-1] <= 64 else 1
    save_image_grid(grid.float() / 127.5 - 1, os.path.join(run.out_dir, "samples.png"), nrow=nrow, scale=scale)
    write_json(out, os.path.join(run.out_dir, "metrics.json"))
    return out
