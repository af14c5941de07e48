"""The README's Python API snippets run as written (on the toy models they define)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    section = section[: section.index("\n## ", 4)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_python_api_snippets_run(capsys) -> None:
    snippets = _api_snippets()
    assert len(snippets) == 2
    scope: dict = {}
    for code in snippets:  # the second continues the first, as the README says
        exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["result"].merge_max_abs_diff <= 1e-4
    blocks = scope["record"].to_dict()["blocks"]
    assert [b["status"] for b in blocks] == ["channels chosen"] * 3  # a half-width copy of the toy teacher
    assert "channels chosen" in capsys.readouterr().out  # what the snippet prints


def test_the_readme_demo_numbers_are_the_committed_demo_files() -> None:
    """The demo rows of the results table are copied from the committed `graftkd demo --out results/demo`
    files, which record their command, commit and device."""
    import json

    root = README.parent
    rows = [line for line in README.read_text().splitlines() if line.startswith("| digits demo (`graftkd demo`)")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        result = json.loads((root / cells[-1].strip("`")).read_text())
        assert result["command"].startswith("graftkd demo")
        assert cells[3] == str(result["fewshot"]["shots"])
        assert cells[4].strip("*").split("%")[0] == f"{result['student']['test_acc']:.2f}"
        assert cells[5] == f"{result['teacher']['test_acc']:.2f}%"
