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

import torch
from torch import nn

from compressor.pruning.graph import input_shape, units as units_of


def _zeros(model: nn.Module, input_size: int | tuple[int, int] | None) -> torch.Tensor:
    c, h, w = input_shape(model)
    if input_size is not None:
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    p = next(model.parameters())
    return torch.zeros(1, c, h, w, device=p.device, dtype=p.dtype)


def count_macs(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> int:
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += mod.in_features * mod.out_features * (out[0].numel() // mod.out_features)

    handles = []
    try:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(_zeros(model, input_size))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total


def count_norm_ops(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> int:
    """Operations of the norm layers as thop counts them: 2 per output element (scale, shift).

    Not part of ``count``. Some published pruned-model figures include them (CHIP's and
    HRankPlus's ResNet-56 counts do), so comparing against those needs the sum.
    """
    total = 0

    def hook(_mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out[0].numel()

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_hook(hook) for m in norms]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_zeros(model, input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, input_size: int | None = None) -> dict[str, int]:
    return {"macs": count_macs(model, input_size), "params": count_params(model)}


def fmt_m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def size_table(before: nn.Module, after: nn.Module, counts_before: dict[str, int] | None = None,
               counts_after: dict[str, int] | None = None) -> str:
    """Per-unit channels before → after, then totals with reduction % (pass counts already made)."""
    ub = {u.name: u.width for u in units_of(before)}
    ua = {u.name: u.width for u in units_of(after)}
    rows = ["| layer | channels | kept |", "|---|---|---|"]
    for name, w in ub.items():
        a = ua.get(name, w)
        rows.append(f"| {name} | {w} → {a} | {100.0 * a / w:.1f}% |")
    cb, ca = counts_before or count(before), counts_after or count(after)
    rows.append("")
    rows.append("| | before | after | reduction |")
    rows.append("|---|---|---|---|")
    for key in ("params", "macs"):
        red = 100.0 * (1 - ca[key] / cb[key])
        rows.append(f"| {key} | {fmt_m(cb[key])} | {fmt_m(ca[key])} | {red:.1f}% |")
    return "\n".join(rows)
