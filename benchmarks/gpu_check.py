"""One prepared GPU check (``make gpu-check``): kernels, CUDA graphs, real-size bf16 training and sampling.

Written to run once, unattended, on one large GPU and to fit 10 minutes on an H200 (not yet run on a GPU), writing
every figure to ``<out>/gpu_check.md`` and ``<out>/gpu_check.json`` (rewritten after every row, so a run killed
at a time limit keeps what it measured). The whole run has a time limit (``--time-limit``, 540 s) and each
section a budget (an item that would start after it is listed as skipped, not run); each section runs in its
own try/except (a crash is recorded in the report, the next section still runs, and the script exits 1 at the
end if any check failed):

1. ``kernels``: every fused op of stepdistill.ops (benchmarks/bench_kernels.py's table of ops) at SD1.5 and
   SDXL latent sizes, batch 1 / 8 / 64, float32 and bfloat16: eager torch, torch.compile of the torch
   reference and the Triton kernel, as GB/s of minimal traffic and as a fraction of a same-size ``copy_``;
   the max error of Triton (and of torch.compile) against the eager torch backend. A Triton error above the
   dtype's tolerance fails the check.
2. ``graphs``: stepdistill.ops.capture_generator on a one-step and a four-step generator call of an
   SD1.5-size UNet (UNet + fused DDIM step): eager vs replay time, and the replay's output against eager.
3. ``training``: SD1.5, SD2.1-base, SDXL and DiT-XL/2 networks built from their published configs (written
   below; random weights, nothing downloaded) and 10 iterations of each real-model recipe (DMD2 full and
   LoRA, LCM-LoRA, LCM, SIM, VSD, progressive) at the recipe's per-device batch, halved on out-of-memory (and
   said so), then DMD2 SDXL with gradient checkpointing / teacher offload: seconds per iteration, peak
   allocated memory, model state. A non-finite loss (or a skipped step) fails the check. Text encoders are
   correct-shape (the real hidden sizes and 77 tokens) but 2 layers deep, and the VAE that encodes the
   training images is a correct-shape 8x VAE with tiny widths: their cost is not the real one.
4. ``sampling``: the exported pipeline class (StepDistillSDXLPipeline with the LCM scheduler on the trained
   timesteps) at SDXL size, one and four steps, vs the stock StableDiffusionXLPipeline with 50 steps and CFG,
   images per second with and without torch.compile of the UNet (real-config SDXL VAE; random weights).

``--dry-run`` runs the same code on CPU with tiny configs of the same classes (the test suite runs it, so the
script cannot rot); its numbers say nothing about a GPU.

Example::

    python benchmarks/gpu_check.py --out outputs/gpu          # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu   # anywhere, a few CPU minutes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

SECTIONS = ("kernels", "graphs", "training", "sampling")
# seconds per section: the whole GPU run fits 10 minutes with margin for imports and set-up
BUDGET = {"kernels": 100, "graphs": 30, "training": 240, "sampling": 120}
TIME_LIMIT = 540  # the whole run; an item starts only inside its section's budget, so leave room for the last one
BUDGET_DRY = {"kernels": 90, "graphs": 15, "training": 120, "sampling": 40}
CAPTIONS = ["a cat", "a dog", "the cat", "a red dog", "a cat and a dog", "the red cat", "a dog of the cat", "red"]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------------
# published configs (diffusers config.json of each hub model, the keys that differ from the class defaults)
# --------------------------------------------------------------------------------------------------------

SD15_UNET = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
    _class_name="UNet2DConditionModel",
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)
SD21_UNET = dict(  # stabilityai/stable-diffusion-2-1-base unet/config.json
    SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    _class_name="UNet2DConditionModel",
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
DIT_XL2 = dict(  # facebook/DiT-XL-2-256 transformer/config.json (DiTTransformer2DModel)
    _class_name="DiTTransformer2DModel",
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
    norm_num_groups=32,
)
SDXL_VAE = dict(  # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# kind -> network config, text encoders (hidden size, projection dim or None), VAE scaling factor
ARCHS = {
    "sd15": dict(net=SD15_UNET, text=[(768, None)], scaling=0.18215),
    "sd21": dict(net=SD21_UNET, text=[(1024, None)], scaling=0.18215),
    "sdxl": dict(net=SDXL_UNET, text=[(768, None), (1280, 1280)], scaling=0.13025),
    "dit": dict(net=DIT_XL2, text=[], scaling=0.18215),
}
TEACHERS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "facebook/DiT-XL-2-256": "dit",
}


def tiny_arch(kind: str) -> dict:
    """The same classes and block layout at tiny widths (the dry run)."""
    a = dict(ARCHS[kind])
    net = dict(a["net"])
    if kind == "dit":
        net.update(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, num_embeds_ada_norm=10)
    else:
        n = len(net["block_out_channels"])
        net.update(
            block_out_channels=[8 * 2**i for i in range(n)], layers_per_block=1, sample_size=8, norm_num_groups=4
        )
        if isinstance(net["attention_head_dim"], list):
            net["attention_head_dim"] = [2 * 2**i for i in range(n)]
        else:
            net["attention_head_dim"] = 4
        if "transformer_layers_per_block" in net:
            net["transformer_layers_per_block"] = [1] * n
    widths = [(32, None)] if len(a["text"]) == 1 else [(32, None), (32, 32)]
    if kind != "dit":
        net["cross_attention_dim"] = sum(w for w, _ in widths)
        if kind == "sdxl":
            net.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    return dict(a, net=net, text=widths if a["text"] else [])


# --------------------------------------------------------------------------------------------------------
# context
# --------------------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.used()


class Section:
    """Rows, notes, errors and skips of one section."""

    def __init__(self, name: str, budget: float):
        self.name, self.budget = name, Budget(budget)
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.errors: list[str] = []
        self.skipped: list[str] = []

    def fail(self, what: str, exc: BaseException | None = None) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:300] if exc is not None else ""
        msg = what if exc is None else f"{what}: {type(exc).__name__}: {first}"
        self.errors.append(msg)
        log(f"FAILED {self.name}: {msg}")
        if exc is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stdout)
            sys.stdout.flush()

    def can_start(self, what: str, estimate: float = 0.0) -> bool:
        if self.budget.left() > estimate:
            return True
        self.skipped.append(what)
        log(f"skip {self.name}: {what} (budget {self.budget.seconds:.0f} s used)")
        return False

    def as_dict(self) -> dict:
        status = "failed" if self.errors else ("partial" if self.skipped else "ok")
        return dict(
            status=status,
            seconds=round(self.budget.used(), 2),
            budget_seconds=self.budget.seconds,
            rows=self.rows,
            notes=self.notes,
            errors=self.errors,
            skipped=self.skipped,
        )


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _header(*columns: str) -> list[str]:
    """A markdown table's header and rule."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _max_err(a, b) -> tuple[float, float]:
    """(max |a - b|, max |b|) over the tensors of two outputs (a tensor or a tuple of tensors)."""
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    err, scale = 0.0, 0.0
    for x, y in zip(a, b):
        if torch.is_tensor(x) and torch.is_tensor(y):
            err = max(err, (x.double() - y.double()).abs().max().item())
            scale = max(scale, y.double().abs().max().item())
    return err, scale


def _clone(out):
    if isinstance(out, (tuple, list)):
        return type(out)(o.detach().clone() if torch.is_tensor(o) else o for o in out)
    return out.detach().clone()


# --------------------------------------------------------------------------------------------------------
# 1. kernels (bench_kernels.py's ops and timer)
# --------------------------------------------------------------------------------------------------------

KERNEL_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # max |Triton - torch| / max |torch|


def section_kernels(sec: Section, ctx: dict) -> None:
    from stepdistill.ops import triton_available

    device, dry = ctx["device"], ctx["dry"]
    use_triton = (device.type == "cuda" or dry) and triton_available()
    if dry and use_triton:  # the Triton path on CPU: its interpreter (correct numbers, meaningless timings)
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        sec.notes.append(
            "dry run: Triton runs in its CPU interpreter (TRITON_INTERPRET=1), on the first size of each dtype: "
            "errors are real, times are not"
        )
        try:
            return _kernels(sec, ctx, use_triton)
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
    return _kernels(sec, ctx, use_triton)


def _kernels(sec: Section, ctx: dict, use_triton: bool) -> None:
    import bench_kernels as bk

    device, dry = ctx["device"], ctx["dry"]
    latents = (
        [("SD1.5", (4, 8, 8)), ("SDXL", (4, 16, 16))] if dry else [("SD1.5", (4, 64, 64)), ("SDXL", (4, 128, 128))]
    )
    batches = (1, 2) if dry else (1, 8, 64)
    repeats, min_time = (1, 0.0) if dry else (5, 0.01)
    dtypes = (torch.float32, torch.bfloat16)
    if not use_triton:
        sec.notes.append("no Triton on this device: the Triton columns are empty (n/a)")
    sec.notes.append(f"torch.compile backend: {ctx['compile_backend']}; errors are max |x - torch| / max |torch|")
    compiled: dict = {}
    for lname, latent in latents:
        for batch in batches:
            for dtype in dtypes:
                shape = (batch, *latent)
                if not sec.can_start(f"{dtype} {lname} batch {batch}"):
                    continue
                numel = math.prod(shape)
                elem = torch.empty((), dtype=dtype).element_size()
                src = torch.randn(shape, device=device).to(dtype)
                dst = torch.empty_like(src)
                t_copy = bk.timeit(lambda s=src, d=dst: d.copy_(s), device, repeats, min_time)
                copy_bw = 2 * numel * elem / t_copy / 1e9
                for name, (ntensors, eager, (bind, ref_fn), tri) in bk.make_ops(shape, device, dtype).items():
                    row = dict(op=name, latent=lname, shape=list(shape), dtype=str(dtype).replace("torch.", ""))
                    row["copy_gbps"] = copy_bw
                    nbytes = ntensors * numel * elem
                    try:
                        ref_out = _clone(eager())
                        t = bk.timeit(eager, device, repeats, min_time)
                        row.update(eager_ms=t * 1e3, eager_gbps=nbytes / t / 1e9)
                        key = (name, dtype)
                        fn = compiled.setdefault(key, torch.compile(ref_fn, backend=ctx["compile_backend"]))
                        if isinstance(fn, str):
                            row["compile_error"] = fn
                        else:
                            try:
                                call = bind(fn)
                                err, scale = _max_err(_clone(call()), ref_out)
                                t = bk.timeit(call, device, repeats, min_time)
                                row.update(compile_ms=t * 1e3, compile_gbps=nbytes / t / 1e9)
                                row["compile_max_err"] = err / max(scale, 1e-30)
                            except Exception as e:  # noqa: BLE001 - no compiler on this machine, etc.
                                compiled[key] = row["compile_error"] = bk.short_reason(e)
                        # the interpreter (dry run) is slow: the first size of each dtype exercises the Triton path
                        if use_triton and (not dry or (lname, batch) == (latents[0][0], batches[0])):
                            err, scale = _max_err(_clone(tri()), ref_out)
                            t = bk.timeit(tri, device, repeats, min_time)
                            rel = err / max(scale, 1e-30)
                            row.update(triton_ms=t * 1e3, triton_gbps=nbytes / t / 1e9, triton_max_err=rel)
                            if not rel <= KERNEL_TOL[dtype]:
                                sec.fail(f"{name} {shape} {dtype}: Triton max error {rel:.3g} > {KERNEL_TOL[dtype]}")
                        for k in ("eager", "compile", "triton"):
                            if f"{k}_gbps" in row:
                                row[f"{k}_of_copy"] = row[f"{k}_gbps"] / copy_bw
                    except Exception as e:  # noqa: BLE001 - record and go on
                        sec.fail(f"{name} {shape} {dtype}", e)
                    sec.rows.append(row)
                ctx["flush"](sec)
                log(f"kernels {dtype} {lname} batch {batch} done ({sec.budget.used():.0f} s)")


def kernels_table(rows: list[dict]) -> list[str]:
    def cell(r, k):
        if f"{k}_ms" not in r:
            return f"n/a ({r['compile_error']})" if k == "compile" and r.get("compile_error") else "n/a"
        err = r.get(f"{k}_max_err")
        e = "" if err is None else f", err {err:.1e}"
        return f"{r[f'{k}_ms']:.3f} ms, {r[f'{k}_gbps']:.3g} GB/s ({r[f'{k}_of_copy']:.0%}){e}"

    out = _header("op", "dtype", "latent", "shape", "copy_ GB/s", "eager torch", "torch.compile", "Triton")
    for r in rows:
        out.append(
            f"| {r['op']} | {r['dtype']} | {r['latent']} | {'x'.join(map(str, r['shape']))} | {r['copy_gbps']:.3g} | "
            f"{cell(r, 'eager')} | {cell(r, 'compile')} | {cell(r, 'triton')} |"
        )
    return out


# --------------------------------------------------------------------------------------------------------
# 2. CUDA graphs of a one- and four-step generator call
# --------------------------------------------------------------------------------------------------------


def build_net(cfg: dict, device, dtype=None, seed: int = 0):
    """A diffusers network from a config dict, initialised directly on ``device`` (random weights)."""
    import diffusers

    cfg = dict(cfg)
    cls = getattr(diffusers, cfg.pop("_class_name"))
    torch.manual_seed(seed)
    with torch.device(device):
        net = cls.from_config(cfg)
    if dtype is not None:
        net.to(dtype)
    return net.eval()


def section_graphs(sec: Section, ctx: dict) -> None:
    import bench_kernels as bk

    from stepdistill.ops import capture_generator, fused_ddim_step, step_coefficients
    from stepdistill.schedules import from_diffusers

    device, dry = ctx["device"], ctx["dry"]
    arch = tiny_arch("sd15") if dry else ARCHS["sd15"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet = build_net(arch["net"], device, dtype).requires_grad_(False)
    schedule = from_diffusers(dict(SD_BETAS, _class_name="DDPMScheduler"))
    side = arch["net"]["sample_size"]
    ctx_dim = arch["net"]["cross_attention_dim"]
    repeats, min_time = (1, 0.0) if dry else (5, 0.05)
    for steps, timesteps in ((1, [999]), (4, [999, 749, 499, 249])):
        for batch in (1, 4):
            what = f"{steps}-step batch {batch}"
            if not sec.can_start(what):
                continue
            row = dict(steps=steps, batch=batch, dtype=str(dtype).replace("torch.", ""), latent=[4, side, side])
            try:
                t = [torch.full((batch,), ts, device=device) for ts in timesteps]
                coef = [
                    step_coefficients(schedule, schedule.timestep_to_t(torch.full((batch,), ts)), device)
                    for ts in timesteps
                ]
                text = torch.randn(batch, 77, ctx_dim, device=device, dtype=dtype)

                def generate(noise, t=t, coef=coef, text=text, net=unet):
                    x = noise
                    for i in range(len(t)):
                        eps = net(x, t[i], encoder_hidden_states=text).sample
                        nxt = coef[i + 1] if i + 1 < len(t) else (None, None)
                        x = fused_ddim_step(x, eps, *coef[i], *nxt, pred_type="eps")
                    return x

                noise = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
                with torch.no_grad():
                    eager_out = generate(noise).clone()
                    t_eager = bk.timeit(lambda g=generate, n=noise: g(n), device, repeats, min_time)
                row["eager_ms"] = t_eager * 1e3
                row["finite"] = bool(torch.isfinite(eager_out).all())
                if not row["finite"]:
                    sec.fail(f"{what}: non-finite eager output")
                if device.type == "cuda":
                    graph = capture_generator(generate, (noise,))
                    replay = graph(noise).clone()
                    err, scale = _max_err(replay, eager_out)
                    t_graph = bk.timeit(lambda g=graph, n=noise: g(n), device, repeats, min_time)
                    row.update(graph_ms=t_graph * 1e3, speedup=t_eager / t_graph, replay_max_err=err)
                    row["replay_equal"] = bool(torch.equal(replay, eager_out))
                    if not err <= 1e-2 * max(scale, 1.0):
                        sec.fail(f"{what}: CUDA-graph replay differs from eager by {err:.3g}")
                    del graph
                else:
                    row["graph_note"] = "CUDA graphs need CUDA"
            except Exception as e:  # noqa: BLE001
                sec.fail(what, e)
            sec.rows.append(row)
            ctx["flush"](sec)
            log(f"graphs {what} done")
    if device.type != "cuda":
        with contextlib.suppress(RuntimeError):  # the error path is the only one that runs on CPU
            capture_generator(lambda x: x, (torch.zeros(1),))
        sec.notes.append("CPU: eager timings only (capture_generator refuses non-CUDA tensors)")
    unet = None
    free_memory()


def graphs_table(rows: list[dict]) -> list[str]:
    out = _header(
        "steps", "batch", "dtype", "eager ms", "graph replay ms", "speed-up", "replay == eager (max abs diff)"
    )
    for r in rows:
        if "graph_ms" in r:
            g, s, e = f"{r['graph_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['replay_equal']} ({r['replay_max_err']:.1e})"
        else:
            g, s, e = "n/a", "n/a", "n/a"
        eager = f"{r['eager_ms']:.2f}" if "eager_ms" in r else "n/a"
        out.append(f"| {r['steps']} | {r['batch']} | {r['dtype']} | {eager} | {g} | {s} | {e} |")
    return out


# --------------------------------------------------------------------------------------------------------
# 3. training at real size
# --------------------------------------------------------------------------------------------------------

# recipe, per-device batch, extra options, where the per-device batch comes from; in priority order (when the
# section's time budget runs out, the tail is skipped and listed as such)
TRAIN_ROWS = [
    ("dmd2/sd15", 32, {}, "recipe: 64 GPUs x 32"),
    ("dmd2/sdxl_4step", 2, {}, "recipe: 64 GPUs x 2"),
    ("dmd2/sdxl_4step_lora", 2, {}, "recipe: 64 GPUs x 2"),
    ("dmd2/dit_xl2", 40, {}, "recipe: 7 GPUs x 40"),
    ("consistency/lcm_lora_sdxl", 12, {}, "recipe: train_batch_size 12"),
    ("sim/sd15", 8, {}, "ASSUMED: the recipe gives only the global batch 512"),
    ("vsd/sd21_swiftbrush", 16, {}, "recipe: 16 per GPU"),
    ("progressive/sd15_guided", 8, {}, "ASSUMED: the recipe gives only the global batch 512"),
    ("dmd2/sdxl_4step", 2, {"gradient_checkpointing": True}, "recipe: 64 GPUs x 2"),
    ("dmd2/sdxl_4step", 2, {"teacher_offload": True}, "recipe: 64 GPUs x 2"),
    (
        "dmd2/sdxl_4step",
        2,
        {"gradient_checkpointing": True, "teacher_dtype": "bf16", "teacher_offload": True},
        "recipe: 64 GPUs x 2",
    ),
    ("consistency/lcm_sd15", 12, {}, "recipe: train_batch_size 12 per GPU"),
]


def _recipe(name: str) -> dict:
    import yaml

    with open(os.path.join(ROOT, "recipes", name + ".yaml")) as f:
        return yaml.safe_load(f)


def write_teacher_folder(kind: str, arch: dict, root: str, max_length: int) -> str:
    """A pipeline folder with correct-shape small text encoders, real tokenizer classes over a tiny vocabulary,
    a correct-shape tiny 8x VAE, the teacher's scheduler, and ONLY the config of the network: the network is
    built on the device from it by the patched loader (see ``patch_loader``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, EulerDiscreteScheduler, PNDMScheduler
    from tiny_models import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, tiny_clip_tokenizer, tiny_dit, tiny_sd_unet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = os.path.join(root, kind)
    torch.manual_seed(0)
    tiny = dict(block_out_channels=[8] * 4, layers_per_block=1, norm_num_groups=4, sample_size=64)
    vae = AutoencoderKL(**dict(SDXL_VAE, **tiny, scaling_factor=arch["scaling"]))  # the 8x factor, tiny widths
    if kind == "dit":
        sched = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
        n = arch["net"]["num_embeds_ada_norm"]
        pipe = DiTPipeline(
            transformer=tiny_dit(num_classes=n), vae=vae, scheduler=sched, id2label={i: f"class {i}" for i in range(n)}
        )
        sub = "transformer"
    else:
        encoders = []
        for i, (width, proj) in enumerate(arch["text"]):
            cfg = CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=width,
                intermediate_size=2 * width,
                projection_dim=proj or width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=max_length,
                bos_token_id=CLIP_BOS_ID,
                eos_token_id=CLIP_EOS_ID,
                pad_token_id=CLIP_EOS_ID,
            )
            torch.manual_seed(i + 1)
            encoders.append((CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval())
        src = os.path.join(root, kind + "_tok")
        tok = tiny_clip_tokenizer(src, model_max_length=max_length)
        placeholder = tiny_sd_unet(cross_attention_dim=8)  # replaced by the config below
        if kind == "sdxl":
            from diffusers import StableDiffusionXLPipeline

            sched = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=encoders[0],
                text_encoder_2=encoders[1],
                tokenizer=tok,
                tokenizer_2=tiny_clip_tokenizer(src, pad_token="!", model_max_length=max_length),
                unet=placeholder,
                scheduler=sched,
                add_watermarker=False,
            )
        else:
            from diffusers import StableDiffusionPipeline

            sched = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1)
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=encoders[0],
                tokenizer=tok,
                unet=placeholder,
                scheduler=sched,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        sub = "unet"
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(os.path.join(out, sub))
    os.makedirs(os.path.join(out, sub))
    with open(os.path.join(out, sub, "config.json"), "w") as f:
        json.dump(arch["net"], f, indent=2)
    return out


@contextlib.contextmanager
def patch_loader(folders: set, device):
    """Teacher.from_pretrained on one of our folders: the network comes from its config.json, built with random
    weights directly on ``device`` (no multi-GB weight file written or read); every other path loads as usual."""
    import stepdistill.models.teacher as teacher_mod
    from stepdistill.schedules import from_diffusers

    original = teacher_mod.load_network

    def load(path, subfolder=None, *, torch_dtype=None, **kw):
        if os.path.abspath(str(path)) not in folders:
            return original(path, subfolder, torch_dtype=torch_dtype, **kw)
        sub = subfolder or ("unet" if os.path.isdir(os.path.join(path, "unet")) else "transformer")
        with open(os.path.join(path, sub, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            sched = json.load(f)
        net = build_net(cfg, device, torch_dtype)
        return net, from_diffusers(sched), sched.get("prediction_type") or "epsilon"

    teacher_mod.load_network = load
    try:
        yield
    finally:
        teacher_mod.load_network = original


def write_datasets(root: str, pixel_sides: set, class_side: int) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    for px in sorted(pixel_sides):
        d = os.path.join(root, f"captioned_{px}")
        os.makedirs(d)
        for i, caption in enumerate(CAPTIONS):
            Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(f"{d}/{i}.png")
            with open(f"{d}/{i}.txt", "w") as f:
                f.write(caption)
        out[f"captioned_{px}"] = d
    d = os.path.join(root, "classes")
    for k in range(4):  # 4 of the classes, at the class-conditional network's pixel size
        os.makedirs(f"{d}/n0{k}")
        for i in range(2):
            pixels = rng.integers(0, 256, (class_side, class_side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(f"{d}/n0{k}/{i}.png")
    out["classes"] = d
    with open(os.path.join(root, "prompts.txt"), "w") as f:
        f.write("\n".join(CAPTIONS) + "\n")
    out["prompts"] = os.path.join(root, "prompts.txt")
    return out


def _overrides(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def run_trainer(recipe_name: str, values: dict, device) -> dict:
    """make_trainer + setup + train; per-iteration times from on_step_end; peak memory of setup + training."""
    from bench_trainers import model_state_bytes

    from stepdistill.train import make_trainer

    free_memory()
    reset_peak(device)
    before = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
    trainer = make_trainer(os.path.join(ROOT, "recipes", recipe_name + ".yaml"), _overrides(values))
    try:
        t0 = time.perf_counter()
        trainer.setup()
        sync(device)
        setup_s = time.perf_counter() - t0
        after_setup = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
        stamps = [time.perf_counter()]
        step_end = trainer.on_step_end

        def timed(step):
            step_end(step)
            sync(device)
            stamps.append(time.perf_counter())

        trainer.on_step_end = timed
        trainer.train()
        its = [b - a for a, b in zip(stamps, stamps[1:])]
        losses = {k: v for h in trainer.history for k, v in h.items() if k.startswith("loss")}
        all_losses = [v for h in trainer.history for k, v in h.items() if k.startswith("loss")]
        return dict(
            iterations=len(trainer.history),
            nonfinite_skipped=int(getattr(trainer, "nonfinite_total", 0)),
            finite=bool(all_losses) and all(math.isfinite(v) for v in all_losses),
            last_losses=losses,
            setup_s=setup_s,
            first_it_s=its[0] if its else None,
            s_per_it=statistics.mean(its[1:]) if len(its) > 1 else (its[0] if its else None),
            peak_mb=peak_mb(device),
            before_mb=before,
            after_setup_mb=after_setup,
            model_state_mb=model_state_bytes(trainer) / 2**20,
            trainable_params_m=sum(p.numel() for ps in trainer.params.values() for p in ps) / 1e6,
        )
    finally:
        trainer.__dict__.pop("on_step_end", None)  # the timing hook refers back to the trainer
        del trainer
        free_memory()


def section_training(sec: Section, ctx: dict) -> None:
    device, dry, tmp = ctx["device"], ctx["dry"], ctx["tmp"]
    steps = ctx["train_steps"]
    rows = [r for r in TRAIN_ROWS if not ctx.get("train_only") or r[0] in ctx["train_only"]]
    kinds = {TEACHERS[_recipe(r[0])["teacher"]] for r in rows}
    archs = {k: tiny_arch(k) if dry else ARCHS[k] for k in kinds}
    root = os.path.join(tmp, "teachers")
    folders = {k: write_teacher_folder(k, archs[k], root, 16 if dry else 77) for k in sorted(kinds)}
    res = {r[0]: (8 if dry else _recipe(r[0])["resolution"]) for r in rows}
    dit_side = 8 * (8 if dry else _recipe("dmd2/dit_xl2")["resolution"])
    data = write_datasets(os.path.join(tmp, "data"), {8 * v for v in res.values()}, dit_side)
    if dry:
        sec.notes.append(f"dry run: tiny configs of the same classes, batch 2, {steps} iterations, CPU")
    sec.notes.append(
        "text encoders: real hidden sizes and 77 tokens but 2 layers; training-image VAE: an 8x VAE of width 8 "
        "(their cost is not the real one); networks: published configs, random weights"
    )
    with patch_loader({os.path.abspath(f) for f in folders.values()}, device):
        for i, (name, batch, options, source) in enumerate(rows):
            label = name + ("" if not options else " + " + ", ".join(f"{k}={v}" for k, v in options.items()))
            if not sec.can_start(label, 5.0):
                continue
            recipe = _recipe(name)
            kind = TEACHERS[recipe["teacher"]]
            ds = recipe.get("dataset", "")
            if kind == "dit":
                dataset = data["classes"]
            elif str(ds).endswith((".txt", ".jsonl")):
                dataset = data["prompts"]
            else:
                dataset = data[f"captioned_{8 * res[name]}"]
            batch = 2 if dry else batch
            row = dict(recipe=name, options=options, network=kind, batch_recipe=batch, batch_source=source)
            values = dict(
                teacher=folders[kind],
                dataset=dataset,
                resolution=res[name],
                grad_accum=1,
                checkpoint_every=0,
                sample_every=0,
                progress=False,
                **options,
            )
            if recipe["method"] == "progressive":  # max_steps is derived: guided_steps + rounds x steps_per_round
                values.update(
                    start_steps=2 * recipe.get("final_steps", 1),
                    max_steps=0,
                    guided_steps=steps // 2,
                    steps_per_round=steps - steps // 2,
                )
            else:
                values["max_steps"] = steps
            if recipe.get("regression_weight", 0):
                values.update(regression_pairs=4, regression_steps=2, regression_batch=2)
            log(f"training {label}: batch {batch}")
            while True:
                try:
                    out_dir = os.path.join(tmp, f"run{i}_batch{batch}")  # a fresh folder for each attempt
                    result = run_trainer(name, dict(values, global_batch=batch, output_dir=out_dir), device)
                    row.update(result, batch=batch)
                    if not result["finite"] or result["nonfinite_skipped"] or result["iterations"] != steps:
                        sec.fail(
                            f"{label}: non-finite loss ({result['nonfinite_skipped']} steps skipped, "
                            f"{result['iterations']} of {steps} iterations)"
                        )
                    log(f"training {label}: {result['s_per_it']:.3f} s/it, peak {result['peak_mb']:.0f} MB")
                    break
                except torch.cuda.OutOfMemoryError:
                    free_memory()
                    if batch == 1:
                        sec.fail(f"{label}: out of memory at batch 1")
                        row["oom"] = True
                        break
                    batch //= 2
                    row["reduced"] = f"out of memory at batch {batch * 2}: reduced to {batch}"
                    log(f"training {label}: OOM, retrying at batch {batch}")
                except Exception as e:  # noqa: BLE001
                    sec.fail(label, e)
                    break
            sec.rows.append(row)
            ctx["flush"](sec)
            for folder in glob.glob(os.path.join(tmp, f"run{i}_batch*")):
                shutil.rmtree(folder, ignore_errors=True)


def training_table(rows: list[dict], cuda: bool) -> list[str]:
    peak = "peak allocated MB" if cuda else "peak RSS MB of the process so far"
    out = _header(
        "recipe",
        "options",
        "network",
        "batch (per device)",
        "s / it (after the 1st)",
        "1st it s",
        peak,
        "model state MB",
        "trainable M",
        "losses finite",
    )
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        reduced = "; " + r["reduced"] if r.get("reduced") else ""
        batch = f"{r.get('batch', r['batch_recipe'])} ({r['batch_source']}{reduced})"
        if "s_per_it" not in r:
            out.append(f"| {r['recipe']} | {opts} | {r['network']} | {batch} | FAILED | | | | | |")
            continue
        out.append(
            f"| {r['recipe']} | {opts} | {r['network']} | {batch} | {r['s_per_it']:.3f} | {r['first_it_s']:.2f} | "
            f"{r['peak_mb']:.0f} | {r['model_state_mb']:.0f} | {r['trainable_params_m']:.1f} | "
            f"{r['finite'] and not r['nonfinite_skipped']} |"
        )
    return out


# --------------------------------------------------------------------------------------------------------
# 4. sampling: exported one- and four-step SDXL pipelines vs the 50-step teacher
# --------------------------------------------------------------------------------------------------------


def section_sampling(sec: Section, ctx: dict) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from stepdistill.export import student_scheduler
    from stepdistill.pipelines import StepDistillSDXLPipeline

    device, dry, tmp = ctx["device"], ctx["dry"], ctx["tmp"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch = tiny_arch("sdxl") if dry else ARCHS["sdxl"]
    folder = os.path.join(tmp, "sampling")
    src = write_teacher_folder("sdxl", arch, folder, 16 if dry else 77)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te1 = CLIPTextModel.from_pretrained(src, subfolder="text_encoder").to(device, dtype)
    te2 = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2").to(device, dtype)
    tok1 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2")
    if dry:
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae").to(device, dtype)
        sec.notes.append("dry run: tiny SDXL-class UNet and an 8x VAE of width 8, CPU, float32")
    else:
        torch.manual_seed(0)
        with torch.device(device):
            vae = AutoencoderKL(**SDXL_VAE)
        vae.to(dtype)
        sec.notes.append(
            "SDXL UNet and VAE from their published configs (random weights, bf16); text encoders "
            "of the real widths but 2 layers"
        )
    unet = build_net(arch["net"], device, dtype).requires_grad_(False)
    side = arch["net"]["sample_size"]
    px = 8 * side
    teacher_sched = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    common = dict(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2)
    teacher_steps = 3 if dry else 50
    configs = [
        ("one-step (exported, LCM scheduler)", [999], 1 if dry else 4, None),
        ("four-step (exported, LCM scheduler)", [999, 749, 499, 249], 1 if dry else 4, None),
        (f"teacher, {teacher_steps} steps, CFG 5", None, 1, teacher_steps),
    ]
    for compiled in (False, True):
        if compiled:
            # room for a long first compile of the SDXL UNet (and a second one: the CFG batch is another shape)
            if not sec.can_start("torch.compile rows", 80.0 if not dry else 5.0):
                break
            unet = torch.compile(unet, backend=ctx["compile_backend"])
        for label, timesteps, batch, _ in configs:
            what = f"{label}{' + torch.compile' if compiled else ''}"
            if not sec.can_start(what, 10.0 if not dry else 1.0):
                continue
            row = dict(
                pipeline=label, compiled=compiled, batch=batch, pixels=px, dtype=str(dtype).replace("torch.", "")
            )
            try:
                if timesteps is None:
                    pipe = StableDiffusionXLPipeline(
                        unet=unet, scheduler=teacher_sched, add_watermarker=False, **common
                    )
                    kw = dict(num_inference_steps=teacher_steps, guidance_scale=5.0)
                    row["steps"] = teacher_steps
                else:
                    sched = student_scheduler("lcm", dict(teacher_sched.config), timesteps)
                    pipe = StepDistillSDXLPipeline(unet=unet, scheduler=sched, trained_timesteps=timesteps, **common)
                    kw = {}
                    row["steps"] = len(timesteps)
                pipe.set_progress_bar_config(disable=True)
                prompts = ["a cat"] * batch
                call = dict(height=px, width=px, output_type="np", **kw)
                t0 = time.perf_counter()
                with torch.no_grad():
                    warm = dict(call, num_inference_steps=2) if timesteps is None else call
                    pipe(prompts, generator=torch.Generator().manual_seed(0), **warm)
                    sync(device)
                    row["warmup_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    images = pipe(prompts, generator=torch.Generator().manual_seed(0), **call).images
                    sync(device)
                seconds = time.perf_counter() - t0
                row.update(seconds_per_call=seconds, images_per_s=batch / seconds)
                row["finite"] = bool(math.isfinite(float(images.sum())))
                if not row["finite"]:
                    sec.fail(f"{what}: non-finite image")
                log(f"sampling {what}: {row['images_per_s']:.2f} images/s")
            except Exception as e:  # noqa: BLE001
                sec.fail(what, e)
            sec.rows.append(row)
            ctx["flush"](sec)
    del unet, vae, te1, te2
    free_memory()


def sampling_table(rows: list[dict]) -> list[str]:
    out = _header("pipeline", "torch.compile", "steps", "batch", "pixels", "s / call", "images / s", "warm-up s")
    for r in rows:
        if "images_per_s" not in r:
            out.append(f"| {r['pipeline']} | {r['compiled']} | | {r['batch']} | {r['pixels']} | FAILED | | |")
            continue
        out.append(
            f"| {r['pipeline']} | {r['compiled']} | {r['steps']} | {r['batch']} | {r['pixels']} | "
            f"{r['seconds_per_call']:.3f} | {r['images_per_s']:.2f} | {r['warmup_s']:.1f} |"
        )
    return out


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------

RUNNERS = {
    "kernels": section_kernels,
    "graphs": section_graphs,
    "training": section_training,
    "sampling": section_sampling,
}
TABLES = {"kernels": kernels_table, "graphs": graphs_table, "sampling": sampling_table}
TITLES = {
    "kernels": "1. Fused kernels vs eager torch and torch.compile",
    "graphs": "2. CUDA-graph capture of a generator call (SD1.5-size UNet + fused DDIM step)",
    "training": "3. Real-size training (bf16 mixed precision, random weights)",
    "sampling": "4. Sampling: exported SDXL-size one- / four-step pipelines vs the 50-step teacher",
}


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(out: str, meta: dict, sections: dict) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    failed = [n for n, s in sections.items() if s["status"] == "failed"]
    lines = [
        f"# GPU check{' (DRY RUN on CPU: tiny configs, not GPU figures)' if meta['dry_run'] else ''}",
        "",
        f"Device: {meta['device_name']}; torch {meta['torch']}, diffusers {meta['diffusers']}, triton "
        f"{meta['triton']}; command: `{meta['command']}`; {meta['total_seconds']:.0f} s in all; "
        f"result: {'FAILED (' + ', '.join(failed) + ')' if failed else 'all checks passed'}.",
        "",
    ]
    for name, s in sections.items():
        lines += [
            f"## {TITLES[name]}",
            "",
            f"Status: **{s['status']}**, {s['seconds']:.0f} s of a {s['budget_seconds']:.0f} s budget.",
            "",
        ]
        lines += [f"- {n}" for n in s["notes"]]
        lines += [f"- skipped (time budget): {k}" for k in s["skipped"]]
        lines += [f"- FAILED: {e}" for e in s["errors"]]
        if s["notes"] or s["skipped"] or s["errors"]:
            lines.append("")
        if s["rows"]:
            table = training_table(s["rows"], meta["cuda"]) if name == "training" else TABLES[name](s["rows"])
            lines += table + [""]
    md, js = os.path.join(out, "gpu_check.md"), os.path.join(out, "gpu_check.json")
    _atomic_write(md, "\n".join(lines))
    _atomic_write(js, json.dumps(_json_safe(dict(meta=meta, failed=failed, sections=sections)), indent=1))
    return md, js


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/gpu", help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny configs of the same classes (a few minutes)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds for the whole run (default 540, x --budget-scale): a section never gets more than what is left",
    )
    p.add_argument("--train-steps", type=int, default=None, help="iterations per training row (10; dry run 3)")
    p.add_argument("--train-only", default="", help="comma-separated recipe names (e.g. dmd2/sd15) to train")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"error: --sections: unknown {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA device; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if args.dry_run:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    meta = dict(
        dry_run=args.dry_run,
        cuda=cuda,
        device_name=name,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        triton=triton_version,
        command="python " + " ".join([os.path.relpath(__file__, ROOT)] + list(argv or sys.argv[1:])),
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    log(f"device {name}; sections {sections}")
    budgets = BUDGET_DRY if args.dry_run else BUDGET
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = dict(
            device=device,
            dry=args.dry_run,
            tmp=tmp,
            train_steps=args.train_steps or (3 if args.dry_run else 10),
            train_only={s.strip() for s in args.train_only.split(",") if s.strip()},
            # the dry run traces with dynamo but skips inductor's C++ build (minutes of CPU for a check of the
            # script, not of the compiler); the GPU run compiles with inductor
            compile_backend="eager" if args.dry_run else "inductor",
        )
        total = Budget(args.time_limit or (TIME_LIMIT * args.budget_scale))

        def flush(running: Section) -> None:  # after every row: a run killed at its time limit keeps its figures
            meta["total_seconds"] = time.perf_counter() - start
            write_report(args.out, meta, {**results, running.name: running.as_dict()})

        ctx["flush"] = flush
        for name_ in sections:
            sec = Section(name_, max(0.0, min(budgets[name_] * args.budget_scale, total.left())))
            log(f"section {name_} (budget {sec.budget.seconds:.0f} s)")
            try:
                RUNNERS[name_](sec, ctx)
            except Exception as e:  # noqa: BLE001 - a section crash is a failed check, the others still run
                sec.fail(f"section {name_} crashed", e)
            free_memory()
            results[name_] = sec.as_dict()
            meta["total_seconds"] = time.perf_counter() - start
            write_report(args.out, meta, results)  # after every section: a later crash keeps the earlier figures
    meta["total_seconds"] = time.perf_counter() - start
    meta["cpu_seconds"] = time.process_time()
    md, js = write_report(args.out, meta, results)
    failed = [n for n, s in results.items() if s["status"] == "failed"]
    log(
        f"wrote {md} and {js} in {meta['total_seconds']:.0f} s ({meta['cpu_seconds']:.0f} s CPU); "
        f"{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
