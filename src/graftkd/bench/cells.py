"""What both grid kinds share: reading a grid config, and one rule for when a cell is done."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from graftkd.errors import GraftkdError
from graftkd.files import read_json
from graftkd.records import record_version

DONE = ("ok", "unsupported")  # a failed cell, a damaged file or a missing one is (re)computed


def finished(path: Path) -> bool:
    """True when ``path`` is a readable cell file whose status says the cell needs no more work."""
    record = read_json(path)  # None: missing or damaged
    if not isinstance(record, dict):
        return False
    record_version(record, path)  # a newer graftkd's cell: one line, not a silent recomputation
    return record.get("status") in DONE


def read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GraftkdError(f"cannot read grid config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise GraftkdError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise GraftkdError(f"{path} is not UTF-8 text: a grid config is a YAML file") from None
