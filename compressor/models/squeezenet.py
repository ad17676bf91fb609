"""SqueezeNet 1.0 and 1.1 with torchvision's module and state_dict names.

Layout (as torchvision): ``features.0`` stem conv, ``features.1`` ReLU, then max pools and
``Fire`` modules (``squeeze``/``expand1x1``/``expand3x3`` with their ``*_activation`` ReLUs;
the output is ``cat([expand1x1, expand3x3])``); ``classifier`` = Dropout, a 1×1 conv to
``num_classes``, ReLU, global average pool. The ImageNet variants load torchvision's
weight files with ``load_state_dict``.

``cfg`` is a flat list of 25 widths: the stem's, then ``squeeze, expand1x1, expand3x3``
for each of the 8 Fire modules. All 25 are prunable units, each ranked at the ReLU after it
(there is no BN: ``bns=()``). A squeeze conv's kept channels slice both expand convs'
inputs; a Fire's output is the concatenation, so the next squeeze conv (or the classifier
conv) reads the expand1x1 indices first, then the expand3x3 indices offset by the
expand1x1 width. The classifier conv is never pruned (``ignored_layers``).

CIFAR variants (32×32): torchvision's stems (7×7 stride 2 for 1.0, 3×3 stride 2 for 1.1,
no padding) shrink 32×32 inputs to 1×1 maps after the three max pools. Here the stem is a
3×3 conv with stride 1 and padding 1 (same widths) and the three max pools stay, so the
Fire maps are 16×16, 8×8 and 4×4. Module indices are unchanged. The CIFAR head has no ReLU
on the class scores (see ``SqueezeNet.__init__``).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from compressor.errors import UserError
from compressor.models._registry import register_model

FIRES: tuple[tuple[int, int, int], ...] = (
    (16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
    (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256),
)
#: Per version: stem width, and the layout after the stem and its ReLU ("M" pool, "F" Fire).
VERSIONS: dict[str, tuple[int, str]] = {"1_0": (96, "MFFFMFFFFMF"), "1_1": (64, "MFFMFFMFFFF")}


def default_cfg(version: str) -> list[int]:
    return [VERSIONS[version][0]] + [w for fire in FIRES for w in fire]


def _check_cfg(cfg: list, version: str) -> list[int]:
    cfg = list(cfg)
    ref = default_cfg(version)
    if len(cfg) != len(ref) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cfg):
        raise UserError(f"cfg does not fit SqueezeNet {version.replace('_', '.')} (expected {len(ref)} positive "
                        f"widths like {ref}), got {cfg}", field="cfg")
    return cfg


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)
        for conv in (self.squeeze, self.expand1x1, self.expand3x3):
            conv.cp_rate = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    #: quick-baseline training (prune without --checkpoint): no BN, so a lower lr and a warm-up
    def __init__(self, version: str, num_classes: int, cfg: list | None, cifar: bool, input_size: int,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.version = version
        self.cfg = _check_cfg(cfg if cfg is not None else default_cfg(version), version)
        self.num_classes = num_classes
        self.input_size = input_size
        if cifar:
            stem = nn.Conv2d(3, self.cfg[0], kernel_size=3, stride=1, padding=1)
        else:
            stem = nn.Conv2d(3, self.cfg[0], kernel_size=7 if version == "1_0" else 3, stride=2)
        stem.cp_rate = 0.0
        layers: list[nn.Module] = [stem, nn.ReLU(inplace=True)]
        inp, f = self.cfg[0], 0
        for kind in VERSIONS[version][1]:
            if kind == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
            else:
                s, e1, e3 = self.cfg[1 + 3 * f: 4 + 3 * f]
                layers.append(Fire(inp, s, e1, e3))
                inp, f = e1 + e3, f + 1
        self.features = nn.Sequential(*layers)
        final_conv = nn.Conv2d(inp, num_classes, kernel_size=1)
        # CIFAR variants drop the ReLU on the class scores (an Identity keeps the indices): on small
        # data that ReLU dies and training stalls at chance (digits: 15% vs 82% after 10 epochs).
        head_act = nn.Identity() if cifar else nn.ReLU(inplace=True)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv, head_act, nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)

    def _fire_positions(self) -> list[int]:
        return [i for i, m in enumerate(self.features) if isinstance(m, Fire)]

    def ignored_layers(self) -> list[nn.Module]:
        return [self.classifier[1]]

    def _convs(self) -> list[str]:
        """The conv whose width is ``cfg[i]``: the stem, then each Fire's squeeze, expand1x1, expand3x3."""
        return ["features.0"] + [f"features.{pos}.{c}" for pos in self._fire_positions()
                                 for c in ("squeeze", "expand1x1", "expand3x3")]

    def unit_annotations(self) -> dict[str, dict]:
        """The cfg position of each unit's width, from the module names."""
        return {name: {"cfg_index": (i,)} for i, name in enumerate(self._convs())}

    def cfg_from_state_dict(self, sd: Mapping[str, torch.Tensor]) -> list[int]:
        """The cfg of a (possibly pruned) state_dict in this layout, read off its weight shapes."""
        return [int(sd[f"{name}.weight"].shape[0]) for name in self._convs()]


@register_model("squeezenet1_0")
def squeezenet1_0(num_classes: int = 10, cfg: list | None = None) -> SqueezeNet:
    """CIFAR SqueezeNet 1.0 (32×32; 3×3 stride-1 stem)."""
    return SqueezeNet("1_0", num_classes=num_classes, cfg=cfg, cifar=True, input_size=32)


@register_model("squeezenet1_1")
def squeezenet1_1(num_classes: int = 10, cfg: list | None = None) -> SqueezeNet:
    """CIFAR SqueezeNet 1.1 (32×32; 3×3 stride-1 stem)."""
    return SqueezeNet("1_1", num_classes=num_classes, cfg=cfg, cifar=True, input_size=32)


@register_model("squeezenet1_0_imagenet")
def squeezenet1_0_imagenet(num_classes: int = 1000, cfg: list | None = None) -> SqueezeNet:
    """torchvision-layout SqueezeNet 1.0 (224×224); loads torchvision weight files."""
    return SqueezeNet("1_0", num_classes=num_classes, cfg=cfg, cifar=False, input_size=224)


@register_model("squeezenet1_1_imagenet")
def squeezenet1_1_imagenet(num_classes: int = 1000, cfg: list | None = None) -> SqueezeNet:
    """torchvision-layout SqueezeNet 1.1 (224×224); loads torchvision weight files."""
    return SqueezeNet("1_1", num_classes=num_classes, cfg=cfg, cifar=False, input_size=224)
