"""Per-layer sensitivity: prune one layer alone at several rates, measure the accuracy drop.

Works on every model the engine prunes (registered families, CIFAR ResNets, ``torchvision:``
and ``module:builder`` models): the layers are the dependency-graph engine's units
(``compressor.pruning.graph.units``), each (layer, rate) point is a physically cut model
(``surgery.apply``: the same channels the prune job would cut, by the same criterion),
evaluated *without fine-tuning* on a held-out subset (``bundle.val``), optionally after
re-estimating BN statistics, and sizes are the engine's exact count (``pruning.size.SizeModel``).

The curves suggest per-layer rates. Without a budget, each layer gets the largest tested
rate whose drop (and every smaller rate's drop) stays within a tolerance. With a budget
(``macs``/``params`` fraction kept), a greedy walk starts from those tolerated rates and
repeatedly moves the layer whose next tested rate costs the least predicted drop per unit
of budget saved (curves made monotone by a running max; savings counted exactly for the
layer alone), until the budget is crossed; ``policy.solve_local`` then scales that profile
by one factor so the exact count lands within 1% of the target.

Single-layer drops do not add up exactly when several layers are pruned together; the
suggestion is a starting point, not a guarantee.
"""

from __future__ import annotations

import csv
import io as _io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from compressor.storage import io
from compressor.pruning import surgery
from compressor.pruning import graph
from compressor.pruning.graph import units as units_of
from compressor.pruning.size import SizeModel
from compressor.training.evaluation import evaluate, recalibrate_bn
from compressor.pruning.plan import make_plan
from compressor.pruning.policy import PolicyConfig, SizeCounter, solve_local
from compressor.pruning.rates import RateSpec

DEFAULT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CSV_FIELDS = ("unit", "rate", "width", "kept", "top1", "drop", "macs_kept", "params_kept")


@dataclass
class SensitivityResult:
    baseline_top1: float
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def units(self) -> list[str]:
        return list(dict.fromkeys(r["unit"] for r in self.rows))

    def curve(self, unit: str) -> list[tuple[float, float]]:
        return [(r["rate"], r["drop"]) for r in self.rows if r["unit"] == unit]


def compute_scores(model: nn.Module, loader_with_labels: Iterable, criterion: str, *, n_images: int, seed: int,
                   device: torch.device | str = "cpu", progress: bool = False,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scores, tiebreak) for one criterion (``scores.compute`` gives gradient criteria the labels)."""
    from compressor.pruning import scores as scores_mod

    sc = scores_mod.compute(model, loader_with_labels, [criterion], n_images=n_images, seed=seed, device=device,
                            progress=progress, options={"seed": seed})
    return sc.for_criterion(criterion), sc.tiebreak


def size_counter(model: nn.Module) -> SizeCounter:
    """Exact MACs/params at any keep counts of the model's units, from the engine's size model."""
    size = SizeModel(model, graph.discovery(model))
    return SizeCounter(counter=size.count, widths=dict(size.widths))


def unit_names(model: nn.Module) -> list[str]:
    """The units a scan can cut, in the engine's order (the rates-file keys)."""
    return [u.name for u in units_of(model)]


def analyze(model: nn.Module, scores: Mapping[str, torch.Tensor], eval_loader: Iterable,
            rates: Sequence[float] = DEFAULT_RATES, *, tiebreak: Mapping[str, torch.Tensor] | None = None,
            units: Sequence[str] | None = None, device: torch.device | str = "cpu",
            recal_loader: Iterable | None = None, recal_images: int = 512, progress: bool = False,
            ) -> SensitivityResult:
    """Drop in top-1 (percentage points) for each unit pruned alone at each rate."""
    all_units = units_of(model)
    widths = {u.name: u.width for u in all_units}
    chosen = list(units) if units else [u.name for u in all_units if u.name in scores]
    missing = [u for u in chosen if u not in widths]
    if missing:
        raise ValueError(f"unknown unit(s) {missing}")
    counter = size_counter(model)
    model = model.to(device).eval()
    base = evaluate(model, eval_loader, device)["top1"]
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, int], float] = {}
    bar = tqdm(total=len(chosen) * len(rates), desc="sensitivity", disable=not progress, leave=False)
    for unit in chosen:
        for rate in rates:
            spec = RateSpec(rates={unit: float(rate)}, round_to=graph.keep_multiple(model, unit))  # grouped: per group
            kept = spec.keep_counts({unit: widths[unit]})[unit]
            if (unit, kept) not in done:  # small layers: several rates keep the same channels
                plan = make_plan({unit: scores[unit]}, spec, {unit: widths[unit]}, tiebreak=tiebreak,
                                 model=getattr(model, "arch", ""), groups=graph.discovery(model).groups)
                pruned = surgery.apply(model, plan, verify=False).eval()
                if recal_loader is not None:
                    recalibrate_bn(pruned, recal_loader, device, max_images=recal_images)
                done[(unit, kept)] = evaluate(pruned, eval_loader, device)["top1"]
            top1 = done[(unit, kept)]
            frac = counter.fractions({unit: kept})
            rows.append({"unit": unit, "rate": float(rate), "width": widths[unit], "kept": kept, "top1": top1,
                         "drop": base - top1, "macs_kept": frac["macs"], "params_kept": frac["params"]})
            bar.update(1)
    bar.close()
    return SensitivityResult(baseline_top1=base, rows=rows,
                             meta={"rates": [float(r) for r in rates], "bn_recalibrated": recal_loader is not None})


def write_csv(result: SensitivityResult, path) -> Any:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})
    return io.write_text(path, buf.getvalue())


def plot(result: SensitivityResult, path, title: str = "") -> Any:
    """One curve per layer: drop in top-1 vs rate (matplotlib Agg, no global pyplot state)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = result.units()
    if len(names) <= 20:
        colors = [matplotlib.colormaps["tab20"](i / 20) for i in range(len(names))]
    else:
        colors = [matplotlib.colormaps["viridis"](0.9 * i / (len(names) - 1)) for i in range(len(names))]
    for unit, color in zip(names, colors):
        xs, ys = zip(*result.curve(unit))
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=unit, color=color)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("rate (fraction of the layer's filters removed)")
    ax.set_ylabel("top-1 drop (percentage points)")
    ax.set_title(title or f"per-layer sensitivity (baseline {result.baseline_top1:.2f}%)")
    ax.legend(fontsize=6, ncol=2 if len(names) > 14 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    return io.atomic_write(path, lambda fh: fh.write(buf.getvalue()))


def tolerated_rates(result: SensitivityResult, tolerance: float) -> dict[str, float]:
    """Per unit, the largest tested rate whose drop, and every smaller rate's, is ≤ tolerance."""
    out = {}
    for unit in result.units():
        best = 0.0
        for rate, drop in sorted(result.curve(unit)):
            if drop > tolerance:
                break
            best = rate
        out[unit] = best
    return out


def predicted_drop(result: SensitivityResult, unit: str, rate: float) -> float:
    """Linear interpolation of the unit's measured curve (0 at rate 0; clamped at the ends)."""
    pts = [(0.0, 0.0)] + sorted(result.curve(unit))
    for (r0, d0), (r1, d1) in zip(pts, pts[1:]):
        if r0 <= rate <= r1:
            return d0 if r1 == r0 else d0 + (d1 - d0) * (rate - r0) / (r1 - r0)
    return pts[-1][1]


def _floor6(x: float) -> float:
    return math.floor(x * 1e6) / 1e6


def greedy_profile(result: SensitivityResult, counter: SizeCounter, target: Mapping[str, float],
                   tolerance: float) -> dict[str, float]:
    """Tolerated rates, then cheapest-drop-per-saving steps along the curves until ``target`` is crossed."""
    widths = dict(counter.widths)
    curves: dict[str, list[tuple[float, float]]] = {}
    for unit in result.units():
        run, pts = 0.0, [(0.0, 0.0)]
        for rate, drop in sorted(result.curve(unit)):
            run = max(run, drop)
            pts.append((rate, run))
        curves[unit] = pts
    tol = tolerated_rates(result, tolerance)
    level = {u: max(i for i, (r, _) in enumerate(pts) if r <= tol[u]) for u, pts in curves.items()}

    def rates() -> dict[str, float]:
        return {u: curves[u][level[u]][0] if u in curves else 0.0 for u in widths}

    def keep(u: str, rate: float) -> int:
        return RateSpec(rates={u: rate}).keep_counts({u: widths[u]})[u]

    def fracs(r: Mapping[str, float]) -> dict[str, float]:
        return counter.fractions(RateSpec(rates=dict(r)).keep_counts(widths))

    while True:
        f = fracs(rates())
        ratios = {k: f[k] / v for k, v in target.items()}
        key = max(ratios, key=ratios.get)
        if ratios[key] <= 1.0:
            break
        best, best_cost = None, math.inf
        for u, pts in curves.items():
            if level[u] + 1 >= len(pts):
                continue
            (r0, d0), (r1, d1) = pts[level[u]], pts[level[u] + 1]
            gain = counter.fractions({u: keep(u, r0)})[key] - counter.fractions({u: keep(u, r1)})[key]
            cost = (d1 - d0) / gain if gain > 0 else math.inf
            if cost < best_cost or best is None:
                best, best_cost = u, cost
        if best is None:
            break
        level[best] += 1
    return rates()


def suggest(result: SensitivityResult, model: nn.Module, tolerance: float, *,
            target: Mapping[str, float] | None = None, min_keep: float = 0.1, max_keep: float = 1.0,
            ) -> tuple[RateSpec, dict[str, Any]]:
    """Rates from the curves: the tolerated rates, or for a ``target`` the greedy profile scaled to meet it."""
    units = units_of(model)
    widths = {u.name: u.width for u in units}
    profile = {u: 0.0 for u in widths}
    profile.update(tolerated_rates(result, tolerance))
    cfg = PolicyConfig(name="local", min_keep=min_keep, max_keep=max_keep)
    counter = size_counter(model)
    info: dict[str, Any] = {"tolerance_pp": tolerance, "tolerated": dict(profile)}
    if target:
        profile = greedy_profile(result, counter, target, tolerance)
        info["profile"] = dict(profile)
        counts, alpha = solve_local(counter, widths, profile, dict(target), cfg)
        info["scale"] = alpha
        info["profile_was_zero"] = not any(v > 0 for v in profile.values())
    else:
        counts = RateSpec(rates=profile).keep_counts(widths)
    rates = {u: _floor6((w - counts[u]) / w) for u, w in widths.items()}
    spec = RateSpec(rates=rates, target=dict(target) if target else None)
    if spec.keep_counts(widths) != counts:  # pragma: no cover - guards the 6-decimal rounding
        raise RuntimeError("suggested rates do not round-trip to the solved keep counts")
    info["achieved"] = counter.fractions(counts)
    info["predicted_drop_sum_pp"] = sum(predicted_drop(result, u, r) for u, r in rates.items() if u in profile
                                        and u in result.units())
    info["over_tolerance"] = [u for u in result.units() if predicted_drop(result, u, rates[u]) > tolerance]
    return spec, info


def suggestion_yaml(spec: RateSpec, info: Mapping[str, Any], model_name: str, header: str = "") -> str:
    a = info["achieved"]
    note = (f"from per-layer sensitivity: largest rate with drop <= {info['tolerance_pp']} pp per layer"
            + (f", then greedy steps along the curves and a scale of {info['scale']:.4f} to meet target "
               f"{spec.target}" if spec.target else "")
            + f"; keeps {a['macs']:.2%} of MACs and {a['params']:.2%} of params"
            + f"; sum of single-layer predicted drops {info['predicted_drop_sum_pp']:.2f} pp")
    if info.get("profile_was_zero"):
        note += "; the greedy walk chose no rate, so a uniform profile was scaled"
    if info.get("over_tolerance"):
        note += ("; layers whose measured curve predicts a drop above the tolerance at these rates: "
                 + ", ".join(info["over_tolerance"]))
    doc = {"model": model_name, "rates": {u: float(r) for u, r in spec.rates.items()}, "rounding": spec.rounding,
           "notes": note}
    head = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    return head + yaml.safe_dump(doc, sort_keys=False, width=120)
