"""The ``stepdistill`` command."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """stepdistill: distil many-step diffusion models into one- and few-step generators.

commands:
  train      train from a recipe (method: dsm = a teacher by denoising score matching; dmd2)
  demo       distil the bundled digits teacher into a one-step generator, export, reload, measure
  sample     sample a diffusers model folder with the reference DDIM sampler and write an image grid
  eval       sample an exported pipeline (or read a folder of images) and score it: FD-digits, FID, KID,
             precision / recall, CLIP score; writes metrics.json and a sample grid
  fd-digits  FD-digits of a digits model at several DDIM step counts (the bundled stand-in for FID)

Multi-GPU: accelerate launch -m stepdistill.train --config <recipe.yaml> [key=value ...]"""


def _sample_args(p):
    p.add_argument(
        "--model",
        default=None,
        help="diffusers folder (unet/ + scheduler/) or hub id; default: the bundled digits teacher",
    )
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale, out_u + w (out_c - out_u); 1 = off")
    p.add_argument("--seed", type=int, default=0)


def _load_teacher(path):
    from .models import Teacher

    if path is None:
        from .assets import digits_teacher_path

        path = digits_teacher_path()
    return Teacher.from_pretrained(path)


def cmd_sample(args) -> int:
    import torch

    from .models.conditioning import ClassConditioner
    from .sampling import sample
    from .utils import save_image_grid

    teacher = _load_teacher(args.model)
    net = teacher.net
    n = args.num
    cond = None
    if getattr(net.config, "num_class_embeds", None):
        cond = ClassConditioner.for_unet2d(net)(torch.arange(n) % (net.config.num_class_embeds - 1))
    shape = (n, net.config.in_channels, net.config.sample_size, net.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    x = sample(
        lambda x, t: teacher.raw(x, t, cond, args.guidance_scale),
        teacher.schedule,
        noise,
        args.steps,
        pred_type=teacher.prediction_type,
        progress=True,
    )
    save_image_grid(x, args.out, nrow=10, scale=4)
    print(f"wrote {args.out}")
    return 0


def cmd_fd_digits(args) -> int:
    from .eval.teacher_report import teacher_fd_report

    report = teacher_fd_report(
        _load_teacher(args.model),
        steps=args.steps,
        num_samples=args.num_samples,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    for row in report["rows"]:
        print(f"steps={row['steps']:>3}  FD-digits={row['fd_digits']:.3f}")
    if args.out:
        from .utils import write_json

        write_json(report, args.out)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train import add_train_args

    p = argparse.ArgumentParser(
        prog="stepdistill", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="command")
    tr = sub.add_parser(
        "train",
        help="train from a recipe YAML",
        description="Train from a recipe. "
        "Example: stepdistill train --config recipes/teacher/digits.yaml max_steps=200",
    )
    add_train_args(tr)
    sp = sub.add_parser("sample", help="sample a model folder into an image grid")
    _sample_args(sp)
    sp.add_argument("--steps", type=int, default=50, help="DDIM steps (trailing spacing)")
    sp.add_argument("--num", type=int, default=40, help="number of images")
    sp.add_argument("--out", default="samples.png", help="output PNG")
    dm = sub.add_parser("demo", help="DMD2 on the bundled digits teacher: train, export, reload, metrics")
    dm.add_argument("--out", default="outputs/demo", help="output folder (samples.png, metrics.json, pipeline/)")
    dm.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    dm.add_argument("--num-samples", type=int, default=1000, help="samples per FD-digits estimate")
    ev = sub.add_parser(
        "eval",
        help="score an exported pipeline or an image folder (FID/KID/PR/CLIP/FD-digits)",
        description="Sample --pipeline (an exported folder or hub id; or read a folder of PNGs) and "
        "score it against --reference ('digits', an image folder, or a cached .npz). Multi-GPU: "
        "accelerate launch -m stepdistill.cli eval ...",
    )
    ev.add_argument("--pipeline", required=True, help="exported pipeline folder / hub id, or a folder of images")
    ev.add_argument("--reference", default="digits", help="'digits', a folder of reference images, or an .npz")
    ev.add_argument("--prompts", default=None, help="prompt file (.txt / .jsonl) for text-to-image pipelines")
    ev.add_argument("--num-samples", type=int, default=1000)
    ev.add_argument("--batch-size", type=int, default=250)
    ev.add_argument("--metrics", default=None, help="comma list of fd_digits,fid,kid,pr,clip (default: by reference)")
    ev.add_argument("--inception-weights", default=None, help="local weights-inception-2015-12-05-6726825d.pth")
    ev.add_argument("--allow-download", action="store_true", help="let the FID library download its weights")
    ev.add_argument("--clip-model", default=None, help="open_clip model name, e.g. ViT-g-14")
    ev.add_argument("--clip-pretrained", default=None, help="local open_clip checkpoint file")
    ev.add_argument("--center-crop-size", type=int, default=None, help="centre crop + resize (COCO protocols)")
    ev.add_argument("--kid-subset-size", type=int, default=None)
    ev.add_argument("--cache-dir", default=None, help="where reference statistics (.npz) are cached")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="outputs/eval", help="output folder (metrics.json, samples.png)")
    fd = sub.add_parser("fd-digits", help="FD-digits of a digits model vs DDIM steps")
    _sample_args(fd)
    fd.add_argument("--steps", type=int, nargs="+", default=[1, 4, 10, 25, 50], help="DDIM step counts")
    fd.add_argument("--num-samples", type=int, default=1000, help="generated samples per step count")
    fd.add_argument("--out", default="", help="write the report JSON here")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "train":
        from .train import run_train

        return run_train(args)
    if args.command == "sample":
        return cmd_sample(args)
    if args.command == "eval":
        from .eval.run import run_eval

        metrics = run_eval(
            args.pipeline,
            args.reference,
            args.out,
            prompts=args.prompts,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            metrics=args.metrics,
            inception_weights=args.inception_weights,
            allow_download=args.allow_download,
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            seed=args.seed,
            center_crop_size=args.center_crop_size,
            kid_subset_size=args.kid_subset_size,
            cache_dir=args.cache_dir,
        )
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, max_steps=args.max_steps, num_samples=args.num_samples)
        return 0
    return cmd_fd_digits(args)


if __name__ == "__main__":
    sys.exit(main())
