"""The version of graftkd's result records (``result.json``, grid cells, ``grid.json``, evaluations).

Every record starts from :func:`graftkd.engine.runtime.run_facts`, which stamps ``schema_version``. The rule:
adding a field keeps the version; renaming or removing a field, or changing what one means, bumps it, and
``docs/results.md`` says what changed. Readers accept every version up to :data:`RESULT_SCHEMA` (a record
without the key was written before versioning: version 0, the same fields as 1) and refuse a newer one with
one line, so an old graftkd never misreads a new file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from graftkd.errors import GraftkdError

RESULT_SCHEMA = 1
SCHEMA_KEY = "schema_version"


def record_version(record: dict[str, Any], path: str | Path) -> int:
    """The record's schema version; a GraftkdError naming the file when this graftkd cannot read it."""
    version = record.get(SCHEMA_KEY, 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise GraftkdError(f"{path}: {SCHEMA_KEY} is {version!r}, not a version number: the file is damaged; "
                           "re-run the command that wrote it")
    if version > RESULT_SCHEMA:
        raise GraftkdError(f"{path} was written by a newer graftkd (result schema {version}; this one reads up to "
                           f"{RESULT_SCHEMA}): upgrade graftkd to read it")
    return version
