"""``accelerate launch -m stepdistill.train --config recipe.yaml [key=value ...]`` (same as ``stepdistill train``)."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, build_config, parse_overrides, read_yaml

# method name (the recipe's ``method:`` key) -> (module, trainer class, one-line description); imported lazily
METHODS = {
    "dsm": ("stepdistill.trainers.dsm", "DSMTrainer", "train a teacher by denoising score matching"),
    "dmd2": ("stepdistill.trainers.dmd2", "DMD2Trainer", "distribution matching distillation (DMD2)"),
    "sim": ("stepdistill.trainers.sim", "SIMTrainer", "score implicit matching (SIM; SiD's loss)"),
    "vsd": ("stepdistill.trainers.vsd", "VSDTrainer", "variational score distillation (SwiftBrush)"),
    "disback": ("stepdistill.trainers.disback", "DisBackTrainer", "distribution backtracking on DMD2 / SIM / VSD"),
    "fdistill": ("stepdistill.trainers.fdistill", "FDistillTrainer", "f-divergence distribution matching (f-distill)"),
    "ladd": ("stepdistill.trainers.ladd", "LADDTrainer", "latent adversarial diffusion distillation (LADD)"),
    "boot": ("stepdistill.trainers.boot", "BOOTTrainer", "data-free distillation by bootstrapping (BOOT)"),
    "msd": ("stepdistill.trainers.msd", "MSDTrainer", "multi-student distillation: K routed DMD2 students"),
    "sfd": ("stepdistill.trainers.sfd", "SFDTrainer", "score forgetting distillation (SFD): SiD that unlearns a class"),
    "progressive": ("stepdistill.trainers.progressive", "ProgressiveTrainer", "progressive / guided distillation"),
    "meanflow": ("stepdistill.trainers.meanflow", "MeanFlowTrainer", "MeanFlow: one/few-step average-velocity model"),
    "consistency": (
        "stepdistill.trainers.consistency",
        "ConsistencyTrainer",
        "consistency family: LCM / CD, LCM-LoRA, PCM / TSCD, iCT, ECT",
    ),
    "scm": ("stepdistill.trainers.scm", "SCMTrainer", "continuous-time consistency (sCM: sCD / sCT, TrigFlow)"),
    "hyper_sd": ("stepdistill.trainers.hyper_sd", "HyperSDTrainer", "Hyper-SD: human feedback and one-step stages"),
}


def trainer_classes() -> dict:
    """Method name (the recipe's ``method:`` key) -> trainer class."""
    import importlib

    return {name: getattr(importlib.import_module(mod), cls) for name, (mod, cls, _) in METHODS.items()}


def make_trainer(config_path: str, overrides=()):
    data = read_yaml(config_path)
    data.update(parse_overrides(overrides))
    method = data.pop("method", None)
    if method not in METHODS:
        raise ConfigError(f"recipe {config_path!r}: 'method' must be one of {sorted(METHODS)}, got {method!r}")
    cls = trainer_classes()[method]
    cfg = build_config(cls.config_class, data, source=config_path)
    cfg._given_keys = frozenset(data)  # what the recipe / command line set (launcher settings fill the rest)
    return cls(cfg)


def add_train_args(p: argparse.ArgumentParser):
    p.add_argument("--config", required=True, help="recipe YAML (keys map one-to-one onto the method's config)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys (YAML syntax for values)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of errors")


def run_train(args) -> int:
    trainer = make_trainer(args.config, args.overrides)
    trainer.train()  # refusals (output folder, resume checks, launcher conflicts) come before models load
    if hasattr(trainer, "export"):
        path = trainer.export()
        if trainer.accelerator.is_main_process:
            print(f"exported to {path}")
    trainer.finish()
    return 0


def main(argv=None) -> int:
    from .cli import ArgumentParser, report_errors, train_help_epilog

    argv = sys.argv[1:] if argv is None else list(argv)
    p = ArgumentParser(
        prog="python -m stepdistill.train",
        description=__doc__,
        epilog=train_help_epilog(argv),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_args(p)
    args = p.parse_args(argv)
    return report_errors(lambda: run_train(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
