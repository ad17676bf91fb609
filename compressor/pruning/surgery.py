"""Physically remove channels: a NEW, smaller model (the input is never mutated).

torch-pruning's dependency graph cuts each unit with the plan's explicit indices; coupled
layers (next conv input, BN, depthwise convs, concat offsets, Linear columns) follow. The
result is then checked against the unpruned model with the cut channels zeroed
(``verify_masked``), for every model, because torch-pruning silently does less on some
mistakes. (The hand-written per-family rebuild that used to be a second path is a test
oracle now: ``tests/oracles.py``.)
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch_pruning as tp
from torch import nn

from compressor.errors import UserError
from compressor.models import hrank
from compressor.pruning.plan import Plan
from compressor.pruning import graph

METHODS = ("torch_pruning",)


def _drop(unit_width: int, keep: tuple[int, ...]) -> list[int]:
    kept = set(keep)
    return [i for i in range(unit_width) if i not in kept]


def _units_of(model: nn.Module, plan: Plan) -> dict[str, "object"]:
    units = {u.name: u for u in graph.units(model)}
    for name, width in plan.widths.items():
        if name not in units:
            graph.check_prunable(model, [name])  # a refused or skipped layer says why
            raise UserError(f"plan names unit {name!r}, which the model does not have", field=name)
        if units[name].width != width:
            raise UserError(f"plan says {name!r} has {width} channels, the model has {units[name].width}", field=name)
    return units


def prune_with_torch_pruning(model: nn.Module, plan: Plan) -> nn.Module:
    """Cut a deep copy with torch-pruning's dependency graph and the plan's explicit indices."""
    return cut(model, plan)[0]


def cut(model: nn.Module, plan: Plan) -> tuple[nn.Module, dict[str, list[int]]]:
    """``prune_with_torch_pruning`` plus, per layer, the output channels that were cut (the
    masks that ``verify_masked`` zeroes in the unpruned model)."""
    units = _units_of(model, plan)
    m = copy.deepcopy(model)
    was_training = m.training
    # Trace the whole graph: torch-pruning's ``ignored_layers`` would drop the classifier from the
    # trace, and its input columns would then no longer follow the unit feeding it.
    dg = graph.build_graph(m, graph.example_input(m))
    protected = set(graph.protected_layers(m))
    names = {mod: n for n, mod in m.named_modules()}
    masks: dict[str, list[int]] = {}
    for name, keep in plan.keep.items():
        drop = _drop(units[name].width, keep)
        if not drop:
            continue
        root = m.get_submodule(name)  # a Conv2d, or a Linear (an MLP's hidden width)
        fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
        group = dg.get_pruning_group(root, fn, idxs=drop)
        if not dg.check_pruning_group(group):
            raise UserError(f"torch-pruning refused the group of {name} (it would empty a layer)", field=name)
        for item in group:
            target = item.dep.target.module
            if not dg.is_out_channel_pruning_fn(item.dep.handler) or target not in names:
                continue
            if target in protected:
                raise UserError(f"pruning {name} would cut the outputs of a protected layer "
                                f"({names[target]})", field=name)
            masks.setdefault(names[target], []).extend(int(i) for i in item.idxs)
        group.prune()
    if hrank.annotated(m):  # HRank's families keep their cfg and cp_rate in step
        m.cfg = hrank.pruned_cfg(model, {u: len(plan.kept(u)) for u in plan.widths})
        hrank.set_cp_rates(m, hrank.rates_of_plan(plan))
    return m.train(was_training), masks


def _masked_copy(model: nn.Module, masks: Mapping[str, list[int]]) -> tuple[nn.Module, list]:
    """A copy of ``model`` whose cut channels output exactly zero (hooks on every cut layer)."""
    ref = copy.deepcopy(model).eval()
    handles = []
    for name, idxs in masks.items():
        idx = torch.tensor(sorted(set(idxs)), dtype=torch.long)

        mod = ref.get_submodule(name)
        width = graph.out_width(mod)

        def hook(_mod: nn.Module, _inp: object, out: torch.Tensor, idx: torch.Tensor = idx,
                 width: int | None = width) -> torch.Tensor:
            # channels are dim 1 (NCHW, or [N, C]) unless only the last dim fits (a channels-last Linear/LayerNorm)
            dim = -1 if (width is not None and out.shape[1] != width and out.shape[-1] == width) else 1
            return out.index_fill(dim, idx.to(out.device), 0)

        handles.append(mod.register_forward_hook(hook))
    return ref, handles


def verify_masked(model: nn.Module, pruned: nn.Module, masks: Mapping[str, list[int]],
                  example: torch.Tensor | None = None) -> float:
    """Raise unless ``pruned`` computes what ``model`` computes with the cut channels zeroed.

    This is the engine's oracle for any graph: a coupling the graph missed (a channel
    shuffle, a norm over channels) changes the kept channels' values and shows up here.
    Returns the largest absolute difference seen.
    """
    x = example if example is not None else graph.example_input(model, 2)
    ref, handles = _masked_copy(model, masks)
    was = pruned.training
    try:
        pruned.eval()
        with torch.no_grad():
            want = ref(x)
            try:
                got = pruned(x)
            except (RuntimeError, IndexError, ValueError) as exc:  # the graph left inconsistent shapes
                raise PruneMismatch(float("inf"), 0.0, f"the pruned network fails to run ({str(exc)[:120]})") from exc
    finally:
        for h in handles:
            h.remove()
        pruned.train(was)
    want, got = _logits(want), _logits(got)
    if want.shape != got.shape:
        raise UserError(f"the pruned model's output is {tuple(got.shape)}, the model's {tuple(want.shape)}",
                        field="model")
    err = float((want.float() - got.float()).abs().max())
    eps = torch.finfo(want.dtype).eps if want.is_floating_point() else 1e-7
    tol = max(1e-4, 100 * eps) * (1.0 + float(want.float().abs().max()))
    if not err <= tol:
        raise PruneMismatch(err, tol)
    return err


def _logits(out: object) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out  # type: ignore[return-value]


class PruneMismatch(UserError):
    def __init__(self, err: float, tol: float, what: str | None = None) -> None:
        super().__init__(what or f"the pruned network differs from the masked one by {err:.3g} (tolerance "
                         f"{tol:.3g}): the dependency graph mis-coupled some channels", field="model")
        self.err = err


def _culprit_unit(model: nn.Module, plan: Plan) -> str | None:
    """The first unit that fails the masked check when pruned alone (only run after a failure)."""
    for name, keep in plan.keep.items():
        single = Plan(keep={name: keep}, widths=dict(plan.widths), model=plan.model)
        pruned, masks = cut(model, single)
        try:
            verify_masked(model, pruned, masks)
        except PruneMismatch:
            return name
    return None


def apply(model: nn.Module, plan: Plan, method: str = "torch_pruning", verify: bool = True) -> nn.Module:
    """Return a new model with only the plan's channels; ``model`` is left untouched.

    ``verify`` checks the result against the unpruned model with the cut channels zeroed
    (every model), and for registered families also tensor by tensor against the cfg
    rebuild.
    """
    if method != "torch_pruning":
        raise ValueError(f"unknown surgery method {method!r}; valid: {', '.join(METHODS)}")
    pruned, masks = cut(model, plan)
    if verify:
        try:
            verify_masked(model, pruned, masks)
        except PruneMismatch as exc:
            unit = _culprit_unit(model, plan)
            where = f" (unit {unit})" if unit else ""
            raise UserError(f"{exc.args[0].split(': ', 1)[-1]}{where}; the model is refused rather than pruned "
                            "wrongly", field=unit or "model") from exc
    return pruned
