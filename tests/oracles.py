"""Test oracles: the hand-written per-family descriptions, kept to check the engine against.

``rebuild`` builds a registered family from its reduced cfg and copies the kept slices of
every tensor following the family's ``channel_map()``: an independent path to the model the
dependency graph's surgery makes, used only by tests.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from compressor.models import get_model
from compressor.models._spec import Slot
from compressor.pruning.plan import Plan
from compressor.pruning.surgery import _set_cp_rates, pruned_cfg


def _check_plan(model: nn.Module, plan: Plan) -> None:
    units = {u.name: u for u in model.prunable_units()}
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
    new.to(dtype=p.dtype).load_state_dict(transplant(model.state_dict(), model.channel_map(), plan))
    _set_cp_rates(new, plan)
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
        norms = [mb.name for mb in found.members[u.name] if mb.role == "out"
                 and isinstance(dead.get_submodule(mb.name), nn.modules.batchnorm._BatchNorm)]
        for name in norms:
            bn = dead.get_submodule(name)
            bn.weight.data[drop] = 0
            bn.bias.data[drop] = 0
        if not norms:
            for conv in u.convs:
                c = dead.get_submodule(conv)
                c.weight.data[drop] = 0
                if c.bias is not None:
                    c.bias.data[drop] = 0
    return dead
