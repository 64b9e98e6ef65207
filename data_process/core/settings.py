"""Settings: the one YAML loader of every config the toolkit reads (training, caption, enrichment) and the one
command-line parser style of every command.

* :func:`load_settings` reads a YAML mapping and checks it against a schema (``{key: Setting}``): an unknown key,
  a wrong type (``batch_size: 3.7``, ``epochs: [1, 2]``, ``concurrency: lots``) or a value outside the allowed
  choices is a :class:`ConfigError` naming the file, the key and what is allowed. ``base: OTHER.yaml`` makes a
  file hold only what differs from another (the dataset configs over ``configs/base.yaml``).
* :func:`settings_from_parser` derives that schema from a command's flags, so a config file's keys are exactly
  the command's flag names (with underscores) and every config value can be overridden on the command line.
* :class:`ToolkitParser`: flags are spelled with dashes (``--batch-size``); the underscore spelling
  (``--batch_size``) is accepted everywhere as an alias. Booleans have both forms (``--residual`` /
  ``--no-residual``: :func:`add_bool`).
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

BASE_KEY = "base"


class ConfigError(ValueError):
    """A bad settings file or value; the message names the file and the key."""

    def __init__(self, path: str | Path, key: str | None, problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML settings file (an empty file is ``{}``); every error names the file. Repeated keys are an error
    (YAML would keep the last one silently)."""
    import yaml  # noqa: PLC0415 - only the config readers need it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        doc = yaml.compose(text, Loader=yaml.SafeLoader)
        if doc is not None and isinstance(doc, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _ in doc.value:
                if key_node.value in seen:
                    raise ConfigError(path, key_node.value, f"repeated key (line {key_node.start_mark.line + 1})")
                seen.add(key_node.value)
        raw = yaml.safe_load(text) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, None, f"invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(path, None, f"must be a mapping of settings, got {type(raw).__name__}")
    return raw


@dataclass(frozen=True)
class Setting:
    """What one settings key accepts: a ``kind`` (``int``, ``float``, ``str``, ``bool``, ``list``, ``dict``),
    optionally a fixed set of ``choices``, and ``None`` when ``nullable``."""

    kind: type
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        return {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
                dict: "a mapping"}.get(self.kind, self.kind.__name__)


def check_value(path: str | Path, key: str, value: Any, setting: Setting) -> Any:
    """``value`` checked against ``setting`` (an int is a valid float; YAML's ``off``/``on`` read as booleans are
    mapped back to a choice of that spelling, e.g. ``amp: off``); a :class:`ConfigError` otherwise."""
    if value is None:
        if setting.nullable:
            return None
        raise ConfigError(path, key, f"expected {setting.describe()}, got null")
    if setting.choices is not None:
        if isinstance(value, bool):
            spellings = ("true", "yes", "on") if value else ("false", "no", "off")
            value = next((c for c in setting.choices if str(c).lower() in spellings), value)
        if value not in setting.choices or isinstance(value, bool) != isinstance(setting.choices[0], bool):
            raise ConfigError(path, key, f"invalid value {value!r} (choose from "
                                         f"{', '.join(map(str, setting.choices))})")
        return value
    kind = setting.kind
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(kind, lambda v: isinstance(v, kind))
    if not ok(value):
        raise ConfigError(path, key, f"expected {setting.describe()}, got {value!r}")
    return float(value) if kind is float else value


def check_settings(path: str | Path, raw: Mapping[str, Any], schema: Mapping[str, Setting],
                   renamed: Mapping[str, str] | None = None, ignore_unknown: bool = False) -> dict[str, Any]:
    """Every key of ``raw`` known to ``schema`` and of the right type, else a :class:`ConfigError`; a key of
    ``renamed`` (old name -> new) is an error naming the new key; with ``ignore_unknown``, keys outside ``schema``
    are skipped (a command reading the one key it shares with another command's file)."""
    out = {}
    for key, value in raw.items():
        if renamed and key in renamed:
            raise ConfigError(path, str(key), f"renamed to {renamed[key]} (write {renamed[key]}: {value})")
        if key not in schema:
            if ignore_unknown:
                continue
            near = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (known keys: {', '.join(sorted(schema))})"
            raise ConfigError(path, str(key), f"unknown key{hint}")
        out[key] = check_value(path, key, value, schema[key])
    return out


def load_settings(path: str | Path, schema: Mapping[str, Setting], renamed: Mapping[str, str] | None = None,
                  ignore_unknown: bool = False) -> dict[str, Any]:
    """A settings file checked against ``schema`` (``renamed``, ``ignore_unknown``: :func:`check_settings`).
    ``base: FILE`` (relative to this file) is read first and this file's keys override it; bases may chain, a loop
    is an error."""
    path = Path(path)
    chain: list[Path] = []
    merged: dict[str, Any] = {}
    while True:
        if path.resolve() in chain:
            raise ConfigError(path, BASE_KEY, "the base files form a loop")
        chain.append(path.resolve())
        raw = read_yaml_mapping(path)
        base = raw.pop(BASE_KEY, None)
        merged = {**check_settings(path, raw, schema, renamed, ignore_unknown), **merged}
        if base is None:
            return merged
        if not isinstance(base, str):
            raise ConfigError(path, BASE_KEY, f"expected a file name, got {base!r}")
        path = path.parent / base


def settings_from_parser(parser: argparse.ArgumentParser, skip: Iterable[str] = ("config", "help")
                         ) -> dict[str, Setting]:
    """The settings schema of a command's flags: one key per flag destination (a flag whose action carries a
    ``setting_kind``, e.g. ``list`` for a comma-separated flag, takes that kind in a file)."""
    skip = set(skip)
    schema: dict[str, Setting] = {}
    for action in parser._actions:
        if action.dest in skip or action.dest == argparse.SUPPRESS:
            continue
        nullable = action.default is None
        if getattr(action, "setting_kind", None) is not None:
            schema[action.dest] = Setting(action.setting_kind, nullable=nullable)
        elif isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                               argparse._StoreFalseAction)):
            schema[action.dest] = Setting(bool, nullable=nullable)
        elif action.choices is not None:
            schema[action.dest] = Setting(str, tuple(action.choices), nullable)
        elif action.type in (int, float):
            schema[action.dest] = Setting(action.type, nullable=nullable)
        else:
            schema[action.dest] = Setting(str, nullable=nullable)
    return schema


def add_bool(parser: argparse.ArgumentParser | Any, name: str, default: bool, help: str | None = None,
             dest: str | None = None) -> None:
    """A boolean flag with both forms, ``--NAME`` and ``--no-NAME``."""
    kw = {"dest": dest} if dest else {}
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help, **kw)


def _dashed(option: str) -> str:
    return "--" + option[2:].replace("_", "-") if option.startswith("--") else option


class ToolkitParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose long flags are spelled with dashes, the underscore spelling accepted as an
    alias (``--batch_size 64`` = ``--batch-size 64``); destinations keep underscores (``args.batch_size``)."""

    def _add_action(self, action):
        action.option_strings = [_dashed(o) for o in action.option_strings]
        return super()._add_action(action)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        group._add_action = self._wrap_group_add(group._add_action)
        return group

    def add_mutually_exclusive_group(self, **kwargs):
        group = super().add_mutually_exclusive_group(**kwargs)
        group._add_action = self._wrap_group_add(group._add_action)
        return group

    @staticmethod
    def _wrap_group_add(add):
        def wrapped(action):
            action.option_strings = [_dashed(o) for o in action.option_strings]
            return add(action)
        return wrapped

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        import sys  # noqa: PLC0415

        args = list(sys.argv[1:] if args is None else args)
        out, after = [], False
        for a in args:
            if a == "--":
                after = True
            if not after and a.startswith("--") and "_" in a.split("=", 1)[0]:
                flag, eq, value = a.partition("=")
                a = _dashed(flag) + eq + value
            out.append(a)
        return super().parse_known_args(out, namespace)
