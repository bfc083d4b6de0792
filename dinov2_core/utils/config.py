"""Typed configuration: dataclasses built from nested dicts, validated before anything runs.

Every config in the project (trainer, evaluation, curation, pipeline) is a tree of dataclasses.
This module turns YAML/dicts into those trees and rejects bad input with an error that names the
dotted key and the allowed values, e.g.::

    ConfigError: train.centering: 'sinkorn' is not one of ['centering', 'sinkhorn_knopp']

Command-line overrides use dotted keys with YAML-typed values: ``optim.lr=0.001``,
``crops.local_crops_number=4``, ``model.arch=vit_small``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message names the dotted key."""


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = list(get_args(tp))
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed (expected {_describe(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string; accept it as the number it means.
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise :class:`ConfigError`."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; allowed keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-dict form of a config tree (JSON/YAML serialisable)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, null, lists), else a string."""
    try:
        import yaml
    except ImportError:  # pyyaml is optional for dinov2_core; fall back to JSON-ish parsing
        import json

        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (returns a new dict)."""
    import copy

    result = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. optim.lr=0.001)")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = parse_scalar(raw)
    return result


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (update wins)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@functools.lru_cache(maxsize=1)
def _unique_key_loader():
    """A ``yaml.SafeLoader`` subclass that rejects a key defined twice in one mapping (PyYAML keeps
    the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first_seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides on purpose
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        earlier = first_seen.get(key)
                    except TypeError:  # an unhashable key: let PyYAML report it
                        continue
                    if earlier is not None:
                        mark = key_node.start_mark
                        raise ConfigError(f"{mark.name}:{mark.line + 1}:{mark.column + 1}: duplicate key {key!r} "
                                          f"(first defined at line {earlier.line + 1})")
                    first_seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _read_yaml_file(path: str) -> dict[str, Any]:
    """One YAML file as a mapping; every failure is a :class:`ConfigError` naming the file (and the
    line and column for syntax errors and duplicate keys)."""
    try:
        import yaml
    except ImportError as err:
        raise ImportError("reading YAML configs needs pyyaml: pip install pyyaml") from err
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory, expected a YAML file")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_unique_key_loader())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = " ".join(str(part) for part in (err.context, err.problem) if part)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file {path!r} cannot be read: {err.strerror or err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _record_origins(data: dict[str, Any], directory: str, origins: dict[str, str], prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        origins[dotted] = directory
        if not isinstance(value, dict):  # a value replacing a parent's section: its old leaves are gone
            for stale in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[stale]
        else:
            _record_origins(value, directory, origins, dotted + ".")


def _load_yaml_tree(path: str, chain: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    real = os.path.realpath(path)
    if real in chain:
        cycle = " -> ".join([*chain, real][chain.index(real):])
        raise ConfigError(f"{path}: defaults form a cycle: {cycle}")
    data = _read_yaml_file(path)
    parents = data.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: defaults: expected a list of YAML file paths, got {parents!r}")
    directory = os.path.dirname(os.path.abspath(path))
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for parent in parents:
        parent_path = os.path.join(directory, parent)
        if not os.path.exists(parent_path):
            raise ConfigError(f"{path}: defaults: {parent!r} does not exist (looked for {parent_path!r})")
        parent_data, parent_origins = _load_yaml_tree(parent_path, (*chain, real))
        merged = deep_merge(merged, parent_data)
        origins.update(parent_origins)
    _record_origins(data, directory, origins)
    return deep_merge(merged, data), origins


def load_yaml(path: str | os.PathLike, with_origins: bool = False) -> Any:
    """Read a YAML config. A top-level ``defaults: [other.yaml, ...]`` list is merged first
    (paths relative to this file), so recipes can inherit from a base file.

    Syntax errors, duplicate keys, a missing file or parent, and ``defaults`` cycles raise
    :class:`ConfigError` naming the file (and line and column where there is one).

    With ``with_origins=True`` returns ``(data, origins)``: ``origins`` maps every dotted key
    (``"pretrain"``, ``"pretrain.config"``) to the absolute directory of the file that last set it, so a
    relative path value can be resolved against the file that wrote it rather than the child file. A
    section merged from several files maps to the last one that touched it; its leaves are exact.
    """
    data, origins = _load_yaml_tree(os.fspath(path), ())
    return (data, origins) if with_origins else data


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file plus ``key=value`` overrides, validated."""
    data = load_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for MLflow params and config diffs)."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
