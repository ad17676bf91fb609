"""MobileNetV2 with torchvision's module and state_dict names.

Layout (as torchvision): ``features.0`` = stem (conv 3×3, BN, ReLU6); ``features.1..17`` =
``InvertedResidual`` blocks whose ``conv`` Sequential is [expand (conv 1×1, BN, ReLU6)],
depthwise (conv 3×3, BN, ReLU6), project conv 1×1, project BN (the expand part is absent
when t = 1); ``features.18`` = last conv 1×1 + BN + ReLU6; ``classifier`` = Dropout + Linear.
So torchvision's ImageNet weight files load with ``load_state_dict`` into
``mobilenet_v2_imagenet``.

``cfg`` is a flat list of 35 widths in network order: the stem's, then for each block its
hidden (expanded) width, if t ≠ 1, and its output width, then the last conv's width::

    [stem, out1, hid2, out2, hid3, out3, …, hid17, out17, last]

Block outputs inside a stage are tied by residual adds, so they must be equal; whether a
block adds its input is fixed by the architecture (every block but a stage's first), never
inferred from widths.

Prunable units (rank point: the activation after the unit's BN):

* the stem (``features.0.0``, ranked at ``features.0.2``): block 1 (t = 1) has no expand
  conv, so its depthwise conv + BN follow the stem's kept indices and its project conv
  reads them;
* each block's hidden width, t ≠ 1 (``features.k.conv.0.0``): expand conv out + BN, the
  depthwise conv + BN (same indices), project conv input. Ranked at the ReLU6 after the
  expand BN (``features.k.conv.0.2``); the depthwise ReLU6 has the same channels and is not
  ranked a second time;
* the last conv (``features.18.0``, ranked at ``features.18.2``); the Linear's columns follow.

Linear-bottleneck outputs (project BN, no activation) are full rank by design: in
``mobilenet_v2`` they are never ranked or pruned. Block outputs stay unpruned (a residual
stage would need one shared index set); they are in ``cfg`` so that narrower-stage models
can still be built.

Residual groups (``mobilenet_v2_res``, ``mobilenet_v2_res_imagenet``): the same network,
module names and state_dict (a trained ``mobilenet_v2`` state_dict loads as is), plus one
unit per *residual group*: the output channel space of a stage whose blocks are tied by
adds (n ≥ 2: c = 24, 32, 64, 96, 160). It is pruned with one shared index set:

* name: the stage's first project conv (``features.k.conv.2``); ``convs``/``bns``: every
  project 1×1 conv and project BN of the stage; ``cfg_index``: every block output of the
  stage; the consumers' inputs follow it (each later block's expand conv, the next stage's
  first expand conv, or ``features.18`` after the last stage);
* scores: weight criteria (l1, l2, fpgm, bn_scale) sum the member layers' per-channel
  scores; activation criteria sum over the rank points the engine discovers, the members'
  project-BN outputs (before the add), i.e. HRank's "sum of the member layers' ranks".
  These are linear-bottleneck outputs with no activation, usually near full rank, so HRank
  separates little there (the mean-activation tie-break decides) and APoZ sees no zeros.
  Prefer a weight criterion, or a small group rate, for these units. (The hand description
  below still names the block outputs; it is only the discovery test's oracle for units,
  convs and BNs.)

Stages with one block (c = 16 and 320) have no add: their outputs stay unpruned. Units are
listed in network order (by first producing conv): the stem, then per block its hidden unit
and, after a stage's first hidden unit, the stage's group unit; the last conv last.

Variants: ``mobilenet_v2_imagenet`` (224×224, torchvision's strides). ``mobilenet_v2``
(CIFAR, 32×32) uses stride 1 in the stem and in the second stage (24 channels), as the
usual CIFAR ports do, so the last maps are 4×4 instead of 1×1. The ``_res`` variants are
registered separately (not a builder flag) because checkpoints rebuild a model from
(name, num_classes, cfg) alone.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from compressor.errors import UserError
from compressor.models._registry import register_model

#: (expansion t, output channels c, blocks n, first stride s) per stage, as in the paper.
SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
STEM, LAST = 32, 1280
LAST_INDEX = 34  # position of the last conv's width in cfg


def _blocks(cifar: bool) -> list[dict]:
    """Per block: expansion, stride, stage, residual flag, and its cfg positions."""
    out, k = [], 1
    for stage, (t, c, n, s) in enumerate(SETTING):
        if cifar and stage == 1:
            s = 1
        for i in range(n):
            out.append(dict(index=k, t=t, c=c, n=n, stride=s if i == 0 else 1, stage=stage, residual=i > 0,
                            hid=2 * k - 2 if t != 1 else None, out=2 * k - 1))
            k += 1
    return out


def _project(b: dict) -> tuple[str, str]:
    """Module names of a block's project (linear-bottleneck) conv and its BN."""
    i = 2 if b["t"] != 1 else 1
    return f"features.{b['index']}.conv.{i}", f"features.{b['index']}.conv.{i + 1}"


def default_cfg() -> list[int]:
    cfg, inp = [STEM], STEM
    for b in _blocks(cifar=False):
        if b["t"] != 1:
            cfg.append(inp * b["t"])
        cfg.append(b["c"])
        inp = b["c"]
    return cfg + [LAST]


def _check_cfg(cfg: list) -> list[int]:
    cfg = list(cfg)
    ref = default_cfg()
    if len(cfg) != len(ref) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cfg):
        raise UserError(f"cfg does not fit MobileNetV2 (expected {len(ref)} positive widths like {ref}), got {cfg}",
                        field="cfg")
    stage_out: dict[int, int] = {}
    for b in _blocks(cifar=False):
        w = stage_out.setdefault(b["stage"], cfg[b["out"]])
        if cfg[b["out"]] != w:
            raise UserError(f"cfg: the outputs of stage {b['stage'] + 1} are tied by residual adds and must be "
                            f"equal, got {cfg[b['out']]} and {w}", field="cfg")
    return cfg


def _conv_bn_act(inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, hidden: int, oup: int, stride: int, expand: bool, residual: bool) -> None:
        super().__init__()
        self.use_res_connect = residual
        layers: list[nn.Module] = []
        if expand:
            layers.append(_conv_bn_act(inp, hidden, kernel=1))
            layers[0][0].cp_rate = 0.0
        layers += [
            _conv_bn_act(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    #: quick-baseline training (prune without --checkpoint)
    def __init__(self, num_classes: int, cfg: list | None, cifar: bool, input_size: int, dropout: float = 0.2,
                 residual_groups: bool = False) -> None:
        super().__init__()
        self.cfg = _check_cfg(cfg if cfg is not None else default_cfg())
        self.num_classes = num_classes
        self.input_size = input_size
        self.residual_groups = residual_groups
        self.prune_residual = residual_groups  # the engine prunes residual groups of this variant
        self._blocks = _blocks(cifar)
        stem = _conv_bn_act(3, self.cfg[0], stride=1 if cifar else 2)
        stem[0].cp_rate = 0.0
        layers: list[nn.Module] = [stem]
        inp = self.cfg[0]
        for b in self._blocks:
            hidden = self.cfg[b["hid"]] if b["t"] != 1 else inp
            oup = self.cfg[b["out"]]
            layers.append(InvertedResidual(inp, hidden, oup, b["stride"], b["t"] != 1, b["residual"]))
            inp = oup
        last = _conv_bn_act(inp, self.cfg[LAST_INDEX], kernel=1)
        last[0].cp_rate = 0.0
        layers.append(last)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.cfg[LAST_INDEX], num_classes))
        for b in self._blocks:
            if self._group(b) is not None:
                self.get_submodule(_project(b)[0]).cp_rate = 0.0
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))

    def _group(self, b: dict) -> str | None:
        """The residual-group unit that block ``b``'s output follows (None: unpruned output)."""
        if not self.residual_groups or b["n"] < 2:
            return None
        first = next(f for f in self._blocks if f["stage"] == b["stage"])
        return _project(first)[0]

    def ignored_layers(self) -> list[nn.Module]:
        return [self.classifier[1]]

    def group_members(self) -> dict[str, tuple[str, ...]]:
        """Each residual group's convs: the project conv of every block in its stage."""
        return {self._group(b): tuple(_project(m)[0] for m in self._blocks if m["stage"] == b["stage"])
                for b in self._blocks if self._group(b) is not None and not b["residual"]}

    def unit_annotations(self) -> dict[str, dict]:
        """The cfg positions of each unit's width, from the module names: the stem's, each expand conv's
        (``hid``), each residual group's (the ``out`` of every block in the stage) and the last conv's."""
        notes = {"features.0.0": {"cfg_index": (0,)}}
        for b in self._blocks:
            if b["t"] != 1:
                notes[f"features.{b['index']}.conv.0.0"] = {"cfg_index": (b["hid"],)}
            group = self._group(b)
            if group is not None and not b["residual"]:
                notes[group] = {"cfg_index": tuple(m["out"] for m in self._blocks if m["stage"] == b["stage"])}
        notes[f"features.{len(self._blocks) + 1}.0"] = {"cfg_index": (LAST_INDEX,)}
        return notes

    def cfg_from_state_dict(self, sd: Mapping[str, torch.Tensor]) -> list[int]:
        """The cfg of a (possibly pruned, also at block outputs) state_dict, read off its weight shapes."""
        cfg = [int(sd["features.0.0.weight"].shape[0])]
        for b in self._blocks:
            p = f"features.{b['index']}.conv"
            if b["t"] != 1:
                cfg.append(int(sd[f"{p}.0.0.weight"].shape[0]))
            cfg.append(int(sd[f"{p}.{2 if b['t'] != 1 else 1}.weight"].shape[0]))
        return cfg + [int(sd[f"features.{len(self._blocks) + 1}.0.weight"].shape[0])]


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10, cfg: list | None = None) -> MobileNetV2:
    """CIFAR MobileNetV2 (32×32; stride 1 in the stem and the second stage)."""
    return MobileNetV2(num_classes=num_classes, cfg=cfg, cifar=True, input_size=32)


@register_model("mobilenet_v2_imagenet")
def mobilenet_v2_imagenet(num_classes: int = 1000, cfg: list | None = None) -> MobileNetV2:
    """torchvision-layout MobileNetV2 (224×224); loads torchvision weight files."""
    return MobileNetV2(num_classes=num_classes, cfg=cfg, cifar=False, input_size=224)


@register_model("mobilenet_v2_res")
def mobilenet_v2_res(num_classes: int = 10, cfg: list | None = None) -> MobileNetV2:
    """CIFAR MobileNetV2 whose residual stages' outputs are prunable too (one shared index set per stage)."""
    return MobileNetV2(num_classes=num_classes, cfg=cfg, cifar=True, input_size=32, residual_groups=True)


@register_model("mobilenet_v2_res_imagenet")
def mobilenet_v2_res_imagenet(num_classes: int = 1000, cfg: list | None = None) -> MobileNetV2:
    """ImageNet MobileNetV2 with prunable residual groups; loads torchvision weight files."""
    return MobileNetV2(num_classes=num_classes, cfg=cfg, cifar=False, input_size=224, residual_groups=True)
