"""VGG16-BN: the HRank CIFAR layout (reference model) and torchvision's ImageNet layout.

CIFAR layout (state_dict keys identical to HRank's ``vgg_16_bn``): ``features`` holds
``conv{i}/norm{i}/relu{i}`` and ``pool{i}`` named by cfg position, then AvgPool2d(2) and
``classifier = linear1 -> norm1 -> relu1 -> linear2``. ``cfg[-1]`` is linear1's width;
linear1's input width is the last conv's width, so a reduced cfg just works.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from compressor.errors import UserError
from compressor.models._registry import register_model

CIFAR_CFG: list = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, 512]
IMAGENET_CFG: list = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _check_cfg(cfg: list, reference: list) -> list:
    cfg = list(cfg)
    ok = len(cfg) == len(reference) and all(
        (r == "M" and c == "M") or (r != "M" and isinstance(c, int) and not isinstance(c, bool) and c >= 1)
        for c, r in zip(cfg, reference)
    )
    if not ok:
        raise UserError(f"cfg does not fit VGG16-BN (expected the shape of {reference}), got {cfg}", field="cfg")
    return cfg


class VGGCifar(nn.Module):
    """HRank's CIFAR VGG16-BN; convs carry ``cp_rate`` (fraction of filters removed)."""

    input_size = 32
    short_rate_list = 12  # HRank strings list 12 rates; conv 13 is then kept whole

    def __init__(self, num_classes: int = 10, cfg: list | None = None) -> None:
        super().__init__()
        self.cfg = _check_cfg(cfg if cfg is not None else CIFAR_CFG, CIFAR_CFG)
        self.num_classes = num_classes
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = 3
        for i, x in enumerate(self.cfg[:-1]):
            if x == "M":
                layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=2, stride=2)
                continue
            conv = nn.Conv2d(in_ch, x, kernel_size=3, padding=1)
            conv.cp_rate = 0.0
            layers[f"conv{i}"] = conv
            layers[f"norm{i}"] = nn.BatchNorm2d(x)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            in_ch = x
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(in_ch, self.cfg[-1]),
                norm1=nn.BatchNorm1d(self.cfg[-1]),
                relu1=nn.ReLU(inplace=True),
                linear2=nn.Linear(self.cfg[-1], num_classes),
            )
        )
        names = [n for n, _ in self.features.named_children()]
        # HRank's index lists, derived from names (positions in ``features``).
        self.convcfg = [names.index(f"conv{i}") for i, x in enumerate(self.cfg[:-1]) if x != "M"]
        self.relucfg = [names.index(f"relu{i}") for i, x in enumerate(self.cfg[:-1]) if x != "M"]
        self.hrank_relucfg = [p + 1 if p + 1 < len(names) and names[p + 1].startswith("pool") else p for p in self.relucfg]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def ignored_layers(self) -> list[nn.Module]:
        return [self.classifier.linear2]

    def unit_annotations(self) -> dict[str, dict]:
        """HRank's bookkeeping per unit, from module names: the cfg position of ``features.conv{i}``'s
        width is ``i``; HRank's original rank point (``--hrank-compat``) is its ``relucfg`` entry, a
        MaxPool output for 4 of the 12 convs it ranks (conv 13 is not ranked there)."""
        names = [n for n, _ in self.features.named_children()]
        convs = [i for i, x in enumerate(self.cfg[:-1]) if x != "M"]
        return {f"features.conv{i}": {"cfg_index": (i,),
                                      "compat_rank_points": (f"features.{names[h]}",) if k < 12 else None}
                for k, (i, h) in enumerate(zip(convs, self.hrank_relucfg))}

    def cfg_from_state_dict(self, sd: dict[str, torch.Tensor]) -> list:
        """The cfg of a (possibly pruned) HRank state_dict, read off its weight shapes."""
        cfg = [x if x == "M" else int(sd[f"features.conv{i}.weight"].shape[0]) for i, x in enumerate(self.cfg[:-1])]
        return cfg + [int(sd["classifier.linear1.weight"].shape[0])]


class VGGImageNet(nn.Module):
    """torchvision's ``vgg16_bn`` layout (keys ``features.N``, ``classifier.N``) for 224×224."""

    input_size = 224

    def __init__(self, num_classes: int = 1000, cfg: list | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        self.cfg = _check_cfg(cfg if cfg is not None else IMAGENET_CFG, IMAGENET_CFG)
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        in_ch = 3
        for x in self.cfg:
            if x == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(in_ch, x, kernel_size=3, padding=1)
                conv.cp_rate = 0.0
                layers += [conv, nn.BatchNorm2d(x), nn.ReLU(inplace=True)]
                in_ch = x
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * 49, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def ignored_layers(self) -> list[nn.Module]:
        return [self.classifier[6]]

    def _conv_positions(self) -> list[tuple[int, int]]:
        """(cfg position, index in ``features``) of each conv: conv, BN, ReLU per width, one pool per 'M'."""
        out, pos = [], 0
        for ci, x in enumerate(self.cfg):
            if x == "M":
                pos += 1
            else:
                out.append((ci, pos))
                pos += 3
        return out

    def unit_annotations(self) -> dict[str, dict]:
        """The cfg position of each conv's width, from its index in ``features``."""
        return {f"features.{pos}": {"cfg_index": (ci,)} for ci, pos in self._conv_positions()}

    def cfg_from_state_dict(self, sd: dict[str, torch.Tensor]) -> list:
        """The cfg of a (possibly pruned) state_dict in this layout, read off its weight shapes."""
        cfg = list(self.cfg)
        for ci, pos in self._conv_positions():
            cfg[ci] = int(sd[f"features.{pos}.weight"].shape[0])
        return cfg


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, cfg: list | None = None) -> VGGCifar:
    """CIFAR VGG16-BN in HRank's layout (32×32 input)."""
    return VGGCifar(num_classes=num_classes, cfg=cfg)


@register_model("vgg16_bn_imagenet")
def vgg16_bn_imagenet(num_classes: int = 1000, cfg: list | None = None) -> VGGImageNet:
    """torchvision-layout VGG16-BN (224×224 input); loads torchvision weights from a local file."""
    return VGGImageNet(num_classes=num_classes, cfg=cfg)
