"""Fused-op benchmark: eager torch reference vs torch.compile of the same reference vs the Triton kernel.

For each op and latent batch, the table gives milliseconds per call, the achieved bandwidth counted from the
op's minimal memory traffic (every input tensor read once, every output written once, at the data dtype; a
kernel that reads more, like the DMD gradient's second pass, is still charged the minimal amount), and that
bandwidth as a fraction of a plain ``copy_`` of one tensor of the same shape measured in the same run (the
copy is the practical ceiling of a memory-bound op at that size, launch overhead included).
On CPU there is no Triton column (the kernels need CUDA; the interpreter is a correctness tool), which the
table header says. The DMD / VSD references compute in float64, as stepdistill.losses does.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from stepdistill.ops import (
    fused_consistency_step,
    fused_ddim_step,
    fused_dmd_gradient,
    fused_vsd_gradient,
    pseudo_huber_loss,
    triton_available,
)
from stepdistill.ops import reference as ref

LATENTS = [(4, 64, 64), (4, 128, 128)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_ops(shape, device, dtype):
    """name -> (tensors read + written, eager fn, reference fn for torch.compile, triton fn)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = shape[0]

    def rnd():
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    x, c, u, z, f = rnd(), rnd(), rnd(), rnd(), rnd()
    a = torch.rand(batch, generator=g).to(device) * 0.8 + 0.1
    s = (1 - a**2).sqrt()
    ap, sp = (a + 1) / 2, (1 - ((a + 1) / 2) ** 2).sqrt()
    w = 4.5
    ddim_kw = dict(pred_type="eps", model_out_uncond=u, guidance_scale=w)
    cm_kw = dict(alpha_next=ap, sigma_next=sp, noise=z)
    dmd_kw = dict(real_out_uncond=u, guidance_scale=w)
    vsd_kw = dict(real_out_uncond=u, guidance_scale=w)
    pr = rnd().requires_grad_()

    def huber(fn):
        def run():
            pr.grad = None
            fn(pr, x).sum().backward()
            return pr.grad

        return run

    def huber_ref(p, t):
        return ref.pseudo_huber_distance_ref(p, t, 1.0)

    return {
        "CFG + DDIM step (eps)": (
            4,
            lambda: fused_ddim_step(x, c, a, s, ap, sp, backend="torch", **ddim_kw),
            (lambda fn: lambda: fn(x, c, a, s, ap, sp, **ddim_kw), ref.ddim_step_ref),
            lambda: fused_ddim_step(x, c, a, s, ap, sp, backend="triton", **ddim_kw),
        ),
        "consistency step + re-noise": (
            4,
            lambda: fused_consistency_step(x, f, a, s, backend="torch", **cm_kw),
            (lambda fn: lambda: fn(x, f, a, s, **cm_kw), ref.consistency_step_ref),
            lambda: fused_consistency_step(x, f, a, s, backend="triton", **cm_kw),
        ),
        "DMD2 gradient (CFG, eps)": (
            6,
            lambda: fused_dmd_gradient(x, z, c, f, a, s, backend="torch", **dmd_kw),
            (lambda fn: lambda: fn(x, z, c, f, a, s, **dmd_kw), ref.dmd_gradient_ref),
            lambda: fused_dmd_gradient(x, z, c, f, a, s, backend="triton", **dmd_kw),
        ),
        "VSD gradient (CFG, eps)": (
            5,
            lambda: fused_vsd_gradient(z, c, f, a, s, backend="torch", **vsd_kw),
            (lambda fn: lambda: fn(z, c, f, a, s, **vsd_kw), ref.vsd_gradient_ref),
            lambda: fused_vsd_gradient(z, c, f, a, s, backend="triton", **vsd_kw),
        ),
        "pseudo-Huber fwd + bwd": (
            5,
            huber(lambda p, t: pseudo_huber_loss(p, t, 1.0, backend="torch")),
            (lambda fn: huber(fn), huber_ref),
            huber(lambda p, t: pseudo_huber_loss(p, t, 1.0, backend="triton")),
        ),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeats: int, min_time: float) -> float:
    """Median seconds per call over ``repeats`` measurements of enough calls to last ``min_time``."""
    fn()
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / once))
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def short_reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first[:80]}".replace("|", "/")


def cell(seconds: float | None, nbytes: int, copy_bw: float, reason: str | None = None) -> str:
    if seconds is None:
        return f"n/a ({reason})" if reason else "n/a"
    bw = nbytes / seconds / 1e9
    return f"{seconds * 1e3:.3f} ms, {bw:.1f} GB/s ({bw / copy_bw:.0%})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench/kernels.md")
    p.add_argument("--quick", action="store_true", help="batch 1 and 8 only, fewer repeats")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    batches = (1, 8) if args.quick else (1, 8, 64)
    repeats = args.repeats or (3 if args.quick else 7)
    min_time = 0.02 if args.quick else 0.1
    use_triton = device.type == "cuda" and triton_available()

    if device.type == "cuda":
        where = f"CUDA ({torch.cuda.get_device_name(device)})"
    else:
        nt = torch.get_num_threads()
        where = f"CPU ({platform.processor() or platform.machine()}, {nt} thread{'' if nt == 1 else 's'})"
    triton_note = "" if use_triton else " -- reference and torch.compile paths only (no Triton on this device)"
    lines = [
        f"# Fused kernels on {where}, {args.dtype}{triton_note}",
        "",
        f"torch {torch.__version__}; each cell: ms per call, GB/s of minimal traffic, (fraction of a same-shape "
        f"copy_); median of {repeats}.",
        "",
        "| op | batch x latent | MB moved | copy_ GB/s | eager torch | torch.compile | Triton |",
        "|---|---|---|---|---|---|---|",
    ]
    compiled_cache: dict = {}
    for latent in LATENTS:
        for batch in batches:
            shape = (batch, *latent)
            numel = batch * latent[0] * latent[1] * latent[2]
            elem = torch.empty((), dtype=dtype).element_size()
            src = torch.randn(shape, device=device).to(dtype)
            dst = torch.empty_like(src)
            t_copy = timeit(lambda src=src, dst=dst: dst.copy_(src), device, repeats, min_time)
            copy_bw = 2 * numel * elem / t_copy / 1e9
            for name, (ntensors, eager, (bind, ref_fn), tri) in make_ops(shape, device, dtype).items():
                nbytes = ntensors * numel * elem
                print(f"[bench_kernels] {name} {shape}", file=sys.stderr, flush=True)
                t_eager = timeit(eager, device, repeats, min_time)
                t_comp, why = None, None
                if args.no_compile:
                    why = "skipped (--no-compile)"
                else:
                    fn = compiled_cache.setdefault(name, torch.compile(ref_fn))
                    if isinstance(fn, str):  # it failed on an earlier shape: do not pay for it again
                        why = fn
                    else:
                        try:
                            t_comp = timeit(bind(fn), device, repeats, min_time)
                        except Exception as e:  # no C compiler, unsupported op, ...: report, do not crash
                            why = compiled_cache[name] = short_reason(e)
                t_tri = timeit(tri, device, repeats, min_time) if use_triton else None
                row = [
                    name,
                    f"{batch} x {latent[0]}x{latent[1]}x{latent[2]}",
                    f"{nbytes / 1e6:.2f}",
                    f"{copy_bw:.1f}",
                    cell(t_eager, nbytes, copy_bw),
                    cell(t_comp, nbytes, copy_bw, why),
                    cell(t_tri, nbytes, copy_bw, None if use_triton else "CPU"),
                ]
                lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
