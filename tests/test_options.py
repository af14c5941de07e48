"""Command-line options derived from the config dataclasses (schema.option): one declaration per setting."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import pytest

from graftkd.errors import GraftkdError
from graftkd.schema import add_options, build_options, fill_defaults, given_options, option


@dataclasses.dataclass
class _Inner:
    rate: float = dataclasses.field(default=0.5, metadata=option("a rate", flag="--inner-rate"))
    epochs: int | Sequence[int] | None = dataclasses.field(default=None, metadata=option("epochs (default: none)"))


@dataclasses.dataclass
class _Toy:
    size: int = dataclasses.field(default=3, metadata=option("how many"))
    mode: str = dataclasses.field(default="a", metadata=option("which mode", words=("a", "b")))
    share: bool | None = dataclasses.field(default=None, metadata=option(
        "share it", words={"auto": None, "yes": True, "no": False}))
    flip: bool = dataclasses.field(default=True, metadata=option("no flips"))
    loud: bool = dataclasses.field(default=False, metadata=option("be loud"))
    steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2], metadata=option("milestones"))
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    hidden: int = 7  # no option: not on the command line


def _parser(**kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_options(parser, _Toy, **kw)
    return parser


def test_options_take_name_type_choices_and_default_from_the_field() -> None:
    parser = _parser()
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == {"--size", "--mode", "--share", "--no-flip", "--loud", "--steps", "--inner-rate", "--epochs"}
    text = parser.format_help()
    assert "how many (default: 3)" in text and "milestones (default: 1,2)" in text
    assert "share it (default: auto)" in text and "(default: none)" in text and "be loud\n" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])  # not one of the field's words


def test_only_the_given_options_reach_the_dataclass_and_words_become_values() -> None:
    args = _parser().parse_args(["--size", "5", "--share", "no", "--no-flip", "--steps", "4", "--inner-rate", "0.25",
                                 "--epochs", "3"])
    assert given_options(args, _Toy) == {"size": 5, "share": False, "flip": False, "steps": [4],
                                         "inner": {"rate": 0.25, "epochs": 3}}
    built = build_options(args, _Toy, hidden=9)
    assert built == _Toy(size=5, share=False, flip=False, steps=[4], inner=_Inner(rate=0.25, epochs=3), hidden=9)
    assert _parser().parse_args(["--epochs", "3,4"]).epochs == [3, 4]  # one value or a list
    assert build_options(_parser().parse_args([]), _Toy) == _Toy()


def test_fill_defaults_sets_what_was_not_given_except_skipped_and_negated_options() -> None:
    args = _parser(defaults={"mode": "b"}).parse_args(["--size", "5"])
    fill_defaults(args, _Toy, skip=("inner.rate",), defaults={"mode": "b"})
    assert (args.size, args.mode, args.share, args.loud, args.steps) == (5, "b", "auto", False, [1, 2])
    assert args.inner_rate is None and args.flip is None  # skipped; a negated switch not given keeps the field's
    assert build_options(args, _Toy).mode == "b"


def test_the_dataclass_checks_a_given_value_before_any_work() -> None:
    from graftkd.refine import DeriveOptions

    parser = argparse.ArgumentParser()
    add_options(parser, DeriveOptions)
    with pytest.raises(GraftkdError, match=r"fade must be a share of the budget in \[0, 1\] \(got 2.0\)"):
        build_options(parser.parse_args(["--fade", "2"]), DeriveOptions)


def test_the_commands_declare_their_recipes_options_once() -> None:
    from graftkd.cli import build_parser
    from graftkd.distill.fulldata import KDRecipe
    from graftkd.engine.supervised import TeacherRecipe

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    args = commands["train-kd"].parse_args(["--student-arch", "s", "--data", "d", "--homo", "no", "--milestones", "5",
                                            "--adaptive", "sakd"])
    assert build_options(args, KDRecipe) == KDRecipe(homo=False, milestones=[5], adaptive="sakd")
    args = commands["train-teacher"].parse_args(["--arch", "a", "--data", "d", "--out", "o", "--no-flip",
                                                 "--schedule", "cosine"])
    assert build_options(args, TeacherRecipe) == TeacherRecipe(flip=False, schedule="cosine")
    assert "(default: 240)" in commands["train-kd"].format_help()  # KDRecipe.epochs, said once


def test_every_option_of_every_command_has_a_line_of_help() -> None:
    from graftkd.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    walk(sub, f"{name} {command}")
            elif action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {action.option_strings[0]}")

    walk(build_parser(), "graftkd")
    assert not missing, missing
