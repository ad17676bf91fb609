"""ResNet-20/56/110 for CIFAR (He et al. 2016, option-A shortcuts), with akamaster's names.

Module names match akamaster's ``pytorch_resnet_cifar10`` (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``, ``linear``), so its weight files load after the
``module.`` prefix is stripped. Its inputs are normalised with the ImageNet mean/std.

The zero-pad shortcut (stride-2 subsample, then zero channels on both sides) is a module
of its own, ``PadShortcut``, not an ``F.pad`` in a lambda. torch-pruning treats ``F.pad`` as
elementwise and merges the stage widths 16/32/64 into one channel group, which cannot be
pruned. ``PadShortcut`` keeps, as a buffer ``dst``, the output channel that each input
channel lands in (-1: dropped), and has a torch-pruning pruner of its own, so its input and
output channel spaces are independent: stage outputs can be pruned, and the pruned shortcut
still adds each kept input channel onto the same channel as in the unpruned network.

The first block of stage 1 also gets a stride-1 ``PadShortcut`` (a channel map; identity
when unpruned), so the stem's outputs are a channel space of their own, as in HRankPlus.

Units (from the dependency graph, see ``compressor.pruning.graph``): the stem ``conv1``
(ranked at ``bn1`` + ReLU), the 3·n block-inner convs (``layerS.i.conv1``, at ``bn1`` + ReLU)
and, as residual groups, the three stage output spaces (named by their first ``conv2``,
ranked at the members' ``bn2`` outputs, summed). Residual groups are prunable in these
models (``prune_residual = True``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compressor.errors import UserError
from compressor.models._registry import register_model
from compressor.pruning.graph import ChannelOp, register_channel_op

#: ImageNet statistics: what akamaster's weights were trained with
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` placed into ``out_channels`` zeros.

    Input channel ``i`` lands in output channel ``dst[i]`` (``-1``: not used). Unpruned,
    ``dst[i] = i + pad`` with ``pad = (out - in) // 2``; akamaster pads ``planes // 4`` on
    each side, the same for its doubling stages.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:  # stride 1: a channel map
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        pad = (out_channels - in_channels) // 2
        self.register_buffer("dst", torch.arange(in_channels) + pad, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if x.is_meta:  # shapes only (a checkpoint's shape check, an input-size check): the gather's
            return x.new_empty(x.shape[0], self.out_channels, x.shape[2], x.shape[3])  # index ops have no meta kernel
        # a gather from [x, 0]: output channel j reads input src[j], or the zero channel
        src = torch.full((self.out_channels,), self.in_channels, dtype=torch.long, device=x.device)
        used = self.dst >= 0
        src[self.dst[used]] = torch.arange(self.in_channels, device=x.device)[used]
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2], x.shape[3])], 1)
        return padded.index_select(1, src)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class _PadShortcutPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's per-layer function for ``PadShortcut`` (in and out are independent)."""

    def prune_out_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
        gone = torch.tensor(sorted(set(int(i) for i in idxs)), dtype=torch.long)
        dst = layer.dst.clone()
        hit = torch.isin(dst, gone.to(dst.device))
        shift = (gone.to(dst.device)[None, :] < dst[:, None]).sum(1)
        layer.dst = torch.where(hit | (dst < 0), torch.full_like(dst, -1), dst - shift)
        layer.out_channels -= len(gone)
        return layer

    def prune_in_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
        gone = set(int(i) for i in idxs)
        keep = torch.tensor([i for i in range(layer.in_channels) if i not in gone], dtype=torch.long)
        layer.dst = layer.dst[keep.to(layer.dst.device)]
        layer.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: PadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: PadShortcut) -> int:
        return layer.in_channels


def _describe(layer: nn.Module) -> dict[str, Any]:
    return {"in": layer.in_channels, "out": layer.out_channels, "dst": [int(d) for d in layer.dst]}


def _restore(layer: nn.Module, spec: Mapping[str, Any]) -> None:
    dst = spec.get("dst")
    n_in, n_out = spec.get("in"), spec.get("out")
    ok = (isinstance(dst, list) and isinstance(n_in, int) and isinstance(n_out, int)
          and 1 <= n_in <= layer.in_channels and 1 <= n_out <= layer.out_channels and len(dst) == n_in
          and all(isinstance(d, int) and -1 <= d < n_out for d in dst))
    if not ok:
        raise UserError(f"a PadShortcut shape must be in/out within ({layer.in_channels}, {layer.out_channels}) "
                        "and one dst in [-1, out) per input channel", field="shapes")
    layer.in_channels, layer.out_channels = n_in, n_out
    layer.dst = torch.tensor(dst, dtype=torch.long, device=layer.dst.device)


register_channel_op(PadShortcut, ChannelOp(pruner=_PadShortcutPruner(), describe=_describe, restore=_restore))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, map_identity: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        mapped = map_identity or stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(in_planes, planes, stride) if mapped else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2): three stages of n BasicBlocks at widths 16, 32, 64."""

    input_size = 32
    mean, std = MEAN, STD
    prune_residual = True

    def __init__(self, depth: int, num_classes: int = 10, cfg: list | None = None) -> None:
        super().__init__()
        if cfg is not None:
            raise UserError("CIFAR ResNets have no cfg: pruned widths travel as module shapes", field="cfg")
        if (depth - 2) % 6:
            raise UserError(f"depth must be 6n+2, got {depth}", field="depth")
        n = (depth - 2) // 6
        self.depth, self.num_classes = depth, num_classes
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(n):
                # the first block's shortcut maps channels even in stage 1, so that the stem is a
                # channel space of its own (HRankPlus prunes stem and stage 1 apart)
                stage.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, map_identity=i == 0))
                in_planes = planes
            blocks.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = blocks
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def ignored_layers(self) -> list[nn.Module]:
        return [self.linear]

    #: rate lists in HRankPlus/CHIP's published order are read by ``models.hrank.layout_rates``
    rate_layout = "hrankplus_resnet"


def _builder(depth: int):  # noqa: ANN202 - registry builders share one signature
    def build(num_classes: int = 10, cfg: list | None = None) -> ResNetCifar:
        return ResNetCifar(depth, num_classes=num_classes, cfg=cfg)

    build.__doc__ = f"CIFAR ResNet-{depth} (option-A shortcuts, akamaster's module names)."
    return build


for _depth in (20, 56, 110):
    register_model(f"resnet{_depth}")(_builder(_depth))
