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


def test_the_readme_derived_students_table_is_the_committed_grid_report() -> None:
    """Each row of the README's derived-students table names its grid row; its K=1 and K=10 cells are that row's
    entries in results/cifar10-derived/results.md (written by the grid from the cell files), as mean ± std, with
    n when it is not 3, or a dash where the row has no cell."""
    root = README.parent
    report = {}
    for line in (root / "results" / "cifar10-derived" / "results.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"([\d.]+) ± ([\d.]+) \((\d+)\)", cells[3]) if len(cells) > 3 else None
        if match and cells[2].isdigit():
            mean, std, n = match.groups()
            report[(cells[0], cells[1], int(cells[2]))] = (f"{mean} ({'n=1'})" if n == "1" else
                                                           f"{mean} ± {std}" + ("" if n == "3" else f" (n={n})"))
    pairs = {"ResNet-56 (93.39) → ResNet-20": "resnet56-resnet20", "VGG16-BN (91.52) → vgg16_half_bn":
             "vgg16bn-vgg16half", "VGG16-BN (91.52) → vgg16-graft": "vgg16bn-vgg16graft"}
    text = README.read_text()
    lines = text[text.index("**Students derived from the teacher**"):].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| pair | row | K=1 | K=10 |"))
    rows = [line for line in lines[first + 2:first + 40] if line.startswith("| ")]
    assert len(rows) >= 15
    for line in rows:
        pair, what, *shots = [c.strip() for c in line.strip().strip("|").split("|")]
        row = re.search(r"row `([^`]+)`", what)
        assert row, f"README row names no grid row: {what}"
        for k, cell in zip((1, 10), shots):
            expected = report.get((pairs[pair], row.group(1), k), "—")
            assert cell.strip("*") == expected, (pair, row.group(1), k, cell, expected)
