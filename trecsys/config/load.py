"""Loading an experiment config: YAML (with `inherit:`), dotted overrides, and the strict typed build.

Every key is checked against the schema in `trecsys/config/schema.py`: unknown keys (with the closest
known key suggested), wrong types and missing required values are ConfigErrors naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from trecsys.config.schema import ExperimentConfig
from trecsys.errors import ConfigError

# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML silently overwrites."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# YAML 1.2 core schema instead of PyYAML's YAML 1.1: `3e-4` is a float (1.1 wants `3.0e-4`), and only
# true/false (any case) are booleans, so a domain called NO or a value `yes` stays a string (a bool
# key still takes yes/no/on/off: see _coerce). No sexagesimal `1:30`, no implicit dates, `010` is ten.
_CORE_SCHEMA = {
    "tag:yaml.org,2002:bool": (r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    "tag:yaml.org,2002:int": (r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    "tag:yaml.org,2002:float": (r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
}
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in _CORE_SCHEMA and tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, (_pattern, _first) in _CORE_SCHEMA.items():  # int before float: "10" is an int
    _UniqueKeyLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _construct_core_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_core_int)


def parse_yaml(text: str) -> Any:
    """YAML text with the core schema and duplicate keys refused (the one way trecsys reads YAML)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


# A config is a few hundred values in a few KB. Far larger means a mistake (or an attack): YAML aliases
# nested a few levels deep expand a 4 KB file into billions of values, which would hang the run.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def check_expansion(data: Any, where: str) -> None:
    """Refuse a value that expands (aliases followed) to more than MAX_CONFIG_VALUES values; stops counting there."""
    stack, count = [data], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases nested "
                              "in aliases?); a config holds a few hundred")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.is_dir() else
                          f"config file {path} is a folder: give the YAML file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is not a config (the limit is "
                          f"{MAX_CONFIG_BYTES:,}): is it the right file?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): re-save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    check_expansion(data, str(path))
    return data


def _load_with_inheritance(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config inheritance loops: {chain}")
    data = read_yaml(path)
    base = data.pop("inherit", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'inherit' must be a path to a base config file")
    return deep_merge(_load_with_inheritance(path.parent / base, (*seen, path)), data)


def deep_merge(base: dict, update: dict) -> dict:
    """Mappings merge key by key; any other value (lists included) replaces the base value."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    check_expansion(value, f"override {key.strip()}")
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            value = deep_merge(node[parts[-1]], value)
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    data = _load_with_inheritance(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    where = f" in {path}" if path is not None else ""
    # An error in a value typed on the command line names that override, not the file.
    typed = {".".join(parse_override(text)[0]): text.strip() for text in overrides or []}
    return build(ExperimentConfig, data, where=where, overrides=typed)


def _origin(key: str, where: str, overrides: dict[str, str] | None) -> str:
    """Where the value of dotted `key` came from: an override that set it (or a section above it),
    else `where` (the file)."""
    for set_key, text in (overrides or {}).items():
        if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")):
            return f" on the command line ({text})"
    return where


def build(cls: type, data: Any, where: str = "", prefix: str = "", overrides: dict[str, str] | None = None) -> Any:
    """`data` as the dataclass tree `cls`; errors name the dotted key and where its value came from:
    `where` (the file), or the command line for keys in `overrides` (dotted key -> the override)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}{_origin(prefix.rstrip('.'), where, overrides)}: "
                          f"expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{prefix}{key}"
            raise ConfigError(f"unknown config key '{full}'{_origin(full, where, overrides)}"
                              f"{_suggest(cls, prefix, str(key))}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], full, where, overrides)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config value '{full}'{where}")
    obj = cls(**kwargs)
    # A section may check combinations of its keys in `validate(prefix, where)`; its messages read
    # "config key '<key>'<where>: ...", so the key it names gets its own origin.
    if hasattr(obj, "validate"):
        section_where = _origin(prefix.rstrip("."), where, overrides)
        try:
            obj.validate(prefix, section_where)
        except ConfigError as exc:
            named = re.match(r"config key '([^']+)'", str(exc))
            origin = _origin(named.group(1), section_where, overrides) if named else section_where
            if origin == section_where:
                raise
            raise ConfigError(str(exc).replace(f"'{named.group(1)}'{section_where}", f"'{named.group(1)}'{origin}", 1),
                              exc.exit_code) from None
    return obj


# What a bool key accepts beyond true/false: the YAML 1.1 spellings people write (any case).
_BOOL_WORDS = {"yes": True, "no": False, "on": True, "off": False, "true": True, "false": False}


def _coerce(value: Any, tp: Any, key: str, where: str, overrides: dict[str, str] | None = None) -> Any:
    where = _origin(key, where, overrides)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where, overrides)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"config key '{key}'{where}: {value!r} is not one of {choices}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, prefix=f"{key}.", overrides=overrides)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}'{where}: expected a list, got {_describe(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", where, overrides) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}'{where}: expected a mapping, got {_describe(value)}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", where, overrides) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan, .inf: no setting means that
                raise ConfigError(f"config key '{key}'{where}: must be a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema type this function does not know is a bug in trecsys
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"config key '{key}'{where}: expected {tp.__name__}, got {_describe(value)}")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def all_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (dict-valued sections contribute their value's keys once)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        tp = hints[f.name]
        if typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
            full = f"{full}.<name>"
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{full}."))
    return keys


def _suggest(cls: type, prefix: str, key: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    # The key may belong to another section: `min_user_interactions` at the top means `data.…`.
    elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f" (did you mean '{elsewhere[0]}'?)"
    return f"; known keys here: {', '.join(names)}"


# ---------------------------------------------------------------------------------------------
# Output


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


class _Dumper(yaml.SafeDumper):
    """Quotes a string that either YAML 1.1 or the core schema would read as something else ('NO',
    '3e-4'), so the printed config reads back the same under both."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == "tag:yaml.org,2002:str":
            for core_tag, (pattern, _) in _CORE_SCHEMA.items():
                if re.match(pattern, value):
                    return core_tag
        return tag


def to_yaml(config: Any) -> str:
    return yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def data_path(config: ExperimentConfig, relative: str) -> Path:
    """An input path from the config: absolute as given, else under `data.root`."""
    path = Path(relative).expanduser()
    return path if path.is_absolute() else Path(config.data.root).expanduser() / path
