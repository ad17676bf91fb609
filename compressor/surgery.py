"""Physically remove channels: a NEW, smaller model (the input is never mutated).

Two paths give the same model:

* ``torch_pruning`` (default): torch-pruning's dependency graph cuts each unit with the
  plan's explicit indices; coupled layers (next conv input, BN, depthwise convs, concat
  offsets, Linear columns) follow. The result is then checked tensor-by-tensor against
  the rebuild path, because torch-pruning silently does less on some mistakes.
* ``rebuild``: build the model from the reduced cfg and copy the kept slices of every
  tensor, following ``model.channel_map()``.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch_pruning as tp
from torch import nn

from compressor.models import get_model
from compressor.models._spec import Slot, cfg_with_widths, set_cp_rates
from compressor.plan import Plan

METHODS = ("torch_pruning", "rebuild")


def pruned_cfg(model: nn.Module, plan: Plan) -> list:
    return cfg_with_widths(model, {u: len(plan.kept(u)) for u in plan.widths})


def _set_cp_rates(model: nn.Module, plan: Plan) -> None:
    set_cp_rates(model, {u: 1.0 - len(plan.kept(u)) / w for u, w in plan.widths.items()})


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
    new = get_model(model.arch, num_classes=model.num_classes, cfg=pruned_cfg(model, plan))
    new.load_state_dict(transplant(model.state_dict(), model.channel_map(), plan))
    _set_cp_rates(new, plan)
    return new.to(next(model.parameters()).device).train(model.training)


def prune_with_torch_pruning(model: nn.Module, plan: Plan) -> nn.Module:
    """Cut a deep copy with torch-pruning's dependency graph and the plan's explicit indices."""
    _check_plan(model, plan)
    m = copy.deepcopy(model)
    device = next(m.parameters()).device
    was_training = m.training
    m.eval()
    example = torch.randn(1, 3, m.input_size, m.input_size, device=device)
    # Trace the whole graph: torch-pruning's ``ignored_layers`` would drop the classifier from the
    # trace, and its input columns would then no longer follow the unit feeding it.
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=example)
    ignored = set(m.ignored_layers())
    for unit in m.prunable_units():
        if unit.name not in plan.keep:
            continue
        keep = set(plan.keep[unit.name])
        drop = [i for i in range(unit.width) if i not in keep]
        if not drop:
            continue
        conv = m.get_submodule(unit.name)
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop)
        if not dg.check_pruning_group(group):
            raise RuntimeError(f"torch-pruning refused the group of {unit.name} (it would empty a layer)")
        for item in group:
            if item.dep.target.module in ignored and dg.is_out_channel_pruning_fn(item.dep.handler):
                raise RuntimeError(f"pruning {unit.name} would cut the outputs of a protected layer (classifier)")
        group.prune()
    m.cfg = pruned_cfg(model, plan)
    _set_cp_rates(m, plan)
    return m.train(was_training)


def verify_same(a: nn.Module, b: nn.Module) -> None:
    """Raise if two models differ in any tensor (names, shapes or values)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise RuntimeError(f"surgery paths disagree on tensor names: {sorted(set(sa) ^ set(sb))[:5]}")
    for k in sa:
        if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]):
            raise RuntimeError(f"surgery paths disagree on {k}: {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}")


def apply(model: nn.Module, plan: Plan, method: str = "torch_pruning", verify: bool = True) -> nn.Module:
    """Return a new model with only the plan's channels; ``model`` is left untouched."""
    if method == "rebuild":
        return rebuild(model, plan)
    if method != "torch_pruning":
        raise ValueError(f"unknown surgery method {method!r}; valid: {', '.join(METHODS)}")
    pruned = prune_with_torch_pruning(model, plan)
    if verify:
        verify_same(pruned, rebuild(model, plan))
    return pruned
