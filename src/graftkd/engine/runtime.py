"""Devices, precision, seeds and run facts (command, commit, machine) recorded with every result."""
from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from graftkd.errors import GraftkdError
from graftkd.records import RESULT_SCHEMA, SCHEMA_KEY


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present; an explicit device that is not there is a clear error."""
    if isinstance(spec, torch.device):
        return spec
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise GraftkdError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GraftkdError(f"device '{spec}' requested but CUDA is not available here: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GraftkdError(
                f"device '{spec}' requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise GraftkdError(f"device '{spec}' requested but MPS is not available here: use --device cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware: CUDA with bf16 support, or a CPU with AMX/AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(device: torch.device, precision: str, cpu_bf16: bool = False) -> str:
    """'auto' -> 'bf16' on CUDA (and on a bf16-capable CPU when ``cpu_bf16``), else 'fp32'."""
    if precision not in ("auto", "fp32", "bf16"):
        raise GraftkdError(f"unknown precision '{precision}': use auto, fp32 or bf16")
    if precision != "auto":
        return precision
    if device.type == "cuda" or (cpu_bf16 and native_bf16(device)):
        return "bf16"
    return "fp32"


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing only; never inside a training step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked ('auto' = bf16 on CUDA, fp32 on CPU), else a no-op context."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise GraftkdError(f"unknown precision '{precision}': use auto, fp32 or bf16")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a dedicated generator for shuffling and augmentation."""
    # Denormal floats (tiny activations/gradients late in training) slow CPU math by 10-100x.
    torch.set_flush_denormal(True)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The commit of the graftkd checkout (with '+dirty' if modified), or 'unknown' outside git."""
    root = Path(path) if path else Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # result files are outputs, not code: writing one must not mark the next run "dirty"
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
             ".", ":(exclude)results", ":(exclude)benchmarks/results"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    return f"cpu: {cpu_model()}, {torch.get_num_threads()} threads"


def machine_facts(device: torch.device) -> dict:
    """Hardware a benchmark ran on, so its ratios are read against the right machine."""
    facts = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "cpu_native_bf16": native_bf16(torch.device("cpu")), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                      "gpu_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda})
    return facts


def _program_name() -> str:
    """'graftkd' also when started as ``python -m graftkd.cli``, so recorded commands can be re-run."""
    name = Path(sys.argv[0]).name
    return "graftkd" if name in ("cli.py", "__main__.py") else name


def run_facts(device: torch.device, seed: int | None = None) -> dict:
    """What every result file records so a number can be traced and reproduced."""
    return {
        SCHEMA_KEY: RESULT_SCHEMA,  # graftkd.records: what a reader checks before it trusts the fields
        "command": " ".join([_program_name(), *sys.argv[1:]]) if sys.argv else "",
        "commit": git_commit(),
        "seed": seed,
        "device": device_description(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        # how OpenMP threads waited (PASSIVE: they slept; the graftkd command sets it on a busy machine): speed only
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class Timer:
    """Wall-clock timer that synchronises CUDA only when read, never inside a step."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start
