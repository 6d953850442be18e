"""YAML recipes <-> config dataclasses: keys map one-to-one onto fields; ``key=value`` overrides on the
command line; unknown keys, wrong types and missing paths fail here, before any model loads."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing

import yaml


class ConfigError(ValueError):
    """A bad recipe key or value (the message names it)."""


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: YAML 1.1's float syntax
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
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


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
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


def check_paths(cfg, keys) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value and not os.path.exists(value) and not _looks_like_hub_id(value):
            raise ConfigError(f"{key}: path {value!r} does not exist")


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))
