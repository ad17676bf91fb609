"""The Python API: rank, prune, save and load any CNN in a few calls (the CLI calls these).

>>> import compressor
>>> scores = compressor.rank(model, calib_loader, criteria=["hrank", "l1"])      # one pass
>>> small, info = compressor.prune(model, example, rates={"target": {"macs": 0.5}}, scores=scores)
>>> compressor.save(small, "pruned.pt"); small2 = compressor.load("pruned.pt")

``model`` is any ``nn.Module`` (a registered one, a torchvision classifier or the user's own);
it is never changed. The units are found by the dependency graph
(``compressor.pruning.graph``). ``example`` fixes the input shape the graph is traced with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from compressor import checkpoint, counting, policy, surgery
from compressor import scores as scores_mod
from compressor.errors import UserError
from compressor.plan import Plan, make_plan
from compressor.pruning import graph
from compressor.pruning.size import SizeModel
from compressor.rates import RateSpec, load_rates, resolve_rates, spec_from_doc

WEIGHT_ONLY = ("l1", "l2", "bn_scale", "fpgm", "random")


@dataclass(frozen=True)
class PruneInfo:
    """What ``prune`` did: the plan, the resolved rates, sizes before/after, the achieved budget."""

    plan: Plan
    rates: RateSpec
    size_before: dict[str, int]
    size_after: dict[str, int]
    criterion: str
    kept: dict[str, float] = field(default_factory=dict)  # fraction of MACs / params kept

    def summary(self) -> str:
        b, a = self.size_before, self.size_after
        return (f"{self.criterion}: MACs {b['macs'] / 1e6:.2f}M -> {a['macs'] / 1e6:.2f}M "
                f"({100 * a['macs'] / b['macs']:.1f}% kept), params {b['params'] / 1e6:.3f}M -> "
                f"{a['params'] / 1e6:.3f}M ({100 * a['params'] / b['params']:.1f}% kept)")


def _prepare(model: nn.Module, example: torch.Tensor | None, ignored: Sequence[nn.Module | str] | None,
             residual: bool | None) -> None:
    """Give a user's model what the engine reads, without touching its weights or structure."""
    if example is not None:
        if not torch.is_tensor(example) or example.ndim != 4:
            raise UserError("example inputs must be one [N, C, H, W] tensor", field="example_inputs")
        model.input_size = (int(example.shape[2]), int(example.shape[3]))
        model.in_channels = int(example.shape[1])
    elif getattr(model, "input_size", None) is None:
        raise UserError("pass example inputs (the model has no input_size)", field="example_inputs")
    if not hasattr(model, "arch"):
        model.arch = type(model).__name__
    if not hasattr(model, "num_classes"):
        out = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        model.num_classes = int(out.out_features if isinstance(out, nn.Linear) else out.out_channels)
    if ignored:
        names = {m: n for n, m in model.named_modules()}
        extra = [n if isinstance(n, str) else names[n] for n in ignored]
        model.__dict__.pop("_compressor_ignored", None)  # the defaults again, then the caller's on top
        base = [names[m] for m in graph.protected_layers(model)]
        model._compressor_ignored = tuple(dict.fromkeys(base + extra))
    if residual is not None:
        model.prune_residual = bool(residual)


def rank(model: nn.Module, loader: Iterable, criteria: Sequence[str] = ("hrank",), *, n_images: int | None = None,
         seed: int = 0, device: torch.device | str | None = None, example_inputs: torch.Tensor | None = None,
         residual: bool | None = None, progress: bool = True, **options: Any) -> scores_mod.Scores:
    """Score every unit by each criterion; activation criteria share one forward pass."""
    batches = list(loader) if n_images is None else loader
    if n_images is None:
        n_images = sum((b[0] if isinstance(b, (list, tuple)) else b).shape[0] for b in batches)
    if example_inputs is None and getattr(model, "input_size", None) is None:
        first = next(iter(batches))
        example_inputs = (first[0] if isinstance(first, (list, tuple)) else first)[:1]
    _prepare(model, example_inputs, None, residual)
    dev = device or (next(model.parameters()).device)
    return scores_mod.compute(model, batches, list(criteria), n_images=int(n_images), seed=seed, device=dev,
                              options=options, progress=progress)


def _spec(rates: Any, names: Sequence[str], model: nn.Module) -> RateSpec:
    if isinstance(rates, RateSpec):
        return rates
    if isinstance(rates, (str, Path)) and Path(rates).suffix in (".yaml", ".yml"):
        return load_rates(rates, names, model_name=getattr(model, "arch", None),
                          short_list=getattr(model, "short_rate_list", None))
    if isinstance(rates, Mapping) and ({"target", "rates", "default", "policy", "round_to"} & set(rates)):
        return spec_from_doc(dict(rates), names, model_name=getattr(model, "arch", None),
                             short_list=getattr(model, "short_rate_list", None))
    return RateSpec(rates=resolve_rates(rates, names, source="<rates>"), source="<rates>")


def prune(model: nn.Module, example_inputs: torch.Tensor | None = None, rates: Any = None, *,
          scores: scores_mod.Scores | Mapping[str, torch.Tensor] | None = None, criterion: str | None = None,
          ignored_layers: Sequence[nn.Module | str] | None = None, residual: bool | None = None,
          seed: int = 0, verify: bool = True) -> tuple[nn.Module, PruneInfo]:
    """A new, physically smaller model at ``rates``; ``model`` is left untouched.

    ``rates``: a ``rates.yaml`` path, a rates-file-like dict (``{"target": {"macs": 0.5}}``,
    ``{"rates": "[0.3]*4", "default": 0}``), a ``{layer: rate}`` mapping, a list in unit order,
    a string in HRank's grammar, or a ``RateSpec``. ``scores``: from ``rank`` (its first
    criterion, or ``criterion``), or a ``{layer: Tensor}`` mapping; without scores a weight
    criterion (``criterion``, default ``l1``) is computed here.
    """
    if rates is None:
        raise UserError("prune needs rates (a rates.yaml, a dict, a list or a target)", field="rates")
    _prepare(model, example_inputs, ignored_layers, residual)
    units = graph.units(model)
    if not units:
        d = graph.discovery(model)
        why = "; ".join(f"{k}: {v}" for k, v in list({**d.refused, **d.skipped}.items())[:3])
        raise UserError(f"the model has no prunable unit{' (' + why + ')' if why else ''}", field="model")
    names = [u.name for u in units]
    widths = {u.name: u.width for u in units}
    spec = _spec(rates, names, model)
    per_unit, tiebreak, crit = _scores_for(model, scores, criterion, seed)
    found = graph.discovery(model)
    sizer = SizeModel(model, found)
    spec = policy.resolve(spec, model, per_unit, tiebreak=tiebreak, counter=sizer.count, widths=widths)
    plan = make_plan(per_unit, spec, widths, tiebreak=tiebreak, model=getattr(model, "arch", ""))
    small = surgery.apply(model, plan, verify=verify)
    before, after = counting.count(model), counting.count(small)
    kept = {k: after[k] / before[k] for k in ("macs", "params")}
    return small, PruneInfo(plan=plan, rates=spec, size_before=before, size_after=after, criterion=crit, kept=kept)


def _scores_for(model: nn.Module, scores: Any, criterion: str | None,
                seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, str]:
    if isinstance(scores, scores_mod.Scores):
        crit = criterion or next(iter(scores.scores))
        return scores.for_criterion(crit), scores.tiebreak or None, crit
    if isinstance(scores, Mapping):
        return dict(scores), None, criterion or "given"
    crit = criterion or "l1"
    if crit not in WEIGHT_ONLY:
        raise UserError(f"criterion {crit!r} needs data: pass scores=compressor.rank(model, loader, [{crit!r}])",
                        field="criterion")
    sc = scores_mod.compute(model, [], [crit], n_images=0, seed=seed, progress=False)
    return sc.for_criterion(crit), None, crit


def save(model: nn.Module, path: str | Path, **fields: Any) -> Path:
    """Write a pruned (or any) model as a plain-data checkpoint (``checkpoint.save``)."""
    if not hasattr(model, "arch"):
        raise UserError("save needs a model built by get_model or passed through prune/rank "
                        "(it must know its architecture reference)", field="model")
    return checkpoint.save(path, model, **fields)


def load(path: str | Path, model: str | nn.Module | None = None, **kwargs: Any) -> nn.Module:
    """Rebuild a checkpoint's model.

    ``model``: nothing for registered and ``torchvision:`` models; the ``module:builder`` the
    file was built from (user code is imported only when named here); or an instance of the
    user's unpruned ``nn.Module``, which the file's shapes then narrow.
    """
    if isinstance(model, nn.Module):
        return checkpoint.load_into(path, model, **kwargs)[0]
    return checkpoint.load(path, model=model, **kwargs)[0]
