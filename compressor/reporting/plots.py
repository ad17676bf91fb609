"""Report figures: accuracy vs cost with the Pareto frontier, layer widths, score distributions.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch),
rendered into memory and written with ``io.atomic_write``, so an interrupted report never
leaves a half-written PNG.
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compressor.storage import io

DPI = 100


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower-or-equal cost *and* higher accuracy.

    ``points`` are ``(cost, accuracy)``. Returned in increasing cost.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return io.atomic_write(path, lambda fh: fh.write(buf.getvalue()))


def _label_offsets(xy: Sequence[tuple[float, float]], span: tuple[float, float], step: float = 9.0,
                   near: float = 0.02) -> list[float]:
    """Vertical offsets (points) for the labels of ``xy``: labels of points closer than ``near`` of the
    axis spans are stacked one line apart instead of printed over each other."""
    offsets: list[float] = []
    placed: list[tuple[float, float, int]] = []
    sx, sy = (s if s > 0 else 1.0 for s in span)
    for x, y in xy:
        k = sum(1 for px, py, _ in placed if abs(px - x) <= near * sx and abs(py - y) <= near * sy)
        placed.append((x, y, k))
        offsets.append(4.0 + step * k)
    return offsets


def tradeoff(rows: Sequence[Mapping], cost_key: str, path: str | Path, *, acc_key: str = "top1",
             label_key: str = "name", title: str = "") -> Path | None:
    """Accuracy vs ``cost_key`` (``macs`` or ``params``): pruned points, baselines as stars, frontier line.

    Rows without an accuracy are left out; returns None when no row has one. Labels of points at
    (nearly) the same place are stacked, not overprinted.
    """
    fig = tradeoff_figure(rows, cost_key, acc_key=acc_key, label_key=label_key, title=title)
    return None if fig is None else save_png(fig, path)


def tradeoff_figure(rows: Sequence[Mapping], cost_key: str, *, acc_key: str = "top1", label_key: str = "name",
                    title: str = "") -> Figure | None:
    """The figure of :func:`tradeoff` (None without accuracies)."""
    from matplotlib.lines import Line2D

    pts = [r for r in rows if r.get(acc_key) is not None and r.get(cost_key)]
    if not pts:
        return None
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    xy = [(r[cost_key] / 1e6, r[acc_key]) for r in pts]
    front = pareto_front(xy)
    archs = sorted({r["model"] for r in pts})
    colors = {a: f"C{i % 10}" for i, a in enumerate(archs)}
    xs, ys = [x for x, _ in xy], [y for _, y in xy]
    offsets = _label_offsets(xy, (max(xs) - min(xs), max(ys) - min(ys)))
    for r, (x, y), dy in zip(pts, xy, offsets):
        base = r.get("role") == "baseline"
        ax.scatter([x], [y], marker="*" if base else "o", s=160 if base else 40, color=colors[r["model"]],
                   edgecolors="black" if base else "none", zorder=3)
        ax.annotate(str(r.get(label_key, "")), (x, y), textcoords="offset points", xytext=(4, dy), fontsize=7)
    fx, fy = [xy[i][0] for i in front], [xy[i][1] for i in front]
    frontier = dict(color="black", linestyle="--", linewidth=1.2)
    if len(front) > 1:
        ax.step(fx, fy, where="post", zorder=2, **frontier)
    handles = [Line2D([], [], label="Pareto frontier", **frontier)]  # a plain line: a step line's legend is empty
    handles += [Line2D([], [], linestyle="none", marker="o", color=colors[a], label=a) for a in archs]
    handles.append(Line2D([], [], linestyle="none", marker="*", markersize=11, markerfacecolor="white",
                          markeredgecolor="black", label="baseline (unpruned)"))
    unit = "MACs (M, one image)" if cost_key == "macs" else "parameters (M)"
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel(unit)
    ax.set_ylabel(f"{acc_key} accuracy on test (%)")
    ax.set_title(title or f"accuracy vs {cost_key}")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="lower right", handlelength=3.0)
    fig.tight_layout()
    return fig


def widths(units: Sequence[str], before: Sequence[int], after: Sequence[int], path: str | Path,
           title: str = "") -> Path:
    """Grouped bars: each unit's output channels before and after pruning."""
    n = len(units)
    fig = _figure(max(6.0, 0.45 * n + 2.0), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(n))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after", color="C0")
    ax.set_xticks(xs)
    ax.set_xticklabels(units, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title or "channels per layer")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def score_boxes(per_unit: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """One box per layer: the distribution of its filters' scores."""
    names = list(per_unit)
    fig = _figure(max(6.0, 0.45 * len(names) + 2.0), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([list(map(float, per_unit[n])) for n in names], showfliers=True,
               flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("score")
    ax.set_title(title or "filter scores per layer")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def recovery_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *,
                    title: str = "", baselines: Mapping[str, float] | None = None) -> Path:
    """Validation top-1 vs epochs done (fractions of an epoch), one line per run.

    ``curves``: ``{label: [(epoch_frac, val_acc), ...]}``; the first point of a run at epoch 0 is
    the accuracy it started from (e.g. right after pruning). ``baselines``: ``{legend label: top-1}``
    of the unpruned model(s), drawn as horizontal reference lines (the label says which split).
    """
    return save_png(recovery_figure(curves, title=title, baselines=baselines), path)


def recovery_figure(curves: Mapping[str, Sequence[tuple[float, float]]], *, title: str = "",
                    baselines: Mapping[str, float] | None = None) -> Figure:
    """The figure of :func:`recovery_curves`."""
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, pts) in enumerate(curves.items()):
        xs = [float(x) for x, _ in pts]
        ys = [float(y) for _, y in pts]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, color=f"C{i % 10}", label=str(label))
    styles = (":", "-.", (0, (5, 2, 1, 2)))
    for j, (label, acc) in enumerate((baselines or {}).items()):
        ax.axhline(float(acc), color="dimgrey", linestyle=styles[j % len(styles)], linewidth=1.2, label=str(label),
                   zorder=1)
    ax.set_xlabel("epochs (fractions of an epoch)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title or "recovery curves: validation top-1 during training")
    ax.grid(True, alpha=0.3)
    if curves or baselines:
        ax.legend(fontsize=7, loc="lower right", handlelength=3.0)
    ax.margins(x=0.03, y=0.08)
    fig.tight_layout()
    return fig
