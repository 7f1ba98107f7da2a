"""Experiment configs: flat TOML files parsed into typed dataclasses, with `key=value` overrides.

A config file has one table per section (`[run]`, `[data]`, `[optim]`, ...); every field of
every section has a default and a one-line doc (`doc_field`). Loading is strict: an unknown
key, a wrong type or a bad value raises `ConfigError` with one line naming the file, the key
and, for a typo, the closest valid key. Overrides come after the file as dotted keys whose
values are parsed as TOML (a value that is not valid TOML is taken as a plain string):

    accelerate launch scripts/pretrain.py configs/0.14bpp.toml data.train=/data/train train.max_steps=1000
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from illm.errors import ConfigError

Check = Callable[[Any], "str | None"]


def doc_field(default: Any, doc: str, check: Check | None = None, choices: tuple | None = None):
    """A dataclass field with its documentation and an optional validity check or choices."""
    metadata = {"doc": doc, "check": check, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --- value checks (return a message when the value is bad) -------------------------------------


def positive(value) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def non_negative(value) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def at_least(bound) -> Check:
    return lambda value: None if value >= bound else f"must be >= {bound}, got {value}"


def unit_interval(value) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value}"


def multiple_of(k: int) -> Check:
    def check(value):
        if value <= 0 or value % k:
            return f"must be a positive multiple of {k}, got {value}"
        return None

    return check


def all_positive(values) -> str | None:
    bad = [v for v in values if v <= 0]
    return f"all entries must be > 0, got {list(values)}" if bad else None


# --- parsing ------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError (int is accepted where float is wanted)."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
        items = [_coerce(v, item_tp, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp in (int, float, str) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _section_types(config_cls) -> dict[str, type]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is parsed as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override '{text}': the key must be section.key, e.g. train.max_steps")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


# Keys that were renamed: given under the old name, they are refused with the new one.
RENAMED_KEYS = {
    "rate.warmup_steps": "rate.switch_step",
    "rate.warmup_target_factor": "rate.early_target_factor",
    "rate.warmup_lam_factor": "rate.early_lam_factor",
    "optim.aux_lr": "quantiles.lr",
    "optim.aux_weight_decay": "quantiles.weight_decay",
}


def build_config(config_cls, tables: dict[str, Any], source: str):
    """Build `config_cls` (a dataclass of section dataclasses) from nested dicts, strictly."""
    sections = _section_types(config_cls)
    defaults = config_cls()
    kwargs = {}
    for section_name, table in tables.items():
        if section_name not in sections:
            hint = _closest(section_name, sections)
            raise ConfigError(f"{source}: unknown section '[{section_name}]'{hint}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: '{section_name}' must be a table ([{section_name}])")
        section_cls = sections[section_name]
        fields = {f.name: f for f in dataclasses.fields(section_cls)}
        types = _section_types(section_cls)
        values = {}
        for key, value in table.items():
            where = f"{source}: key '{section_name}.{key}'"
            if key not in fields and f"{section_name}.{key}" in RENAMED_KEYS:
                new = RENAMED_KEYS[f"{section_name}.{key}"]
                raise ConfigError(f"{source}: key '{section_name}.{key}' was renamed: use '{new}'")
            if key not in fields:
                all_keys = [f"{s}.{k}" for s, c in sections.items() for k in _section_types(c)]
                hint = _closest(f"{section_name}.{key}", all_keys)
                raise ConfigError(f"{source}: unknown key '{section_name}.{key}'{hint}")
            value = _coerce(value, types[key], where)
            meta = fields[key].metadata
            if meta.get("choices") and value not in meta["choices"]:
                options = ", ".join(map(repr, meta["choices"]))
                raise ConfigError(f"{where}: {value!r} is not one of {options}")
            if meta.get("check") and (problem := meta["check"](value)):
                raise ConfigError(f"{where}: {problem}")
            values[key] = value
        # Keys a file leaves out keep the defaults of *this* config's section (e.g. a stage's own
        # batch size), not those of the section class.
        kwargs[section_name] = dataclasses.replace(getattr(defaults, section_name), **values)
    config = config_cls(**kwargs)
    if hasattr(config, "validate"):
        try:
            config.validate()
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    return config


def load_config(config_cls, path: str | Path | None, overrides: list[str] = ()):
    """Read a TOML file (or only the defaults when `path` is None) and apply the overrides."""
    tables: dict[str, dict] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            tables = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    for text in overrides:
        key, value = parse_override(text)
        section, name = key.split(".")
        tables.setdefault(section, {})
        if not isinstance(tables[section], dict):
            raise ConfigError(f"{source}: '{section}' must be a table")
        tables[section][name] = value
    where = source if not overrides else f"{source} (with overrides)"
    return build_config(config_cls, tables, where)


# --- writing --------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_dict(config) -> dict[str, dict[str, Any]]:
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(config)}


def to_toml(config) -> str:
    """The resolved config as TOML text (loads back to an equal config)."""
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def reference_markdown(config_cls, title: str) -> str:
    """A Markdown table of every key of `config_cls` with its default and doc, for the README."""
    rows = [f"#### {title}", "", "| key | default | meaning |", "| --- | --- | --- |"]
    defaults = config_cls()
    for section_name, section_cls in _section_types(config_cls).items():
        section = getattr(defaults, section_name)
        for f in dataclasses.fields(section_cls):
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc += " One of " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            rows.append(f"| `{section_name}.{f.name}` | `{_toml_value(getattr(section, f.name))}` | {doc} |")
    return "\n".join(rows) + "\n"
