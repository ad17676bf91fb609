"""The CLI is a thin client: its commands never reach into the pruning engine.

Ranking, planning, surgery, budgets and recovery are the public API's (``compressor.rank``,
``prune``, ``recover``, ``sensitivity``...). A command may use the public API, the job modules
that wrap it with files and data (``pipeline``, ``sweep``, ``report``), and the file/data
helpers; it may not import the engine's internals. The one exception is named with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import compressor

COMMANDS = Path(compressor.__file__).parent / "commands"
ENGINE = ("compressor.pruning.surgery", "compressor.pruning.plan", "compressor.pruning.policy", "compressor.pruning.reconstruct",
          "compressor.pruning.capture", "compressor.pruning.graph", "compressor.pruning.size", "compressor.pruning.shapes",
          "compressor.pruning.rates", "compressor.pruning.criteria.base")
EXCEPTIONS = {
    # list-layers prints the engine's own discovery (kinds, rank points, members, refusals and why)
    ("list_layers.py", "compressor.pruning.graph"),
    # ...and what each unit's channels carry (MACs and params), from the one size model
    ("list_layers.py", "compressor.pruning.size"),
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compressor"):
            base = node.module  # `from a.b import c` may name a module a.b.c: both are recorded
            found |= {f"{base}.{a.name}" for a in node.names} | ({base} if base != "compressor" else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("compressor")}
    return found


def test_commands_do_not_import_engine_internals() -> None:
    bad = []
    for path in sorted(COMMANDS.glob("*.py")):
        for mod in _imports(path):
            hit = next((e for e in ENGINE if mod == e or mod.startswith(e + ".")), None)
            if hit and (path.name, hit) not in EXCEPTIONS:
                bad.append(f"{path.name}: {mod}")
    assert not bad, bad


def test_the_checker_sees_an_engine_import(tmp_path) -> None:
    f = tmp_path / "cmd.py"
    f.write_text("def run():\n    from compressor.pruning.surgery import apply\n    from compressor.pruning import policy\n"
                 "    from compressor.storage import io\n    from compressor.pruning import graph\n")
    found = _imports(f)
    assert {"compressor.pruning.surgery", "compressor.pruning.policy", "compressor.storage.io",
            "compressor.pruning.graph"} <= found
    hits = [m for m in found if any(m == e or m.startswith(e + ".") for e in ENGINE)]
    assert {"compressor.pruning.graph", "compressor.pruning.policy", "compressor.pruning.surgery"} <= set(hits)
    assert "compressor.storage.io" not in hits

