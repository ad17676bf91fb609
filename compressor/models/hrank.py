"""HRank's bookkeeping, in one place: ``cfg`` widths, ``cp_rate``, compat rank points, cfg from weights.

The engine finds every model's units on the dependency graph. HRank's families (VGG16-BN, MobileNet
v1/v2, SqueezeNet) are also built from a ``cfg`` width list, and HRank's code reads a removed
fraction ``cp_rate`` off each conv. Each such family says, from its own module names, which cfg
positions hold each unit's width and (VGG) HRank's original rank point: ``unit_annotations()``
(``{unit: {"cfg_index": (...), "compat_rank_points": (...)}}``, read by ``pruning.graph.units``),
and, for a residual group, which convs share it (``group_members()``). Everything HRank-shaped is
derived from those here; nothing else in the library needs a hand-written description.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


def annotated(model: nn.Module) -> bool:
    """Whether ``model`` is one of HRank's cfg-built families."""
    return hasattr(model, "unit_annotations") and getattr(model, "cfg", None) is not None


def unit_convs(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each annotated unit's convs: the unit's own (its name), or a residual group's members."""
    members = model.group_members() if hasattr(model, "group_members") else {}
    return {u: tuple(members.get(u, (u,))) for u in model.unit_annotations()}


def cfg_with_widths(model: nn.Module, widths: Mapping[str, int]) -> list:
    """``model.cfg`` with the named units' widths written at their cfg positions (others keep theirs)."""
    cfg = list(model.cfg)
    for unit, note in model.unit_annotations().items():
        if unit in widths:
            for i in note["cfg_index"]:
                cfg[i] = int(widths[unit])
    return cfg


def pruned_cfg(model: nn.Module, kept: Mapping[str, int]) -> list:
    """The cfg that rebuilds ``model`` with ``kept`` channels per unit (a plan's keep counts)."""
    return cfg_with_widths(model, kept)


def set_cp_rates(model: nn.Module, rates: Mapping[str, float]) -> None:
    """Write each unit's removed fraction onto its convs' ``cp_rate`` (units not named: 0)."""
    if not annotated(model):
        return
    for unit, convs in unit_convs(model).items():
        for conv in convs:
            model.get_submodule(conv).cp_rate = float(rates.get(unit, 0.0))


def rates_of_plan(plan: Any) -> dict[str, float]:
    """Removed fraction per unit of a ``Plan`` or of its JSON (``{"units": {u: {"width", "keep"}}}``)."""
    if isinstance(plan, Mapping):
        return {u: 1.0 - len(v["keep"]) / v["width"] for u, v in (plan.get("units") or {}).items()}
    return {u: 1.0 - len(plan.kept(u)) / w for u, w in plan.widths.items()}


def cfg_from_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> list:
    """The cfg of a (possibly pruned) state_dict of ``model``'s family, read off its weight shapes."""
    if hasattr(model, "cfg_from_state_dict"):
        return model.cfg_from_state_dict(sd)
    return cfg_with_widths(model, {u: int(sd[f"{convs[0]}.weight"].shape[0]) for u, convs in unit_convs(model).items()})
