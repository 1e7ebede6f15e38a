"""Strict, typed configuration: dataclasses filled from a YAML preset and `a.b=c` command-line overrides.

An unknown key is an error that lists the valid ones; a value of the wrong type is an error that names
the key. `rl/` and `launch/` reuse `load_config` for their own dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML as people mean it: 1e-3 is a float (YAML 1.1 says string) and only true/false are booleans
    (YAML 1.1 also turns no/yes/on/off into booleans, which breaks `eval_strategy: no`)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass; the message names the key."""


def _check(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {kind}")
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {kind.__name__}, got {value!r}")
        return build(kind, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind)[:1] or (Any,)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type[T], values: dict, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a (nested) dict, strictly."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {[prefix + k for k in valid]}")
    kwargs = {k: _check(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is a value, not a section")
        tree = node
    tree[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then `key.sub=value` overrides (values parsed as YAML)."""
    try:
        tree = dataclasses.asdict(cls())
    except TypeError:  # a dataclass with required fields: the file and overrides must give them
        tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = parse_yaml(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(tree, loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), parse_yaml(raw))
    return build(cls, tree)


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"a.b.c": value}: the dotted keys of CLI overrides."""
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config, as plain YAML, into the run directory."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False))


def config_from_cli(cls: type[T], argv: list[str], doc: str) -> T:
    """`[--config FILE.yaml] [key.sub=value ...]` -> a config, for the entry points' main().

    -h/--help prints `doc` and exits 0; a bad file, key or value prints the error and exits 2.
    """
    if argv and argv[0] in ("-h", "--help"):
        print(doc)
        raise SystemExit(0)
    config_path = None
    if argv and argv[0] == "--config":
        if len(argv) < 2:
            print("error: --config needs a YAML file", file=sys.stderr)
            raise SystemExit(2)
        config_path, argv = argv[1], argv[2:]
    try:
        return load_config(cls, config_path, argv)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
