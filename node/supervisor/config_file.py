"""Config files as Petals' run_server reads them: `--config FILE`, and `./config.yml` when it exists.

Petals parses them with configargparse's default syntax (not YAML): one setting a line as `key value`,
`key = value`, `key: value` or `--key value`; a bare `key` (or `key = true`) sets a flag and `false`
leaves it off; `[a, b]` is a list; quotes around a value are dropped; lines starting with `#`, `;`, `[`
or `---` and trailing ` # comments` are ignored. The node reads the same, plus what its own earlier
`--config` took: a `.json` file holding a map, and YAML block lists (`key:` then `  - item` lines).

The settings become flags placed before the real command line, so one parser checks the file and the
command line alike, and the command line wins (as in Petals).
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Union

Value = Union[str, list]

_LINE = re.compile(
    r"^(?P<key>[^:=;#\s]+)\s*"
    r"(?:(?P<equal>[:=\s])\s*(['\"]?)(?P<value>.+?)?\3)?"
    r"\s*(?:\s[;#]\s*(?P<comment>.*?)\s*)?$"
)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ConfigFileError(ValueError):
    """The file cannot be read as settings; the message says where."""


def _list_value(text: str) -> list:
    try:
        value = json.loads(text)
        if isinstance(value, list):
            return value
    except ValueError:
        pass
    return [item.strip() for item in text[1:-1].split(",") if item.strip()]


def parse_settings(text: str, name: str) -> dict[str, Value]:
    """The settings of a file in configargparse's syntax (and YAML block lists), in file order."""
    settings: dict[str, Value] = {}
    open_list = None  # a key written `key:` with nothing after it, which `- item` lines may follow
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;[" or line.startswith("---"):
            continue
        if line.startswith("- ") and open_list is not None:
            item = line[2:].strip().strip("'\"")
            settings[open_list] = [*settings[open_list], item] if isinstance(settings[open_list], list) else [item]
            continue
        match = _LINE.match(line)
        if not match:
            raise ConfigFileError(f"line {number} of {name} is not `key value`, `key = value` or `key: value`: {line}")
        key, equal, value = match.group("key").lstrip("-"), match.group("equal"), match.group("value")
        if value is None:
            value = "" if equal is not None and equal != " " else "true"
        if value.startswith("[") and value.endswith("]"):
            value = _list_value(value)
        settings[key] = value
        open_list = key if value == "" else None
    return settings


def read_settings(path: str) -> dict[str, Value]:
    """A config file's settings; ConfigFileError or OSError when it cannot be read."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            values = json.loads(text)
        except ValueError as e:
            raise ConfigFileError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ConfigFileError(f"{path} must hold a map of flag names to values")
        return {
            str(k): ("true" if v else "false") if isinstance(v, bool) else v if isinstance(v, list) else str(v)
            for k, v in values.items()
            if v is not None
        }
    return parse_settings(text, path)


def settings_to_argv(settings: dict[str, Value], parser: argparse.ArgumentParser, name: str) -> list[str]:
    """Flags for the settings, as configargparse makes them; ConfigFileError for a key no flag has."""
    by_key = {}
    for action in parser._actions:
        for option in action.option_strings:
            by_key.setdefault(option.lstrip("-"), action)
    argv: list[str] = []
    for key, value in settings.items():
        action = by_key.get(key) or by_key.get(key.replace("-", "_"))
        if action is None or action.dest in ("config", "help"):
            raise ConfigFileError(f"unknown setting {key!r} in {name}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a flag: store_true and the like
            word = value.lower() if isinstance(value, str) else ""
            if word in _TRUE:
                argv.append(flag)
            elif word not in _FALSE:
                raise ConfigFileError(f"{key} in {name} is a flag: give true or false, not {value!r}")
        elif isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise ConfigFileError(f"{key} in {name} takes one value, not a list")
            argv += [flag, *map(str, value)]
        else:
            argv.append(f"{flag}={value}")  # one word, even when the value starts with '-'
    return argv
