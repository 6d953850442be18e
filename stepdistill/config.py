"""YAML recipes <-> config dataclasses: keys map one-to-one onto fields; ``key=value`` overrides on the
command line; unknown keys, wrong types and missing paths fail here, before any model loads."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing

import yaml


class UserError(Exception):
    """An expected error caused by the user's input (a key, a path, a file, a value). The CLI prints its message
    as one ``error: ...`` line and exits with code 2 (``--debug`` shows the traceback); anything else is a bug
    and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """A bad recipe key or value (the message names it)."""


class DataError(UserError, ValueError):
    """Unusable data: a missing, empty or unreadable dataset, image or prompt file (the message names it)."""


class ObjectError(UserError, TypeError):
    """An object given to the library (a teacher, generator, fake score or dataset passed to a trainer) that
    does not satisfy its documented contract (the message names the argument)."""


def _check_type(name: str, value, tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected null, got {value!r}")
    if tp is typing.Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else typing.Any
        items = [_check_type(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: YAML 1.1's float syntax
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / yes as false / true: mixed_precision=no
            return "no" if value is False else "yes"
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def parse_overrides(items) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} in {self.name} (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a mapping of config keys, got {type(data).__name__}")
    return data


def build_config(cls, data: dict, source: str = "config"):
    """Instantiate dataclass ``cls`` from a mapping, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {source} for {cls.__name__}{hint}")
        kwargs[key] = _check_type(key, value, hints[key])
    cfg = cls(**kwargs)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


# (key, lowest value, whether the lowest value itself is allowed, what the value means)
TRAIN_RANGES = (
    ("learning_rate", 0.0, False, "the optimiser's step size"),
    ("generator_lr", 0.0, True, "the generator's learning rate (0: learning_rate)"),
    ("fake_lr", 0.0, True, "the fake score's learning rate (0: learning_rate)"),
    ("warmup_steps", 0, True, "linear warm-up steps (0: none)"),
    ("max_grad_norm", 0.0, True, "gradient clipping norm (0: no clipping)"),
    ("weight_decay", 0.0, True, "AdamW weight decay"),
    ("checkpoint_every", 0, True, "steps between checkpoints (0: none)"),
    ("checkpoints_total_limit", 1, True, "checkpoints kept"),
    ("log_every", 1, True, "steps between logged scalars"),
    ("sample_every", 0, True, "steps between sample grids (0: none)"),
    ("max_nonfinite", 1, True, "non-finite steps in a row before the run stops"),
    ("global_batch", 1, True, "samples per optimiser step"),
    ("data_workers", 0, True, "dataloader workers per process of a streamed dataset"),
    ("shuffle_window", 1, True, "samples permuted together inside a shard"),
    ("max_bad_samples", 0, True, "bad samples or shards skipped before the run stops"),
)


def check_ranges(cfg, ranges=TRAIN_RANGES) -> None:
    """Refuse out-of-range numeric settings (a ConfigError naming the key and value) instead of clamping them."""
    for key, low, inclusive, meaning in ranges:
        if not hasattr(cfg, key):
            continue
        value = getattr(cfg, key)
        if value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"{key} must be {bound} ({meaning}), got {value!r}")
    for key in ("adam_beta1", "adam_beta2"):
        value = getattr(cfg, key, None)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
