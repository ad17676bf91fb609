"""``random``: seeded uniform scores, the honest baseline every criterion must beat.

Each unit's generator is seeded from (seed, crc32 of the unit name), so a unit's scores do
not depend on which other units are scored or in what order.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch
from torch import nn

from compressor.pruning.capture import Accumulator
from compressor.pruning.criteria.base import Criterion, register_criterion
from compressor.models._spec import PrunableUnit


@register_criterion
class Random(Criterion):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def score(self, model: nn.Module, units: Sequence[PrunableUnit], acc: Accumulator | None) -> dict[str, torch.Tensor]:
        out = {}
        for u in units:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(u.name.encode())) % (2**63))
            out[u.name] = torch.rand(u.width, generator=g)
        return out
