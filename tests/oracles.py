"""Test oracles: the hand-written per-family descriptions, kept to check the engine against.

``units_of`` / ``channel_map_of`` are the hand-written descriptions of HRank's families (VGG16-BN,
MobileNet v1/v2, SqueezeNet): which channel spaces can be cut, where they are ranked, which cfg
positions hold their widths, and which dims of which tensors follow them. The product never reads
them: the engine discovers units on the dependency graph and ``compressor.models.hrank`` keeps the
cfg bookkeeping from module names; tests check both against these. ``rebuild`` builds a family
from its reduced cfg and copies the kept slices of every tensor following ``channel_map_of``: an
independent path to the model the graph's surgery makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from compressor.models import get_model
from compressor.models._spec import PrunableUnit
from compressor.models.mobilenet_v2 import LAST_INDEX, _project
from compressor.pruning.plan import Plan


def _check_plan(model: nn.Module, plan: Plan) -> None:
    units = {u.name: u for u in units_of(model)}
    for name, width in plan.widths.items():
        if name not in units:
            raise ValueError(f"plan names unit {name!r}, which {model.arch} does not have")
        if units[name].width != width:
            raise ValueError(f"plan says {name!r} has {width} channels, the model has {units[name].width}")


def _index_parts(parts: tuple[str | int, ...], plan: Plan, repeat: int) -> torch.Tensor:
    idx, offset = [], 0
    for part in parts:
        if isinstance(part, str):
            kept = torch.tensor(plan.kept(part), dtype=torch.long) if part in plan.widths else None
            width = plan.widths.get(part)
            if kept is None:
                raise KeyError(part)
        else:
            width, kept = part, torch.arange(part)
        idx.append(kept + offset)
        offset += width
    cols = torch.cat(idx)
    if repeat > 1:
        cols = (cols[:, None] * repeat + torch.arange(repeat)[None, :]).reshape(-1)
    return cols


def transplant(state: Mapping[str, torch.Tensor], slots: Mapping[str, Slot], plan: Plan) -> dict[str, torch.Tensor]:
    """Slice every tensor of ``state`` to the plan (tensors without a slot are copied)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        slot = slots.get(key)
        if slot is None:
            out[key] = t.clone()
            continue
        if slot.out is not None and slot.out in plan.widths:
            t = t.index_select(0, torch.tensor(plan.kept(slot.out), dtype=torch.long))
        if slot.inp and any(isinstance(p, str) and p in plan.widths for p in slot.inp):
            parts = tuple(p if (isinstance(p, int) or p in plan.widths) else _width_of(p, slots, state) for p in slot.inp)
            t = t.index_select(1, _index_parts(parts, plan, slot.repeat))
        out[key] = t.clone()
    return out


def _width_of(unit: str, slots: Mapping[str, Slot], state: Mapping[str, torch.Tensor]) -> int:
    """Width of a unit the plan does not mention: the dim 0 of a tensor that follows it."""
    for key, slot in slots.items():
        if slot.out == unit and key in state:
            return int(state[key].shape[0])
    raise KeyError(unit)


def rebuild(model: nn.Module, plan: Plan) -> nn.Module:
    """Build from the reduced cfg and copy the kept slices."""
    _check_plan(model, plan)
    with torch.random.fork_rng(devices=[]):  # the fresh model's init must not advance the caller's RNG
        new = get_model(model.arch, num_classes=model.num_classes, cfg=pruned_cfg(model, plan))
    p = next(model.parameters())
    new.to(dtype=p.dtype).load_state_dict(transplant(model.state_dict(), channel_map_of(model), plan))
    set_cp_rates(new, plan)
    return new.to(p.device).train(model.training)


def verify_same(a: nn.Module, b: nn.Module) -> None:
    """Raise if two models differ in any tensor (names, shapes or values)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise RuntimeError(f"surgery paths disagree on tensor names: {sorted(set(sa) ^ set(sb))[:5]}")
    for k in sa:
        if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]):
            raise RuntimeError(f"surgery paths disagree on {k}: {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}")


def dead_copy(model: nn.Module, plan: Plan, units: list) -> nn.Module:
    """A copy of ``model`` whose channels the plan drops output exactly zero: every norm that carries a
    unit's channels gets gamma = beta = 0 there, or, without a norm, the producing convs' rows are 0.
    Pruning those channels must then change nothing (the engine's exactness property)."""
    import copy

    from compressor.pruning import graph

    dead = copy.deepcopy(model)
    found = graph.discovery(dead)
    for u in units:
        drop = [i for i in range(u.width) if i not in set(plan.keep[u.name])]
        norms = [mb for mb in found.members[u.name] if mb.role == "out"
                 and isinstance(dead.get_submodule(mb.name), nn.modules.batchnorm._BatchNorm)]
        for mb in norms:
            bn = dead.get_submodule(mb.name)
            # a norm over a concat of the unit's channels and their depthwise copies (GhostNet) drops each copy
            idx = [i + j * u.width for j in range(max(1, mb.n // u.width)) for i in drop]
            bn.weight.data[idx] = 0
            bn.bias.data[idx] = 0
        if not norms:
            for conv in u.convs:
                c = dead.get_submodule(conv)
                c.weight.data[drop] = 0
                if c.bias is not None:
                    c.bias.data[drop] = 0
    return dead


# ---------------------------------------------------------------- exactness checks

def example(model: nn.Module) -> torch.Tensor:
    """Two seeded inputs at the model's input size."""
    from compressor.pruning import graph

    return graph.example_input(model, 2, generator=torch.Generator().manual_seed(7))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_same_function(pruned: nn.Module, dead: nn.Module, x: torch.Tensor) -> None:
    """The pruned network computes the dead one's function: compared in float64.

    The two differ only by sums of exact zeros, so any difference is rounding in a different
    summation order. In float32 that rounding is ~1e-7 of the *intermediate* magnitudes, which in
    a random-init ResNet-110 grow to ~1e5 (its logits reach 1.2e5), and which kernels a CPU
    picks changes the last bits: a fixed rtol of 1e-5 failed on one CPU and passed on another.
    In float64 the unit roundoff is 1.1e-16; even a 10^5 growth over ~300 layers leaves the
    error below 1e-9 of the logits' scale, so a tolerance of 1e-9 · max|logit| still catches a
    single wrongly transplanted weight (an O(1) relative change of some logit) by many orders.
    """
    import copy

    a = copy.deepcopy(pruned).double()
    b = copy.deepcopy(dead).double()
    la, lb = logits(a, x.double()), logits(b, x.double())
    scale = float(lb.abs().max())
    torch.testing.assert_close(la, lb, atol=1e-9 * max(scale, 1.0), rtol=0)


def assert_exact(model: nn.Module, plan: Plan) -> nn.Module:
    """Rate 0 gives identical logits; dropping dead channels gives the dead model's function exactly."""
    from compressor.pruning import graph, surgery

    x = example(model)
    units = [u for u in graph.units(model) if u.name in plan.keep]
    whole = Plan(keep={u.name: tuple(range(u.width)) for u in units}, widths={u.name: u.width for u in units})
    assert torch.equal(logits(surgery.apply(model, whole, verify=False), x), logits(model, x))
    dead = dead_copy(model, plan, units)
    pruned, masks = surgery.cut(dead, plan)
    surgery.verify_masked(dead, pruned, masks)
    assert_same_function(pruned, dead, x)
    return pruned


# ---------------------------------------------------------------- the hand-written family descriptions

@dataclass(frozen=True)
class Slot:
    """How one parameter/buffer follows channel spaces.

    ``out``: dim 0 is this unit's channels. ``inp``: dim 1 is the concatenation of these
    parts, each a unit name or a fixed (unpruned) width. ``repeat``: each input channel
    spans that many consecutive columns (a Linear after a flatten of k×k maps).
    """

    out: str | None = None
    inp: tuple[str | int, ...] = ()
    repeat: int = 1


def bn_slots(prefix: str, unit: str | None) -> dict[str, Slot]:
    """The four tensors of a BatchNorm (γ, β, running mean and variance) all follow ``unit``."""
    return {f"{prefix}.{t}": Slot(out=unit) for t in ("weight", "bias", "running_mean", "running_var")}


def units_of(model: nn.Module) -> list[PrunableUnit]:
    """The family's hand-written units (what discovery must find), in forward order."""
    return _UNITS[type(model).__name__](model)


def channel_map_of(model: nn.Module) -> dict[str, Slot]:
    """Which dims of which tensors follow which unit (the rebuild's transplant map)."""
    return _MAPS[type(model).__name__](model)


def described(model: nn.Module) -> bool:
    return type(model).__name__ in _UNITS


def pruned_cfg(model: nn.Module, plan: Plan) -> list:
    """The family's cfg at the plan's keep counts (the oracle's own: from its hand-written cfg positions)."""
    cfg = list(model.cfg)
    for u in units_of(model):
        for i in u.cfg_index:
            cfg[i] = len(plan.kept(u.name)) if u.name in plan.widths else u.width
    return cfg


def set_cp_rates(model: nn.Module, plan: Plan) -> None:
    for u in units_of(model):
        rate = 1.0 - len(plan.kept(u.name)) / plan.widths[u.name] if u.name in plan.widths else 0.0
        for conv in u.convs:
            model.get_submodule(conv).cp_rate = rate


def _units_VGGCifar(self: nn.Module) -> list[PrunableUnit]:
    names = [n for n, _ in self.features.named_children()]
    units = []
    for pos, (cpos, hpos) in enumerate(zip(self.convcfg, self.hrank_relucfg)):
        i = int(names[cpos][4:])
        units.append(
            PrunableUnit(
                name=f"features.conv{i}",
                convs=(f"features.conv{i}",),
                bns=(f"features.norm{i}",),
                rank_points=(f"features.relu{i}",),
                cfg_index=(i,),
                width=self.cfg[i],
                # HRank's relucfg: the seed ranks 12 convs, 4 of them on MaxPool outputs.
                compat_rank_points=(f"features.{names[hpos]}",) if pos < 12 else None,
            )
        )
    return units


def _map_VGGCifar(self: nn.Module) -> dict[str, Slot]:
    slots: dict[str, Slot] = {}
    prev: str | int = 3
    for u in units_of(self):
        i = u.name.split("conv")[-1]
        slots[f"features.conv{i}.weight"] = Slot(out=u.name, inp=(prev,))
        slots[f"features.conv{i}.bias"] = Slot(out=u.name)
        slots.update(bn_slots(f"features.norm{i}", u.name))
        prev = u.name
    slots["classifier.linear1.weight"] = Slot(inp=(prev,))
    return slots


def _units_VGGImageNet(self: nn.Module) -> list[PrunableUnit]:
    units, pos = [], 0
    for ci, x in enumerate(self.cfg):
        if x == "M":
            pos += 1
            continue
        units.append(PrunableUnit(
            name=f"features.{pos}", convs=(f"features.{pos}",), bns=(f"features.{pos + 1}",),
            rank_points=(f"features.{pos + 2}",), cfg_index=(ci,), width=x,
        ))
        pos += 3
    return units


def _map_VGGImageNet(self: nn.Module) -> dict[str, Slot]:
    slots: dict[str, Slot] = {}
    prev: str | int = 3
    for u in units_of(self):
        bn = u.bns[0]
        slots[f"{u.name}.weight"] = Slot(out=u.name, inp=(prev,))
        slots[f"{u.name}.bias"] = Slot(out=u.name)
        slots.update(bn_slots(bn, u.name))
        prev = u.name
    slots["classifier.0.weight"] = Slot(inp=(prev,), repeat=49)
    return slots


def _units_MobileNetV1(self: nn.Module) -> list[PrunableUnit]:
    units = [PrunableUnit(name="features.conv_bn.conv", convs=("features.conv_bn.conv",),
                          bns=("features.conv_bn.bn",), rank_points=("features.conv_bn.relu",),
                          cfg_index=(0,), width=self.cfg[0])]
    for i in range(1, len(self.cfg)):
        b = f"features.conv_dw{i}"
        units.append(PrunableUnit(name=f"{b}.pw", convs=(f"{b}.pw",), bns=(f"{b}.pw_bn",),
                                  rank_points=(f"{b}.pw_relu",), cfg_index=(i,), width=self.cfg[i]))
    return units


def _map_MobileNetV1(self: nn.Module) -> dict[str, Slot]:
    slots: dict[str, Slot] = {}

    def bn(prefix: str, unit: str) -> None:
        slots.update(bn_slots(prefix, unit))

    prev: str | int = 3
    for i, u in enumerate(units_of(self)):
        if i > 0:  # the depthwise conv before this pointwise conv follows the previous unit
            b = f"features.conv_dw{i}"
            slots[f"{b}.dw.weight"] = Slot(out=prev)
            bn(f"{b}.dw_bn", prev)
        slots[f"{u.name}.weight"] = Slot(out=u.name, inp=(prev,))
        bn(u.bns[0], u.name)
        prev = u.name
    slots["fc.weight"] = Slot(inp=(prev,))
    return slots


def _units_MobileNetV2(self: nn.Module) -> list[PrunableUnit]:
    units = [PrunableUnit(name="features.0.0", convs=("features.0.0",), bns=("features.0.1",),
                          rank_points=("features.0.2",), cfg_index=(0,), width=self.cfg[0])]
    for b in self._blocks:
        if b["t"] != 1:
            p = f"features.{b['index']}.conv.0"
            units.append(PrunableUnit(name=f"{p}.0", convs=(f"{p}.0",), bns=(f"{p}.1",), rank_points=(f"{p}.2",),
                                      cfg_index=(b["hid"],), width=self.cfg[b["hid"]]))
        group = self._group(b)
        if group is not None and not b["residual"]:  # the stage's first block: one unit for the stage
            members = [m for m in self._blocks if m["stage"] == b["stage"]]
            convs, bns = zip(*(_project(m) for m in members))
            units.append(PrunableUnit(name=group, convs=convs, bns=bns,
                                      rank_points=tuple(f"features.{m['index']}" for m in members),
                                      cfg_index=tuple(m["out"] for m in members), width=self.cfg[b["out"]]))
    n = len(self._blocks) + 1
    units.append(PrunableUnit(name=f"features.{n}.0", convs=(f"features.{n}.0",), bns=(f"features.{n}.1",),
                              rank_points=(f"features.{n}.2",), cfg_index=(LAST_INDEX,),
                              width=self.cfg[LAST_INDEX]))
    return units


def _map_MobileNetV2(self: nn.Module) -> dict[str, Slot]:
    slots: dict[str, Slot] = {}

    def conv_bn(prefix: str, unit: str, inp: tuple = ()) -> None:
        slots[f"{prefix}.0.weight"] = Slot(out=unit, inp=inp)
        slots.update(bn_slots(f"{prefix}.1", unit))

    conv_bn("features.0", "features.0.0")
    feed: tuple = ()  # the unit the current block's input follows, if pruned (a residual group)
    for b in self._blocks:
        p = f"features.{b['index']}.conv"
        if b["t"] == 1:  # depthwise + project follow the block input (the stem)
            unit, dw = "features.0.0", f"{p}.0"
        else:
            unit, dw = f"{p}.0.0", f"{p}.1"
            conv_bn(f"{p}.0", unit, inp=feed)
        conv_bn(dw, unit)
        group = self._group(b)
        proj, proj_bn = _project(b)
        slots[f"{proj}.weight"] = Slot(out=group, inp=(unit,))
        if group is not None:
            slots.update(bn_slots(proj_bn, group))
        feed = (group,) if group is not None else ()
    n = len(self._blocks) + 1
    conv_bn(f"features.{n}", f"features.{n}.0", inp=feed)
    slots["classifier.1.weight"] = Slot(inp=(f"features.{n}.0",))
    return slots


def _units_SqueezeNet(self: nn.Module) -> list[PrunableUnit]:
    units = [PrunableUnit(name="features.0", convs=("features.0",), bns=(), rank_points=("features.1",),
                          cfg_index=(0,), width=self.cfg[0])]
    for f, pos in enumerate(self._fire_positions()):
        for j, conv in enumerate(("squeeze", "expand1x1", "expand3x3")):
            name = f"features.{pos}.{conv}"
            units.append(PrunableUnit(name=name, convs=(name,), bns=(), rank_points=(f"{name}_activation",),
                                      cfg_index=(1 + 3 * f + j,), width=self.cfg[1 + 3 * f + j]))
    return units


def _map_SqueezeNet(self: nn.Module) -> dict[str, Slot]:
    slots = {"features.0.weight": Slot(out="features.0", inp=(3,)), "features.0.bias": Slot(out="features.0")}
    prev: tuple[str, ...] = ("features.0",)
    for pos in self._fire_positions():
        p = f"features.{pos}"
        slots[f"{p}.squeeze.weight"] = Slot(out=f"{p}.squeeze", inp=prev)
        slots[f"{p}.squeeze.bias"] = Slot(out=f"{p}.squeeze")
        for e in ("expand1x1", "expand3x3"):
            slots[f"{p}.{e}.weight"] = Slot(out=f"{p}.{e}", inp=(f"{p}.squeeze",))
            slots[f"{p}.{e}.bias"] = Slot(out=f"{p}.{e}")
        prev = (f"{p}.expand1x1", f"{p}.expand3x3")
    slots["classifier.1.weight"] = Slot(inp=prev)
    return slots


_UNITS = {
    "VGGCifar": _units_VGGCifar,
    "VGGImageNet": _units_VGGImageNet,
    "MobileNetV1": _units_MobileNetV1,
    "MobileNetV2": _units_MobileNetV2,
    "SqueezeNet": _units_SqueezeNet,
}
_MAPS = {
    "VGGCifar": _map_VGGCifar,
    "VGGImageNet": _map_VGGImageNet,
    "MobileNetV1": _map_MobileNetV1,
    "MobileNetV2": _map_MobileNetV2,
    "SqueezeNet": _map_SqueezeNet,
}
