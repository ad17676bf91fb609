"""The criterion interface: one small class per criterion, registered by name.

A criterion returns one score per output channel of each unit (higher = more important).
Activation criteria hand ``capture.record`` an accumulator, so any number of them share
one forward pass; weight criteria read the weights alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from compressor.pruning.capture import Accumulator
from compressor.errors import UserError, suggest
from compressor.models._spec import PrunableUnit

_CRITERIA: dict[str, type["Criterion"]] = {}


class Criterion(ABC):
    name: ClassVar[str] = ""
    #: "weight" (reads weights), "activation" (needs the capture pass), "gradient" (needs labels + backward)
    kind: ClassVar[str] = "weight"

    def accumulator(self) -> Accumulator | None:
        """An accumulator for the shared capture pass (activation criteria only)."""
        return None

    def settings(self) -> dict[str, Any]:
        """Parameters that change the scores; recorded in the scores file."""
        return {}

    @abstractmethod
    def score(self, model: nn.Module, units: Sequence[PrunableUnit], acc: Accumulator | None) -> dict[str, torch.Tensor]:
        ...


class AccumulatorCriterion(Criterion):
    """A criterion whose scores are its accumulator's per-channel means (filled by a pass)."""

    kind = "activation"

    def score(self, model: nn.Module, units: Sequence[PrunableUnit], acc: Accumulator | None) -> dict[str, torch.Tensor]:
        if acc is None:
            raise RuntimeError(f"criterion {self.name} ({self.kind}) needs its accumulator filled by the "
                               "capture pass or, for gradient criteria, gradient_pass(); scores.compute routes both")
        return acc.result()


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    if not cls.name or cls.name in _CRITERIA:
        raise ValueError(f"criterion name {cls.name!r} is empty or already registered")
    _CRITERIA[cls.name] = cls
    return cls


def list_criteria() -> list[str]:
    return sorted(_CRITERIA)


def _accepted(cls: type[Criterion]) -> list[str]:
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def get(name: str, **options: Any) -> Criterion:
    """The criterion ``name`` built with the ``options`` it takes.

    One options mapping serves several criteria (``scores.compute`` hands every one the seed
    and the rank tolerances), so an option another registered criterion takes is passed over
    quietly; a name no criterion takes (a typo, ``rtoll``) is an error naming the valid ones.
    """
    if name not in _CRITERIA:
        raise UserError(f"unknown criterion {name!r}{suggest(name, _CRITERIA)}; valid: {', '.join(list_criteria())}",
                        field="criterion")
    cls = _CRITERIA[name]
    accepted = _accepted(cls)
    known = {o for c in _CRITERIA.values() for o in _accepted(c)}
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        valid = ", ".join(accepted) or "none"
        raise UserError(f"unknown option {unknown[0]!r} for criterion {name!r}{suggest(unknown[0], known)}; "
                        f"valid: {valid}", field="criterion")
    return cls(**{k: v for k, v in options.items() if k in accepted})


def per_unit_weight_score(model: nn.Module, units: Sequence[PrunableUnit],
                          fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum ``fn(conv.weight) -> [C_out]`` over the convs of each unit."""
    out: dict[str, torch.Tensor] = {}
    for u in units:
        total = None
        for conv in u.convs:
            w = model.get_submodule(conv).weight.detach().float()
            s = fn(w.flatten(1)).cpu()
            total = s if total is None else total + s
        out[u.name] = total
    return out
