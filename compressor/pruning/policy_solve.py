"""The budget solvers: a rates file's policy options, and the keep counts that meet a budget.

``PolicyConfig`` (read from a rates file by ``policy_config``) holds the bounds, the tolerance and the
steps each unit moves by (``round_to``, and the ``groups`` of units a grouped conv reads). ``solve_local``
scales a rate profile by one factor; ``solve_global`` removes channels in one network-wide ranking
(``global_order``); both bisect on a monotone size and pick the candidate within tolerance (``_pick``),
walking one unit at a time where the steps are coarse. See ``compressor.pruning.policy`` for the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from compressor.errors import UserError
from compressor.pruning.graph import residual_hint
from compressor.pruning.plan import rank_order
from compressor.pruning.policy_size import SizeCounter
from compressor.pruning.rates import RateSpec, as_float, n_keep, round_keep, short

POLICIES = ("local", "global", "obs")  # obs: allocation by the refit error (policy_obs, criterion obs)
NORMALIZERS = ("mean", "max", "l2", "rank", "none")


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


def precheck(spec: RateSpec, device: str = "cpu") -> PolicyConfig:
    """Everything about the policy and budget that can be checked before any work (call it early)."""
    cfg = policy_config(spec)
    if "latency" in (spec.target or {}):
        dev = str((spec.latency_options or {}).get("device", device))
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"a latency budget on {dev} needs a GPU, and none is available here", source=spec.source,
                            field="target.device")
    return cfg


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

    When neither candidate is within it (``round_to`` > 1, grouped units, or channels that are each a large
    share of a small model), one-unit steps from them are tried (``_one_step``), then the finest walk up
    from the best one under the budget (``_finest_crossing``).
    """
    tol = cfg.tolerance

    def best(cands: Sequence[dict[str, int]]) -> dict[str, int] | None:
        rated = [(c, _ratio(counter.fractions(c), target)) for c in cands]
        ok = sorted((r > 1.0, abs(r - 1.0), i) for i, (c, r) in enumerate(rated) if abs(r - 1.0) <= tol)
        return rated[ok[0][2]][0] if ok else None

    chosen = best(candidates)
    if chosen is None:  # coarse steps (round_to, groups, or a small model's channels): one-unit moves first
        chosen = best(_one_step(counter, candidates, target, cfg))
    if chosen is None:
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
