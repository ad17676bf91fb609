"""Cheap activation statistics, taken in the shared capture pass at the unit's rank points.

* ``apoz``: 1 − APoZ (Hu et al., 2016), the fraction of *non-zero* outputs after the ReLU,
  per image, averaged over images. Higher = more often active = keep.
* ``mean_activation``: the mean output after the ReLU (the tie-break of every activation
  criterion, also usable on its own).
"""

from __future__ import annotations


import torch

from compressor.pruning.capture import Accumulator, MeanActivation as MeanActivationAcc
from compressor.pruning.criteria.base import AccumulatorCriterion, register_criterion


class NonZeroAccumulator(Accumulator):
    """Fraction of positions with a non-zero output, per image and channel."""

    name = "apoz"

    def batch_stat(self, act: torch.Tensor) -> torch.Tensor:
        nz = (act != 0).float()
        return nz.mean(dim=(2, 3)) if nz.ndim == 4 else nz


@register_criterion
class APoZ(AccumulatorCriterion):
    name = "apoz"

    def accumulator(self) -> Accumulator:
        return NonZeroAccumulator()

    def settings(self) -> dict:
        return {"score": "1 - fraction of zeros after the activation"}


@register_criterion
class MeanActivation(AccumulatorCriterion):
    name = "mean_activation"

    def accumulator(self) -> Accumulator:
        return MeanActivationAcc()
