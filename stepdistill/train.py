"""``accelerate launch -m stepdistill.train --config recipe.yaml [key=value ...]`` (same as ``stepdistill train``)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, build_config, parse_overrides, read_yaml


def trainer_classes() -> dict:
    """Method name (the recipe's ``method:`` key) -> trainer class."""
    from .trainers.consistency import ConsistencyTrainer
    from .trainers.dmd2 import DMD2Trainer
    from .trainers.dsm import DSMTrainer
    from .trainers.progressive import ProgressiveTrainer
    from .trainers.sim import SIMTrainer
    from .trainers.vsd import VSDTrainer

    return {
        "dsm": DSMTrainer,
        "dmd2": DMD2Trainer,
        "sim": SIMTrainer,
        "vsd": VSDTrainer,
        "progressive": ProgressiveTrainer,
        "consistency": ConsistencyTrainer,
    }


def make_trainer(config_path: str, overrides=()):
    data = read_yaml(config_path)
    data.update(parse_overrides(overrides))
    method = data.pop("method", None)
    classes = trainer_classes()
    if method not in classes:
        raise ConfigError(f"recipe {config_path!r}: 'method' must be one of {sorted(classes)}, got {method!r}")
    cls = classes[method]
    cfg = build_config(cls.config_class, data, source=config_path)
    cfg._given_keys = frozenset(data)  # what the recipe / command line set (launcher settings fill the rest)
    return cls(cfg)


def add_train_args(p: argparse.ArgumentParser):
    p.add_argument("--config", required=True, help="recipe YAML (keys map one-to-one onto the method's config)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys (YAML syntax for values)")


def run_train(args) -> int:
    try:
        trainer = make_trainer(args.config, args.overrides)
        trainer.train()  # refusals (output folder, resume checks, launcher conflicts) come before models load
        if hasattr(trainer, "export"):
            path = trainer.export()
            if trainer.accelerator.is_main_process:
                print(f"exported to {path}")
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch every process refuses: one message
            print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.finish()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepdistill.train", description=__doc__)
    add_train_args(p)
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
