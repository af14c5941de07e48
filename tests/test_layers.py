"""The import contract: layers import downward only, lazily or not (an AST check here, and the same layers as
import-linter contracts in pyproject.toml, run by `lint-imports`).

    errors, files, schema, records   (shared leaves)
    models, data                     (the bottom: neither imports the other's layer or anything above)
    engine                           (the loop, runtime, checkpoints: imports no method)
    graft, then derive               (grafting; derivation builds on grafting's block contract)
    distill                          (the methods, the full-data trainer)
    loaded, then refine              (models as files; a derived student's refinement, a method's run)
    everything else                  (commands, bench, report, cli: the top)
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "graftkd"
RANK = {"errors": 0, "files": 0, "schema": 0, "records": 0, "__init__": 0, "models": 1, "data": 1, "engine": 2, "graft": 3,
        "derive": 3.5, "distill": 4, "loaded": 4.3, "refine": 4.6}
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
            sideways = other_rank == mine_rank and other != mine and mine_rank in (1, 2, 3, 3.5, 4, 4.3, 4.6)
            if upward or sideways:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_contract_sees_lazy_imports(tmp_path) -> None:
    """A function-level import counts: the check walks the whole tree, not only the module's top."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from graftkd.distill.base import FewShotTask\n    import graftkd.engine.loop\n")
    assert list(_imports(module)) == [("graftkd.distill.base", 4), ("graftkd.engine.loop", 5)]


def _lint_imports(config: Path, cwd: Path, pythonpath: Path | None = None):
    import os
    import shutil
    import subprocess

    tool = shutil.which("lint-imports") or str(Path(__import__("sys").executable).parent / "lint-imports")
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([tool, "--config", str(config), "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_linter_contracts_hold() -> None:
    """The same layers as import-linter contracts (pyproject.toml: [tool.importlinter]), kept by `lint-imports`."""
    root = PACKAGE.parents[1]
    done = _lint_imports(root / "pyproject.toml", root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_import_linter_sees_a_lazy_upward_import(tmp_path) -> None:
    """The contracts are not vacuous: an engine that imports a method inside a function breaks them."""
    package = tmp_path / "src" / "fakekd"
    for sub in ("engine", "distill"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "engine" / "loop.py").write_text("def run():\n    from fakekd.distill import kd\n")
    (package / "distill" / "kd.py").write_text("import fakekd.engine.loop\n")
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_package = "fakekd"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "engine below distill"\ntype = "forbidden"\nsource_modules = ["fakekd.engine"]\n'
                      'forbidden_modules = ["fakekd.distill"]\n')
    done = _lint_imports(config, tmp_path, pythonpath=tmp_path / "src")
    assert done.returncode == 1 and "fakekd.engine.loop -> fakekd.distill" in done.stdout, done.stdout + done.stderr
