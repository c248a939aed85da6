"""Config files of the ``din-ext`` commands: every option of a command's argparse parser is one key of the file.

    din-ext config > run.yaml                       # the defaults of din-ext train, one commented key per option
    din-ext train --config run.yaml --epochs 5      # flags given on the command line override the file
    din-ext train --config run.yaml --print-config  # the resolved options, as a config file; nothing is trained

The keys are the parser's option names with underscores (``--batch-size`` is ``batch_size``; ``batch-size`` is read
too), so no option is listed twice: a flag added to the parser is a config key at once. A value is checked and
converted as argparse converts the flag's text (its ``type`` and ``choices``; an on/off flag takes true or false;
widths take a list such as ``[200, 80]`` or the flag's text ``"200,80"``). An unknown key or a wrong value is one
``ConfigError`` line naming the file and the key.

Formats: ``.yaml``/``.yml`` through PyYAML (``pip install "din_ext[config]"``, imported only to read such a file)
and ``.json`` through the standard library, for machines without the extra. The files this module writes (``dump``)
need no PyYAML: each value is a JSON scalar or list, which is also YAML, so PyYAML reads them back unchanged.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import textwrap
from typing import Any, Dict, Mapping, Optional

SUFFIXES = (".yaml", ".yml", ".json")
# parser entries that are not options of a run: the file itself and what prints it
NOT_OPTIONS = ("help", "config", "print_config")


class ConfigError(ValueError):
    """A config file that cannot be read, an unknown key or a bad value: one line naming the file (and key)."""


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of the subcommand ``command`` of ``parser`` (argparse keeps no public index of subcommands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    raise KeyError(f"the parser has no command {command!r}")


def options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """key -> argparse action of every option of ``parser`` that a config file may set, in the parser's order."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_OPTIONS}


def _is_switch(action: argparse.Action) -> bool:
    """An on/off flag (store_true and the like): it takes no value on the command line."""
    return action.nargs == 0 and isinstance(action.const, bool)


def _value(key: str, raw: Any, action: argparse.Action) -> Any:
    """``raw`` (from a file) converted as argparse converts the flag's text; raises ValueError with the reason."""
    if _is_switch(action):
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw
    if raw is None:
        if action.default is not None:
            raise ValueError(f"null is not a value of this option (default {action.default!r})")
        return None
    if isinstance(raw, (bool, dict)):
        raise ValueError(f"expected {_kind(action)}, got {raw!r}")
    convert = action.type
    if convert is int and not isinstance(raw, (int, str)):
        raise ValueError(f"expected an integer, got {raw!r}")
    if convert is float and isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, list):
        if convert in (None, int, float):
            raise ValueError(f"expected {_kind(action)}, got the list {raw!r}")
        value = convert(",".join(str(item) for item in raw))  # the flag's comma-separated text
    elif convert is None:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {raw!r}")
        value = raw
    else:
        try:  # the flag's own conversion (its ArgumentTypeError says what it expects)
            value = convert(str(raw))
        except (TypeError, ValueError):
            raise ValueError(f"expected {_kind(action)}, got {raw!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {raw!r}")
    return value


def _kind(action: argparse.Action) -> str:
    return {int: "an integer", float: "a number", None: "a string"}.get(action.type, "a value of its flag's form")


def convert(values: Mapping[str, Any], parser: argparse.ArgumentParser, source: str) -> Dict[str, Any]:
    """``values`` (key -> value, e.g. a file's) checked against the options of ``parser`` and converted to what
    argparse would store for the same flags; ``source`` names the file in errors. Raises ConfigError."""
    known = options(parser)
    out = {}
    for raw_key, raw in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; the keys are {', '.join(known)}"
            raise ConfigError(f"{source}: unknown key {raw_key!r}{hint}")
        try:
            out[key] = _value(key, raw, known[key])
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{source}: key {raw_key!r}: {exc}") from None
    return out


def read(path: str) -> Dict[str, Any]:
    """The mapping a config file holds (.yaml/.yml with PyYAML, .json); raises ConfigError naming ``path``."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: a config file's name ends in {', '.join(SUFFIXES)}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}, line {exc.lineno}: not JSON ({exc.msg})") from None
    else:
        data = _read_yaml(path, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option keys to values, got {type(data).__name__}")
    return data


def _read_yaml(path: str, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{path}: reading YAML needs PyYAML: pip install \"din_ext[config]\" (or write the config "
                          f"as .json)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not YAML ({reason})") from None


def load(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The options of the config file ``path`` for ``parser``, converted as argparse converts flags."""
    return convert(read(path), parser, path)


def _scalar(value: Any) -> str:
    """``value`` as YAML flow text that is JSON too; floats keep a dot so that PyYAML (YAML 1.1) reads a float."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if exponent:
            return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{'' if exponent[0] in '+-' else '+'}{exponent}"
        return text
    return json.dumps(value)


def dump(values: Mapping[str, Any], parser: argparse.ArgumentParser, fmt: str = "yaml",
         header: Optional[str] = None) -> str:
    """The config file text of ``values`` (key -> value) for the options of ``parser``, in the parser's order.

    fmt "yaml": each key with its flag's help as a comment above it; "json": one JSON object. Keys of ``values``
    that are not options of ``parser`` are refused (ValueError), so what is written reads back.
    """
    known = options(parser)
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ValueError(f"not options of the parser: {unknown}")
    ordered = {k: (list(values[k]) if isinstance(values[k], tuple) else values[k]) for k in known if k in values}
    if fmt == "json":
        return json.dumps(ordered, indent=2) + "\n"
    if fmt != "yaml":
        raise ValueError(f"fmt must be 'yaml' or 'json', got {fmt!r}")
    lines = [f"# {line}" for line in (header or "").splitlines()]
    for key, value in ordered.items():
        action = known[key]
        text = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
        if action.choices is not None:
            text += f" (one of: {', '.join(map(str, action.choices))})"
        flag = max(action.option_strings, key=len)
        lines += textwrap.wrap(f"{flag}: {text}" if text else flag, width=118, initial_indent="# ",
                               subsequent_indent="#   ")
        lines.append(f"{key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"
