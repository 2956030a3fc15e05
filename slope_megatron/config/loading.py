"""Loading a configuration: YAML plus `--set section.key=value` overrides, each value checked
against its field's type, unknown keys refused with the closest valid one, then validated."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from .schema import Config, ConfigError
from .validation import read_deepspeed_json, validate


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and gently coerce ints to floats) one value against its annotation."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-4" as a string
        except ValueError:
            pass
    ok = (isinstance(value, hint) and not (hint is int and isinstance(value, bool))) \
        if isinstance(hint, type) else True
    if not ok:
        raise ConfigError(f"config key '{key}' must be {hint.__name__}, got "
                          f"{type(value).__name__} {value!r}")
    return value


def _check_known(name: str, known: dict, what: str, prefix: str = "") -> None:
    """Refuse an unknown key/section, suggesting the closest valid one."""
    if name in known:
        return
    hint = difflib.get_close_matches(name, known, n=1)
    did = f" Did you mean '{prefix}{hint[0]}'?" if hint else ""
    where = f" in '{prefix[:-1]}'" if prefix else ""
    raise ConfigError(f"unknown config {what} '{prefix}{name}'.{did} Valid {what}s{where}: "
                      f"{', '.join(known)}")


def _section_from_dict(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        _check_known(key, fields, "key", f"{prefix}.")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, fields[key].type)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, value in data.items():
        _check_known(name, sections, "section")
        section_cls = sections[name].default_factory
        kwargs[name] = _section_from_dict(section_cls, value or {}, name)
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key '{path}' must be section.key (e.g. train.iters)")
        data.setdefault(parts[0], {})
        if not isinstance(data[parts[0]], dict):
            raise ConfigError(f"config section '{parts[0]}' must be a mapping")
        data[parts[0]][parts[1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def _resolve_file_paths(data: Any, config_dir: Path) -> tuple[Any, list[str]]:
    """Resolve a relative zero.deepspeed_json written in a config file: against the config
    file's directory when the file is there (the shipped configs name deepspeed/*.json beside
    themselves), else (left as written) against the current directory. Returns the value as resolved and the places looked at besides the
    current directory (for the message if it is missing there too)."""
    zero = data.get("zero") if isinstance(data, dict) else None
    value = zero.get("deepspeed_json") if isinstance(zero, dict) else None
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value, []
    beside = config_dir / value
    if beside.is_file():
        zero["deepspeed_json"] = str(beside)
        return zero["deepspeed_json"], []
    return value, [os.path.abspath(beside)]


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML file (or start from defaults), apply overrides, validate; check that the
    files the config names exist (zero.deepspeed_json: a JSON object) before any work."""
    data: dict = {}
    from_file, also_tried = None, []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass --config "
                              f"configs/<name>.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
        from_file, also_tried = _resolve_file_paths(data, p.parent)
    cfg = config_from_dict(apply_overrides(data, overrides or []))
    ds_json = cfg.zero.deepspeed_json
    if ds_json is not None:  # an override names a path relative to the current directory
        # not in validate(): a stored config (an inference artifact's) is valid without it
        read_deepspeed_json(ds_json, also_tried if ds_json == from_file else ())
    return cfg
