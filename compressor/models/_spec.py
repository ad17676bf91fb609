"""A prunable unit: one channel space the engine cuts as a whole.

Units are found on the dependency graph for every model (``compressor.pruning.graph``);
algorithms never look at a model's class. HRank's cfg bookkeeping lives in
``compressor.models.hrank``; the hand-written per-family descriptions the discovery is checked
against are test oracles (``tests/oracles.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


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
