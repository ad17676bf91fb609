"""Criteria that read the weights alone (no data pass).

* ``l1`` / ``l2``: the filter's L1 or L2 norm (Li et al., ICLR 2017).
* ``bn_scale``: |γ| of the unit's BatchNorm (Liu et al., "Network Slimming", ICCV 2017).
* ``fpgm``: distance to the geometric median of the layer's filters (He et al., CVPR 2019).

A unit with several convs (or BNs) gets the sum of their per-channel scores.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from compressor.pruning.capture import Accumulator
from compressor.pruning.criteria.base import Criterion, per_unit_weight_score, register_criterion
from compressor.errors import UserError
from compressor.models._spec import PrunableUnit


@register_criterion
class L1(Criterion):
    name = "l1"

    def score(self, model: nn.Module, units: Sequence[PrunableUnit], acc: Accumulator | None) -> dict[str, torch.Tensor]:
        return per_unit_weight_score(model, units, lambda w: w.abs().sum(1))


@register_criterion
class L2(Criterion):
    name = "l2"

    def score(self, model: nn.Module, units: Sequence[PrunableUnit], acc: Accumulator | None) -> dict[str, torch.Tensor]:
        return per_unit_weight_score(model, units, lambda w: w.double().pow(2).sum(1).sqrt().float())


def fpgm_distances(w: torch.Tensor) -> torch.Tensor:
    """Sum of Euclidean distances from each filter (row of ``w`` [C, D]) to all the others.

    The geometric median ``x*`` of the filters minimizes ``Σ_j ||x − f_j||``; the filter with
    the smallest sum is the one nearest to it, the most replaceable by the others (He et al.
    prune those). Computed in float64 from the Gram matrix, so the result does not depend on
    ``cdist``'s matmul shortcut.
    """
    w = w.double()
    sq = (w * w).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (w @ w.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt().sum(1).float()


@register_criterion
class FPGM(Criterion):
    """Filter pruning via the geometric median: higher score = farther from it = keep."""

    name = "fpgm"

    def score(self, model: nn.Module, units: Sequence[PrunableUnit], acc: Accumulator | None) -> dict[str, torch.Tensor]:
        return per_unit_weight_score(model, units, fpgm_distances)


@register_criterion
class BNScale(Criterion):
    """|γ| of the BatchNorm that follows the unit's conv (summed over the unit's BNs)."""

    name = "bn_scale"

    def score(self, model: nn.Module, units: Sequence[PrunableUnit], acc: Accumulator | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for u in units:
            if not u.bns:
                raise UserError(f"criterion bn_scale needs BatchNorm, but {getattr(model, 'arch', type(model).__name__)}"
                                f" has none after {u.name}; use l1, l2, fpgm or an activation criterion",
                                field="criterion")
            total = None
            for name in u.bns:
                bn = model.get_submodule(name)
                if getattr(bn, "weight", None) is None:
                    raise UserError(f"criterion bn_scale: {name} has no affine scale (affine=False)", field="criterion")
                s = bn.weight.detach().float().abs().cpu()
                total = s if total is None else total + s
            out[u.name] = total
        return out
