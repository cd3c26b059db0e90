"""Training options declared once: each trainer's config dataclass is also its command line.

A config field is one option. Its name gives the flag (``patch_size`` -> ``--patch-size``), its
type the argparse ``type`` (``X | None`` -> ``X``; a ``bool`` is a switch), its default the
default (a field without one is a required option), and its ``metadata``, written with
:func:`option`, the rest: help text, choices, a flag name where it differs (``--no-augment`` for
``augment = True``), a metavar, a mutually exclusive group, or ``cli=False`` for a field the
command line does not set. :func:`add_trainer_parser` builds a ``brainscan train`` subcommand
from a config class and :func:`run_trainer` builds the config back from the parsed arguments, so
that the ``classifier`` and ``segmenter`` commands are made the same way and a new option is one
new field. :func:`check_choices` validates the declared choices when a config is built in Python.

Nothing here imports TensorFlow, so ``--help`` stays fast.

Example::

    @dataclass
    class Config:
        data: Path = option(help="dataset folder")          # required: --data DATA
        preset: str = option("full", choices=("full", "tiny"))
        augment: bool = option(True, flag="--no-augment", help="train on raw patches")
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def option(default: Any = dataclasses.MISSING, *, help: str | None = None, choices: Sequence[Any] | None = None,
           flag: str | None = None, metavar: str | None = None, group: str | None = None, cli: bool = True,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field that declares its command-line option too.

    Args:
        default: the field's (and the option's) default; none makes the option required.
        help: the option's help text.
        choices: the allowed values (argparse refuses others; :func:`check_choices` too).
        flag: the flag where it is not ``--`` plus the field name with dashes.
        metavar: the value's name in the help.
        group: options of one mutually exclusive group share this name.
        cli: ``False`` for a field that no flag sets (such as the recorded command).
        default_factory: as in :func:`dataclasses.field`.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag,
                "metavar": metavar, "group": group, "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def cli_fields(config_class: type) -> list[dataclasses.Field]:
    """The fields of ``config_class`` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(config_class) if f.metadata.get("cli", True)]


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of ``field``."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _value_type(annotation: Any) -> Any:
    """The type of an option's value: ``X`` of ``X | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"an option's type must be one type or that type | None, got {annotation}")
        return kinds[0]
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add an option to ``parser`` for every command-line field of the dataclass ``config_class``."""
    hints = typing.get_type_hints(config_class)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in cli_fields(config_class):
        meta = field.metadata
        target: Any = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta.get("help")}
        kind = _value_type(hints[field.name])
        if kind is bool:
            kwargs["action"] = "store_false" if field.default is True else "store_true"
        else:
            kwargs["type"] = kind
            if field.default is not dataclasses.MISSING:
                kwargs["default"] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                kwargs["default"] = field.default_factory()
            else:
                kwargs["required"] = True
            for name in ("choices", "metavar"):
                if meta.get(name) is not None:
                    kwargs[name] = meta[name]
        target.add_argument(flag_of(field), **kwargs)


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """The ``config_class`` of parsed arguments; the command as typed goes into its ``command`` field.

    Raises:
        ValueError: a value the config rejects (the message names it).
    """
    values = {field.name: getattr(args, field.name) for field in cli_fields(config_class)}
    command_line = getattr(args, "command_line", None)
    if command_line and "command" in {field.name for field in dataclasses.fields(config_class)}:
        values["command"] = command_line
    return config_class(**values)


def check_choices(config: Any) -> None:
    """Refuse a field value outside the field's declared choices.

    Raises:
        ValueError: ``"NAME must be one of (...), got VALUE"``.
    """
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{field.name} must be one of {choices}, got {value!r}")


def add_trainer_parser(commands: argparse._SubParsersAction, name: str, config_class: type,
                       func: Callable[[argparse.Namespace], int], **parser_args: Any) -> argparse.ArgumentParser:
    """Add the ``brainscan train NAME`` subcommand, whose options are ``config_class``'s fields.

    Args:
        commands: the ``brainscan train`` subcommands.
        name: the subcommand.
        config_class: the trainer's config dataclass.
        func: what runs the command (usually through :func:`run_trainer`).
        parser_args: ``help``, ``description``, ``epilog``, ``formatter_class`` of the subcommand.

    Returns:
        The subcommand's parser.
    """
    parser = commands.add_parser(name, **parser_args)
    add_config_arguments(parser, config_class)
    parser.set_defaults(func=func)
    return parser


def run_trainer(args: argparse.Namespace, config_class: type, train: Callable[[Any], Any], name: str) -> int:
    """Build ``config_class`` from ``args``, run ``train`` on it and print the bundle written.

    A value the config rejects exits with ``brainscan train NAME: <reason>``.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        config = config_from_args(config_class, args)
    except ValueError as exc:
        raise SystemExit(f"brainscan train {name}: {exc}") from exc
    bundle = train(config)
    print(f"bundle written: {bundle}")
    return 0
