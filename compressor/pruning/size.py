"""MACs, params and conv shapes of a model at given keep counts, without building it.

The budget solvers evaluate many candidate keep counts, so building each candidate would
be slow. Here every Conv2d, Linear and norm layer is described once, from the discovered
units and one forward pass: which unit its output channels follow, how many of its input
channels follow which unit (a concat consumer follows several, a Linear after a flatten
follows k×k columns per channel), and its spatial size. A count is then arithmetic, and so
is every conv's shape at any widths (``SizeModel.conv_shapes``: what a latency table times).

What is counted is what ``compressor.pruning.counting`` counts on the physically pruned model
(Conv2d/Linear multiply-accumulates; every parameter), and a test checks both agree on
every registered and listed torchvision model.

``layer_calls`` is the one forward walk (every leaf module call, in call order, with its
input and output shapes) that both the spatial sizes here and ``latency_table.conv_shapes`` read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
from torch import nn

from compressor.deploy.latency_table import ConvShape
from compressor.pruning.graph import Discovery, example_input, forward_once

#: activations a latency block times with its conv (the module that runs right after the conv or its BN)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardtanh, nn.Sigmoid)


@dataclass(frozen=True)
class Call:
    """One call of a leaf module in a forward pass."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]   # shape of the first tensor argument (() if none)
    out_shape: tuple[int, ...]  # shape of the output (() if not a tensor)


def layer_calls(model: nn.Module, example: torch.Tensor) -> list[Call]:
    """Every leaf module call of one forward pass of ``example``, in call order (eval mode, no grad).

    Works on the ``meta`` device (no memory, no compute). A module called twice appears twice.
    """
    calls: list[Call] = []
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, inp: tuple, out: Any) -> None:
        ins = tuple(inp[0].shape) if inp and torch.is_tensor(inp[0]) else ()
        calls.append(Call(names[mod], mod, ins, tuple(out.shape) if torch.is_tensor(out) else ()))

    handles.extend(m.register_forward_hook(hook) for m in model.modules() if not list(m.children()))
    forward_once(model, example, handles)
    return calls


def block_after(calls: list[Call], i: int) -> tuple[bool, str | None]:
    """(BN follows, activation class name) for the conv called at ``calls[i]``."""
    nxt = [c.module for c in calls[i + 1:i + 3]]
    bn = bool(nxt) and isinstance(nxt[0], nn.BatchNorm2d)
    after = nxt[1:] if bn else nxt[:1]
    act = type(after[0]).__name__ if after and isinstance(after[0], ACTIVATIONS) else None
    return bn, act


def _padding(mod: nn.Conv2d) -> tuple[int, int]:
    if isinstance(mod.padding, str):  # "valid" or "same" (stride 1)
        if mod.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for k, d in zip(mod.kernel_size, mod.dilation))  # type: ignore[return-value]
    return tuple(mod.padding)  # type: ignore[return-value]


def conv_shape(call: Call, calls: list[Call], i: int) -> ConvShape:
    """The full-width ``ConvShape`` of the conv called at ``calls[i]`` (with its BN/activation)."""
    mod = call.module
    bn, act = block_after(calls, i)
    return ConvShape(c_in=mod.in_channels, c_out=mod.out_channels, groups=mod.groups, kernel=tuple(mod.kernel_size),
                     stride=tuple(mod.stride), padding=_padding(mod), dilation=tuple(mod.dilation),
                     hw=(int(call.in_shape[2]), int(call.in_shape[3])), bias=mod.bias is not None, bn=bn, act=act)


def linear_shape(call: Call) -> ConvShape:
    """A Linear as the latency table times it: ``hw[0]`` rows per sample (1 after a flatten)."""
    mod = call.module
    rows = max(1, int(torch.Size(call.in_shape[1:-1]).numel())) if len(call.in_shape) > 2 else 1
    return ConvShape(c_in=mod.in_features, c_out=mod.out_features, groups=1, kernel=(1, 1), stride=(1, 1),
                     padding=(0, 0), dilation=(1, 1), hw=(rows, 1), bias=mod.bias is not None, linear=True)


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
    spatial: int = 1                # output elements per channel (conv) or rows (linear), summed over calls
    bias: bool = False
    fixed_params: int = 0           # params that never follow a unit
    per_channel_params: int = 0     # params per output channel of a norm layer
    name: str = ""
    shape: ConvShape | None = None  # full-width shape at its first call (a conv/Linear the forward runs)


class SizeModel:
    """``count(keep) -> {"macs", "params"}`` and ``conv_shapes(keep)`` for keep counts of the discovered units."""

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
        calls = layer_calls(model, example[:1])
        spatial = _spatial(calls)
        shapes: dict[str, ConvShape] = {}
        for i, c in enumerate(calls):
            if c.name in shapes:
                continue
            if isinstance(c.module, nn.Conv2d) and len(c.in_shape) == 4:
                shapes[c.name] = conv_shape(c, calls, i)
            elif isinstance(c.module, nn.Linear) and c.in_shape:
                shapes[c.name] = linear_shape(c)
        self.layers: list[_Layer] = []
        self.other_params = 0
        for name, mod in model.named_modules():
            own = sum(p.numel() for p in mod.parameters(recurse=False))
            if isinstance(mod, nn.Conv2d):
                dw = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                self.layers.append(_Layer("conv", mod.out_channels, mod.in_channels, out_of.get(name, ("", 0.0)),
                                          tuple(in_of.get(name, ())), mod.groups, dw,
                                          mod.kernel_size[0] * mod.kernel_size[1], spatial.get(name, 0),
                                          mod.bias is not None, name=name, shape=shapes.get(name)))
            elif isinstance(mod, nn.Linear):
                self.layers.append(_Layer("linear", mod.out_features, mod.in_features, out_of.get(name, ("", 0.0)),
                                          tuple(in_of.get(name, ())), spatial=spatial.get(name, 0),
                                          bias=mod.bias is not None, name=name, shape=shapes.get(name)))
            elif name in out_of and own:
                width = _channels(mod)
                self.layers.append(_Layer("norm", width, 0, out_of[name], (), per_channel_params=own // width,
                                          name=name))
            else:
                self.other_params += own
        self._shape_cache: dict[tuple[int, ...], dict[str, ConvShape]] = {}

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

    def conv_shapes(self, keep: Mapping[str, int]) -> dict[str, ConvShape]:
        """Every Conv2d and Linear the forward runs, at ``keep`` widths (units not named stay whole).

        Input/output channels follow the units exactly as ``count`` does (residual groups, depthwise
        followers, concat consumers, the Linear after a flatten); a depthwise conv keeps
        groups = channels; kernel, stride, padding, input size and the BN/activation run with it
        are those of the unpruned model. Linear layers come with ``linear=True``.
        """
        key = tuple(int(keep.get(u, w)) for u, w in self.widths.items())
        hit = self._shape_cache.get(key)
        if hit is not None:
            return hit
        out: dict[str, ConvShape] = {}
        for layer in self.layers:
            if layer.shape is None:
                continue
            c_out = _follow(layer.out, (layer.out_unit,), keep, self.widths)
            if layer.depthwise:
                out[layer.name] = layer.shape.at(c_out, c_out)
                continue
            c_in = _follow(layer.inp, layer.in_units, keep, self.widths)
            sh = layer.shape
            if sh.groups > 1 and sh.groups == layer.inp:  # channel-wise grouping follows the channels
                sh = replace(sh, groups=c_in)
            out[layer.name] = replace(sh, c_in=c_in, c_out=c_out)
        if len(self._shape_cache) > 4096:
            self._shape_cache.clear()
        self._shape_cache[key] = out
        return out


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


def _spatial(calls: list[Call]) -> dict[str, int]:
    """Output elements per channel of each conv, rows per sample of each Linear (one image), over every call."""
    found: dict[str, int] = {}
    for c in calls:
        mod = c.module
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and c.out_shape:
            per = torch.Size(c.out_shape[1:]).numel() // (mod.out_channels if isinstance(mod, nn.Conv2d)
                                                           else mod.out_features)
            found[c.name] = found.get(c.name, 0) + per
    return found
