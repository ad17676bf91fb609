"""Pruning policies: turn a rates file into exact per-layer keep counts.

``resolve(spec, model, scores)`` is called between scoring and planning. It always returns
a :class:`RateSpec` whose rates are ``(C − k) / C`` for the chosen keep count ``k`` of each
unit (``keep_floor`` rounding then gives back exactly ``k``), so ``plan.make_plan`` is
unchanged and picks the top-``k`` channels of each unit by the same order used here. What
was achieved is recorded in ``spec.extra["resolved"]`` (see :func:`describe`).

Rates-file keys read here (``rates.load_rates`` already accepts them)::

    policy: local            # default: the rates as given, one per layer
    policy: global           # one rate for the network; or a mapping:
    policy: {name: global, normalize: mean, tolerance: 0.01}
    target: {macs: 0.42}     # fraction of MACs (and/or params) *kept*, within tolerance
    target: {latency: 0.5, batch_size: 64, threads: 1, device: cpu}   # fraction of *measured* latency
    min_keep: 0.1            # per-layer fraction that always stays (≥ 1 channel)
    max_keep: 1.0            # per-layer fraction that may stay at most
    round_to: 8              # every kept width a multiple of 8 (``rates.round_keep``), in every path

**local**: without a target, the rates as given (clamped to ``min_keep``/``max_keep`` only
when the file sets them). With a target, the file's rates are a *profile* ``p`` scaled by
one factor: ``rate_i = α · p_i`` (an all-zero or absent profile means uniform, ``p_i = 1``),
clamped per layer, and ``α`` is found by bisection.

**global**: every channel of every scored unit competes in one ranking by its score after a
per-layer normalization (``normalize``):

* ``mean`` (default, Torch-Pruning's choice): divide by the layer's mean |score|;
* ``max``: divide by the layer's max |score|;
* ``l2``: divide by the layer's L2 norm;
* ``rank``: the channel's rank in its layer / (C − 1), i.e. near-uniform rates;
* ``none``: raw scores (only sensible for criteria already comparable across layers).

Each layer first drops what ``max_keep`` forces, then channels are removed lowest score
first, skipping layers that reached ``min_keep``, so no layer is emptied. The global rate
is ``default`` or, for a per-layer list, its width-weighted mean (same number of channels
removed). With a target, the number of channels removed is found by bisection.

Sizes are counted exactly, for any model, by the one size model ``pruning.size.SizeModel``
(built from the dependency graph and one forward pass; arithmetic per candidate, no model
built): its counts are those ``counting.count`` gives on the model surgery builds (checked in
the tests). Callers that already have it pass it as ``counter``; any other callable
``counter`` (keep counts per unit → ``{"macs", "params"}``) with ``widths`` replaces it for MACs/params.
A target is met when the achieved fraction is within ``tolerance`` (relative, default 1%) of
it; otherwise ``UserError`` says what the closest reachable figures are.

**round_to N** rounds every candidate's keep counts (``rates.round_keep``) before it is counted,
so both solvers search only widths that are multiples of N; the rounded model is what must meet
the budget. Units tied into one channel space (residual groups, concat inputs) are single units,
so one rounding per unit keeps them consistent.

**latency**: the fraction of the model's latency kept, predicted from a measured per-conv table
(``latency_table.LatencyTable``: measured once per machine/threads/batch, cached on disk) and solved
like the size budgets. Each conv's (and Linear's) shape at any keep counts comes from the same
``SizeModel`` (``SizeModel.conv_shapes``), so it works for every model the engine prunes. With the
real timer the candidate is then cut (``surgery.cut``), timed against the model, and the target
asked of the table corrected (``_refine_latency``). ``latency_table.verify_spec`` times the pruned model
afterwards and prints predicted vs measured.
**Grouped convs**: a unit whose channels a grouped conv reads or makes (``Discovery.groups``) keeps
a multiple of lcm(round_to, groups) channels in every path (``PolicyConfig.step``), and the plan keeps
the same number in every group. Where the solver's path moves several such units at once and the two
configurations around the target both miss the tolerance, it walks up from the one under the budget
by the cheapest single step until the budget is crossed (``_finest_crossing``).

Layout: ``policy_size`` (the size view: ``SizeCounter``, unit widths and groups), ``policy_solve``
(``PolicyConfig`` and the local and global solvers), ``policy_latency`` (latency tables and the timed
loop); this module applies them (``resolve``, ``describe``). Every public name stays importable here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from compressor.pruning import counting
from compressor.errors import UserError
from compressor.pruning.size import SizeModel
from compressor.pruning.rates import RateSpec, short
from compressor.pruning import policy_latency as _latency
from compressor.pruning.policy_latency import LatencyHooks, _refine_latency, _solve_widening, attach_latency
from compressor.pruning.policy_latency import measured_fraction, shrunk
from compressor.pruning.policy_size import BUDGETS, SizeCounter, achieved, engine_counter, keep_counts_for
from compressor.pruning.policy_size import size_model, unit_groups, unit_widths
from compressor.pruning.policy_solve import NORMALIZERS, POLICIES, CoarseSteps, GlobalOrder, PolicyConfig
from compressor.pruning.policy_solve import _ratio, _rounded, global_order, normalized, policy_config, precheck
from compressor.pruning.policy_solve import solve_global, solve_local

__all__ = [  # the names this module has always had (now defined in policy_size/_solve/_latency)
    "BUDGETS", "NORMALIZERS", "POLICIES", "TARGETS", "CoarseSteps", "GlobalOrder", "LatencyHooks", "PolicyConfig",
    "SizeCounter", "achieved", "attach_latency", "describe", "engine_counter", "global_order", "keep_counts_for",
    "measured_fraction", "normalized", "policy_config", "precheck", "resolve", "shrunk", "size_model",
    "solve_global", "solve_local", "unit_groups", "unit_widths",
]
# the latency loop's curve helpers, read by its tests under their old names
_curve, _first_slope, _measured_at, _table_at = (_latency._curve, _latency._first_slope, _latency._measured_at,
                                                 _latency._table_at)

log = logging.getLogger("compressor")

TARGETS = ("macs", "params", "latency")  # what a target may ask for


@dataclass
class _Problem:
    """What one ``resolve`` solves: the spec, the size view, the units' widths, scores, and the record."""

    spec: RateSpec
    size: SizeCounter
    widths: dict[str, int]
    scores: Mapping[str, torch.Tensor] | None
    tiebreak: Mapping[str, torch.Tensor] | None
    has_target: bool
    info: dict[str, Any]

    def counts(self, tgt: Mapping[str, float], cfg: PolicyConfig) -> dict[str, int]:
        return _local_counts(self, cfg, tgt) if cfg.name == "local" else _global_counts(self, cfg, tgt)


def resolve(spec: RateSpec, model: nn.Module | None, scores: Mapping[str, torch.Tensor] | None = None, *,
            tiebreak: Mapping[str, torch.Tensor] | None = None,
            counter: SizeModel | Callable[[Mapping[str, int]], Mapping[str, int]] | None = None,
            widths: Mapping[str, int] | None = None, device: str = "cpu",
            latency: LatencyHooks | None = None, **latency_keywords: Any) -> RateSpec:
    """Apply the rates file's policy and budget; return exact per-layer rates (see module doc).

    ``counter``: the model's ``SizeModel`` (or its bound ``count``), so it is not built twice; by
    default it is built from ``model``. Any other callable (keep counts of every unit →
    ``{"macs", "params"}``) is used for MACs/params as given, with its ``widths``; a latency budget
    then takes the conv shapes from ``model``'s ``SizeModel``. ``widths``: the units' widths (default:
    the size model's). ``device`` is the run's device (a latency budget's default). ``latency``
    (``LatencyHooks``) injects the timer, the conv shapes, the cache switch, the model's constant part
    and the number of timed re-solves (tests, engines); the older ``latency_timer=``, ``latency_shapes=``,
    ``latency_cache=``, ``latency_overhead_ms=`` and ``latency_refine=`` keywords say the same.
    """
    hooks = LatencyHooks.of(latency, latency_keywords)
    cfg = policy_config(spec)
    if cfg.name == "obs":
        raise UserError("policy obs allocates by the reconstruction's error: it needs criterion obs and calibration "
                        "images (--criterion obs; compressor.prune(..., criterion='obs', calibration=batches))",
                        source=spec.source, field="policy")
    if counter is None and model is None:
        raise ValueError("resolve needs a model or a counter")
    size = SizeCounter(model, counter=counter, widths=widths)
    widths = dict(size.widths)
    cfg = replace(cfg, multiples=unit_groups(model, widths))
    target = dict(spec.target or {})
    for k in target:
        if k not in TARGETS:
            raise UserError(f"unknown budget {short(k)}; valid: {', '.join(TARGETS)}", source=spec.source,
                            field="target")
    info: dict[str, Any] = {"policy": cfg.name, "min_keep": cfg.min_keep, "max_keep": cfg.max_keep,
                            "target": target or None, "tolerance": cfg.tolerance}
    if cfg.round_to > 1:
        info["round_to"] = cfg.round_to
    if cfg.multiples:  # read by ``plan.make_plan``: the same number kept in every group
        info["groups"] = dict(cfg.multiples)
    if "latency" in target:
        info["latency"] = attach_latency(size, spec, model, device, timer=hooks.timer, shapes=hooks.shapes,
                                         cache=hooks.cache, overhead_ms=hooks.overhead_ms)
    job = _Problem(spec, size, widths, scores, tiebreak, bool(target), info)

    def solve(tgt: Mapping[str, float], c: PolicyConfig = cfg) -> dict[str, int]:
        return job.counts(tgt, c)

    counts = _solve_widening(solve, target, cfg) if "latency" in target else solve(target)
    if "latency" in target and hooks.refine and hooks.timer is None and model is not None:
        counts = _refine_latency(size, model, counts, target, cfg, solve, info, hooks.refine)
    _record_achieved(info, size, counts, widths, target, cfg)
    if (cfg.name == "local" and not target and not cfg.bounds_given
            and counts == spec.keep_counts(widths)):  # keep the file's own rates on record
        return RateSpec(rates=dict(spec.rates), rounding=spec.rounding, source=spec.source, target=spec.target,
                        extra={**spec.extra, "resolved": info}, round_to=spec.round_to,
                        latency_options=spec.latency_options)
    return _exact_spec(spec, widths, counts, info)


def _exact_spec(spec: RateSpec, widths: Mapping[str, int], counts: Mapping[str, int], info: dict) -> RateSpec:
    rates = {u: (w - counts[u]) / w for u, w in widths.items()}
    out = RateSpec(rates=rates, rounding="keep_floor", source=spec.source, target=spec.target,
                   extra={**spec.extra, "resolved": info}, round_to=spec.round_to,
                   latency_options=spec.latency_options)
    got = out.keep_counts(dict(widths))
    if got != dict(counts):  # pragma: no cover - guards the (C−k)/C round trip
        raise RuntimeError(f"rate round trip lost channels: {got} != {dict(counts)}")
    return out


def _local_counts(job: _Problem, cfg: PolicyConfig, tgt: Mapping[str, float]) -> dict[str, int]:
    """Per-layer rates as given, or (with a budget) scaled uniformly until the budget is met."""
    spec, widths = job.spec, job.widths
    if job.has_target:
        counts, alpha = solve_local(job.size, widths, spec.rates, tgt, cfg, spec.rounding)
        job.info["scale"] = alpha
        job.info["profile"] = "uniform" if not any(v > 0 for v in spec.rates.values()) else "rates file"
        return counts
    counts = spec.keep_counts(widths)
    if cfg.bounds_given:
        return {u: cfg.clamp(widths[u], k, unit=u) for u, k in counts.items()}
    # grouped units: the file's counts rounded to a multiple of their groups (nothing else changes)
    return {u: cfg.clamp(widths[u], k, bounded=False, unit=u) if cfg.step(u) > cfg.round_to else k
            for u, k in counts.items()}


def _global_counts(job: _Problem, cfg: PolicyConfig, tgt: Mapping[str, float]) -> dict[str, int]:
    """Channels ranked across layers; the budget (or the file's mean rate) decides how many go."""
    spec, widths, info = job.spec, job.widths, job.info
    if job.scores is None:
        raise UserError("policy global needs scores (it ranks channels across layers)", field="policy")
    info["normalize"] = cfg.normalize
    order = global_order(job.scores, widths, cfg, job.tiebreak)
    skipped = [u for u in widths if u not in order.start]
    if skipped:
        info["unscored_units_kept_whole"] = skipped
        log.info("policy global: %d unit(s) without scores are kept whole", len(skipped))
    scored_total = sum(widths[u] for u in order.start)
    mandatory = sum(widths[u] - order.start[u] for u in order.start)
    if job.has_target:
        counts, _ = solve_global(job.size, order, tgt, cfg, widths)
    else:
        rate = sum(spec.rates[u] * widths[u] for u in order.start) / max(1, scored_total)
        n = round(rate * scored_total) - mandatory
        if not 0 <= n <= len(order.sequence):
            lo = mandatory / scored_total
            hi = (mandatory + len(order.sequence)) / scored_total
            raise UserError(f"global rate {rate:.4f} is outside what min_keep={cfg.min_keep} and "
                            f"max_keep={cfg.max_keep} allow ({lo:.4f} … {hi:.4f})", source=spec.source,
                            field="rates")
        counts = _rounded(order, widths, cfg, n)
        info["global_rate_asked"] = rate
    counts = {u: counts.get(u, w) for u, w in widths.items()}
    info["global_rate"] = sum(widths[u] - counts[u] for u in order.start) / max(1, scored_total)
    return counts


def _record_achieved(info: dict[str, Any], size: SizeCounter, counts: Mapping[str, int],
                     widths: Mapping[str, int], target: Mapping[str, float], cfg: Any) -> None:
    """What the resolved counts give: fractions kept, sizes, predicted/measured latency, whether met."""
    info["achieved"] = size.fractions(counts)
    info["size"] = dict(size(counts))
    info["base_size"] = dict(size.base)
    info["channels_kept"] = sum(counts.values()) / sum(widths.values())
    if size.latency is not None:
        info["latency"]["predicted_ms"] = size.latency.predict(counts)
        if "measured_fraction" in info["latency"]:  # judged on what was measured, not on the table
            info["achieved"]["latency_predicted"] = info["achieved"]["latency"]
            info["achieved"]["latency"] = info["latency"]["measured_fraction"]
    if target:
        info["met"] = abs(_ratio(info["achieved"], target) - 1.0) <= cfg.tolerance


def describe(spec: RateSpec) -> str:
    """One line: policy, channels removed and the achieved MACs/params (vs the target)."""
    r = spec.extra.get("resolved")
    if not r:
        return "policy local (rates as given)"
    head = f"policy {r['policy']}" + (f" (normalize {r['normalize']})" if "normalize" in r else "")
    a, s, b = r["achieved"], r["size"], r["base_size"]
    line = (f"{head}: keeps {r['channels_kept']:.1%} of channels, {a['macs']:.2%} of MACs "
            f"({counting.fmt_m(s['macs'])} of {counting.fmt_m(b['macs'])}), {a['params']:.2%} of params "
            f"({counting.fmt_m(s['params'])} of {counting.fmt_m(b['params'])})")
    if "latency" in a:
        li = r.get("latency") or {}
        how = "measured" if "measured_fraction" in li else "predicted"
        line += (f", {a['latency']:.2%} of {how} latency (table: {li.get('predicted_ms', 0):.2f} of "
                 f"{li.get('predicted_full_ms', 0):.2f} ms; {li.get('device')} batch {li.get('batch_size')}, "
                 f"{li.get('threads')} thread(s))")
    if r.get("round_to"):
        line += f", widths rounded to multiples of {r['round_to']}"
    if r.get("groups"):
        line += f", {len(r['groups'])} unit(s) read by grouped convs cut the same number per group"
    if r.get("target"):
        t = ", ".join(f"{k} {v:.4f}" for k, v in r["target"].items())
        line += f"; target {t}: " + ("met" if r.get("met") else "NOT met") + f" within {r['tolerance']:.0%}"
    return line
