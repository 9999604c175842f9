"""The layer rule of docs/ARCHITECTURE.md: a module never imports one of a higher layer, including
imports made inside functions (parsed with ast, so nothing is imported to check)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trecsys"
# Lowest first; a module may import its own layer and those below it.
LAYERS = [
    ("trecsys", "trecsys.errors", "trecsys.artifacts", "trecsys.config", "trecsys.runtime", "trecsys.stage_table"),
    ("trecsys.ingest",),
    ("trecsys.prepared",),
    ("trecsys.model",),
    ("trecsys.train",),
    ("trecsys.rank",),
    ("trecsys.stages",),
    ("trecsys.pipeline",),
    ("trecsys.cli", "trecsys.__main__", "trecsys.api"),
]


def layer_of(module: str) -> int:
    """The layer of the longest prefix of `module` that LAYERS names."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    assert best is not None, f"{module} is in no layer of LAYERS: add it (and to docs/ARCHITECTURE.md)"
    return best


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """(line, module) of every trecsys import in the file, at any depth."""
    mine = module_name(path, root)
    package = mine if path.name == "__init__.py" else mine.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from trecsys import x` may name a submodule: judge it as trecsys.x when it is one.
            names = [f"{base}.{a.name}" for a in node.names if (root / f"{base}.{a.name}".replace(".", "/")).exists()
                     or (root / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists()]
            out += [(node.lineno, name) for name in names or [base]]
    return [(line, name) for line, name in out if name == "trecsys" or name.startswith("trecsys.")]


# The one allowed upward import: `import trecsys; trecsys.load_run(...)` — the package's public face
# re-exports the Python API, lazily (on first attribute access), so importing trecsys stays light.
FACADE = {("trecsys", "trecsys.api")}


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = module_name(path)
        for line, name in imported(path):
            if layer_of(name) > layer_of(mine) and (mine, name) not in FACADE:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mine} (layer {layer_of(mine)}) "
                                  f"imports {name} (layer {layer_of(name)})")
    assert not violations, "lower layers import higher ones:\n" + "\n".join(violations)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    model = tmp_path / "trecsys" / "model"
    (tmp_path / "trecsys" / "stages").mkdir(parents=True)
    model.mkdir()
    (tmp_path / "trecsys" / "stages" / "evaluate.py").write_text("")
    (model / "probe.py").write_text("import torch\n\n\ndef f():\n    from trecsys.cli import app\n"
                                    "    from ..stages import evaluate\n    from . import seqrec\n")
    found = imported(model / "probe.py", tmp_path)
    assert found == [(5, "trecsys.cli"), (6, "trecsys.stages.evaluate"), (7, "trecsys.model")]
    assert layer_of("trecsys.cli") > layer_of("trecsys.stages.evaluate") > layer_of("trecsys.model.probe")


def test_every_stage_of_the_table_is_a_command_that_runs_its_module():
    """The stage table (trecsys/stage_table.py) is what the CLI, `trec run` and every folder lookup
    read: each row is a `trec` command, and its module has the `run(cfg)` both call."""
    import importlib

    from typer.main import get_command

    from trecsys.cli import app
    from trecsys.stage_table import BY_NAME, STAGES

    commands = set(get_command(app).commands)
    assert [s.name for s in STAGES if s.name not in commands] == []
    assert all(callable(getattr(importlib.import_module(s.module), "run", None)) for s in STAGES)
    assert len({s.folder for s in STAGES}) == len(STAGES) and set(BY_NAME) == {s.name for s in STAGES}
    # What a stage reads comes before it in pipeline order (`trec run` runs the table top to bottom).
    assert all(read in [t.name for t in STAGES[:i]] for i, s in enumerate(STAGES) for read in s.reads)
