"""argparse helpers shared by the commands: a command group, and numbers with bounds and a clear message when not."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def number(cast: type[int] | type[float], description: str,
           accept: Callable[[float], bool]) -> Callable[[str], int | float]:
    """An argparse ``type=`` that parses ``cast`` and keeps values for which ``accept`` holds.

    Example:
        >>> positive_int = number(int, "a positive integer", lambda v: v >= 1)
    """
    def parse(text: str) -> int | float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value

    return parse


positive_int = number(int, "a positive integer", lambda v: v >= 1)
non_negative_int = number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = number(float, "a positive number", lambda v: v > 0)
non_negative_float = number(float, "a number >= 0", lambda v: v >= 0)
overlap_fraction = number(float, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)


def command_group(subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str,
                  **parser_options) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """``brainscan NAME COMMAND``: the group's parser and the action its commands are added to."""
    group = subparsers.add_parser(name, help=help, description=description, **parser_options)
    commands = group.add_subparsers(title=f"{name} commands", metavar="COMMAND", required=True)
    return group, commands
