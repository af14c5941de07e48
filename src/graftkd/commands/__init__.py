"""The CLI's commands, one module each: its arguments (``add_arguments``), what it does (``run``) and the
workflow function a library caller uses instead of the command line (``distill``, ``train_teacher``, ...).

Every module has ``NAME`` (the command), ``HELP`` (one line for ``graftkd --help``), ``add_arguments(parser)``
and ``run(args)``; :data:`COMMANDS` lists them in the order ``graftkd --help`` shows them. Importing this package
imports no command module: each is loaded when the parser is built.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# module names under graftkd.commands, in help order
ORDER = ("demo", "fewshot", "train_teacher", "distill", "train_kd", "export", "students", "models", "evaluate",
         "bench", "report", "methods", "teachers")


def command_modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{name}") for name in ORDER]
