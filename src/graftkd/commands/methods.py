"""`graftkd methods`: the few-shot methods and their options, and the full-data feature distillers."""
from __future__ import annotations

import argparse
import sys


NAME = "methods"
HELP = "list the few-shot methods and their options"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def _first_sentence(doc: str | None) -> str:
    """A docstring's whole first paragraph on one line (a line break is not the end of a sentence)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def run(args) -> None:
    from graftkd.distill.base import METHODS, list_methods

    width = max(map(len, list_methods()), default=0)
    for name in list_methods():
        cls = METHODS[name]
        options = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items()) or "no options"
        recipes = "paper|patient" if cls.takes_recipe else "paper"
        print(f"{name:<{width}} {_first_sentence(cls.__doc__ or sys.modules[cls.__module__].__doc__)}  [{options}; "
              f"--recipe {recipes}]")
    from graftkd.distill.zoo import DISTILLERS, list_distillers

    print("\nfeature distillers for full-data training (graftkd train-kd --distiller NAME [--adaptive sakd]):")
    for name in list_distillers():
        cls = DISTILLERS[name]
        summary = _first_sentence(sys.modules[cls.__module__].__doc__)
        print(f"{name:<8} spots={cls.spot_kind:<9} beta={cls.weight:<8g} {summary}")
