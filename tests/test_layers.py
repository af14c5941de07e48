"""The import contract: layers import downward only, lazily or not.

    errors, files, schema            (shared leaves)
    models, data                     (the bottom: neither imports the other's layer or anything above)
    engine                           (the loop, runtime, checkpoints: imports no method)
    graft, then derive               (grafting; derivation builds on grafting's block contract)
    distill                          (the methods, the full-data trainer)
    everything else                  (workflows, bench, report, cli: the top)
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "graftkd"
RANK = {"errors": 0, "files": 0, "schema": 0, "__init__": 0, "models": 1, "data": 1, "engine": 2, "graft": 3,
        "derive": 3.5, "distill": 4}
TOP = 5


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graftkd."):
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("graftkd."):
                    yield alias.name, node.lineno


def test_every_import_points_down_the_layers() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for module, line in _imports(path):
            other = module.split(".")[1]
            mine_rank, other_rank = RANK.get(mine, TOP), RANK.get(other, TOP)
            upward = other_rank > mine_rank
            sideways = other_rank == mine_rank and other != mine and mine_rank in (1, 2, 3, 3.5, 4)
            if upward or sideways:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_contract_sees_lazy_imports(tmp_path) -> None:
    """A function-level import counts: the check walks the whole tree, not only the module's top."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from graftkd.distill.base import FewShotTask\n    import graftkd.engine.loop\n")
    assert list(_imports(module)) == [("graftkd.distill.base", 4), ("graftkd.engine.loop", 5)]
