"""MobileNet v1 in HRankPlus's seed layout: a ``conv_bn`` stem, 13 ``conv_dw`` blocks, fc.

Module names are readable (``features.conv_bn.conv``, ``features.conv_dw3.pw``); see
``models.hrank.hrankplus_mobilenet_v1_state_dict`` for HRankPlus's positional keys (``conv1.0``, ``features.2.3``).

``cfg`` holds 14 widths: the stem conv's, then each pointwise conv's. A depthwise conv has
no channels of its own: it keeps the indices its producer (the stem or the previous
pointwise conv) keeps, with ``groups`` = the kept count, and the next pointwise conv reads
the same indices. So there are 14 prunable units (stem + 13 pointwise convs), each ranked
at the ReLU after its BN; the last pointwise conv feeds ``fc`` (its input columns follow).

Variants: ``mobilenet_v1`` (CIFAR, 32×32) has stride 1 in the stem and the standard
strides elsewhere, so the last maps are 2×2; ``mobilenet_v1_imagenet`` (224×224) has the
paper's stride-2 stem (7×7 last maps). Both end in a global average pool.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from compressor.errors import UserError
from compressor.models._registry import register_model

CFG: list[int] = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
#: Stride of each depthwise conv (blocks 1..13).
DW_STRIDES: tuple[int, ...] = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)


def _check_cfg(cfg: list) -> list[int]:
    cfg = list(cfg)
    if len(cfg) != len(CFG) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cfg):
        raise UserError(f"cfg does not fit MobileNet v1 (expected {len(CFG)} positive widths like {CFG}), got {cfg}",
                        field="cfg")
    return cfg


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(inp, oup, 3, stride, 1, bias=False)
    conv.cp_rate = 0.0
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(oup), relu=nn.ReLU(inplace=True)))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    pw = nn.Conv2d(inp, oup, 1, 1, 0, bias=False)
    pw.cp_rate = 0.0
    return nn.Sequential(OrderedDict(
        dw=nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        dw_bn=nn.BatchNorm2d(inp),
        dw_relu=nn.ReLU(inplace=True),
        pw=pw,
        pw_bn=nn.BatchNorm2d(oup),
        pw_relu=nn.ReLU(inplace=True),
    ))


class MobileNetV1(nn.Module):
    """MobileNet v1; ``stem_stride`` is 1 for CIFAR and 2 for ImageNet."""
    #: quick-baseline training (prune without --checkpoint), measured on digits: ~97% in 6 epochs

    def __init__(self, num_classes: int, cfg: list | None, stem_stride: int, input_size: int) -> None:
        super().__init__()
        self.cfg = _check_cfg(cfg if cfg is not None else CFG)
        self.num_classes = num_classes
        self.input_size = input_size
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv_bn=_conv_bn(3, self.cfg[0], stem_stride))
        for i, stride in enumerate(DW_STRIDES, start=1):
            layers[f"conv_dw{i}"] = _conv_dw(self.cfg[i - 1], self.cfg[i], stride)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.cfg[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    def ignored_layers(self) -> list[nn.Module]:
        return [self.fc]

    def _pointwise(self) -> list[str]:
        """The conv whose width is ``cfg[i]``: the stem, then each block's pointwise conv."""
        return ["features.conv_bn.conv"] + [f"features.conv_dw{i}.pw" for i in range(1, len(self.cfg))]

    def unit_annotations(self) -> dict[str, dict]:
        """The cfg position of each unit's width, from the module names."""
        return {name: {"cfg_index": (i,)} for i, name in enumerate(self._pointwise())}

    def cfg_from_state_dict(self, sd: Mapping[str, torch.Tensor]) -> list[int]:
        """The cfg of a (possibly pruned) state_dict in this layout, read off its weight shapes."""
        return [int(sd[f"{name}.weight"].shape[0]) for name in self._pointwise()]


@register_model("mobilenet_v1")
def mobilenet_v1(num_classes: int = 10, cfg: list | None = None) -> MobileNetV1:
    """CIFAR MobileNet v1 (32×32 input, stride-1 stem)."""
    return MobileNetV1(num_classes=num_classes, cfg=cfg, stem_stride=1, input_size=32)


@register_model("mobilenet_v1_imagenet")
def mobilenet_v1_imagenet(num_classes: int = 1000, cfg: list | None = None) -> MobileNetV1:
    """ImageNet MobileNet v1 (224×224 input, stride-2 stem), HRankPlus's ImageNet seed layout."""
    return MobileNetV1(num_classes=num_classes, cfg=cfg, stem_stride=2, input_size=224)
