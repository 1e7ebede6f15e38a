"""Strict, typed configuration: dataclasses filled from a YAML preset and `a.b=c` command-line overrides.

An unknown key is an error that lists the valid ones; a value of the wrong type is an error that names
the key; each dataclass checks its values in `__post_init__`. `--help` of an entry point lists every key
with its default and the docstring under its field (`config_help`). `rl/` and `launch/` reuse `load_config`
for their own dataclasses, and the flag-driven entry points `HelpFormatter`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
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
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


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
    renamed = {k: v for k, v in getattr(cls, "RENAMED", {}).items() if k in unknown}  # a class lists its old keys
    if renamed:
        raise ConfigError(
            "renamed config key(s): "
            + ", ".join(f"{prefix + old} is now {prefix + new}" for old, new in renamed.items())
        )
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {[prefix + k for k in valid]}"
        )
    kwargs = {k: _check(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)  # each dataclass checks its values in __post_init__
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


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


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass `cls`: the string literal under each field, read from the source
    of the class and of its dataclass bases (a subclass's own docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):  # fmt: skip
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@dataclasses.dataclass
class ConfigKey:
    """One key of a config as --help lists it."""

    key: str  # dotted, as overrides spell it: model.lora_rank; reward.terms[].name for the fields of list items
    default: Any  # dataclasses.MISSING when the key is required
    doc: str  # the field's docstring on one line; '' for the default keys of a dict-valued field


def config_keys(cls: type, defaults: Any = None, prefix: str = "") -> list[ConfigKey]:
    """Every key of dataclass `cls` with its default and doc, depth first: nested dataclasses are expanded,
    a list of dataclasses by its items' fields (`terms[].name`), and a dict-valued field by its default keys.

    Args:
        defaults: the instance whose values are the defaults (a nested field's default_factory may differ
            from its class's defaults); None: `cls()`, or the fields' own defaults when `cls` has required fields.
    """
    if defaults is None:
        try:
            defaults = cls()
        except TypeError:  # required fields
            defaults = None
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        key, kind = prefix + f.name, hints[f.name]
        keys.append(ConfigKey(key, value, docs.get(f.name, "")))
        if dataclasses.is_dataclass(kind):
            keys += config_keys(kind, value, f"{key}.")
        elif typing.get_origin(kind) is list and dataclasses.is_dataclass(item := typing.get_args(kind)[0]):
            keys += config_keys(item, None, f"{key}[].")
        elif isinstance(value, dict):
            keys += [ConfigKey(f"{key}.{k}", v, "") for k, v in value.items()]
    return keys


def config_help(cls: type, doc: str) -> str:
    """--help of a config-driven entry point: the summary and usage lines of its docstring `doc` (its first
    two paragraphs), then every key of `cls` with its default and doc."""
    usage = "\n\n".join(doc.strip().split("\n\n")[:2])
    lines = [
        usage,
        "",
        "keys (set them in --config FILE.yaml or as key=value; the list items' fields take YAML mappings):",
    ]
    for k in config_keys(cls):
        if dataclasses.is_dataclass(k.default) or (
            isinstance(k.default, dict) and k.default
        ):  # a section: its keys follow
            lines.append(f"  {k.key}:")
        else:
            lines.append(
                f"  {k.key} " + ("(required)" if k.default is dataclasses.MISSING else f"= {yaml_value(k.default)}")
            )
        if k.doc:
            lines += textwrap.wrap(k.doc, 110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def yaml_value(value: Any) -> str:
    """A default as YAML writes it inline (true, null, [a, b], {k: v}): what an override or a preset would say."""
    plain = (
        [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        if isinstance(value, list)
        else value
    )
    return (
        yaml.safe_dump(plain, default_flow_style=True, sort_keys=False, width=10**6).strip().removesuffix("...").strip()
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse help for the entry points that take flags: the docstring as written, and every option's
    default after its help (unless the help already says it, the option is required, or the default is None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if (
            "default" in help
            or action.required
            or action.default in (None, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return help
        return f"{help} (default: %(default)s)"


def config_from_cli(cls: type[T], argv: list[str], doc: str) -> T:
    """`[--config FILE.yaml] [key.sub=value ...]` -> a config, for the entry points' main().

    -h/--help prints `doc`'s usage lines and every key with its default and doc (config_help) and exits 0;
    a bad file, key or value prints the error and exits 2.
    """
    if argv and argv[0] in ("-h", "--help"):
        print(config_help(cls, doc))
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
