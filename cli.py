"""The command-line face that train.py, judge.py and export.py share: a parser built from a
config dataclass (each field's one-line comment is its --help), errors as one line with exit
code 2 instead of the whole usage, and `say`, a line for the user on stderr. Nothing of DPO.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing


def say(message: str) -> None:
    """A line for the user, on stderr (stdout is left for results)."""
    print(message, file=sys.stderr, flush=True)


def field_help(config_class: type) -> dict[str, str]:
    """The one-line comment after each dataclass field becomes its --help text."""
    import inspect
    import re
    return {match.group(1): match.group(2) for line in inspect.getsource(config_class).splitlines()
            if (match := re.match(r"\s+(\w+): .*?#\s*(.*)$", line))}


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line and exit code 2, not the whole usage


def cli_type(config_class: type, name: str, hint) -> type:
    """What argparse converts a field's text with: int, float, str or bool, or X of `X | None`."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [kind for kind in (typing.get_args(hint) if union else (hint,)) if kind is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise TypeError(f"{config_class.__name__}.{name}: the CLI reads int, float, str, bool or one of them "
                        f"| None, not {hint}")
    return kinds[0]


def config_parser(config_class: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field (a field without default is positional)."""
    parser = OneLineErrorParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps, hints = field_help(config_class), typing.get_type_hints(config_class)  # annotations are strings here
    for f in dataclasses.fields(config_class):
        flag, kind = "--" + f.name.replace("_", "-"), cli_type(config_class, f.name, hints[f.name])
        if f.default is dataclasses.MISSING:
            parser.add_argument(f.name, type=kind, help=helps[f.name])
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=helps[f.name])
    return parser
