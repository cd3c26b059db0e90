"""The trainers' command lines are generated from their config dataclasses (no training here)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from training.classifier_cli import add_classifier_parser
from training.classifier_config import ClassifierTrainConfig
from training.options import check_choices, cli_fields, config_from_args, flag_of, option
from training.segmenter_cli import add_segmenter_parser
from training.segmenter_config import SegmenterTrainConfig

# (command, config class, register, a valid --arch, the fields no flag sets)
TRAINERS = [
    ("classifier", ClassifierTrainConfig, add_classifier_parser, "resnet50", {"command"}),
    ("segmenter", SegmenterTrainConfig, add_segmenter_parser, "unet3d", {"command", "progress"}),
]
IDS = [t[0] for t in TRAINERS]


def train_parser(register) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainscan train")
    register(parser.add_subparsers(required=True))
    return parser


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


@pytest.mark.parametrize("name, config_class, register, arch, internal", TRAINERS, ids=IDS)
def test_every_config_field_has_its_flag(name, config_class, register, arch, internal):
    options = {a.dest: a for a in subparser(train_parser(register), name)._actions}
    fields = dataclasses.fields(config_class)
    assert {f.name for f in fields} - {f.name for f in cli_fields(config_class)} == internal
    for field in cli_fields(config_class):
        action = options[field.name]
        assert action.option_strings == [flag_of(field)]
        assert action.help == field.metadata.get("help")
        assert (tuple(action.choices) if action.choices else None) == field.metadata.get("choices")
    assert set(options) - {"help"} == {f.name for f in cli_fields(config_class)}


@pytest.mark.parametrize("name, config_class, register, arch, internal", TRAINERS, ids=IDS)
def test_parsing_the_defaults_gives_the_dataclass_defaults(name, config_class, register, arch, internal, tmp_path):
    args = train_parser(register).parse_args([name, "--data", str(tmp_path), "--arch", arch])
    for field in cli_fields(config_class):
        if field.name not in ("data", "arch"):
            assert getattr(args, field.name) == field.default, field.name
    args.version, args.command_line = "v1", "brainscan train test"
    parsed = config_from_args(config_class, args)
    direct = config_class(data=tmp_path, arch=arch, version="v1")
    assert dataclasses.asdict(parsed) == {**dataclasses.asdict(direct), "command": "brainscan train test"}
    assert args.func.__name__ == f"run_{name}"


@pytest.mark.parametrize("name, config_class, register, arch, internal", TRAINERS, ids=IDS)
def test_required_options_are_the_fields_without_a_default(name, config_class, register, arch, internal, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_parser(register).parse_args([name, "--arch", arch])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --data" in capsys.readouterr().err


CHOICES = [(name, register, arch, field) for name, config_class, register, arch, _ in TRAINERS
           for field in cli_fields(config_class) if field.metadata.get("choices")]


@pytest.mark.parametrize("name, register, arch, field", CHOICES, ids=[f"{c[0]}-{c[3].name}" for c in CHOICES])
def test_an_unknown_choice_is_rejected(name, register, arch, field, tmp_path, capsys):
    argv = [name, "--data", str(tmp_path), "--arch", arch, flag_of(field), "bogus"]
    with pytest.raises(SystemExit) as exit_info:
        train_parser(register).parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag_of(field)}: invalid choice: 'bogus'" in capsys.readouterr().err


def test_choices_are_checked_when_built_in_python_too(tmp_path):
    with pytest.raises(ValueError, match=r"arch must be one of \('resnet50', 'vit_cnn'\), got 'bogus'"):
        ClassifierTrainConfig(data=tmp_path, arch="bogus")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        ClassifierTrainConfig(data=tmp_path, arch="resnet50", mixed_precision="bf16")  # the CLI refuses it too
    with pytest.raises(ValueError, match="outputs must be one of"):
        SegmenterTrainConfig(data=tmp_path, arch="unet3d", outputs="bogus")


@pytest.mark.parametrize("argv, message", [
    (["--mirror-tta", "--select-tta"], "--select-tta: not allowed with argument --mirror-tta"),
    (["--val-cases", "2", "--folds", "5"], "--folds: not allowed with argument --val-cases"),
])
def test_segmenter_exclusive_options_are_refused_together(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_parser(add_segmenter_parser).parse_args(["segmenter", "--data", str(tmp_path), "--arch", "unet3d",
                                                       *argv])
    assert message in capsys.readouterr().err


@dataclass
class _Example:
    data: Path = option(help="a folder")
    size: int | None = option(None, metavar="N")
    augment: bool = option(True, flag="--no-augment")
    quiet: bool = False
    mode: str = option("a", choices=("a", "b"))
    hidden: str = option("x", cli=False)

    def __post_init__(self) -> None:
        check_choices(self)


def test_option_types_switches_and_flags_come_from_the_field():
    parser = argparse.ArgumentParser()
    from training.options import add_config_arguments

    add_config_arguments(parser, _Example)
    args = parser.parse_args(["--data", "d", "--size", "3", "--no-augment", "--quiet", "--mode", "b"])
    assert vars(args) == {"data": Path("d"), "size": 3, "augment": False, "quiet": True, "mode": "b"}
    assert config_from_args(_Example, args) == _Example(data=Path("d"), size=3, augment=False, quiet=True, mode="b")
    assert "--size N" in parser.format_help() and "--hidden" not in parser.format_help()
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        _Example(data=Path("d"), mode="c")
