"""Reading a stage config: YAML files, flags, type coercion, key checks (with TRL's names), and its inputs."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from aligndistil_cli.config import trl
from aligndistil_cli.core.errors import ConfigError, shown
from aligndistil_cli.core.yamlio import parse_yaml


def _base_type(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """YAML 1.1 reads 1e-3 as a string; coerce by the declared type, naming the field on failure."""
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if tp is dict:
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"config field {name!r} must be {getattr(tp, '__name__', tp)}; got {shown(value)}") from None
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def check_keys(cls: type, keys: typing.Iterable[str], source: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    names = {**{k: k for k in known}, **trl.alias_map(cls)}
    for key in keys:
        if key not in known:
            key_ = str(key).replace("-", "_")
            close = [key_] if key_ in names else difflib.get_close_matches(key_, list(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _coerced(cls: type, values: dict, source: str) -> dict:
    """values with known keys, each coerced to its field's type; errors start with source."""
    check_keys(cls, values, source)
    types_ = field_types(cls)
    try:
        return {k: _coerce(k, v, types_[k]) for k, v in values.items()}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def build_config(cls: type, values: dict, source: str = "config") -> Any:
    """Instantiate a stage config from a dict (a pipeline stage's values), with key checks and type
    coercion; TRL's names are read as ours (trl.py). Every error names source (the file and the stage)."""
    values, per_device = trl.from_trl(cls, values, source)
    values = _coerced(cls, values, source)
    if per_device is not None:
        values["batch_size"] = trl.global_batch(per_device, values, source)
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(cls: type, config_file: str | Path | None, overrides: dict, ignore_unknown_keys: bool = False) -> Any:
    """defaults < YAML file < flags (flags that were not given are None and do not override).

    The file may use TRL's names (trl.py); ignore_unknown_keys drops the keys that only TRL knows. An error
    in a value of the file names the file; flags arrive typed from the command line.
    """
    values, per_device = {}, None
    if config_file:
        values, per_device = trl.from_trl(cls, read_yaml(config_file), str(config_file), ignore_unknown_keys)
        values = _coerced(cls, values, str(config_file))
    flags = {k: v for k, v in overrides.items() if v is not None}
    check_keys(cls, flags, "flags")
    values.update(flags)
    if per_device is not None and "batch_size" not in flags:  # --batch-size wins over the file's per-device size
        values["batch_size"] = trl.global_batch(per_device, values, str(config_file))
    return cls(**values)


class Input(typing.NamedTuple):
    name: str  # the field, or FIELD.NAME for an entry of a NAME=PATH field
    given_as: str  # as on the command line: "--data runs/toy/sft.jsonl"
    path: str
    kind: str  # opt's input: model, cache or data


def config_inputs(config) -> list[Input]:
    """Every input a config names: one per entry of a NAME=PATH field."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not f.metadata.get("input") or not value:
            continue
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        entries = value.items() if isinstance(value, dict) else [(None, value)]
        found += [Input(f"{f.name}.{k}" if k else f.name, f"{flag} {k}={v}" if k else f"{flag} {v}", str(v),
                        f.metadata["input"]) for k, v in entries]
    return found


