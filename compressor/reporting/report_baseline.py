"""The unpruned model a pruned checkpoint is compared with, from what its file records.

Every format-2 checkpoint records its architecture reference (``model``: a registered name,
``torchvision:<name>`` or ``package.module:builder``), its ``builder_kwargs`` and ``num_classes``;
a pruned one also records its plan, which lists each unit's width before pruning and the
channels it kept. So, for any model the engine prunes:

* **identity** ``(model, builder_kwargs, num_classes)`` says which architecture a file is;
* a pruned file's **pre-pruning widths** are its plan's ``width`` per unit;
* a baseline's **unit widths** are read off the loaded model by the dependency-graph engine
  (``graph.discovery``: every channel space it finds, prunable or skipped).

A baseline matches a pruned file when the identities are equal and the baseline has every unit
of the plan at the plan's width. When none of the inputs matches, :func:`rebuild_unpruned` builds
the model before pruning for counting and latency (random weights): the architecture is built from
its reference, as ``checkpoint.load`` does, then narrowed to the pruned model's module shapes
*widened back* by the plan: each channel dimension that follows a unit (the engine's
``Discovery.members``, found on the architecture itself) regains the channels the plan removed.
Dimensions that follow no unit (e.g. VGG's hidden Linear width) keep the pruned model's value,
which is the baseline's. Nothing here reads a family's hand-written description.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch
from torch import nn

from compressor.storage import checkpoint
from compressor.errors import UserError
from compressor.pruning import graph, shapes as shapes_mod

Identity = tuple[str, str, int]


def identity(ck: Mapping[str, Any]) -> Identity:
    """``(model reference, builder_kwargs as sorted JSON, num_classes)`` of a checkpoint."""
    kwargs = json.dumps(ck.get("builder_kwargs") or {}, sort_keys=True, default=list)
    return str(ck["model"]), kwargs, int(ck["num_classes"])


def plan_units(ck: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return dict(((ck.get("plan") or {}).get("units") or {}))


def pre_prune_widths(ck: Mapping[str, Any]) -> dict[str, int]:
    """Each unit's width before pruning, as the plan recorded it (empty for an unpruned file)."""
    return {u: int(v["width"]) for u, v in plan_units(ck).items()}


def unit_widths(net: nn.Module) -> dict[str, int]:
    """Width of every channel space the engine finds in ``net`` (prunable units and skipped
    residual/linear ones), keyed by the unit's name (its first producing conv)."""
    found = graph.discovery(net)
    return {name: int(graph.out_width(net.get_submodule(name))) for name in found.kinds}


def kept_widths(net: nn.Module, ck: Mapping[str, Any]) -> tuple[list[str], list[int], list[int]]:
    """(units, widths before, widths after) of a pruned checkpoint: before from its plan, after
    read off the physical model (the unit's producing conv), for the widths plot."""
    units = plan_units(ck)
    mods = dict(net.named_modules())
    after = [int(graph.out_width(mods[u]) or len(v["keep"])) if u in mods else len(v["keep"])
             for u, v in units.items()]
    return list(units), [int(v["width"]) for v in units.values()], after


def matches(base_widths: Mapping[str, int], pre: Mapping[str, int]) -> bool:
    """Whether a baseline with ``base_widths`` is the model a plan with pre-pruning widths ``pre`` cut."""
    return all(base_widths.get(u) == w for u, w in pre.items())


def _deltas(ref: nn.Module, removed: Mapping[str, int]) -> tuple[dict[str, float], dict[str, float]]:
    """Channels each module's output / input dimension regains when ``removed[u]`` channels of unit
    ``u`` come back (members found on the unpruned architecture ``ref``)."""
    found = graph.discovery(ref)
    out_d: dict[str, float] = {}
    in_d: dict[str, float] = {}
    for unit, r in removed.items():
        if unit not in found.members:
            raise UserError(f"the plan's unit {unit!r} is not a channel space of the architecture")
        width = graph.out_width(ref.get_submodule(unit))
        for m in found.members[unit]:
            side = out_d if m.role == "out" else in_d
            side[m.name] = side.get(m.name, 0.0) + r * m.n / width
    return out_d, in_d


def _widen(name: str, shape: Mapping[str, Any], ref_shape: Mapping[str, Any] | None, ref_mod: nn.Module,
           out: float, inp: float, same_units: bool) -> dict[str, Any]:
    d = json.loads(json.dumps(shape))
    kind = d.get("type")
    if kind in ("Conv2d", "Linear"):
        d["out"], d["in"] = round(d["out"] + out), round(d["in"] + inp)
        if kind == "Conv2d" and ref_mod.groups > 1 and ref_mod.groups == ref_mod.in_channels == ref_mod.out_channels:
            d["in"] = d["groups"] = d["out"]  # depthwise: one group per channel
    elif kind == "BatchNorm":
        d["features"] = round(d["features"] + out)
    elif kind == "GroupNorm":
        d["channels"] = round(d["channels"] + out)
    elif kind == "LayerNorm":
        d["shape"][-1] = round(d["shape"][-1] + out)
    elif d != ref_shape:  # a registered channel op (e.g. a zero-pad shortcut): its own state
        if not same_units:
            raise UserError(f"cannot widen {name} ({kind}) back to the plan's widths")
        return dict(ref_shape or {})  # every unit at the architecture's width: the op is the architecture's
    return d


def rebuild_unpruned(net: nn.Module, ck: Mapping[str, Any]) -> nn.Module:
    """The model ``net`` was pruned from, with random weights (for counting and latency only).

    Raises ``UserError`` when it cannot be rebuilt (a plan wider than the architecture, a channel op
    whose state cannot be widened, or widths that do not come out as the plan says).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = checkpoint.reference_of(net).eval()
    units = plan_units(ck)
    removed = {u: int(v["width"]) - len(v["keep"]) for u, v in units.items() if int(v["width"]) != len(v["keep"])}
    out_d, in_d = _deltas(ref, removed)
    ref_widths = unit_widths(ref)
    pre = pre_prune_widths(ck)
    same_units = matches(ref_widths, pre)
    ref_shapes = shapes_mod.module_shapes(ref)
    mods = dict(ref.named_modules())
    want = {}
    for name, shape in shapes_mod.module_shapes(net).items():
        if name not in mods:
            raise UserError(f"the pruned model has a module {name!r} that the architecture lacks")
        want[name] = _widen(name, shape, ref_shapes.get(name), mods[name], out_d.get(name, 0.0),
                            in_d.get(name, 0.0), same_units)
    changed = {n: d for n, d in want.items() if d != ref_shapes.get(n)}
    if changed:
        shapes_mod.shrink(ref, changed, "<rebuilt baseline>")  # narrows only: a wider plan is refused here
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for n in changed:
                if hasattr(mods[n], "reset_parameters"):
                    mods[n].reset_parameters()  # shrink leaves values uninitialised
        got = unit_widths(ref)
        if not matches(got, pre):
            bad = next(u for u, w in pre.items() if got.get(u) != w)
            raise UserError(f"rebuilt widths differ from the plan's ({bad}: {got.get(bad)} vs {pre[bad]})")
    return ref


# ----------------------------------------------------------------------------- a sweep's paths
def sweep_point_folder(folder: Any, sweep: Any, index: int, name: Any) -> Any:
    """``folder / name`` for the point ``name`` of a sweep's ``sweep.json``: one folder name that
    stays inside the sweep folder (no ``/``, ``..``, absolute path, or symlink out of it), or a
    one-line ``UserError`` naming the file and field."""
    from pathlib import Path

    field = f"points[{index}].name"
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"must be one folder name inside {folder}, got {str(name)[:80]!r}", source=str(sweep),
                        field=field)
    p = Path(folder) / name
    try:
        p.resolve().relative_to(Path(folder).resolve())
    except (OSError, ValueError):
        raise UserError(f"{name!r} leads out of {folder}", source=str(sweep), field=field) from None
    return p


def sweep_baseline(folder: Any, sweep: Any, value: Any, is_checkpoint: Any) -> Any:
    """The baseline a ``sweep.json`` names, or None where it is not followed: a path inside the sweep
    folder, or one outside it (the checkpoint the sweep started from) that is a ``.pt``/``.pth``
    compressor checkpoint (``is_checkpoint``); anything else (``/etc/passwd``) is not read as a
    baseline (the report rebuilds the baseline for counting). A value that is not a path is an error."""
    from pathlib import Path

    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise UserError("must be a checkpoint path", source=str(sweep), field="baseline")
    p = Path(value)
    try:
        p.resolve().relative_to(Path(folder).resolve())
        inside = True
    except (OSError, ValueError):
        inside = False
    if inside:
        return p
    if p.suffix.lower() in (".pt", ".pth") and p.is_file() and is_checkpoint(p):
        return p
    return None
