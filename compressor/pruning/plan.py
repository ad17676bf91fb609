"""A plan is ``{unit: keep_indices}``: which output channels of each unit survive.

Keep indices are sorted ascending, so surviving channels keep their order. Ties in score
are broken by the tie-break vector (mean activation for activation criteria: the more
active channel stays), then by the lower channel index, so a plan is deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from compressor.storage import io
from compressor.errors import UserError
from compressor.pruning.graph import balanced_keep
from compressor.pruning.rates import RateSpec, round_keep

PLAN_FORMAT = "compressor.pruning.plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """Kept output channels per unit, with the unit's original width."""

    keep: dict[str, tuple[int, ...]]
    widths: dict[str, int]
    model: str = ""

    def __post_init__(self) -> None:
        for unit, idx in self.keep.items():
            if unit not in self.widths:
                raise ValueError(f"plan: unit {unit!r} has no width")
            w = self.widths[unit]
            if not idx:
                raise ValueError(f"plan: unit {unit!r} keeps no channel")
            if list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= w:
                raise ValueError(f"plan: unit {unit!r} keep indices must be sorted, unique and in [0, {w})")

    def kept(self, unit: str) -> tuple[int, ...]:
        return self.keep.get(unit, tuple(range(self.widths[unit])))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "units": {u: {"width": self.widths[u], "keep": list(self.kept(u))} for u in self.widths},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = "<plan>") -> "Plan":
        if not isinstance(doc, Mapping) or doc.get("format") != PLAN_FORMAT:
            raise UserError(f"not a compressor plan (format must be {PLAN_FORMAT!r})", source=source, field="format")
        try:
            units = doc["units"]
            widths = {u: int(v["width"]) for u, v in units.items()}
            keep = {u: tuple(int(i) for i in v["keep"]) for u, v in units.items()}
            return cls(keep=keep, widths=widths, model=str(doc.get("model", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"malformed plan ({exc})", source=source, field="units") from exc

    def save(self, path: str | Path) -> Path:
        return io.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read plan ({exc})", source=str(path)) from exc
        return cls.from_json(doc, str(path))


def rank_order(score: torch.Tensor, tiebreak: torch.Tensor | None = None) -> np.ndarray:
    """Channel indices from most to least important (score, then tie-break, then low index)."""
    s = score.detach().double().cpu().numpy()
    t = tiebreak.detach().double().cpu().numpy() if tiebreak is not None else np.zeros_like(s)
    idx = np.arange(len(s))
    # lexsort sorts by the last key first; negate for descending score/tiebreak, ascending index.
    return np.lexsort((idx, -t, -s))


def make_plan(
    scores: Mapping[str, torch.Tensor],
    spec: RateSpec,
    widths: Mapping[str, int],
    *,
    tiebreak: Mapping[str, torch.Tensor] | None = None,
    model: str = "",
    groups: Mapping[str, int] | None = None,
) -> Plan:
    """Keep the highest-scoring ``n_keep`` channels of each unit at its rate.

    ``groups`` (unit -> ``groups`` of the grouped conv that reads or makes its channels, as in
    ``graph.Discovery.groups``; by default what ``policy.resolve`` recorded in the spec): such a unit
    keeps the same number of channels in each of its ``groups`` contiguous blocks, each block its own
    best (``graph.balanced_keep``), so the grouped conv keeps ``groups``. A count that is not a
    multiple of ``groups`` (a spec the policy did not resolve) is rounded to the nearest one.
    """
    counts = spec.keep_counts(dict(widths))
    if groups is None:
        groups = dict((spec.extra.get("resolved") or {}).get("groups") or {})
    keep: dict[str, tuple[int, ...]] = {}
    for unit, width in widths.items():
        g = int(groups.get(unit, 1))
        k = counts[unit] if g <= 1 else round_keep(width, counts[unit], g)
        if k == width:
            continue
        if unit not in scores:
            raise UserError(f"no scores for unit {unit!r}; re-run ranking for this model", field=unit)
        s = scores[unit]
        if s.ndim != 1 or s.numel() != width:
            raise UserError(f"scores for {unit!r} have {s.numel()} entries, the layer has {width} channels "
                            "(scores of another model or cfg?)", field=unit)
        tb = tiebreak.get(unit) if tiebreak else None
        order = rank_order(s, tb)
        keep[unit] = balanced_keep(order, k, width, g)
    return Plan(keep=keep, widths=dict(widths), model=model)
