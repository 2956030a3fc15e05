"""Loading a configuration: YAML plus `--set section.key=value` overrides, each value checked
against its field's type, unknown keys refused with the closest valid one, then validated."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from .schema import Config, ConfigError
from .validation import validate

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


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML file (or start from defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass --config configs/<name>.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    return config_from_dict(apply_overrides(data, overrides or []))
