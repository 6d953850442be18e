"""The ``stepdistill`` command.

Start-up imports only the standard library (and PyYAML for ``train``): torch, diffusers and the trainers load
when a command runs, so ``--help`` and argument errors answer at once.

Errors: an expected error (a bad key, path, file or value: :class:`stepdistill.config.UserError`, or an
``OSError`` such as a missing file) prints one line ``error: ...`` on stderr and exits with code 2; ``--debug``
shows its traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import sys

DESCRIPTION = """stepdistill: distil many-step diffusion models into one- and few-step generators."""


def _methods_list() -> str:
    from .train import METHODS

    return "\n".join(f"  {name:<12} {desc}" for name, (_, _, desc) in METHODS.items())


def _epilog() -> str:
    return f"""methods (a recipe's `method:` key; `stepdistill train --config <recipe> --help` lists its keys):
{_methods_list()}

Multi-GPU: accelerate launch -m stepdistill.train --config <recipe.yaml> [key=value ...]
Errors print one line `error: ...` (exit code 2); add --debug for the traceback."""


# --------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that are the user's input, not a bug: reported as one ``error:`` line."""
    from .config import UserError

    return (UserError, OSError)


def report_errors(fn, debug: bool = False) -> int:
    """Run ``fn()`` and return its exit code; an expected error prints ``error: <message>`` (one line) on stderr
    and returns 2, unless ``debug`` (then it propagates with its traceback)."""
    try:
        return fn()
    except expected_errors() as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch every process fails alike: one message
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"error: {message}", file=sys.stderr)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: ...``, exit code 2), like every other expected error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


# --------------------------------------------------------------------------------------------------------
# train --help: the keys of a method, read from the config dataclasses' docstrings without importing them
# --------------------------------------------------------------------------------------------------------


def _config_classes() -> dict[str, ast.ClassDef]:
    root = os.path.join(os.path.dirname(__file__), "trainers")
    classes = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            classes.update({n.name: n for n in tree.body if isinstance(n, ast.ClassDef)})
    return classes


def method_keys_help(method: str) -> str:
    """The docstrings of ``method``'s config class and of its bases (shared keys first)."""
    from .train import METHODS

    classes = _config_classes()
    trainer = classes[METHODS[method][1]]
    config_name = None
    for klass in [trainer] + [classes[b.id] for b in trainer.bases if isinstance(b, ast.Name) and b.id in classes]:
        for node in klass.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "config_class" for t in node.targets):
                config_name = node.value.id
                break
        if config_name:
            break
    chain, name = [], config_name
    while name in classes:
        chain.append(classes[name])
        bases = [b.id for b in classes[name].bases if isinstance(b, ast.Name)]
        name = bases[0] if bases else None
    parts = []
    for klass in reversed(chain):
        doc = inspect.cleandoc(ast.get_docstring(klass) or "")
        parts.append(f"{klass.name}:\n" + "\n".join("  " + line for line in doc.splitlines()))
    return f"keys of method {method!r} (recipe keys and key=value overrides):\n\n" + "\n\n".join(parts)


def train_help_epilog(argv) -> str:
    """Epilog of ``train --help``: the keys of the recipe's method when ``--config`` names a readable recipe,
    else the list of methods."""
    from .train import METHODS

    argv = list(argv or ())
    if not any(a in ("-h", "--help") for a in argv):
        return ""
    recipe = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            recipe = argv[i + 1]
        elif a.startswith("--config="):
            recipe = a.split("=", 1)[1]
    method = None
    if recipe and os.path.isfile(recipe):
        from .config import ConfigError, read_yaml

        try:
            method = read_yaml(recipe).get("method")
        except ConfigError:
            method = None
    for a in argv:
        if a.startswith("method="):
            method = a.split("=", 1)[1]
    if method in METHODS:
        return method_keys_help(method)
    return (
        f"methods (the recipe's `method:` key):\n{_methods_list()}\n\n"
        "`stepdistill train --config <recipe.yaml> --help` lists the keys of that recipe's method."
    )


# --------------------------------------------------------------------------------------------------------
# sample / fd-digits
# --------------------------------------------------------------------------------------------------------


def _sample_args(p):
    p.add_argument(
        "--model",
        default=None,
        help="diffusers folder (unet/ + scheduler/) or hub id; default: the bundled digits teacher",
    )
    p.add_argument(
        "--guidance-scale", type=float, default=None, help="CFG scale, out_u + w (out_c - out_u); default 1 = off"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-download", action="store_true", help="let a hub id missing from the cache download")


def _hybrid_args(p):
    p.add_argument(
        "--hybrid-teacher-steps",
        type=_positive("--hybrid-teacher-steps"),
        default=None,
        metavar="K",
        help="hybrid sampling of an export (diversity distillation): the teacher runs the first K steps, the "
        "student its trained steps from the hand-over timestep on (see stepdistill/hybrid.py)",
    )
    p.add_argument("--teacher", default=None, help="the teacher's folder for --hybrid-teacher-steps (default: digits)")
    p.add_argument("--teacher-guidance-scale", type=float, default=1.0, help="the teacher's CFG scale (hybrid)")
    p.add_argument(
        "--teacher-grid-steps",
        type=_positive("--teacher-grid-steps"),
        default=None,
        help="the teacher's own M-step trailing grid for its steps (default: the student's trained timesteps)",
    )


def _model_path(args) -> str:
    if args.model is None:
        from .assets import digits_teacher_path

        return digits_teacher_path()
    from .models.loading import resolve_model_path

    return resolve_model_path(args.model, allow_download=True if args.allow_download else False, key="--model")


def _load_teacher(args):
    from .models import Teacher

    return Teacher.from_pretrained(_model_path(args))


def _exported_timesteps(path: str, text_ok: bool = False):
    """The trained timesteps of a stepdistill export (``model_index.json``), or None for another folder; a
    text-to-image export only with ``text_ok`` (a prompt was given)."""
    from .config import ConfigError

    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        index = json.load(f)
    if ("tokenizer" in index or "text_encoder" in index) and not text_ok:
        raise ConfigError(
            f"--model {path!r} is a text-to-image pipeline: pass --prompt \"...\" (`stepdistill sample`), or "
            "score it with `stepdistill eval --prompts`"
        )
    return (index.get("_stepdistill") or {}).get("trained_timesteps") or index.get("trained_timesteps")


def cmd_sample(args) -> int:
    import torch

    from .utils import save_image_grid

    path = _model_path(args)
    trace = [] if args.trace else None
    from .pipelines import sample_toy, toy_model_kind

    if toy_model_kind(path):  # a 2-D toy teacher or exported toy generator: a scatter plot (+ the points)
        if args.trace or args.hybrid_teacher_steps:
            from .config import ConfigError

            raise ConfigError("--trace / --hybrid-teacher-steps draw images; for toy pipelines use the Python API")
        return sample_toy(path, args.num, args.steps or 50, args.seed, args.out)
    trained = _exported_timesteps(path, text_ok=bool(args.prompt))
    g = torch.Generator().manual_seed(args.seed)
    latent = trained and _latent_export(path)
    if latent and (args.trace or (args.hybrid_teacher_steps and args.teacher is None)):
        from .config import ConfigError

        raise ConfigError(f"--model {path!r} is a latent (text-to-image / DiT) export: --trace draws pixel-space "
                          "exports only, and --hybrid-teacher-steps needs --teacher (the teacher's pipeline folder)")
    hybrid = _hybrid_teacher(args, trained)  # checked before the student loads
    if trained and args.steps is None:
        # an export samples as it was trained: its own pipeline, timesteps and scheduler
        from diffusers import DiffusionPipeline

        import stepdistill  # noqa: F401  (registers the pipeline classes with diffusers)

        how = ""
        if hybrid and os.path.isdir(os.path.join(path, "lora")):  # a LoRA student on the teacher's own network
            from .hybrid import load_lora_student

            pipe, teacher = load_lora_student(path, hybrid[0])
            hybrid, how = (teacher, hybrid[1]), " (the LoRA student: lora/ on the teacher's network, one copy)"
        else:
            pipe = DiffusionPipeline.from_pretrained(path)
        kw = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
        kw.update(_hybrid_kwargs(args, pipe, hybrid, trace))
        x = pipe(**_sample_inputs(pipe, args), generator=g, output_type="pt", **kw).images * 2 - 1
        how = f"the export's own sampling: {len(trained)} step(s) at timesteps {trained}" + how
        if args.hybrid_teacher_steps:
            how += f", the first {args.hybrid_teacher_steps} run by the teacher {args.teacher!r}"
    else:
        from .models.conditioning import ClassConditioner
        from .sampling import sample

        teacher = _load_teacher(args)
        net = teacher.net
        n = args.num
        cond = None
        if getattr(net.config, "num_class_embeds", None):
            cond = ClassConditioner.for_unet2d(net)(torch.arange(n) % (net.config.num_class_embeds - 1))
        shape = (n, net.config.in_channels, net.config.sample_size, net.config.sample_size)
        noise = torch.randn(shape, generator=g)
        steps = args.steps or 50
        x = sample(
            lambda x, t: teacher.raw(x, t, cond, 1.0 if args.guidance_scale is None else args.guidance_scale),
            teacher.schedule,
            noise,
            steps,
            pred_type=teacher.prediction_type,
            progress=True,
            trace=trace,
        )
        how = f"{steps} DDIM steps (trailing)"
    save_image_grid(x, args.out, nrow=10, scale=4)
    print(f"wrote {args.out} ({args.num} images, {how})")
    if trace is not None:
        from .hybrid import save_trace_grid

        save_trace_grid(trace, args.trace)
        print(f"wrote {args.trace} (predicted x0 at each of {len(trace)} steps; a row per sample)")
    return 0


def _latent_export(path: str) -> bool:
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    return "transformer" in index or "vae" in index


def _sample_inputs(pipe, args) -> dict:
    """The call's inputs: the prompt (text-to-image), else the labels 0, 1, ... in turn (class / DiT exports)."""
    import torch

    if getattr(pipe, "tokenizer", None) is not None:
        return {"prompt": args.prompt, "num_images_per_prompt": args.num}
    net = _network(pipe)
    n_classes = getattr(net.config, "num_embeds_ada_norm", None)  # DiT: no null row among the classes
    if n_classes is None and getattr(net.config, "num_class_embeds", None):
        n_classes = net.config.num_class_embeds - 1
    return {"class_labels": torch.arange(args.num) % n_classes} if n_classes else {"num_images": args.num}


def _network(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def _hybrid_teacher(args, trained):
    """(teacher, its grid) for ``--hybrid-teacher-steps``, checked against the export's trained timesteps (one-line
    errors before anything heavy loads); None without the flag."""
    k = args.hybrid_teacher_steps
    if not k:
        return None
    from .config import ConfigError
    from .hybrid import handover, teacher_grid_timesteps
    from .models import Teacher

    steps = getattr(args, "steps", None)
    if not trained or steps is not None:
        key, value = ("--model", args.model) if hasattr(args, "model") else ("--pipeline", args.pipeline)
        raise ConfigError(
            f"--hybrid-teacher-steps needs {key} to be a stepdistill export (model_index.json with trained "
            f"timesteps, used as they are: no --steps); got {key} {value!r}"
            + (f" with --steps {steps}" if steps else "")
        )
    if args.teacher is None:
        from .assets import digits_teacher_path

        args.teacher = digits_teacher_path()
    teacher = Teacher.from_pretrained(args.teacher)
    grid = teacher_grid_timesteps(teacher, args.teacher_grid_steps) if args.teacher_grid_steps else None
    try:
        handover(trained, k, grid)
    except ValueError as e:
        raise ConfigError(f"--hybrid-teacher-steps {k}: {e}") from None
    return teacher, grid


def _hybrid_kwargs(args, pipe, hybrid, trace) -> dict:
    """The pipeline call's hybrid-sampling arguments (the teacher, its steps, CFG and grid) and the trace list."""
    kw = {} if trace is None else {"trace": trace}
    if hybrid is None:
        return kw
    teacher, grid = hybrid
    want = (_network(pipe).config.in_channels, _network(pipe).config.sample_size)
    got = (teacher.net.config.in_channels, teacher.net.config.sample_size)
    if want != got:
        from .config import ConfigError

        raise ConfigError(f"--teacher {args.teacher!r} draws (channels, size) {got}, the student {want}")
    kw.update(teacher=teacher, teacher_steps=args.hybrid_teacher_steps)
    kw.update(teacher_guidance_scale=args.teacher_guidance_scale, teacher_timesteps=grid)
    return kw


def cmd_fd_digits(args) -> int:
    from .eval.teacher_report import teacher_fd_report

    report = teacher_fd_report(
        _load_teacher(args),
        steps=args.steps,
        num_samples=args.num_samples,
        guidance_scale=1.0 if args.guidance_scale is None else args.guidance_scale,
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


def cmd_eval(args) -> int:
    from .config import ConfigError
    from .eval.run import run_eval

    if args.forget_label is not None or args.remap_label is not None:  # SFD's forgetting report (class models)
        from .eval.forget import forget_report

        if args.forget_label is None:
            raise ConfigError("--remap-label needs --forget-label (the class that was forgotten)")
        if args.reference != "digits" or args.prompts or args.metrics or args.hybrid_teacher_steps:
            raise ConfigError("--forget-label scores digits models with the digits classifier; drop --reference, "
                              "--prompts, --metrics and --hybrid-teacher-steps")
        metrics = forget_report(
            args.pipeline, args.forget_label, args.remap_label, num_samples=args.num_samples,
            forget_samples=args.forget_samples, teacher_steps=args.teacher_steps, batch_size=args.batch_size,
            seed=args.seed, out_dir=args.out,
        )
        print(json.dumps(metrics, indent=2))
        return 0
    kwargs = {}
    if args.hybrid_teacher_steps:
        trained = _exported_timesteps(args.pipeline, text_ok=True) if os.path.isdir(args.pipeline) else None
        if trained and args.teacher is None and _latent_export(args.pipeline):
            raise ConfigError(f"--pipeline {args.pipeline!r} is a latent (text-to-image / DiT) export: "
                              "--hybrid-teacher-steps needs --teacher (the teacher's pipeline folder)")
        teacher, grid = _hybrid_teacher(args, trained)
        kwargs = {"teacher": teacher, "teacher_steps": args.hybrid_teacher_steps, "teacher_timesteps": grid}
        kwargs["teacher_guidance_scale"] = args.teacher_guidance_scale

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
        resize=args.resize,
        pipeline_kwargs=kwargs,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, max_steps=args.max_steps, num_samples=args.num_samples)
    return 0


def cmd_cache(args) -> int:
    from .data.cache import write_cache
    from .models.loading import resolve_model_path

    teacher = resolve_model_path(args.teacher, allow_download=args.allow_download or None, key="--teacher")
    index = write_cache(
        teacher,
        args.dataset,
        args.out,
        pixels=args.resolution,
        batch_size=args.batch_size,
        dtype=args.dtype,
        image_key=args.image_key,
        caption_key=args.caption_key,
        max_bad=args.max_bad_samples,
    )
    if index is not None:
        print(
            f"wrote {index['samples']} samples in {len(index['shards'])} shards to {args.out}: train with dataset: "
            f"latents:{args.out}"
        )
    return 0


def cmd_train(args) -> int:
    from .train import run_train

    return run_train(args)


# --------------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------------


def build_parser(argv=None) -> argparse.ArgumentParser:
    from .train import add_train_args

    p = ArgumentParser(
        prog="stepdistill",
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors (default: one error line)")
    sub = p.add_subparsers(dest="command", metavar="command", title="commands")

    def command(name, help, description=None, epilog=None):
        sp = sub.add_parser(
            name,
            help=help,
            description=description or help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name != "train":  # add_train_args adds its own
            sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        return sp

    tr = command(
        "train",
        "train from a recipe YAML (any method: dsm, dmd2, sim, vsd, progressive, consistency)",
        "Train from a recipe, then export. Example: stepdistill train --config recipes/dmd2/digits.yaml max_steps=200",
        epilog=train_help_epilog(argv),
    )
    add_train_args(tr)
    sp = command(
        "sample",
        "sample a model folder into an image grid (an export samples with its own trained timesteps)",
    )
    _sample_args(sp)
    sp.add_argument(
        "--steps",
        type=_positive("--steps"),
        default=None,
        help="DDIM steps with the model's network (trailing spacing); default: a stepdistill export's own sampling "
        "(its trained timesteps and scheduler), 50 for any other model",
    )
    sp.add_argument("--num", type=_positive("--num"), default=40, help="number of images")
    sp.add_argument("--prompt", default=None, help="the prompt of a text-to-image export (--num images of it)")
    sp.add_argument("--out", default="samples.png", help="output PNG")
    _hybrid_args(sp)
    sp.add_argument("--trace", default=None, help="also write the predicted x0 of every step as an image grid here")
    dm = command("demo", "DMD2 on the bundled digits teacher: train, export, reload, metrics")
    dm.add_argument("--out", default="outputs/demo", help="output folder (samples.png, metrics.json, pipeline/)")
    dm.add_argument("--max-steps", type=_positive("--max-steps"), default=None, help="override the recipe's max_steps")
    dm.add_argument("--num-samples", type=_positive("--num-samples"), default=1000, help="samples per FD-digits")
    ev = command(
        "eval",
        "score an exported pipeline or an image folder (FD-digits, FID, KID, precision / recall, CLIP score)",
        "Sample --pipeline (an exported folder, a hub id in the local cache, or a folder of images) and score it "
        "against --reference ('digits', an image folder, or a cached .npz); writes metrics.json and samples.png "
        "and prints every metric as JSON. Multi-GPU: accelerate launch -m stepdistill.cli eval ...",
    )
    ev.add_argument(
        "--pipeline",
        required=True,
        help="exported pipeline folder, hub id (from the local hub cache; with --allow-download also downloaded), "
        "or a folder of images",
    )
    ev.add_argument("--reference", default="digits", help="'digits', a folder of reference images, or an .npz")
    ev.add_argument("--prompts", default=None, help="prompt file (.txt / .jsonl) for text-to-image pipelines")
    ev.add_argument("--num-samples", type=_positive("--num-samples"), default=1000)
    ev.add_argument("--batch-size", type=_positive("--batch-size"), default=250)
    ev.add_argument(
        "--metrics", default=None, help="comma list of fd_digits,fid,kid,pr,clip,diversity (default: by reference)"
    )
    ev.add_argument("--inception-weights", default=None, help="local weights-inception-2015-12-05-6726825d.pth")
    ev.add_argument(
        "--resize",
        choices=("torchmetrics", "tf1"),
        default="torchmetrics",
        help="Inception's resize to 299: torchmetrics' antialiased bilinear (default) or tf1 (TF1's bilinear, "
        "torch-fidelity's and the original FID's; use it to compare with published FIDs of large images)",
    )
    ev.add_argument(
        "--allow-download",
        action="store_true",
        help="let the Inception / CLIP weights and a hub-id pipeline download (default: local files only)",
    )
    ev.add_argument("--clip-model", default=None, help="open_clip model name, e.g. ViT-g-14")
    ev.add_argument(
        "--clip-pretrained",
        default=None,
        help="local open_clip checkpoint file (an open_clip pretrained tag needs --allow-download)",
    )
    ev.add_argument("--center-crop-size", type=_positive("--center-crop-size"), default=None, help="COCO protocols")
    ev.add_argument("--kid-subset-size", type=int, default=None)
    ev.add_argument("--cache-dir", default=None, help="where reference statistics (.npz) are cached")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="outputs/eval", help="output folder (metrics.json, samples.png)")
    _hybrid_args(ev)
    ev.add_argument("--forget-label", type=int, default=None, help="SFD report of a class-conditional digits model: "
                    "share of this label's samples the classifier still assigns to it, FD-digits of the other labels")
    ev.add_argument("--remap-label", type=int, default=None, help="with --forget-label: the class it was remapped to")
    ev.add_argument("--forget-samples", type=_positive("--forget-samples"), default=500,
                    help="with --forget-label: samples of the forgotten label")
    ev.add_argument("--teacher-steps", type=_positive("--teacher-steps"), default=50,
                    help="with --forget-label and a teacher (--pipeline digits or unet/ + scheduler/): DDIM steps")
    fd = command("fd-digits", "FD-digits of a digits model at several DDIM step counts (the stand-in for FID)")
    _sample_args(fd)
    fd.add_argument("--steps", type=_positive("--steps"), nargs="+", default=[1, 4, 10, 25, 50], help="DDIM steps")
    fd.add_argument("--num-samples", type=_positive("--num-samples"), default=1000, help="samples per step count")
    fd.add_argument("--out", default="", help="write the report JSON here")
    ca = command(
        "cache",
        "encode a sharded dataset once with a teacher's VAE and text encoders (train with dataset: latents:<out>)",
        "Encode every image of --dataset (shards:<tar pattern> or hf:<saved folder>) with the teacher's VAE and every "
        "caption with its text encoders, into safetensors shards with an index and a fingerprint of the encoders "
        "and the preprocessing; a recipe then reads dataset: latents:<out> (a cache of other encoders is refused). "
        "Resumable: finished shards are kept. Multi-process: accelerate launch -m stepdistill.cli cache ...",
    )
    ca.add_argument("--teacher", required=True, help="the teacher's diffusers folder or hub id")
    ca.add_argument("--dataset", required=True, help="shards:/data/{00000..00099}.tar or hf:/path/to/saved")
    ca.add_argument("--out", required=True, help="the cache folder")
    ca.add_argument(
        "--resolution",
        type=_positive("--resolution"),
        default=0,
        help="image side in pixels (default: the teacher network's sample size x the VAE's factor)",
    )
    ca.add_argument("--batch-size", type=_positive("--batch-size"), default=16)
    ca.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="encoders' and stored tensors' dtype")
    ca.add_argument("--image-key", default="", help="tar extension / column of the image (default: auto)")
    ca.add_argument("--caption-key", default="", help="tar extension / column of the caption (default: auto)")
    ca.add_argument("--max-bad-samples", type=int, default=100, help="bad samples skipped before an error")
    ca.add_argument("--allow-download", action="store_true", help="let a hub-id teacher download")
    return p


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "demo": cmd_demo, "fd-digits": cmd_fd_digits}
COMMANDS["cache"] = cmd_cache


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    return report_errors(lambda: COMMANDS[args.command](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
