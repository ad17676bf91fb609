"""Weight-norm criteria (Li et al., ICLR 2017): the filter's L1 or L2 norm."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from compressor.capture import Accumulator
from compressor.criteria.base import Criterion, per_unit_weight_score, register_criterion
from compressor.models._spec import PrunableUnit


@register_criterion
class L1(Criterion):
    name = "l1"

    def score(self, model: nn.Module, units: Sequence[PrunableUnit], acc: Accumulator | None) -> dict[str, torch.Tensor]:
        return per_unit_weight_score(model, units, lambda w: w.abs().sum(1))
