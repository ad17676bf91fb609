"""The CLI is a thin client: its commands reach the library only through the public API.

A command parses arguments, calls ``compressor.<public name>`` (or a file-level job that wraps the
API with run folders: ``compressor.jobs``), and prints. Besides the public API it may use the
input/output layers (``compressor.storage``: checkpoint files, run folders, atomic writes;
``compressor.data``: datasets and loaders), the errors, and its own helpers. The few exceptions are
named with their reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import compressor

COMMANDS = Path(compressor.__file__).parent / "commands"
ALLOWED = ("compressor.errors", "compressor.commands", "compressor.jobs", "compressor.storage", "compressor.data")
EXCEPTIONS = {
    # --opset is range-checked while parsing, against the installed exporter's newest opset
    ("_options.py", "compressor.deploy.onnx_export"),
}


def _public(mod: str) -> bool:
    """``compressor`` itself, or one of the names it exports (``from compressor import prune``)."""
    return mod == "compressor" or (mod.startswith("compressor.") and mod.count(".") == 1
                                   and mod.split(".")[1] in compressor.__all__)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compressor"):
            base = node.module  # `from a.b import c` may name a module a.b.c: both are recorded
            found |= {f"{base}.{a.name}" for a in node.names} | ({base} if base != "compressor" else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("compressor")}
    return found


def violations(path: Path) -> list[str]:
    bad = []
    for mod in sorted(_imports(path)):
        if _public(mod) or any(mod == a or mod.startswith(a + ".") for a in ALLOWED):
            continue
        if not any(path.name == f and (mod == e or mod.startswith(e + ".")) for f, e in EXCEPTIONS):
            bad.append(f"{path.name}: {mod}")
    return bad


def test_commands_reach_the_library_only_through_the_public_api() -> None:
    bad = [v for path in sorted(COMMANDS.glob("*.py")) for v in violations(path)]
    assert not bad, bad


def test_the_checker_sees_an_engine_import(tmp_path) -> None:
    f = tmp_path / "cmd.py"
    f.write_text("import compressor\nfrom compressor import prune, report\n"
                 "def run():\n    from compressor.pruning.surgery import apply\n    from compressor.pruning import policy\n"
                 "    from compressor.storage import io\n    from compressor.reporting import report\n"
                 "    from compressor.training.train import TrainConfig\n")
    assert violations(f) == ["cmd.py: compressor.pruning", "cmd.py: compressor.pruning.policy",
                             "cmd.py: compressor.pruning.surgery",
                             "cmd.py: compressor.pruning.surgery.apply", "cmd.py: compressor.reporting",
                             "cmd.py: compressor.reporting.report", "cmd.py: compressor.training.train",
                             "cmd.py: compressor.training.train.TrainConfig"]
