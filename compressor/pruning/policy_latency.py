"""Latency budgets: the measured per-conv table a budget is solved with, and the closed loop that times
candidate models against the model and corrects what is asked of the table (``_refine_latency``).
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from compressor.deploy import latency as lat
from compressor.deploy import latency_table as lt
from compressor.errors import UserError
from compressor.pruning.graph import balanced_keep
from compressor.pruning.plan import Plan
from compressor.pruning.policy_size import SizeCounter, unit_groups, unit_widths
from compressor.pruning.policy_solve import CoarseSteps, PolicyConfig
from compressor.pruning.rates import RateSpec

log = logging.getLogger("compressor")


def attach_latency(counter: SizeCounter, spec: RateSpec, model: nn.Module | None, device: str = "cpu", *,
                   timer: lt.Timer | None = None,
                   shapes: Callable[[Mapping[str, int]], Mapping[str, lt.ConvShape]] | None = None,
                   cache: bool = True, overhead_ms: float | None = None) -> dict[str, Any]:
    """Measure (or read from the cache) the per-conv latency table a latency budget is solved with.

    Defaults: batch 1, torch's current thread count, the run's ``device``. The constant part of the
    model (pooling, linear, adds) is the whole model's measured time minus its convs', unless a stub
    ``timer`` is given (then 0) or ``overhead_ms`` says it.
    """
    opts = dict(spec.latency_options or {})
    dev = str(opts.get("device", device))
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"a latency budget on {dev} needs a GPU, and none is available here", source=spec.source,
                        field="target.device")
    settings = lt.MeasureSettings(batch_size=int(opts.get("batch_size", 1)),
                                   threads=int(opts.get("threads", torch.get_num_threads())), device=dev)
    if shapes is None:
        if not counter.has_shapes:
            raise UserError("a latency budget needs the model's conv shapes at any widths: pass the model (or "
                            "latency_shapes=) to policy.resolve", field="target.latency")
        shapes = counter.conv_shapes
    table = lt.LatencyTable(shapes, counter.widths, settings, timer=timer, cache=cache)
    if overhead_ms is not None:
        table.overhead_ms = float(overhead_ms)
        table.full_ms = table.predict(table.widths)
    elif timer is None and model is not None:
        import copy

        probe = copy.deepcopy(model)
        cfg = lat.LatencyConfig(batch_sizes=(settings.batch_size,), warmup=2, repeats=7, threads=settings.threads,
                                cuda=False)
        t = lat.measure(probe, model.input_size, cfg, dev)[settings.batch_size]
        table.fit_overhead(t.median_ms)
    counter.latency = table
    info = table.info()
    log.info("latency table: %d convs on %s, batch %d, %d thread(s): %d timed, %d from the cache (%s) in %.1fs",
             info["convs"], dev, settings.batch_size, settings.threads, info["cache_misses"], info["cache_hits"],
             info["cache"], info["build_s"])
    return info


def shrunk(model: nn.Module, counts: Mapping[str, int]) -> nn.Module:
    """A copy of ``model`` cut to ``counts`` (the first channels of each unit kept, of each group for units a
    grouped conv reads: only shapes matter)."""
    from compressor.pruning import surgery

    widths = unit_widths(model)
    groups = unit_groups(model, widths)
    keep = {u: balanced_keep(range(widths[u]), int(k), widths[u], groups.get(u, 1))
            for u, k in counts.items() if u in widths and int(k) < widths[u]}
    return surgery.cut(model, Plan(keep=keep, widths=widths, model=str(getattr(model, "arch", ""))))[0]


def measured_fraction(model: nn.Module, counts: Mapping[str, int], settings: lt.MeasureSettings,
                      repeats: int = 11, max_repeats: int = 55, rel_se: float = 0.01) -> float:
    """Measured latency of ``model`` cut to ``counts`` ÷ the model's, on any model.

    Both are timed interleaved, ``repeats`` rounds at a time, and the per-round ratios pooled (their
    median: ``latency.paired_fraction``) until the standard error of the median is under ``rel_se`` of
    it or ``max_repeats`` rounds are done: a loaded machine is timed longer, a quiet one is not.
    """
    import copy

    small = shrunk(model, counts)
    base = copy.deepcopy(model)
    cfg = lat.LatencyConfig(batch_sizes=(settings.batch_size,), warmup=2, repeats=repeats, threads=settings.threads,
                            cuda=False, channels_last=settings.channels_last)
    ratios: list[float] = []
    while True:
        res = lat.compare({"base": base, "cand": small}, model.input_size, cfg, settings.device)
        tb, tc = res["base"][settings.batch_size], res["cand"][settings.batch_size]
        ratios += [c / b for c, b in zip(tc.samples_ms, tb.samples_ms) if b > 0]
        med = statistics.median(ratios)
        se = 1.2533 * statistics.pstdev(ratios) / math.sqrt(len(ratios))  # of the median, as for a normal
        if se <= rel_se * med or len(ratios) >= max_repeats:
            return med
        cfg = replace(cfg, warmup=0)


def _curve(history: Sequence[Mapping[str, float]]) -> list[tuple[float, float]]:
    """Measured fraction as a non-decreasing function of the table's, through the timed candidates and
    the model itself (1, 1): points sorted by the table's fraction, neighbours that disagree in order
    (a disturbed timing) pooled into their mean."""
    blocks: list[list[float]] = []  # [sum p, sum m, n]
    for p, m in sorted([(h["predicted"], h["measured"]) for h in history] + [(1.0, 1.0)]):
        blocks.append([p, m, 1.0])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last)]
    return [(sp / n, sm / n) for sp, sm, n in blocks]


def _first_slope(curve: Sequence[tuple[float, float]]) -> float:
    """Measured per predicted below the lowest point: its first segment's, kept within [0.5, 2] (a table is
    not off by more than 2× in what pruning saves; a steeper or flatter segment is a disturbed timing)."""
    (p0, m0), (p1, m1) = curve[0], curve[1]
    return min(2.0, max(0.5, (m1 - m0) / (p1 - p0))) if p1 > p0 else 1.0


def _measured_at(curve: Sequence[tuple[float, float]], p: float) -> float:
    """The curve at the table's fraction ``p`` (linear between points, the first slope below them)."""
    if len(curve) < 2 or p <= curve[0][0]:
        return curve[0][1] - (curve[0][0] - p) * (_first_slope(curve) if len(curve) > 1 else 1.0)
    for (p0, m0), (p1, m1) in zip(curve, curve[1:]):
        if p <= p1:
            return m0 + (m1 - m0) * (p - p0) / (p1 - p0) if p1 > p0 else m1
    return curve[-1][1]


def _table_at(curve: Sequence[tuple[float, float]], want: float) -> float:
    """The table's fraction at which the curve reaches ``want`` (what to ask of the table)."""
    if len(curve) < 2 or want <= curve[0][1]:
        return curve[0][0] - (curve[0][1] - want) / (_first_slope(curve) if len(curve) > 1 else 1.0)
    for (p0, m0), (p1, m1) in zip(curve, curve[1:]):
        if want <= m1:
            return p0 + (p1 - p0) * (want - m0) / (m1 - m0) if m1 > m0 else p0
    return curve[-1][0]


def _solve_widening(solve: Callable[..., dict[str, int]], target: Mapping[str, float],
                    cfg: PolicyConfig) -> dict[str, int]:
    """``solve`` within the tolerance, else (steps too coarse for it) within 3× then 10× of it.

    For latency targets: a measured table is not smooth in the widths, and the figure judged in the
    end is measured, not the table's; ``met`` in the record still says whether the tolerance held.
    """
    first: CoarseSteps | None = None
    for widen in (1.0, 3.0, 10.0):
        try:
            return solve(target, replace(cfg, tolerance=min(0.5, cfg.tolerance * widen)))
        except CoarseSteps as exc:
            first = first or exc
    raise first  # type: ignore[misc]


def _refine_latency(size: SizeCounter, model: nn.Module, counts: dict[str, int], target: Mapping[str, float],
                    cfg: PolicyConfig, solve: Callable[..., dict[str, int]], info: dict,
                    rounds: int) -> dict[str, int]:
    """Close the loop: time candidates against the model, learn what the table's fractions measure, re-solve.

    A per-conv table timed in isolation misses what the whole network pays (cache traffic between
    layers, weights that no longer stay in cache, kernels that work on blocks of 8 or 16 channels) and
    its constant part is one noisy timing, so its fraction can be off by 10–30%, and not by one factor
    (narrow layers save little until whole channel blocks go). Every timed candidate is a point (the
    table's fraction ``p``, the measured ``m``); with the model itself (1, 1) they make a non-decreasing
    curve (``_curve``: a disturbed timing out of order is pooled with its neighbour, not selected),
    which is inverted at the target (``_table_at``) to ask the table again. ``rounds + 1`` candidates
    are timed and the counts solved after the last one are returned, with the curve's value at them
    recorded as ``measured_fraction``: it rests on the timings, not on the table alone. Where the asked
    fraction cannot be met within ``tolerance`` (coarse channel steps) it is solved within 3× then 10× of
    it (``_solve_widening``), else the timed candidate the curve puts closest to the target is kept.
    """
    want = target["latency"]
    table = size.latency
    asked = want
    history: list[dict[str, float]] = []
    timed: list[dict[str, int]] = []
    curve: list[tuple[float, float]] = [(1.0, 1.0)]
    for _ in range(rounds + 1):
        meas = measured_fraction(model, counts, table.settings)
        timed.append(counts)
        history.append({"asked_of_table": asked, "predicted": table.fraction(counts), "measured": meas})
        curve = _curve(history)
        asked = min(1.0, max(1e-3, _table_at(curve, want)))
        try:
            counts = _solve_widening(solve, {**target, "latency": asked}, cfg)
        except UserError:  # keep the timed candidate the curve puts closest to the target
            counts = min(timed, key=lambda c: abs(_measured_at(curve, table.fraction(c)) - want))
            break
    est = _measured_at(curve, table.fraction(counts))
    info["latency"]["refine"] = history
    info["latency"]["measured_fraction"] = est
    log.info("latency: %.4f of the baseline (target %.4f; the table alone says %.4f), from %d timed candidate(s)",
             est, want, table.fraction(counts), len(history))
    return counts


@dataclass(frozen=True)
class LatencyHooks:
    """How a latency budget is measured, for tests and engines (the defaults: the real timer, cached).

    ``timer`` stands in for timing each conv; ``shapes`` gives the conv shapes at any widths (else the
    size model's); ``cache`` switches the on-disk table cache; ``overhead_ms`` is the model's constant
    part (else measured); ``refine``: with the real timer, up to this many re-solves after timing the
    candidate model itself (``_refine_latency``), 0 trusts the table alone.
    """

    timer: lt.Timer | None = None
    shapes: Callable[[Mapping[str, int]], Mapping[str, lt.ConvShape]] | None = None
    cache: bool = True
    overhead_ms: float | None = None
    refine: int = 2

    @classmethod
    def of(cls, hooks: "LatencyHooks | None", legacy: Mapping[str, Any]) -> "LatencyHooks":
        """``hooks``, or one made of ``resolve``'s older ``latency_timer=`` … ``latency_refine=`` keywords."""
        names = {f"latency_{f}": f for f in ("timer", "shapes", "cache", "overhead_ms", "refine")}
        unknown = sorted(set(legacy) - set(names))
        if unknown:
            raise TypeError(f"resolve() got unexpected keyword argument(s) {', '.join(unknown)}")
        if hooks is not None and legacy:
            raise TypeError("pass latency=LatencyHooks(...) or the latency_* keywords, not both")
        return hooks or cls(**{names[k]: v for k, v in legacy.items()})
