"""MACs and params of a model at given keep counts, without building it.

The budget solvers evaluate many candidate keep counts, so building each candidate would
be slow. Here every Conv2d, Linear and norm layer is described once, from the discovered
units and one forward pass: which unit its output channels follow, how many of its input
channels follow which unit (a concat consumer follows several, a Linear after a flatten
follows k×k columns per channel), and its spatial size. A count is then arithmetic.

What is counted is what ``compressor.counting`` counts on the physically pruned model
(Conv2d/Linear multiply-accumulates; every parameter), and a test checks both agree on
every registered and listed torchvision model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from compressor.pruning.graph import Discovery, example_input


@dataclass(frozen=True)
class _Layer:
    kind: str                       # "conv", "linear", "norm", "other"
    out: int                        # full output channels (features)
    inp: int                        # full input channels (0 for norms/other)
    out_unit: tuple[str, float]     # (unit, channels per unit channel) or ("", 0)
    in_units: tuple[tuple[str, float], ...]
    groups: int = 1
    depthwise: bool = False
    kernel: int = 1                 # kh * kw
    spatial: int = 1                # output elements per channel (conv) or rows (linear)
    bias: bool = False
    fixed_params: int = 0           # params that never follow a unit
    per_channel_params: int = 0     # params per output channel of a norm layer


class SizeModel:
    """``count(keep) -> {"macs", "params"}`` for keep counts of the discovered units."""

    def __init__(self, model: nn.Module, found: Discovery, example: torch.Tensor | None = None) -> None:
        example = example if example is not None else example_input(model)
        self.widths = {u.name: u.width for u in found.units}
        prunable = set(self.widths)
        out_of: dict[str, tuple[str, float]] = {}
        in_of: dict[str, list[tuple[str, float]]] = {}
        for unit, members in found.members.items():
            if unit not in prunable:
                continue
            w = self.widths[unit]
            for m in members:
                if m.role == "out":
                    out_of[m.name] = (unit, m.n / w)
                else:
                    in_of.setdefault(m.name, []).append((unit, m.n / w))
        spatial = _spatial(model, example)
        self.layers: list[_Layer] = []
        self.other_params = 0
        for name, mod in model.named_modules():
            own = sum(p.numel() for p in mod.parameters(recurse=False))
            if isinstance(mod, nn.Conv2d):
                dw = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                self.layers.append(_Layer("conv", mod.out_channels, mod.in_channels, out_of.get(name, ("", 0.0)),
                                          tuple(in_of.get(name, ())), mod.groups, dw,
                                          mod.kernel_size[0] * mod.kernel_size[1], spatial.get(name, 0),
                                          mod.bias is not None))
            elif isinstance(mod, nn.Linear):
                self.layers.append(_Layer("linear", mod.out_features, mod.in_features, out_of.get(name, ("", 0.0)),
                                          tuple(in_of.get(name, ())), spatial=spatial.get(name, 0),
                                          bias=mod.bias is not None))
            elif name in out_of and own:
                width = _channels(mod)
                self.layers.append(_Layer("norm", width, 0, out_of[name], (), per_channel_params=own // width))
            else:
                self.other_params += own

    def count(self, keep: Mapping[str, int]) -> dict[str, int]:
        macs = params = 0
        for layer in self.layers:
            out = _follow(layer.out, (layer.out_unit,), keep, self.widths)
            if layer.kind == "norm":
                params += out * layer.per_channel_params
                continue
            inp = _follow(layer.inp, layer.in_units, keep, self.widths)
            if layer.kind == "conv":
                per_group_in = 1 if layer.depthwise else inp // layer.groups
                weights = out * per_group_in * layer.kernel
                macs += layer.spatial * weights
            else:
                weights = out * inp
                macs += layer.spatial * weights
            params += weights + (out if layer.bias else 0)
        return {"macs": int(macs), "params": int(params + self.other_params)}


def _follow(full: int, parts: tuple[tuple[str, float], ...], keep: Mapping[str, int],
            widths: Mapping[str, int]) -> int:
    removed = 0.0
    for unit, per in parts:
        if unit:
            removed += (widths[unit] - int(keep.get(unit, widths[unit]))) * per
    return int(round(full - removed))


def _channels(mod: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if hasattr(mod, attr):
            return int(getattr(mod, attr))
    shape = getattr(mod, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    p = next(mod.parameters(recurse=False))
    return int(p.shape[0])


def _spatial(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Output elements per channel of each conv, rows per sample of each Linear (one image)."""
    found: dict[str, int] = {}
    handles = []

    def make(name: str) -> object:
        def hook(mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
            per = out[0].numel() // (mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features)
            found[name] = found.get(name, 0) + per
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            handles.append(mod.register_forward_hook(make(name)))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return found
