"""Peak memory of every distillation trainer, full vs LoRA, on the same tiny SDXL-class components and batch.

Rows: each teacher -> student trainer of ``stepdistill.train.trainer_classes()`` (dmd2, sim, vsd, progressive,
consistency) in "full" mode (every trainable network is a full copy of the teacher) and in "lora" mode (every
trainable network is a LoRA on the teacher's own base, which the teacher runs with adapters off), then DMD2 and
SIM (whose generator step differentiates through the teacher) with ``gradient_checkpointing`` and with
``teacher_dtype: bf16``, DMD2's LoRA mode on a bf16 base (with bf16 autocast: its activations are bf16 too);
on CUDA also with ``teacher_offload``. Every row is one process of its own (two at a time on CPU), on the same
SDXL-class pipeline (two CLIP text encoders, text_time added conditions, a three-level UNet with linear
projections; widths shrunk so that the CPU run takes about two minutes), the same captioned images and batch.

Columns, device-independent first:

* model state MB: :func:`bench_trainers.model_state_bytes`: unique weight storage of every network the trainer
  holds (a LoRA's base is the teacher's, counted once) + gradients + AdamW state of the trainable parameters;
* generator / fake-score step MB: the bytes autograd saves for backward while that update group's loss is
  built (its activation memory; unique storages, checkpoint inputs included);
* peak MB: on CUDA ``torch.cuda.max_memory_allocated`` during training (after setup); on CPU the peak resident
  set size of the process, which includes the Python / torch runtime (about the same in every row): compare
  rows, not absolute values.

Example::

    python benchmarks/bench_memory.py --out outputs/bench/memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("dmd2", "sim", "vsd", "progressive", "consistency")
CAPTIONS = ["a cat", "a dog", "the cat", "a red dog", "a cat and a dog", "the red cat", "a dog of the cat", "red"]
SIDE = 16  # latent side; the VAE halves: 32 px images
GUIDED = {"guided": True, "w_embedding_dim": 32, "teacher_cond_dropout": 0.1}


def rows(cuda: bool) -> list[tuple[str, str, dict]]:
    from stepdistill.train import trainer_classes

    methods = [m for m in METHODS if m in trainer_classes()]
    out = [(m, mode, {}) for m in methods for mode in ("full", "lora")]
    if "progressive" in methods:  # guided stage one (LoRA-enhanced guided distillation: w-projection + LoRA)
        out += [("progressive", mode, GUIDED) for mode in ("full", "lora")]
    for m in ("dmd2", "sim"):
        if m in methods:
            out += [(m, "full", {"gradient_checkpointing": True}), (m, "full", {"teacher_dtype": "bf16"})]
    if "dmd2" in methods:  # a LoRA on a bf16 base (diffusers' LoRA recipe; bf16 autocast, also on CPU)
        out.append(("dmd2", "lora", {"teacher_dtype": "bf16", "mixed_precision": "bf16"}))
    if cuda and "dmd2" in methods:  # a no-op on CPU: the weights are on the host already
        out += [
            ("dmd2", "full", {"teacher_offload": True}),
            ("dmd2", "full", {"gradient_checkpointing": True, "teacher_dtype": "bf16", "teacher_offload": True}),
        ]
    return out


# --------------------------------------------------------------------------------------------------------
# the shared components
# --------------------------------------------------------------------------------------------------------


def sdxl_class_unet():
    """SDXL's UNet layout (DownBlock2D then two cross-attention levels, text_time added conditions, linear
    projections, two layers per block) at widths (16, 32, 64)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=SIDE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )


def make_assets(root: str) -> dict:
    """The pipeline folder (tests/tiny_models.py's SDXL text encoders, tokenizers, VAE and scheduler with the
    UNet above) and a folder of captioned images."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import save_tiny_pipeline, tiny_sdxl_components

    components = tiny_sdxl_components(os.path.join(root, "src"))
    components["unet"] = sdxl_class_unet()
    teacher = save_tiny_pipeline(components, StableDiffusionXLPipeline, os.path.join(root, "sdxl"))
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (2 * SIDE, 2 * SIDE, 3), dtype=np.uint8)).save(f"{images}/{i}.png")
        with open(f"{images}/{i}.txt", "w") as f:
            f.write(caption)
    return {"teacher": teacher, "images": images}


def config_for(method: str, mode: str, options: dict, assets: dict, steps: int, batch: int, out: str) -> dict:
    data = dict(
        teacher=assets["teacher"],
        dataset=assets["images"],
        resolution=SIDE,
        global_batch=batch,
        max_steps=steps,
        generator_mode=mode,
        lora_rank=8,
        lora_alpha=8.0,
        lora_target_modules=[],  # stepdistill's default set for every method (VSD's recipe uses to_q / to_v)
        learning_rate=1e-5,
        checkpoint_every=0,
        sample_every=0,
        progress=False,
        output_dir=out,
        seed=0,
    )
    if method in ("dmd2", "sim", "vsd"):
        data.update(fake_score_mode=mode, dfake_gen_update_ratio=1, real_guidance_scale=2.0)
    elif method == "progressive":
        data.update(start_steps=4, final_steps=2, steps_per_round=steps, max_steps=0)
        if options.get("guided"):  # stage one's updates, then the round
            data.update(guided_steps=steps)
    elif method == "consistency":
        data.update(mode="lcm", num_ddim_timesteps=50, w_min=2.0, w_max=4.0)
    data.update(options)
    return data


# --------------------------------------------------------------------------------------------------------
# one configuration (in its own process)
# --------------------------------------------------------------------------------------------------------


def child(spec: dict) -> dict:
    import resource

    import torch

    sys.path.insert(0, HERE)
    from bench_trainers import count_saved_bytes, model_state_bytes

    from stepdistill.config import build_config
    from stepdistill.train import trainer_classes

    cls = trainer_classes()[spec["method"]]
    trainer = cls(build_config(cls.config_class, spec["config"]))
    trainer.setup()
    cuda = torch.cuda.is_available()
    saved = count_saved_bytes(trainer, key=lambda group: "generator" if "generator" in group else "fake_score")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / len(trainer.history)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "trainable_params": sum(p.numel() for ps in trainer.params.values() for p in ps),
        "model_state_mb": model_state_bytes(trainer) / 2**20,
        "saved_mb": {k: v / 2**20 for k, v in saved.items()},
        "peak_mb": peak,
        "seconds_per_iteration": seconds,
        "finite": all(v == v for h in trainer.history for v in h.values()),
    }


# --------------------------------------------------------------------------------------------------------


def _label(mode: str, method: str) -> str:
    if method in ("dmd2", "sim", "vsd"):
        return f"{mode} generator + {mode} fake score"
    return f"{mode} generator"


def _options(options: dict) -> str:
    return ", ".join(f"{k}={str(v).lower()}" for k, v in options.items()) or "-"


def table(results, batch, steps, cuda, device) -> list[str]:
    peak = "CUDA peak allocated MB (training)" if cuda else "peak RSS MB (incl. runtime)"
    note = (
        "peak = torch.cuda.max_memory_allocated during training"
        if cuda
        else "peak RSS includes the Python / torch runtime and the setup (compare rows, not absolute values)"
    )
    lines = [
        f"# Trainer memory: SDXL-class tiny components, batch {batch}, {SIDE}x{SIDE} latents, {device}",
        "",
        f"{steps} iterations per row, each row in its own process. Model state = unique weights held + grads + "
        "AdamW state; generator / fake-score step = bytes autograd saves while that group's loss is built; "
        f"{note}.",
        "",
        f"| method | networks | options | trainable params | model state MB | vs full | generator step MB | "
        f"fake-score step MB | vs full (larger step) | {peak} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = {(m, _options(o)): r for (m, mode, o), r in results if mode == "full"}
    for (m, mode, o), r in results:
        base = full[(m, _options(o) if o.get("guided") else "-")]  # guided rows: vs guided full

        def step(r):
            return max(r["saved_mb"].values())

        gen = r["saved_mb"].get("generator")
        fake = r["saved_mb"].get("fake_score")
        lines.append(
            f"| {m} | {_label(mode, m)} | {_options(o)} | {r['trainable_params'] / 1e6:.2f} M | "
            f"{r['model_state_mb']:.1f} | {r['model_state_mb'] / base['model_state_mb']:.2f}x | "
            f"{gen:.1f} | {'-' if fake is None else f'{fake:.1f}'} | {step(r) / step(base):.2f}x | "
            f"{r['peak_mb']:.0f} |"
        )
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench/memory.md")
    p.add_argument("--steps", type=int, default=2, help="iterations per configuration")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--jobs", type=int, default=0, help="configurations run at once (0: 2 on CPU, 1 on CUDA)")
    p.add_argument("--methods", default="", help="comma-separated methods to run (default: every one)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})"
    from concurrent.futures import ThreadPoolExecutor

    jobs = args.jobs or (1 if cuda else 2)
    env = dict(os.environ)
    if not cuda:
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        assets = make_assets(tmp)

        def run(i, row):
            method, mode, options = row
            out = os.path.join(tmp, f"run{i}")
            config = config_for(method, mode, options, assets, args.steps, args.batch, out)
            spec = json.dumps({"method": method, "config": config})
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", spec], capture_output=True, text=True, env=env
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{method} {mode} {options} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(method, mode, _options(options), json.dumps(result), flush=True)
            return row, result

        with ThreadPoolExecutor(jobs) as pool:
            wanted = [r for r in rows(cuda) if not args.methods or r[0] in args.methods.split(",")]
            results = list(pool.map(lambda a: run(*a), enumerate(wanted)))
    print(f"{len(results)} configurations in {time.time() - start:.0f} s ({jobs} at a time)")
    lines = table(results, args.batch, args.steps, cuda, device)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
