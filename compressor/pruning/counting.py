"""Honest size figures, counted on the physically pruned model.

What is counted:

* **MACs**: multiply-accumulates of every ``Conv2d`` (``out_elems × in_ch/groups × kh × kw``)
  and ``Linear`` (``in × out`` per sample) for one image at the model's input size.
  Bias adds, BatchNorm, activations and pooling are *not* counted.
* **Params**: every parameter (conv, BN γ/β, linear); buffers (BN running stats) are not.

On VGG16-BN CIFAR this gives 313.46M MACs / 14.99M params (published: 313.73M with
HRank's counter, 314.57M with thop, which also count bias/BN/pooling).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from compressor.pruning.graph import input_shape, units as units_of
from compressor.pruning.size import layer_calls


def _zeros(model: nn.Module, input_size: int | tuple[int, int] | None) -> torch.Tensor:
    if input_size is not None:  # a size given here needs none recorded on the model
        c = int(getattr(model, "in_channels", 3))
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    else:
        c, h, w = input_shape(model)
    p = next(model.parameters())
    return torch.zeros(1, c, h, w, device=p.device, dtype=p.dtype)


def count_macs(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> int:
    """Conv2d/Linear multiply-accumulates of one image, over every call (``size.layer_calls``' walk)."""
    total = 0
    for c in layer_calls(model, _zeros(model, input_size)):
        mod, out = c.module, c.out_shape
        if not out:
            continue
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += torch.Size(out[1:]).numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features * (torch.Size(out[1:]).numel() // mod.out_features)
    return total


def count_norm_ops(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> int:
    """Operations of the norm layers as thop counts them: 2 per output element (scale, shift).

    Not part of ``count``. Some published pruned-model figures include them (CHIP's and
    HRankPlus's ResNet-56 counts do), so comparing against those needs the sum.
    """
    return sum(2 * torch.Size(c.out_shape[1:]).numel() for c in layer_calls(model, _zeros(model, input_size))
               if isinstance(c.module, nn.modules.batchnorm._BatchNorm) and c.out_shape)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, input_size: int | None = None) -> dict[str, int]:
    return {"macs": count_macs(model, input_size), "params": count_params(model)}


def fmt_m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _width_of(model: nn.Module, name: str) -> int | None:
    """Output channels of the layer ``name`` (a unit's root) in ``model``, None when it has none."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return None
    return getattr(layer, "out_channels", None) or getattr(layer, "out_features", None)


def size_table(before: nn.Module, after: nn.Module, counts_before: dict[str, int] | None = None,
               counts_after: dict[str, int] | None = None, units: Sequence[Any] | None = None) -> str:
    """Per-unit channels before → after, then totals with reduction % (pass counts already made). ``units``: the
    units the run pruned (default: ``before``'s by its defaults; a run that pruned residual groups passes them)."""
    ub = {u.name: u.width for u in (units if units is not None else units_of(before))}
    ua = {n: _width_of(after, n) for n in ub}
    rows = ["| layer | channels | kept |", "|---|---|---|"]
    for name, w in ub.items():
        a = ua.get(name) or w
        rows.append(f"| {name} | {w} → {a} | {100.0 * a / w:.1f}% |")
    cb, ca = counts_before or count(before), counts_after or count(after)
    rows.append("")
    rows.append("| | before | after | reduction |")
    rows.append("|---|---|---|---|")
    for key in ("params", "macs"):
        red = 100.0 * (1 - ca[key] / cb[key])
        rows.append(f"| {key} | {fmt_m(cb[key])} | {fmt_m(ca[key])} | {red:.1f}% |")
    return "\n".join(rows)
