"""HRank: the average matrix rank of each channel's feature map (Lin et al., CVPR 2020).

Ranks are computed batched on [B, C, H, W] with ``torch.linalg.svdvals`` in fp32, outside
autocast, on the model's device. The tolerance is explicit: a singular value counts if it
exceeds ``max(atol, rtol · σ_max)``. The default ``rtol = eps(fp32) · max(H, W)`` is
``torch.linalg.matrix_rank``'s (and HRank's) default rule; it is recorded as a number in the
scores file. Small maps tie often (2×2 maps give ranks 0, 1 or 2): ties are broken by mean
activation, then by the lower channel index (see ``plan.rank_order``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import torch

from compressor.pruning.capture import Accumulator
from compressor.pruning.criteria.base import AccumulatorCriterion, register_criterion
from compressor.errors import UserError

EPS32 = float(torch.finfo(torch.float32).eps)


@lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="svd")


def _svdvals(a: torch.Tensor) -> torch.Tensor:
    """Batched singular values; on CPU the batch is split over threads.

    CPU ``svdvals`` runs one LAPACK call per matrix on a single core; the chunks are
    independent, so results are bit-identical to one call.
    """
    workers = min(torch.get_num_threads(), os.cpu_count() or 1)
    if a.device.type != "cpu" or workers < 2 or a.shape[0] < 2:
        return torch.linalg.svdvals(a)
    return torch.cat(list(_pool(workers).map(torch.linalg.svdvals, a.chunk(workers))))


def batch_ranks(act: torch.Tensor, rtol: float | None = None, atol: float = 0.0) -> torch.Tensor:
    """Matrix rank of every [H, W] map in ``act`` [..., H, W]; same rule as matrix_rank."""
    with torch.autocast(device_type=act.device.type, enabled=False):
        a = act.float()
        h, w = a.shape[-2:]
        r = EPS32 * max(h, w) if rtol is None else rtol
        s = _svdvals(a)
        tol = torch.clamp(s[..., :1] * r, min=atol)
        return (s > tol).sum(-1)


class RankAccumulator(Accumulator):
    name = "hrank"

    def __init__(self, rtol: float | None = None, atol: float = 0.0) -> None:
        super().__init__()
        self.rtol, self.atol = rtol, atol
        self.effective_rtol: dict[str, float] = {}

    def batch_stat(self, act: torch.Tensor) -> torch.Tensor:
        return batch_ranks(act, self.rtol, self.atol).double()

    def update(self, unit: str, act: torch.Tensor) -> None:
        h, w = act.shape[-2:]
        self.effective_rtol[unit] = EPS32 * max(h, w) if self.rtol is None else self.rtol
        super().update(unit, act)


@register_criterion
class HRank(AccumulatorCriterion):
    name = "hrank"

    def __init__(self, rtol: float | None = None, atol: float = 0.0) -> None:
        if rtol is not None and rtol < 0 or atol < 0:
            raise UserError(f"rank tolerances must be >= 0, got rtol={rtol}, atol={atol}",
                            field="rank-rtol/rank-atol")
        self.rtol, self.atol = rtol, atol
        self._acc: RankAccumulator | None = None

    def accumulator(self) -> RankAccumulator:
        self._acc = RankAccumulator(self.rtol, self.atol)
        return self._acc

    def settings(self) -> dict[str, Any]:
        eff = self._acc.effective_rtol if self._acc else {}
        return {"rtol": self.rtol if self.rtol is not None else "eps32*max(H,W)", "atol": self.atol,
                "effective_rtol": dict(eff)}

