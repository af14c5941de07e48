"""graftkd command line: the parser and the error handling; each command lives in :mod:`graftkd.commands`."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from graftkd.errors import GraftkdError, Interrupted


def machine_is_busy(load: float, cpus: int) -> bool:
    """Whether other work already keeps the cores busy: ``load`` (other runnable threads) of half the cores or more."""
    return load >= 0.5 * max(1, cpus)


def others_running(path: str = "/proc/loadavg", samples: int = 5, interval_s: float = 0.01) -> float | None:
    """Other threads runnable right now, on average over ``samples`` reads ``interval_s`` apart: Linux's running count
    (the fourth field of ``/proc/loadavg``, which counts this process), less one; None where there is no such file.

    Why not the 1-minute load average: it still counts a job that has just ended, so in a chain of grid cells every
    cell after the first found the machine busy and slept its threads, on a machine it had to itself."""
    counts = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval_s)
            with open(path, encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return None
    return sum(counts) / len(counts)


def sleeping_openmp_threads() -> None:
    """On a busy machine, let OpenMP's threads sleep rather than spin while they wait (``OMP_WAIT_POLICY=PASSIVE``),
    unless the user chose a policy.

    Beside another process training on the same cores, spinning threads starve each other: with sleeping threads a
    KD step ran about 2x faster and a small forward 1.3-87x faster; on a quiet machine sleeping cost about 5 % of
    a KD step (``benchmarks/results/omp_wait-cpu.json``, 3 rounds). Hence the rule: passive only when other threads
    are runnable at the start (``others_running``; the 1-minute load average where the system does not say). The
    runtime reads the variable once, when torch loads it, so this runs before torch is imported; ``result.json``
    records the policy (``omp_wait_policy``)."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    load = others_running()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if machine_is_busy(load, os.cpu_count() or 1):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


sleeping_openmp_threads()  # before the commands' modules import torch

from graftkd.commands import command_modules  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graftkd", description="Few-shot distillation by network grafting.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in command_modules():
        command.add_arguments(sub.add_parser(command.NAME, help=command.HELP))
    return parser


# command name -> its run(args); a table, so a test can swap one command for another
COMMANDS = {command.NAME: command.run for command in command_modules()}


def config_tokens(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A ``--config`` file's options as command-line tokens: a YAML list of tokens (a grid row), or a mapping of
    option names to values (``true``: a switch; a list: several values, or a repeated option for ``set`` and
    ``method-option``). Every name is checked against the command's options before any work."""
    import difflib

    import yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GraftkdError(f"--config {path}: cannot read it ({exc.__class__.__name__}: "
                           f"{getattr(exc, 'strerror', None) or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GraftkdError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    known = {s for action in parser._actions for s in action.option_strings}
    repeated = {s for action in parser._actions if isinstance(action, argparse._AppendAction) for s in action.option_strings}
    if raw is None:
        return []
    if isinstance(raw, list):
        tokens = [str(t) for t in raw]
    elif isinstance(raw, dict):
        tokens = []
        for key, value in raw.items():
            flag = "--" + str(key).lstrip("-").replace("_", "-")
            if flag not in known:
                close = difflib.get_close_matches(flag, sorted(known), n=1)
                hint = f" (did you mean '{close[0].lstrip('-')}'?)" if close else ""
                raise GraftkdError(f"--config {path}: unknown option '{key}'{hint}; `graftkd distill --help` lists them")
            if value is True:
                tokens.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list) and flag in repeated:
                for item in value:
                    tokens += [flag, str(item)]
            elif isinstance(value, list):
                tokens += [flag, ",".join(str(v) for v in value)]
            else:
                tokens += [flag, str(value)]
    else:
        raise GraftkdError(f"--config {path}: must be a list of option tokens or a mapping of options to values")
    for token in tokens:
        name = token.split("=", 1)[0]
        if token.startswith("--") and name not in known:
            raise GraftkdError(f"--config {path}: unknown option '{name}'; `graftkd distill --help` lists them")
        if name == "--config":
            raise GraftkdError(f"--config {path}: a config file cannot name another --config")
    return tokens


def _expand_config(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Put a ``distill --config FILE``'s tokens right after the command, so options given on the command line
    (parsed later) win over the file's."""
    if not argv or argv[0] != "distill":
        return argv
    rest, path = [], None
    i = 1
    while i < len(argv):
        token = argv[i]
        if token == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if token.startswith("--config="):
            path = token.split("=", 1)[1]
        else:
            rest.append(token)
        i += 1
    if path is None:
        return argv
    distill_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["distill"]
    return ["distill", *config_tokens(path, distill_parser), *rest]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        argv = _expand_config(argv, parser)
    except GraftkdError as exc:
        print(f"graftkd: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except Interrupted as exc:  # the state is saved: not a failure
        print(f"graftkd: interrupted — {exc}", file=sys.stderr)
        return 130
    except GraftkdError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"graftkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graftkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`graftkd methods | head`): not a bug, and nothing to say
        _quiet_stdout()
        return 141  # what a shell reports for a writer killed by SIGPIPE
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        detail = " ".join(str(exc).split())[:300]
        print(f"graftkd: internal error: {type(exc).__name__}: {detail} (a bug in graftkd: re-run with --debug "
              "and report the traceback)", file=sys.stderr)
        return 1
    return 0


def _quiet_stdout() -> None:
    """Point stdout at the null device, so the interpreter's last flush at exit does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests): nothing is flushed at exit
        pass


if __name__ == "__main__":
    sys.exit(main())
