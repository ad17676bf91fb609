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
(``latency.LatencyTable``: measured once per machine/threads/batch, cached on disk) and solved
like the size budgets. Each conv's (and Linear's) shape at any keep counts comes from the same
``SizeModel`` (``SizeModel.conv_shapes``), so it works for every model the engine prunes. With the
real timer the candidate is then cut (``surgery.cut``), timed against the model, and the target
asked of the table corrected (``_refine_latency``). ``latency.verify_spec`` times the pruned model
afterwards and prints predicted vs measured.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compressor.pruning import counting
from compressor.deploy import latency as lat
from compressor.errors import UserError
from compressor.pruning.plan import Plan, rank_order
from compressor.pruning.graph import balanced_keep, discovery, residual_hint, units as graph_units
from compressor.pruning.size import SizeModel
from compressor.pruning.rates import RateSpec, as_float, n_keep, round_keep, short

log = logging.getLogger("compressor")

POLICIES = ("local", "global")
NORMALIZERS = ("mean", "max", "l2", "rank", "none")
BUDGETS = ("macs", "params")  # what a size counter returns
TARGETS = ("macs", "params", "latency")  # what a target may ask for


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "local"
    normalize: str = "mean"
    min_keep: float = 0.1
    max_keep: float = 1.0
    tolerance: float = 0.01
    bounds_given: bool = False
    round_to: int = 1
    #: unit -> the ``groups`` of the grouped conv that reads or makes its channels (``Discovery.groups``):
    #: its kept counts are multiples of lcm(round_to, groups), the same number in every group
    multiples: Mapping[str, int] = field(default_factory=dict)

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
        if self.round_to < 1:
            raise UserError(f"round_to must be >= 1, got {self.round_to}", field="round_to")

    def bounds(self, width: int) -> tuple[int, int]:
        """(fewest, most) channels a layer of ``width`` may keep; never fewer than 1."""
        lo = max(1, math.ceil(self.min_keep * width - 1e-9))
        hi = max(lo, min(width, math.floor(self.max_keep * width + 1e-9)))
        return lo, hi

    def step(self, unit: str = "") -> int:
        """Kept counts of ``unit`` are multiples of this: ``round_to``, and its grouped conv's ``groups``."""
        g = int(self.multiples.get(unit, 1))
        return self.round_to * g // math.gcd(self.round_to, g)

    @property
    def stepped(self) -> bool:
        """Whether any unit moves more than one channel at a time (``round_to`` or grouped units)."""
        return self.round_to > 1 or any(g > 1 for g in self.multiples.values())

    def clamp(self, width: int, keep: int, bounded: bool = True, unit: str = "") -> int:
        """``keep`` within the bounds (when ``bounded``), then rounded to ``step(unit)``."""
        lo, hi = self.bounds(width) if bounded else (1, width)
        return round_keep(width, min(max(keep, lo), hi), self.step(unit), lo, hi)


def _number(v: Any, source: str, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"must be a number, got {short(v)}", source=source, field=field)
    return as_float(v)


def policy_config(spec: RateSpec) -> PolicyConfig:
    """Read and validate ``policy``/``min_keep``/``max_keep`` of a rates file."""
    raw = spec.extra.get("policy", "local")
    opts: dict[str, Any] = {}
    if isinstance(raw, str):
        opts["name"] = raw
    elif isinstance(raw, Mapping):
        unknown = set(raw) - {"name", "normalize", "tolerance"}
        if unknown:
            raise UserError(f"unknown policy option(s) {short(sorted(map(str, unknown)))}; valid: name, normalize, "
                            "tolerance",
                            source=spec.source, field="policy")
        opts["name"] = raw.get("name", "local")
        if "normalize" in raw:
            opts["normalize"] = raw["normalize"]
        if "tolerance" in raw:
            opts["tolerance"] = _number(raw["tolerance"], spec.source, "policy.tolerance")
    else:
        raise UserError(f"must be 'local', 'global' or a mapping, got {short(raw)}", source=spec.source,
                        field="policy")
    for key in ("min_keep", "max_keep"):
        if key in spec.extra:
            opts[key] = _number(spec.extra[key], spec.source, key)
    opts["bounds_given"] = "min_keep" in spec.extra or "max_keep" in spec.extra
    opts["round_to"] = spec.round_to
    for key in ("name", "normalize"):
        if key in opts and not isinstance(opts[key], str):
            raise UserError(f"must be a name, got {short(opts[key])}", source=spec.source, field=f"policy.{key}")
    try:
        return PolicyConfig(**opts)
    except UserError as exc:
        raise UserError(str(exc), source=spec.source, field=exc.field) from None


def size_model(model: nn.Module) -> SizeModel:
    """The engine's size model of ``model`` (its discovered units, one forward pass)."""
    return SizeModel(model, discovery(model))


def _as_size_model(counter: Any) -> SizeModel | None:
    """``counter`` itself when it is a ``SizeModel``, or the one its bound ``count`` belongs to."""
    if isinstance(counter, SizeModel):
        return counter
    owner = getattr(counter, "__self__", None)
    if isinstance(owner, SizeModel) and getattr(counter, "__name__", "") == "count":
        return owner
    return None


class SizeCounter:
    """Exact MACs/params of a model at given keep counts, its conv shapes there, and predicted latency
    when a table is set: the policy's view of the one size model, ``pruning.size.SizeModel``.

    ``counter`` is a ``SizeModel`` (or its bound ``count``), or for a caller with its own size model any
    ``counter(keep) -> {"macs": int, "params": int}`` given a keep count for *every* unit (then ``widths``
    are needed, and conv shapes, for a latency budget, come from the ``SizeModel`` of ``model``). Without
    ``counter`` the ``SizeModel`` of ``model`` is built (any model: from its graph and one forward pass).
    """

    def __init__(self, model: nn.Module | None = None, *,
                 counter: SizeModel | Callable[[Mapping[str, int]], Mapping[str, int]] | None = None,
                 widths: Mapping[str, int] | None = None) -> None:
        sizer = _as_size_model(counter)
        custom = None if sizer is not None else counter
        if sizer is None and custom is None:
            if model is None:
                raise ValueError("SizeCounter needs a model or a counter")
            sizer = size_model(model)
        if widths is None:
            if sizer is not None:
                widths = sizer.widths
            elif model is not None:
                widths = unit_widths(model)
            else:
                raise ValueError("an injected counter needs widths")
        self.model = model
        self.sizer = sizer
        self.widths = dict(widths)
        self._count = custom if custom is not None else sizer.count  # type: ignore[union-attr]
        self._cache: dict[tuple[int, ...], dict[str, int]] = {}
        self.latency: lat.LatencyTable | None = None
        self.base = self({})

    def _key(self, keep: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(int(keep.get(u, w)) for u, w in self.widths.items())

    def __call__(self, keep: Mapping[str, int]) -> dict[str, int]:
        key = self._key(keep)
        if key not in self._cache:
            got = self._count(dict(zip(self.widths, key)))
            self._cache[key] = {k: int(got[k]) for k in BUDGETS}
        return self._cache[key]

    @property
    def has_shapes(self) -> bool:
        return self.sizer is not None or self.model is not None

    def conv_shapes(self, keep: Mapping[str, int]) -> dict[str, lat.ConvShape]:
        """Every conv's (and Linear's) shape at ``keep``, from the size model: no model is built."""
        if self.sizer is None:
            if self.model is None:
                raise UserError("a latency budget needs the model's conv shapes at any widths: pass the model "
                                "(or latency_shapes=) to policy.resolve", field="target.latency")
            self.sizer = size_model(self.model)
        return self.sizer.conv_shapes({**self.widths, **keep})

    def fractions(self, keep: Mapping[str, int]) -> dict[str, float]:
        c = self(keep)
        out = {k: c[k] / self.base[k] for k in BUDGETS}
        if self.latency is not None:
            out["latency"] = self.latency.fraction(keep)
        return out


def engine_counter(model: nn.Module) -> tuple[Callable[[Mapping[str, int]], Mapping[str, int]], dict[str, int]]:
    """``(count, widths)`` of the engine's size model of ``model``."""
    size = size_model(model)
    return size.count, dict(size.widths)


def unit_widths(model: nn.Module) -> dict[str, int]:
    """``{unit: width}`` of the model's discovered units (the same for every model)."""
    return {u.name: u.width for u in graph_units(model)}


def unit_groups(model: nn.Module | None, widths: Mapping[str, int]) -> dict[str, int]:
    """``{unit: groups}`` of the units of ``widths`` that a grouped conv reads or makes (``Discovery.groups``).

    Their kept counts must be multiples of ``groups`` (the plan keeps the same number in every group).
    Without a model (an injected counter alone) nothing is known of groups: ``{}``.
    """
    if model is None:
        return {}
    found = discovery(model).groups
    return {u: int(g) for u, g in found.items() if u in widths and int(g) > 1}


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


def _coarse_note(cfg: PolicyConfig) -> str:
    if cfg.round_to > 1:
        return (f"round_to {cfg.round_to} moves each layer {cfg.round_to} channels at a time, too coarse here, or a "
                "bound stops it; lower round_to, loosen policy.tolerance or min_keep/max_keep")
    if cfg.stepped:
        return ("units read by grouped convs move one channel per group at a time, too coarse here, or a bound "
                "stops it; loosen policy.tolerance or min_keep/max_keep")
    return ("one channel step is too coarse here, or a bound stops it; loosen policy.tolerance or "
            "min_keep/max_keep, or change the rate profile")


def _fmt_target(target: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in target.items()) + "}"


def _one_step(counter: SizeCounter, cands: Sequence[dict[str, int]], target: Mapping[str, float],
              cfg: PolicyConfig) -> list[dict[str, int]]:
    """Neighbours of the candidates that move one unit by one step (``cfg.step``) toward the target.

    With coarse steps the two configurations that straddle a target along the solver's path can
    both miss the tolerance while a one-unit change of either lands inside it.
    """
    out = []
    for c in cands:
        over = _ratio(counter.fractions(c), target) > 1.0
        for u, k in c.items():
            w = counter.widths[u]
            lo, hi = cfg.bounds(w)
            step = cfg.step(u)
            k2 = k - step if over else k + step
            if k2 > w and not over:
                k2 = w
            if lo <= k2 <= hi and k2 != k and (k2 % step == 0 or k2 == w):
                out.append({**c, u: k2})
    return out


def _finest_crossing(counter: SizeCounter, start: dict[str, int], target: Mapping[str, float], cfg: PolicyConfig,
                     limit: int = 64) -> list[dict[str, int]]:
    """From an under-budget candidate, grow the one unit whose step costs least, until the budget is crossed.

    Units read by grouped convs move a whole channel per group at a time, so where the solver's path
    moves several of them at once the two configurations around the target can be far apart; walking
    up by the finest step there is brings the last two within that step of it. Returns the last
    configuration under the budget and the first over it (or the furthest one reached).
    """
    cur = start
    for _ in range(limit):
        ups = _one_step(counter, [cur], target, cfg)
        if not ups:
            break
        nxt = min(ups, key=lambda c: _ratio(counter.fractions(c), target))
        if _ratio(counter.fractions(nxt), target) > 1.0:
            return [cur, nxt]
        cur = nxt
    return [cur]


class CoarseSteps(UserError):
    """The target lies between two reachable configurations, both outside the tolerance."""


def _pick(counter: SizeCounter, target: Mapping[str, float], cfg: PolicyConfig,
          candidates: Sequence[dict[str, int]], how: str) -> dict[str, int]:
    """The candidate within tolerance of the target, preferring one that does not exceed it.

    With ``round_to`` > 1 or grouped units, one-unit steps from the candidates are tried too (``_one_step``).
    """
    tol = cfg.tolerance

    def best(cands: Sequence[dict[str, int]]) -> dict[str, int] | None:
        rated = [(c, _ratio(counter.fractions(c), target)) for c in cands]
        ok = sorted((r > 1.0, abs(r - 1.0), i) for i, (c, r) in enumerate(rated) if abs(r - 1.0) <= tol)
        return rated[ok[0][2]][0] if ok else None

    chosen = best(candidates)
    if chosen is None and cfg.stepped:
        chosen = best(_one_step(counter, candidates, target, cfg))
    if chosen is None and cfg.multiples:
        under = [c for c in candidates if _ratio(counter.fractions(c), target) <= 1.0]
        if under:
            start = max(under, key=lambda c: _ratio(counter.fractions(c), target))
            chosen = best(_finest_crossing(counter, start, target, cfg))
    if chosen is not None:
        return chosen
    figs = ", ".join(f"{k} " + " or ".join(f"{counter.fractions(c)[k]:.4f}" for c in candidates) for k in target)
    raise CoarseSteps(f"cannot meet target {_fmt_target(target)} within {tol:.1%} with the {how}: the closest "
                      f"kept fractions are {figs} ({_coarse_note(cfg)})", field="target")


def _out_of_reach(counter: SizeCounter, keep: Mapping[str, int], target: Mapping[str, float],
                  cfg: PolicyConfig) -> UserError:
    fr = counter.fractions(keep)
    return UserError(f"target {_fmt_target(target)} is out of reach: with every layer at min_keep={cfg.min_keep}"
                     + (f" (round_to {cfg.round_to})" if cfg.round_to > 1 else "") + " the model still keeps "
                     + ", ".join(f"{k} {fr[k]:.4f}" for k in target) + " (the closest it can get)"
                     + residual_hint(counter.model, target, cfg.min_keep), field="target")  # issue 24: names --residual


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
    """Scale the rate profile by one factor α (bisection) until the budget is met.

    Every candidate is clamped to the bounds and rounded to ``cfg.step(unit)`` before it is counted,
    so the counts found are the ones the plan will use (rounding is monotone, so bisection holds).
    """
    prof = dict(profile) if any(v > 0 for v in profile.values()) else {u: 1.0 for u in widths}

    def counts(alpha: float) -> dict[str, int]:
        return {u: cfg.clamp(w, n_keep(w, min(1.0, alpha * prof.get(u, 0.0)), rounding), unit=u)
                for u, w in widths.items()}

    def ratio(alpha: float) -> float:
        return _ratio(counter.fractions(counts(alpha)), target)

    a_hi = 1.0 / min(v for v in prof.values() if v > 0) + 1e-6
    if ratio(a_hi) > 1.0 + cfg.tolerance:
        raise _out_of_reach(counter, counts(a_hi), target, cfg)
    if ratio(0.0) <= 1.0:  # max_keep alone already meets (or undershoots) the budget
        return _pick(counter, target, cfg, [counts(0.0)], "rate profile"), 0.0
    lo, hi = 0.0, a_hi  # invariant: ratio(lo) > 1 >= ratio(hi), unless ratio(a_hi) is just above 1
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if ratio(mid) > 1.0:
            lo = mid
        else:
            hi = mid
    c_hi, c_lo = counts(hi), counts(lo)
    try:
        chosen = _pick(counter, target, cfg, [c_hi, c_lo], "rate profile")
    except CoarseSteps:  # several units cross a rounding step at the same α: walk between them one unit at a time
        path = [c_lo]
        for u in widths:
            if c_hi[u] != c_lo[u]:
                path.append({**path[-1], u: c_hi[u]})
        j = next((i for i, c in enumerate(path) if _ratio(counter.fractions(c), target) <= 1.0), len(path) - 1)
        chosen = _pick(counter, target, cfg, [path[j]] + ([path[j - 1]] if j > 0 else []), "rate profile")
    return chosen, lo if chosen == c_lo else hi


def _rounded(order: GlobalOrder, widths: Mapping[str, int], cfg: PolicyConfig, n: int) -> dict[str, int]:
    keep = order.counts(n)
    if not cfg.stepped:
        return keep
    return {u: cfg.clamp(widths[u], k, unit=u) for u, k in keep.items()}


def solve_global(counter: SizeCounter, order: GlobalOrder, target: Mapping[str, float], cfg: PolicyConfig,
                 widths: Mapping[str, int] | None = None) -> tuple[dict[str, int], int]:
    """Remove channels in global order until the budget is met (bisection on how many).

    With ``round_to`` (or grouped units) each layer's count along the order is rounded to its step
    (``widths`` needed), so the
    network moves in steps of whole multiples; the size is still monotone in how many are removed.
    """
    n_max = len(order.sequence)
    w = dict(widths) if widths is not None else dict(order.start)
    at = (lambda n: _rounded(order, w, cfg, n)) if cfg.stepped else order.counts

    def ratio(n: int) -> float:
        return _ratio(counter.fractions(at(n)), target)

    if ratio(n_max) > 1.0 + cfg.tolerance:
        raise _out_of_reach(counter, at(n_max), target, cfg)
    if ratio(n_max) > 1.0:
        return at(n_max), n_max
    n = _bisect_int(0, n_max, lambda i: ratio(i) <= 1.0)
    cands = [at(n)] + ([at(n - 1)] if n > 0 else [])
    chosen = _pick(counter, target, cfg, cands, "global ranking")
    return chosen, n if chosen == cands[0] else n - 1


# ---------------------------------------------------------------- entry point


def _exact_spec(spec: RateSpec, widths: Mapping[str, int], counts: Mapping[str, int], info: dict) -> RateSpec:
    rates = {u: (w - counts[u]) / w for u, w in widths.items()}
    out = RateSpec(rates=rates, rounding="keep_floor", source=spec.source, target=spec.target,
                   extra={**spec.extra, "resolved": info}, round_to=spec.round_to,
                   latency_options=spec.latency_options)
    got = out.keep_counts(dict(widths))
    if got != dict(counts):  # pragma: no cover - guards the (C−k)/C round trip
        raise RuntimeError(f"rate round trip lost channels: {got} != {dict(counts)}")
    return out


def precheck(spec: RateSpec, device: str = "cpu") -> PolicyConfig:
    """Everything about the policy and budget that can be checked before any work (call it early)."""
    cfg = policy_config(spec)
    if "latency" in (spec.target or {}):
        dev = str((spec.latency_options or {}).get("device", device))
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"a latency budget on {dev} needs a GPU, and none is available here", source=spec.source,
                            field="target.device")
    return cfg


def attach_latency(counter: SizeCounter, spec: RateSpec, model: nn.Module | None, device: str = "cpu", *,
                   timer: lat.Timer | None = None,
                   shapes: Callable[[Mapping[str, int]], Mapping[str, lat.ConvShape]] | None = None,
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
    settings = lat.MeasureSettings(batch_size=int(opts.get("batch_size", 1)),
                                   threads=int(opts.get("threads", torch.get_num_threads())), device=dev)
    if shapes is None:
        if not counter.has_shapes:
            raise UserError("a latency budget needs the model's conv shapes at any widths: pass the model (or "
                            "latency_shapes=) to policy.resolve", field="target.latency")
        shapes = counter.conv_shapes
    table = lat.LatencyTable(shapes, counter.widths, settings, timer=timer, cache=cache)
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


def measured_fraction(model: nn.Module, counts: Mapping[str, int], settings: lat.MeasureSettings,
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


def resolve(spec: RateSpec, model: nn.Module | None, scores: Mapping[str, torch.Tensor] | None = None, *,
            tiebreak: Mapping[str, torch.Tensor] | None = None,
            counter: SizeModel | Callable[[Mapping[str, int]], Mapping[str, int]] | None = None,
            widths: Mapping[str, int] | None = None, device: str = "cpu",
            latency_timer: lat.Timer | None = None,
            latency_shapes: Callable[[Mapping[str, int]], Mapping[str, lat.ConvShape]] | None = None,
            latency_cache: bool = True, latency_overhead_ms: float | None = None,
            latency_refine: int = 2) -> RateSpec:
    """Apply the rates file's policy and budget; return exact per-layer rates (see module doc).

    ``counter``: the model's ``SizeModel`` (or its bound ``count``), so it is not built twice; by
    default it is built from ``model``. Any other callable (keep counts of every unit →
    ``{"macs", "params"}``) is used for MACs/params as given, with its ``widths``; a latency budget
    then takes the conv shapes from ``model``'s ``SizeModel``. ``widths``: the units' widths (default:
    the size model's). ``device`` is the run's device (a latency budget's default); ``latency_*`` inject the timer, the
    conv shapes at any widths, the on-disk cache switch and the model's constant part (tests, engines).
    ``latency_refine``: with the real timer, up to this many re-solves after timing the candidate model
    itself (``_refine_latency``); 0 trusts the table alone.
    """
    cfg = policy_config(spec)
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
        info["latency"] = attach_latency(size, spec, model, device, timer=latency_timer, shapes=latency_shapes,
                                         cache=latency_cache, overhead_ms=latency_overhead_ms)
    def solve(tgt: Mapping[str, float], c: PolicyConfig = cfg) -> dict[str, int]:
        if c.name == "local":
            return _local_counts(spec, c, size, widths, tgt, bool(target), info)
        return _global_counts(spec, c, size, widths, scores, tiebreak, tgt, bool(target), info)

    counts = _solve_widening(solve, target, cfg) if "latency" in target else solve(target)
    if "latency" in target and latency_refine and latency_timer is None and model is not None:
        counts = _refine_latency(size, model, counts, target, cfg, solve, info, latency_refine)
    _record_achieved(info, size, counts, widths, target, cfg)
    if (cfg.name == "local" and not target and not cfg.bounds_given
            and counts == spec.keep_counts(widths)):  # keep the file's own rates on record
        return RateSpec(rates=dict(spec.rates), rounding=spec.rounding, source=spec.source, target=spec.target,
                        extra={**spec.extra, "resolved": info}, round_to=spec.round_to,
                        latency_options=spec.latency_options)
    return _exact_spec(spec, widths, counts, info)


def _local_counts(spec: RateSpec, cfg: Any, size: SizeCounter, widths: Mapping[str, int],
                  tgt: Mapping[str, float], has_target: bool, info: dict[str, Any]) -> dict[str, int]:
    """Per-layer rates as given, or (with a budget) scaled uniformly until the budget is met."""
    if has_target:
        counts, alpha = solve_local(size, widths, spec.rates, tgt, cfg, spec.rounding)
        info["scale"] = alpha
        info["profile"] = "uniform" if not any(v > 0 for v in spec.rates.values()) else "rates file"
        return counts
    counts = spec.keep_counts(widths)
    if cfg.bounds_given:
        return {u: cfg.clamp(widths[u], k, unit=u) for u, k in counts.items()}
    # grouped units: the file's counts rounded to a multiple of their groups (nothing else changes)
    return {u: cfg.clamp(widths[u], k, bounded=False, unit=u) if cfg.step(u) > cfg.round_to else k
            for u, k in counts.items()}


def _global_counts(spec: RateSpec, cfg: Any, size: SizeCounter, widths: Mapping[str, int],
                   scores: Mapping[str, torch.Tensor] | None, tiebreak: Mapping[str, torch.Tensor] | None,
                   tgt: Mapping[str, float], has_target: bool, info: dict[str, Any]) -> dict[str, int]:
    """Channels ranked across layers; the budget (or the file's mean rate) decides how many go."""
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
    if has_target:
        counts, _ = solve_global(size, order, tgt, cfg, widths)
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
    if r.get("target"):
        t = ", ".join(f"{k} {v:.4f}" for k, v in r["target"].items())
        line += f"; target {t}: " + ("met" if r.get("met") else "NOT met") + f" within {r['tolerance']:.0%}"
    return line


def keep_counts_for(spec: RateSpec, model: nn.Module) -> dict[str, int]:
    """Keep counts of a (resolved) spec for ``model``'s units."""
    return spec.keep_counts(unit_widths(model))


def achieved(spec: RateSpec, model: nn.Module) -> dict[str, float]:
    """Kept MACs/params fractions of ``spec`` on ``model`` (exact, from the size model)."""
    return SizeCounter(model).fractions(keep_counts_for(spec, model))

