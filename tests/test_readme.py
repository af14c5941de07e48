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
