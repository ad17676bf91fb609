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
    min_keep: 0.1            # per-layer fraction that always stays (≥ 1 channel)
    max_keep: 1.0            # per-layer fraction that may stay at most

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

Sizes are counted exactly: the reduced cfg is built on PyTorch's ``meta`` device (no
memory, no weights) and counted with ``counting.count``; the shapes, hence the counts, are
those of ``surgery.rebuild`` (checked in the tests). A target is met when the achieved
fraction is within ``tolerance`` (relative, default 1%) of it; otherwise ``UserError`` says
what the closest reachable figures are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compressor import counting
from compressor.errors import UserError
from compressor.models import get_model
from compressor.models._spec import cfg_with_widths
from compressor.plan import rank_order
from compressor.rates import RateSpec, n_keep

log = logging.getLogger("compressor")

POLICIES = ("local", "global")
NORMALIZERS = ("mean", "max", "l2", "rank", "none")
BUDGETS = ("macs", "params")


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "local"
    normalize: str = "mean"
    min_keep: float = 0.1
    max_keep: float = 1.0
    tolerance: float = 0.01
    bounds_given: bool = False

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise UserError(f"unknown policy {self.name!r}; valid: {', '.join(POLICIES)}", field="policy")
        if self.normalize not in NORMALIZERS:
            raise UserError(f"unknown normalization {self.normalize!r}; valid: {', '.join(NORMALIZERS)}",
                            field="policy.normalize")
        if not 0.0 <= self.min_keep <= self.max_keep <= 1.0 or self.max_keep <= 0.0:
            raise UserError(f"need 0 <= min_keep <= max_keep <= 1 and max_keep > 0, got {self.min_keep} and "
                            f"{self.max_keep}", field="min_keep")
        if not 0.0 < self.tolerance < 1.0:
            raise UserError(f"tolerance must be in (0, 1), got {self.tolerance}", field="policy.tolerance")

    def bounds(self, width: int) -> tuple[int, int]:
        """(fewest, most) channels a layer of ``width`` may keep; never fewer than 1."""
        lo = max(1, math.ceil(self.min_keep * width - 1e-9))
        hi = max(lo, min(width, math.floor(self.max_keep * width + 1e-9)))
        return lo, hi


def _number(v: Any, source: str, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"must be a number, got {v!r}", source=source, field=field)
    return float(v)


def policy_config(spec: RateSpec) -> PolicyConfig:
    """Read and validate ``policy``/``min_keep``/``max_keep`` of a rates file."""
    raw = spec.extra.get("policy", "local")
    opts: dict[str, Any] = {}
    if isinstance(raw, str):
        opts["name"] = raw
    elif isinstance(raw, Mapping):
        unknown = set(raw) - {"name", "normalize", "tolerance"}
        if unknown:
            raise UserError(f"unknown policy option(s) {sorted(unknown)}; valid: name, normalize, tolerance",
                            source=spec.source, field="policy")
        opts["name"] = raw.get("name", "local")
        if "normalize" in raw:
            opts["normalize"] = raw["normalize"]
        if "tolerance" in raw:
            opts["tolerance"] = _number(raw["tolerance"], spec.source, "policy.tolerance")
    else:
        raise UserError(f"must be 'local', 'global' or a mapping, got {raw!r}", source=spec.source, field="policy")
    for key in ("min_keep", "max_keep"):
        if key in spec.extra:
            opts[key] = _number(spec.extra[key], spec.source, key)
    opts["bounds_given"] = "min_keep" in spec.extra or "max_keep" in spec.extra
    try:
        return PolicyConfig(**opts)
    except UserError as exc:
        raise UserError(str(exc), source=spec.source, field=exc.field) from None


class SizeCounter:
    """Exact MACs/params of the model at given keep counts (reduced cfg built on ``meta``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.units = list(model.prunable_units())
        self._cache: dict[tuple[int, ...], dict[str, int]] = {}
        self.base = self({})

    def cfg_for(self, keep: Mapping[str, int]) -> list:
        return cfg_with_widths(self.model, keep)

    def __call__(self, keep: Mapping[str, int]) -> dict[str, int]:
        key = tuple(int(keep.get(u.name, u.width)) for u in self.units)
        if key not in self._cache:
            with torch.device("meta"):
                m = get_model(self.model.arch, num_classes=self.model.num_classes, cfg=self.cfg_for(keep))
            self._cache[key] = counting.count(m, self.model.input_size)
        return self._cache[key]

    def fractions(self, keep: Mapping[str, int]) -> dict[str, float]:
        c = self(keep)
        return {k: c[k] / self.base[k] for k in BUDGETS}


# ---------------------------------------------------------------- global ranking


def normalized(score: torch.Tensor, how: str) -> np.ndarray:
    """Per-layer normalization for the global ranking (see the module docstring)."""
    s = score.detach().double().cpu().numpy()
    if how == "none":
        return s
    denom = {"mean": np.abs(s).mean(), "max": np.abs(s).max(), "l2": np.sqrt((s * s).sum())}[how]
    return s / denom if denom > 0 else np.zeros_like(s)


@dataclass(frozen=True)
class GlobalOrder:
    """The network-wide removal sequence: mandatory drops first, then one merged ranking."""

    start: dict[str, int]  # keep counts after the mandatory (max_keep) drops
    sequence: tuple[str, ...]  # unit of each further removal, lowest normalized score first

    def counts(self, n_remove: int) -> dict[str, int]:
        keep = dict(self.start)
        for unit in self.sequence[:n_remove]:
            keep[unit] -= 1
        return keep


def global_order(scores: Mapping[str, torch.Tensor], widths: Mapping[str, int], cfg: PolicyConfig,
                 tiebreak: Mapping[str, torch.Tensor] | None = None) -> GlobalOrder:
    """Merge every layer's removal order by normalized score (ties: position in layer, layer order)."""
    start: dict[str, int] = {}
    cands: list[tuple[float, int, int, str]] = []
    for li, (unit, width) in enumerate(widths.items()):
        if unit not in scores:
            continue
        s = scores[unit]
        if s.numel() != width:
            raise UserError(f"scores for {unit!r} have {s.numel()} entries, the layer has {width} channels",
                            field=unit)
        lo, hi = cfg.bounds(width)
        start[unit] = hi
        order = rank_order(s, tiebreak.get(unit) if tiebreak else None)  # most -> least important
        removal = order[::-1]  # least important first; the plan keeps the top-k of ``order``
        if cfg.normalize == "rank":  # position in the tie-broken order, 0 (least important) .. 1
            norm = np.empty(width)
            norm[removal] = np.arange(width) / max(1, width - 1)
        else:
            norm = normalized(s, cfg.normalize)
        for j in range(width - hi, width - lo):
            cands.append((float(norm[removal[j]]), j, li, unit))
    cands.sort(key=lambda c: c[:3])
    return GlobalOrder(start=start, sequence=tuple(c[3] for c in cands))


# ---------------------------------------------------------------- solving


def _ratio(frac: Mapping[str, float], target: Mapping[str, float]) -> float:
    """> 1 when some budget is exceeded; the binding budget decides."""
    return max(frac[k] / v for k, v in target.items())


def _pick(counter: SizeCounter, target: Mapping[str, float], tol: float,
          candidates: Sequence[dict[str, int]], how: str) -> dict[str, int]:
    """The candidate within tolerance of the target, preferring one that does not exceed it."""
    rated = [(c, _ratio(counter.fractions(c), target)) for c in candidates]
    ok = sorted((r > 1.0, abs(r - 1.0), i) for i, (c, r) in enumerate(rated) if abs(r - 1.0) <= tol)
    if ok:
        return rated[ok[0][2]][0]
    figs = ", ".join(f"{k} " + " or ".join(f"{counter.fractions(c)[k]:.4f}" for c, _ in rated) for k in target)
    raise UserError(f"cannot meet target {dict(target)} within {tol:.1%} with the {how}: the closest kept "
                    f"fractions are {figs} (one channel step is too coarse here, or a bound stops it); loosen "
                    "policy.tolerance or min_keep/max_keep, or change the rate profile", field="target")


def _bisect_int(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Smallest n in [lo, hi] with ok(n), for ok monotone (False… then True…); ok(hi) must hold."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def solve_local(counter: SizeCounter, widths: Mapping[str, int], profile: Mapping[str, float],
                target: Mapping[str, float], cfg: PolicyConfig, rounding: str = "keep_floor",
                ) -> tuple[dict[str, int], float]:
    """Scale the rate profile by one factor α (bisection) until the budget is met."""
    prof = dict(profile) if any(v > 0 for v in profile.values()) else {u: 1.0 for u in widths}
    bounds = {u: cfg.bounds(w) for u, w in widths.items()}

    def counts(alpha: float) -> dict[str, int]:
        out = {}
        for u, w in widths.items():
            k = n_keep(w, min(1.0, alpha * prof.get(u, 0.0)), rounding)
            out[u] = min(max(k, bounds[u][0]), bounds[u][1])
        return out

    def ratio(alpha: float) -> float:
        return _ratio(counter.fractions(counts(alpha)), target)

    a_hi = 1.0 / min(v for v in prof.values() if v > 0) + 1e-6
    if ratio(a_hi) > 1.0 + cfg.tolerance:
        fr = counter.fractions(counts(a_hi))
        raise UserError(f"target {dict(target)} is out of reach: with every layer at min_keep={cfg.min_keep} the "
                        f"model still keeps " + ", ".join(f"{k} {fr[k]:.4f}" for k in target), field="target")
    if ratio(0.0) <= 1.0:  # max_keep alone already meets (or undershoots) the budget
        return _pick(counter, target, cfg.tolerance, [counts(0.0)], "rate profile"), 0.0
    lo, hi = 0.0, a_hi  # invariant: ratio(lo) > 1 >= ratio(hi), unless ratio(a_hi) is just above 1
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if ratio(mid) > 1.0:
            lo = mid
        else:
            hi = mid
    chosen = _pick(counter, target, cfg.tolerance, [counts(hi), counts(lo)], "rate profile")
    return chosen, hi if chosen == counts(hi) else lo


def solve_global(counter: SizeCounter, order: GlobalOrder, target: Mapping[str, float], cfg: PolicyConfig,
                 ) -> tuple[dict[str, int], int]:
    """Remove channels in global order until the budget is met (bisection on how many)."""
    n_max = len(order.sequence)

    def ratio(n: int) -> float:
        return _ratio(counter.fractions(order.counts(n)), target)

    if ratio(n_max) > 1.0 + cfg.tolerance:
        fr = counter.fractions(order.counts(n_max))
        raise UserError(f"target {dict(target)} is out of reach: with every layer at min_keep={cfg.min_keep} the "
                        f"model still keeps " + ", ".join(f"{k} {fr[k]:.4f}" for k in target), field="target")
    if ratio(n_max) > 1.0:
        return order.counts(n_max), n_max
    n = _bisect_int(0, n_max, lambda i: ratio(i) <= 1.0)
    cands = [order.counts(n)] + ([order.counts(n - 1)] if n > 0 else [])
    chosen = _pick(counter, target, cfg.tolerance, cands, "global ranking")
    return chosen, n if chosen == cands[0] else n - 1


# ---------------------------------------------------------------- entry point


def _exact_spec(spec: RateSpec, widths: Mapping[str, int], counts: Mapping[str, int], info: dict) -> RateSpec:
    rates = {u: (w - counts[u]) / w for u, w in widths.items()}
    out = RateSpec(rates=rates, rounding="keep_floor", source=spec.source, target=spec.target,
                   extra={**spec.extra, "resolved": info})
    got = out.keep_counts(dict(widths))
    if got != dict(counts):  # pragma: no cover - guards the (C−k)/C round trip
        raise RuntimeError(f"rate round trip lost channels: {got} != {dict(counts)}")
    return out


def resolve(spec: RateSpec, model: nn.Module, scores: Mapping[str, torch.Tensor] | None = None, *,
            tiebreak: Mapping[str, torch.Tensor] | None = None) -> RateSpec:
    """Apply the rates file's policy and budget; return exact per-layer rates (see module doc)."""
    cfg = policy_config(spec)
    units = list(model.prunable_units())
    widths = {u.name: u.width for u in units}
    target = dict(spec.target or {})
    for k in target:
        if k not in BUDGETS:
            raise UserError(f"unknown budget {k!r}; valid: {', '.join(BUDGETS)}", source=spec.source, field="target")
    counter = SizeCounter(model)
    info: dict[str, Any] = {"policy": cfg.name, "min_keep": cfg.min_keep, "max_keep": cfg.max_keep,
                            "target": target or None, "tolerance": cfg.tolerance}
    if cfg.name == "local":
        if target:
            counts, alpha = solve_local(counter, widths, spec.rates, target, cfg, spec.rounding)
            info["scale"] = alpha
            info["profile"] = "uniform" if not any(v > 0 for v in spec.rates.values()) else "rates file"
        else:
            counts = spec.keep_counts(widths)
            if cfg.bounds_given:
                counts = {u: min(max(k, cfg.bounds(widths[u])[0]), cfg.bounds(widths[u])[1]) for u, k in counts.items()}
    else:
        if scores is None:
            raise UserError("policy global needs scores (it ranks channels across layers)", field="policy")
        info["normalize"] = cfg.normalize
        order = global_order(scores, widths, cfg, tiebreak)
        skipped = [u for u in widths if u not in order.start]
        if skipped:
            info["unscored_units_kept_whole"] = skipped
            log.info("policy global: %d unit(s) without scores are kept whole", len(skipped))
        scored_total = sum(widths[u] for u in order.start)
        mandatory = sum(widths[u] - order.start[u] for u in order.start)
        if target:
            counts, n = solve_global(counter, order, target, cfg)
        else:
            rate = sum(spec.rates[u] * widths[u] for u in order.start) / max(1, scored_total)
            want = round(rate * scored_total)
            n = want - mandatory
            if not 0 <= n <= len(order.sequence):
                lo = mandatory / scored_total
                hi = (mandatory + len(order.sequence)) / scored_total
                raise UserError(f"global rate {rate:.4f} is outside what min_keep={cfg.min_keep} and "
                                f"max_keep={cfg.max_keep} allow ({lo:.4f} … {hi:.4f})", source=spec.source,
                                field="rates")
            counts = order.counts(n)
            info["global_rate_asked"] = rate
        info["global_rate"] = (mandatory + n) / max(1, scored_total)
        counts = {u: counts.get(u, w) for u, w in widths.items()}
    info["achieved"] = counter.fractions(counts)
    info["size"] = dict(counter(counts))
    info["base_size"] = dict(counter.base)
    info["channels_kept"] = sum(counts.values()) / sum(widths.values())
    if target:
        info["met"] = abs(_ratio(info["achieved"], target) - 1.0) <= cfg.tolerance
    if cfg.name == "local" and not target and not cfg.bounds_given:  # keep the file's own rates on record
        return RateSpec(rates=dict(spec.rates), rounding=spec.rounding, source=spec.source, target=spec.target,
                        extra={**spec.extra, "resolved": info})
    return _exact_spec(spec, widths, counts, info)


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
    if r.get("target"):
        t = ", ".join(f"{k} {v:.4f}" for k, v in r["target"].items())
        line += f"; target {t}: " + ("met" if r.get("met") else "NOT met") + f" within {r['tolerance']:.0%}"
    return line


def keep_counts_for(spec: RateSpec, model: nn.Module) -> dict[str, int]:
    """Keep counts of a (resolved) spec for ``model``'s units."""
    return spec.keep_counts({u.name: u.width for u in model.prunable_units()})


def achieved(spec: RateSpec, model: nn.Module) -> dict[str, float]:
    """Kept MACs/params fractions of ``spec`` on ``model`` (exact, meta-device count)."""
    return SizeCounter(model).fractions(keep_counts_for(spec, model))

