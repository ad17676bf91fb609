"""What a prunable model tells the algorithms about itself.

Algorithms never look at a model's class. They read three things off it:
``model.cfg`` (the per-layer widths its builder accepts), ``model.prunable_units()``
(which channel spaces can be cut and where they are ranked) and ``model.channel_map()``
(which dims of which tensors follow which channel space, for the cfg-rebuild transplant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, runtime_checkable

from torch import nn


@dataclass(frozen=True)
class PrunableUnit:
    """One channel space that is pruned as a whole (one conv's outputs, or a residual group).

    ``name`` is the module name of the producing conv (the first of ``convs``).
    ``rank_points`` are the modules whose *outputs* are ranked, normally the ReLU/ReLU6 after
    the BN; a residual group (``mobilenet_v2_res``) has no activation and is ranked at its
    blocks' outputs after the add. Scores of several rank points are summed. ``cfg_index`` lists the positions in
    ``model.cfg`` that hold this unit's width.
    """

    name: str
    convs: tuple[str, ...]
    bns: tuple[str, ...]
    rank_points: tuple[str, ...]
    cfg_index: tuple[int, ...]
    width: int
    compat_rank_points: tuple[str, ...] | None = None
    #: activation applied to each rank point's output before ranking ('' = none); the
    #: discovered units rank a BN output with its activation, hand-described ones name the activation
    rank_acts: tuple[str, ...] = ()
    #: "plain", "residual" (members tied by an add) or "linear" (no activation after the BN)
    kind: str = "plain"

    def __post_init__(self) -> None:
        if not self.convs or self.name != self.convs[0]:
            raise ValueError(f"unit {self.name!r}: name must be its first conv")
        if self.width < 1:
            raise ValueError(f"unit {self.name!r}: width must be >= 1")
        if self.rank_acts and len(self.rank_acts) != len(self.rank_points):
            raise ValueError(f"unit {self.name!r}: one activation per rank point")


@dataclass(frozen=True)
class Slot:
    """How one parameter/buffer follows channel spaces.

    ``out``: dim 0 is this unit's channels. ``inp``: dim 1 is the concatenation of these
    parts, each a unit name or a fixed (unpruned) width. ``repeat``: each input channel
    spans that many consecutive columns (a Linear after a flatten of k×k maps).
    """

    out: str | None = None
    inp: tuple[str | int, ...] = ()
    repeat: int = 1


@runtime_checkable
class PrunableModel(Protocol):
    arch: str
    num_classes: int
    cfg: list
    input_size: int

    def prunable_units(self) -> list[PrunableUnit]: ...

    def channel_map(self) -> dict[str, Slot]: ...

    def ignored_layers(self) -> list[nn.Module]: ...


def bn_slots(prefix: str, unit: str | None) -> dict[str, Slot]:
    """The four tensors of a BatchNorm (γ, β, running mean and variance) all follow ``unit``."""
    return {f"{prefix}.{t}": Slot(out=unit) for t in ("weight", "bias", "running_mean", "running_var")}


def cfg_with_widths(model: nn.Module, widths: Mapping[str, int]) -> list:
    """``model.cfg`` with the named units' widths replaced (others keep theirs)."""
    cfg = list(model.cfg)
    for u in model.prunable_units():
        for i in u.cfg_index:
            cfg[i] = int(widths.get(u.name, u.width))
    return cfg


def set_cp_rates(model: nn.Module, rates: Mapping[str, float]) -> None:
    """Write each unit's removed fraction onto its convs' ``cp_rate`` (HRank's attribute; only
    the hand-described families carry it)."""
    if not hasattr(model, "prunable_units"):
        return
    for u in model.prunable_units():
        for conv in u.convs:
            model.get_submodule(conv).cp_rate = float(rates.get(u.name, 0.0))


class Described:
    """Mixin of the hand-described families: their descriptions annotate the discovered units.

    The units themselves come from the dependency graph (``compressor.pruning.graph``); a
    family adds only HRank's bookkeeping, the cfg positions of each unit's width and HRank's
    original rank points. ``prunable_units()`` stays as the test oracle for discovery.
    """

    def unit_annotations(self) -> dict[str, dict]:
        return {u.name: {"cfg_index": u.cfg_index, "compat_rank_points": u.compat_rank_points}
                for u in self.prunable_units()}  # type: ignore[attr-defined]
