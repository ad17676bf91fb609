"""Who writes and who reads a unit's channels, from torch-pruning's dependency graph.

A unit (``compressor.pruning.graph``) is one channel space cut as a whole. Reconstruction and
reconstruction-aware selection need two things about it, for any model:

* its **writers**: every named module whose *output* channels are the unit's (the producing
  conv and its BN, a depthwise follower, every member of a residual group, a channel-op such as
  the CIFAR ResNets' ``PadShortcut`` that writes into a residual space), each with the output
  channel that carries each unit channel;
* its **readers**: every ``Conv2d``/``Linear`` whose *input* holds the unit's channels and that
  is not itself a writer (a depthwise follower is part of the unit; the layers reading its output
  are the readers), each with the input positions that carry each unit channel: one per channel
  for a conv or a Linear after pooling, ``k×k`` for the Linear after a flatten, an offset slice
  after a concat. A residual space lists every reader of the shared space.

Both are read off one pruning group per unit (``DependencyGraph.get_pruning_group`` on the
unit's root Conv2d or Linear, all channels), whose items carry, per index, the root channel it follows
(``root_idxs``). Nothing here is model-specific: no ``channel_map()``, no module names.
Readers that are neither Conv2d nor Linear (a ``PadShortcut`` carrying the channel into the next
stage, a pooling op) are listed in ``ChannelSpace.other_readers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch_pruning as tp
from torch import nn

from compressor.pruning import graph


@dataclass(frozen=True)
class Carrier:
    """A layer holding the unit's channels: ``where[c]`` are its channel positions for unit channel ``c``
    (output channels for a writer, input positions for a reader)."""

    name: str
    where: tuple[tuple[int, ...], ...]

    @property
    def span(self) -> int:
        return len(self.where[0]) if self.where else 0


@dataclass(frozen=True)
class ChannelSpace:
    unit: str
    width: int
    writers: tuple[Carrier, ...]
    readers: tuple[Carrier, ...]   # Conv2d / Linear only
    other_readers: tuple[str, ...] = ()


def _per_channel(name: str, idxs: list[int], roots: list[int], width: int) -> tuple[tuple[int, ...], ...]:
    per: list[list[int]] = [[] for _ in range(width)]
    for i, r in zip(idxs, roots):
        if not 0 <= int(r) < width:
            raise ValueError(f"{name}: channel {r} outside the unit's width {width}")
        per[int(r)].append(int(i))
    spans = {len(p) for p in per}
    if len(spans) != 1 or 0 in spans:
        raise ValueError(f"{name} holds the unit's channels unevenly ({sorted(spans)} positions per channel)")
    return tuple(tuple(sorted(p)) for p in per)


def channel_spaces(model: nn.Module, example: torch.Tensor, widths: Mapping[str, int]) -> dict[str, ChannelSpace]:
    """``{unit: ChannelSpace}`` for the units named in ``widths`` (unit name = its root Conv2d or Linear)."""
    dg = graph.build_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, ChannelSpace] = {}
    for unit, width in widths.items():
        root = model.get_submodule(unit)
        if isinstance(root, nn.Conv2d) and root.out_channels == int(width):
            cut = tp.prune_conv_out_channels
        elif isinstance(root, nn.Linear) and root.out_features == int(width):  # a Linear-rooted unit
            cut = tp.prune_linear_out_channels
        else:
            raise ValueError(f"unit {unit!r} is not a Conv2d or Linear with {width} output channels")
        group = dg.get_pruning_group(root, cut, idxs=list(range(int(width))))
        writes: dict[str, tuple[list[int], list[int]]] = {}
        reads: dict[str, tuple[list[int], list[int]]] = {}
        for item in group:
            mod = item.dep.target.module
            name = names.get(mod)
            if name is None:  # an op node (add, concat, flatten): no module to hook or refit
                continue
            side = writes if dg.is_out_channel_pruning_fn(item.dep.handler) else reads
            idxs, roots = side.setdefault(name, ([], []))
            idxs.extend(int(i) for i in item.idxs)
            roots.extend(int(r) for r in item.root_idxs)
        writers = tuple(Carrier(n, _per_channel(n, *ir, int(width))) for n, ir in writes.items())
        readers, others = [], []
        for n, ir in reads.items():
            if n in writes:  # a depthwise follower: part of the unit
                continue
            if isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear)):
                readers.append(Carrier(n, _per_channel(n, *ir, int(width))))
            else:
                others.append(n)
        out[unit] = ChannelSpace(unit, int(width), writers, tuple(readers), tuple(others))
    return out


def layer_writers(model: nn.Module, space: ChannelSpace) -> list[Carrier]:
    """The Conv2d/Linear writers of a space (the layers whose kept rows are the unit's kept channels)."""
    return [w for w in space.writers if isinstance(model.get_submodule(w.name), (nn.Conv2d, nn.Linear))]
