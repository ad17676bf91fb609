"""HRank's bookkeeping, in one place: ``cfg`` widths, ``cp_rate``, compat rank points, cfg from weights,
HRank's rank files, HRankPlus's state_dict keys and its ResNet rate lists.

The engine finds every model's units on the dependency graph. HRank's families (VGG16-BN, MobileNet
v1/v2, SqueezeNet) are also built from a ``cfg`` width list, and HRank's code reads a removed
fraction ``cp_rate`` off each conv. Each such family says, from its own module names, which cfg
positions hold each unit's width and (VGG) HRank's original rank point: ``unit_annotations()``
(``{unit: {"cfg_index": (...), "compat_rank_points": (...)}}``, read by ``pruning.graph.units``),
and, for a residual group, which convs share it (``group_members()``). Everything HRank-shaped is
derived from those here; nothing else in the library needs a hand-written description.

HRank's ``rank_conv{k}.npy`` files (k = the 1-based unit position) are read and written here;
HRankPlus's MobileNet v1 keys (``conv1.0``, ``features.i.j``) are renamed to ours; and a rate list
in HRankPlus/CHIP's ResNet order (stem, stage-1 and stage-2 outputs, then every block-inner conv)
is mapped onto a CIFAR ResNet's units by their module names (``layout_rates``), for a model that
declares ``rate_layout = "hrankplus_resnet"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compressor.errors import UserError


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


# ---------------------------------------------------------------- HRankPlus/CHIP's ResNet rate lists

def has_layout(model: nn.Module) -> bool:
    """Whether ``model`` takes rate lists in a published layout (``layout_rates``)."""
    return getattr(model, "rate_layout", None) == "hrankplus_resnet"


def layout_rates(model: nn.Module, rates: Sequence[float]) -> dict[str, float]:
    """HRankPlus/CHIP's ``3 + 3n``-entry list (30 for ResNet-56) as rates of a CIFAR ResNet's units.

    Their order: stem, stage-1 output, stage-2 output, then the 3·n block-inner convs; stage-3
    outputs stay whole. The widths are HRankPlus's. Where HRankPlus crops or pads its shortcut so
    that the stem and stage 1 can differ, the first block's ``PadShortcut`` maps each kept stem
    channel onto the same stage-1 channel as in the unpruned network (a stem channel that stage 1
    dropped feeds only ``layer1.0.conv1``), so every residual add stays channel-aligned and dead
    channels prune exactly. ``n`` (blocks per stage) is read off the module names.
    """
    names = {n for n, _ in model.named_modules()}
    n = 0
    while f"layer1.{n}.conv1" in names:
        n += 1
    if len(rates) != 3 + 3 * n:
        raise UserError(f"an HRankPlus ResNet-{6 * n + 2} rate list has {3 + 3 * n} entries, got {len(rates)}",
                        field="rates")
    out = {"conv1": float(rates[0]), "layer1.0.conv2": float(rates[1]), "layer2.0.conv2": float(rates[2])}
    inner = [f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(n)]
    out.update({name: float(r) for name, r in zip(inner, rates[3:])})
    return out


# ---------------------------------------------------------------- HRankPlus's MobileNet v1 keys

def hrankplus_mobilenet_v1_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HRankPlus's ``MobileNetV1`` keys (``conv1.0``, ``features.i.j``, ``classifier.0``) to ours."""
    block = ("dw", "dw_bn", "dw_relu", "pw", "pw_bn", "pw_relu")
    stem = ("conv", "bn", "relu")
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        parts = k.split(".")
        if parts[0] == "conv1":
            new = f"features.conv_bn.{stem[int(parts[1])]}.{'.'.join(parts[2:])}"
        elif parts[0] == "features":
            new = f"features.conv_dw{int(parts[1]) + 1}.{block[int(parts[2])]}.{'.'.join(parts[3:])}"
        elif parts[0] == "classifier":
            new = f"fc.{'.'.join(parts[2:])}"
        else:
            raise UserError(f"unexpected key {key!r} in an HRankPlus MobileNet v1 state_dict", field="state_dict")
        out[new] = t
    return out


# ---------------------------------------------------------------- HRank's rank_conv{k}.npy files

def export_rank_files(scores: Any, criterion: str, model: nn.Module, folder: str | Path) -> list[Path]:
    """Write HRank's ``rank_conv{k}.npy`` (k = 1-based unit position)."""
    from compressor.pruning import graph
    from compressor.storage import io

    paths = []
    per_unit = scores.for_criterion(criterion)
    for k, u in enumerate(graph.units(model), start=1):
        if u.name in per_unit:
            p = Path(folder) / f"rank_conv{k}.npy"
            io.atomic_write(p, lambda fh, t=per_unit[u.name]: np.save(fh, t.double().numpy()))
            paths.append(p)
    return paths


def import_rank_files(folder: str | Path, model: nn.Module) -> Any:
    """Read HRank's ``rank_conv{k}.npy`` files into a Scores (criterion ``hrank``)."""
    from compressor.pruning import graph
    from compressor.pruning import scores as scores_mod

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("HRank rank folder not found", source=str(folder))
    out: dict[str, torch.Tensor] = {}
    for k, u in enumerate(graph.units(model), start=1):
        p = folder / f"rank_conv{k}.npy"
        if not p.exists():
            continue
        out[u.name] = _read_rank_file(p, u.name, u.width)
    if not out:
        raise UserError("no rank_conv{k}.npy files found", source=str(folder))
    # HRank's files record no weights: they are bound to the checkpoint they are imported for.
    return scores_mod.Scores(scores={"hrank": out}, meta={"model": getattr(model, "arch", type(model).__name__),
                                               "imported_from": str(folder), "model_checksum": scores_mod.model_checksum(model)})


def _read_rank_file(path: Path, unit: str, width: int) -> torch.Tensor:
    """One ``rank_conv{k}.npy``: its header (shape, dtype) is checked before the values are read;
    the ranks must be ``width`` finite real numbers."""
    src = str(path)
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = header(fh)
    except (ValueError, OSError) as exc:
        raise UserError(f"not a numpy rank file ({str(exc)[:120]})", source=src) from exc
    if len(shape) != 1 or shape[0] != width:
        raise UserError(f"has ranks of shape {shape}, {unit} has {width} channels", source=src)
    if dtype.kind not in "fiu":
        raise UserError(f"ranks must be real numbers, got dtype {dtype}", source=src)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"not a numpy rank file ({str(exc)[:120]})", source=src) from exc
    t = torch.from_numpy(np.asarray(arr, dtype=np.float64)).float()
    if not torch.isfinite(t).all():
        raise UserError(f"holds {int((~torch.isfinite(t)).sum())} NaN/inf ranks; ranks must be finite", source=src)
    return t
