"""Typed stage configs: dataclasses loaded from YAML, with `key=value` overrides from the command line.

Every field carries a one-line help text in `metadata["help"]`. Loading checks types and names and fails with the key
and the file named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be loaded; the message names the key and the source."""


# Stages whose loop runs on several data-parallel workers (`num_workers` in a pipeline, `--num-workers` on `align`).
DATA_PARALLEL_STAGES = ("sft", "dpo", "grpo")


def option(default: Any, help: str, path: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with help text. Mutable defaults (lists, dicts, dataclasses) are copied per instance.

    `path="file"` marks a field naming an input file and `path="model"` one naming a model or tokenizer (a local
    folder, a config .json or a hub id), `path="reward_model"` an `align rm` checkpoint folder: `check_paths` checks
    them before a stage loads anything.
    """
    metadata = {"help": help, **({"path": path} if path else {})}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:  # the allowed values, not the bare word "Literal"
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: `{key}` expects {_type_name(tp)}, got {value!r}")
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{source}: `{key}` must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{key}` is a section and expects a mapping, got {value!r}")
        return _build(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: `{key}` expects a list, got {value!r}")
        (item_type, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{key}` expects a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string; it is still plainly a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: `{key}` expects true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: `{key}` expects {tp.__name__}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean `{prefix}{close[0]}`?)" if close else ""
            raise ConfigError(f"{source}: unknown key `{prefix}{name}`{hint}")
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    try:
        instance = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{source}: {prefix}{exc}") from exc
    return instance


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override `{text}` is not of the form key=value")
    key, raw = text.split("=", 1)
    # YAML parsing gives numbers, booleans, null and lists their natural types: `lr=1e-4`, `budgets=[0,8,null]`.
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file (optional) and `key=value` overrides (dotted keys reach nested sections)."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        data = loaded or {}
        source = str(path)
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{text}`: `{key}` is not a section")
        node[keys[-1]] = value
    if overrides:
        source += " + overrides"
    return _build(cls, data, source)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every field, nested sections flattened; used by `--help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, prefix=f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((prefix + f.name, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows


def input_paths(config: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value, kind) of every non-empty field marked `path=` in `config`, sections included."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += input_paths(value, prefix=f"{prefix}{f.name}.")
        elif f.metadata.get("path") and value:
            found.append((prefix + f.name, value, f.metadata["path"]))
    return found


def check_paths(config: Any) -> None:
    """Fail in seconds, naming the key, when an input file or model a config names is not there.

    Called by each stage before it builds anything (and so before its output folder exists): a mistyped path costs
    seconds, not a model load, and leaves nothing behind.
    """
    from alignment.model_source import check_model_source

    unused = set(getattr(config, "unused_paths", lambda: ())())  # keys a setting makes the stage not read
    for key, value, kind in input_paths(config):
        if key in unused:
            continue
        if kind == "model":
            check_model_source(value, key)
        elif kind == "reward_model":
            from alignment.reward_model import check_reward_model_dir

            check_reward_model_dir(value, key)
        elif not Path(value).is_file():
            raise ConfigError(f"`{key}`: no such file: {value}{relative_to_cwd(Path(value))}")


def relative_to_cwd(path: Path) -> str:
    """` (relative to /the/cwd)` for a relative path in an error message, else nothing."""
    return "" if path.is_absolute() else f" (relative to {Path.cwd()})"
