"""Recovery curves of train/finetune runs overlaid in one PNG, with a start/best/final table.

Each run's ``metrics.jsonl`` gives validation top-1 vs epochs. When a run's checkpoint (``last.pt``/
``best.pt`` in the folder, or the prune run's ``pruned.pt`` one level up) records the baseline's
accuracy (``baseline_test``, from the prune that made the model), it is drawn as a horizontal
reference line, labelled with the split and number of images it was measured on.
"""

from __future__ import annotations

import glob
import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from compressor.reporting import plots
from compressor.errors import UserError
from compressor.reporting.report_render import _f

METRICS_FILE = "metrics.jsonl"
CURVES_PNG = "recovery_curves.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``; a missing file or a bad line is one ``UserError`` naming the file."""
    p = Path(path)
    src = str(p)
    if not p.is_file():
        raise UserError("no such file (not a train/finetune output folder?)", source=src)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})", source=src) from exc
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"line {i} is not valid JSON ({getattr(exc, 'msg', exc)})", source=src) from None
        if not isinstance(row, dict):
            raise UserError(f"line {i} is not a JSON object", source=src)
        for key in ("epoch_frac", "epoch", "val_acc"):
            v = row.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise UserError(f"line {i}: {key} must be a finite number, got {str(v)[:40]!r}", source=src)
        rows.append(row)
    return rows


def _curve_inputs(runs: Sequence[str]) -> list[Path]:
    """Run folders (or their metrics.jsonl files), globs expanded, in the order given."""
    out: list[Path] = []
    for pattern in runs:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for m in matches:
            p = Path(m)
            f = p if p.name == METRICS_FILE and not p.is_dir() else p / METRICS_FILE
            if f not in out:
                out.append(f)
    return out


def curve_summary(points: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Start (the epoch-0 evaluation, None without one), best and final val top-1, and epochs done."""
    start = next((y for x, y in points if x == 0), None)
    return {"start_val": start, "best_val": max(y for _, y in points), "final_val": points[-1][1],
            "epochs": max(x for x, _ in points)}


def curves(runs: Sequence[str], out: str | Path, *, title: str = "") -> dict[str, Any]:
    """Overlay the recovery curves of train/finetune runs in one PNG (one line per run).

    ``runs``: output folders holding ``metrics.jsonl`` (or the files); label = the folder's name
    (its parent's too when two share a name). ``out``: a ``.png`` path, else a folder for
    ``recovery_curves.png``. Returns ``{"rows", "table", "png"}``.
    """
    from compressor.training.train import curve_points

    files = _curve_inputs(runs)
    if not files:
        raise UserError("no run folders given", field="curves")
    taken: set[str] = set()
    data: dict[str, list[tuple[float, float]]] = {}
    rows = []
    for f in files:
        pts = curve_points(read_metrics(f))
        if not pts:
            raise UserError("has no validation rows (val_acc): was the run trained without a validation split?",
                            source=str(f))
        run = f.parent
        label = run.resolve().name or str(run)
        if label in taken:
            label = f"{run.resolve().parent.name}/{label}"
        if label in taken:
            label = str(run)
        taken.add(label)
        data[label] = pts
        base = run_baseline(run)
        rows.append({"run": label, "path": str(f), **curve_summary(pts), "evaluations": len(pts),
                     "baseline": base})
    target = Path(out)
    png = target if target.suffix.lower() == ".png" else target / CURVES_PNG
    refs = {baseline_label(r["baseline"]): r["baseline"]["top1"] for r in rows if r["baseline"]}
    plots.recovery_curves(data, png, title=title, baselines=refs)
    return {"rows": rows, "table": curves_table(rows), "png": str(png)}


def baseline_label(base: Mapping[str, Any]) -> str:
    """``baseline 93.40% (test, 10000 images)``: the reference line's legend entry."""
    n = base.get("n")
    where = ", ".join(str(x) for x in (base.get("split"), f"{n} images" if n else None) if x)
    return f"baseline {base['top1']:.2f}%" + (f" ({where})" if where else "")


def _header(path: Path) -> Mapping[str, Any]:
    """A checkpoint's fields without reading its tensors (memory-mapped); {} if unreadable."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - no reference line rather than a failed plot
        return {}
    return obj if isinstance(obj, Mapping) else {}


def run_baseline(run: Path) -> dict[str, Any] | None:
    """The unpruned model's accuracy a run's checkpoint records, if any: ``{"top1", "split", "n", "source"}``.

    A fine-tune's ``last.pt``/``best.pt`` carries the prune run's metrics under ``metrics["prune"]``
    (``baseline_test`` and the ``eval`` split it was measured on); a run folder without its own
    checkpoint (a prune run's ``finetune/``) is looked up in the prune run's ``pruned.pt`` above it.
    """
    own = [run / "last.pt", run / "best.pt"]
    cands = [p for p in own if p.is_file()] or [p for p in (run.parent / "pruned.pt",) if p.is_file()]
    for path in cands:
        m = _header(path).get("metrics") or {}
        for src in (m, m.get("prune")):
            if not isinstance(src, Mapping) or not isinstance(src.get("baseline_test"), Mapping):
                continue
            top1 = src["baseline_test"].get("top1")
            if isinstance(top1, (int, float)) and not isinstance(top1, bool) and math.isfinite(top1):
                ev = src.get("eval") if isinstance(src.get("eval"), Mapping) else {}
                n = src["baseline_test"].get("n", ev.get("n"))
                return {"top1": float(top1), "split": ev.get("split"), "n": n if isinstance(n, int) else None,
                        "source": str(path)}
    return None


def curves_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: run, start val, best val, final val, epochs (val top-1 in %)."""
    lines = ["| run | start val | best val | final val | epochs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {_f(r['start_val'])} | {_f(r['best_val'])} | {_f(r['final_val'])} | "
                     f"{r['epochs']:g} |")
    return "\n".join(lines) + "\n"

