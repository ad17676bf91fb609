"""The Python API, and the one orchestration: the CLI's commands call these.

A notebook flow on any CNN (a registered one, a torchvision classifier or your own module)::

    >>> import torch, compressor
    >>> from torchvision.models import resnet18
    >>> model = resnet18(num_classes=10).eval()
    >>> example = torch.randn(1, 3, 32, 32)
    >>> batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(4)]
    >>> scores = compressor.rank(model, batches, criteria=["hrank", "l1"], example_inputs=example, progress=False)
    >>> small, info = compressor.prune(model, example, rates={"target": {"macs": 0.5}}, scores=scores)
    >>> small, rec = compressor.recover(small, batches, original=model, progress=False)    # least squares
    >>> compressor.evaluate(small, batches)["top1"]                                          # doctest: +SKIP
    >>> compressor.count(small)["macs"] < compressor.count(model, example)["macs"]
    True
    >>> _ = compressor.save(small, "pruned.pt")
    >>> again = compressor.load("pruned.pt", model=resnet18(num_classes=10))

``model`` is never changed, attributes included: what the engine needs to know about it lives
in a ``ModelRecord`` beside it (``compressor.record``). Every function here takes plain
``nn.Module``s and plain iterables of ``(images, labels)`` batches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from compressor.storage import checkpoint
from compressor.pruning import counting
from compressor.deploy import latency_table as lt
from compressor.pruning import policy
from compressor.pruning import surgery
from compressor.pruning import scores as scores_mod
from compressor.errors import UserError
from compressor.models import hrank
from compressor.pruning.plan import Plan, make_plan
from compressor.pruning import graph
from compressor.pruning.size import SizeModel
from compressor.pruning.rates import RateSpec, load_rates, parse_rate_string, read_yaml, resolve_rates, spec_from_doc
from compressor.record import ModelRecord, record_of, view

WEIGHT_ONLY = ("l1", "l2", "bn_scale", "fpgm", "random")
RECOVERY_METHODS = ("reconstruct", "bn", "finetune")


@dataclass(frozen=True)
class PruneInfo:
    """What ``prune`` did: the plan, the resolved rates, sizes before/after, the achieved budget.

    ``latency_check`` holds the latency measured on the result when the budget was a latency
    one (predicted and measured fractions), else None.
    """

    plan: Plan
    rates: RateSpec
    size_before: dict[str, int]
    size_after: dict[str, int]
    criterion: str
    kept: dict[str, float] = field(default_factory=dict)  # fraction of MACs / params kept
    latency_check: dict[str, Any] | None = None
    selection: Any = None  # criterion "obs": the per-unit removal record (select_obs.ObsReport)
    notes: list[str] = field(default_factory=list)  # what the caller should know (residual groups added, lopsided cuts)

    def summary(self) -> str:
        b, a = self.size_before, self.size_after
        line = (f"{self.criterion}: MACs {b['macs'] / 1e6:.2f}M -> {a['macs'] / 1e6:.2f}M "
                f"({100 * a['macs'] / b['macs']:.1f}% kept), params {b['params'] / 1e6:.3f}M -> "
                f"{a['params'] / 1e6:.3f}M ({100 * a['params'] / b['params']:.1f}% kept)")
        if self.latency_check:
            line += f"; {self.latency_check['line']}"
        return "\n".join([line, *self.notes])


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    from compressor.training.evaluation import resolve_device

    try:
        return resolve_device(str(device))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed device string is the caller's
        raise UserError(f"unknown device {device!r}", field="device") from exc


def _first_images(batches: Iterable) -> torch.Tensor:
    first = next(iter(batches), None)
    if first is None:
        raise UserError("the batches are empty", field="loader")
    return first[0] if isinstance(first, (list, tuple)) else first


# ---------------------------------------------------------------- rank

def rank(model: nn.Module, loader: Iterable, criteria: Sequence[str] = ("hrank",), *, n_images: int | None = None,
         seed: int = 0, device: torch.device | str | None = None, example_inputs: torch.Tensor | None = None,
         residual: bool | None = None, ignored_layers: Sequence[nn.Module | str] | None = None,
         compat: bool = False, progress: bool = True, extra_meta: Mapping[str, Any] | None = None,
         **options: Any) -> scores_mod.Scores:
    """Score every unit by each criterion; the activation criteria share one forward pass.

    ``loader``: batches of images, or of ``(images, labels)`` (gradient criteria need labels).
    ``options`` go to the criteria (``rtol``/``atol`` for hrank, ``seed`` for random).

    >>> scores = compressor.rank(model, batches, ["hrank", "l1"], example_inputs=torch.randn(1, 3, 32, 32))
    >>> scores.for_criterion("hrank")["layer1.0.conv1"].shape          # doctest: +SKIP
    """
    dev = _check_device(device)
    if "obs" in criteria:
        raise UserError("'obs' is a selection, not a score: use compressor.prune(..., criterion='obs', "
                        "calibration=batches)", field="criteria")
    options.setdefault("seed", seed)  # the random criterion follows the run's seed
    batches = list(loader) if n_images is None else loader
    if n_images is None:
        n_images = sum((b[0] if isinstance(b, (list, tuple)) else b).shape[0] for b in batches)
    if example_inputs is None and getattr(model, "input_size", None) is None:
        example_inputs = _first_images(batches)[:1]
    rec = record_of(model, example_inputs, ignored_layers, residual)
    v = view(model, rec)
    return scores_mod.compute(v, batches, list(criteria), n_images=int(n_images), seed=seed,
                              device=dev or _device_of(model), options=options, progress=progress,
                              compat=compat, extra_meta=dict(extra_meta or {}))


# ---------------------------------------------------------------- prune

def rates_spec(rates: Any, model: nn.Module, *, rounding: str | None = None, round_to: int | None = None) -> RateSpec:
    """``rates`` as a ``RateSpec`` for ``model``'s units.

    Takes a ``rates.yaml`` path, a rates-file-like dict, a ``{layer: rate}`` mapping, a list in
    unit order, a string in HRank's grammar, one number for every unit, or a ``RateSpec``. A list in the model's published
    layout (HRankPlus/CHIP's ResNet lists: ``models.hrank.layout_rates``) is accepted too.
    """
    names = [u.name for u in graph.units(model)]
    arch, short = getattr(model, "arch", None), getattr(model, "short_rate_list", None)
    if isinstance(rates, RateSpec):
        spec = rates
    elif isinstance(rates, (str, Path)) and Path(rates).suffix in (".yaml", ".yml"):
        try:
            spec = load_rates(rates, names, model_name=arch, short_list=short)
        except UserError as exc:
            if exc.field:  # a layer the graph found but will not prune says why
                d = graph.discovery(model)
                for name in (exc.field, exc.field.strip("'")):
                    if name in d.refused or name in d.skipped:
                        graph.check_prunable(model, [name])
            if exc.field != "rates" or not hrank.has_layout(model):
                raise  # a bad round_to, rounding or model is reported as itself, not as a layout mismatch
            try:
                spec = _layout_rates(read_yaml(rates), str(rates), model, names)
            except UserError as layout:
                raise UserError(f"{_message(exc)}; read as HRankPlus's layout: {_message(layout)}",
                                source=exc.source, field=exc.field) from exc
            if spec is None:
                raise
    elif isinstance(rates, Mapping) and ({"target", "rates", "default", "policy", "round_to", "rounding"} & set(rates)):
        spec = spec_from_doc(dict(rates), names, model_name=arch, short_list=short)
    else:
        spec = RateSpec(rates=resolve_rates(rates, names, source="<rates>"), source="<rates>")
    changes: dict[str, Any] = {}
    if rounding:
        changes["rounding"] = rounding
    if round_to:
        changes["round_to"] = round_to
    return spec.replace(**changes) if changes else spec


def _message(exc: UserError) -> str:
    """An error's text without its ``source: field:`` prefix."""
    where = ": ".join(p for p in (exc.source, exc.field) if p)
    return str(exc)[len(where) + 2:] if where and str(exc).startswith(where) else str(exc)


def _layout_rates(doc: Any, source: str, model: nn.Module, names: list[str]) -> RateSpec | None:
    """A rate list in the model's published layout (HRankPlus/CHIP ResNet lists), if it is one."""
    if not hrank.has_layout(model):
        return None
    raw = doc.get("rates") if isinstance(doc, dict) else None
    if isinstance(raw, str):
        raw = parse_rate_string(raw, source)
    if not isinstance(raw, list):
        return None
    mapping = hrank.layout_rates(model, raw)
    spec = spec_from_doc({**doc, "rates": {n: float(mapping.get(n, 0.0)) for n in names}}, names, source=source,
                         model_name=getattr(model, "arch", None))
    return spec.replace(extra={**spec.extra, "layout": "hrankplus", "rates_string": str(doc.get("rates"))[:200]})


def prune(model: nn.Module, example_inputs: torch.Tensor | None = None, rates: Any = None, *,
          scores: scores_mod.Scores | Mapping[str, torch.Tensor] | None = None, criterion: str | None = None,
          ignored_layers: Sequence[nn.Module | str] | None = None, residual: bool | None = None,
          rounding: str | None = None, round_to: int | None = None, seed: int = 0, verify: bool = True,
          method: str = "torch_pruning", device: torch.device | str | None = None,
          calibration: Iterable | None = None) -> tuple[nn.Module, PruneInfo]:
    """A new, physically smaller model at ``rates``; ``model`` is left untouched.

    ``rates``: see ``rates_spec``; a budget is ``{"target": {"macs": 0.5}}`` (or ``params``, or
    ``{"latency": 0.7, "batch_size": 8, "threads": 1}``: measured, then checked on the result).
    ``scores``: from ``rank`` (its first criterion, or ``criterion``), or a ``{layer: Tensor}``
    mapping; without scores a weight criterion (``criterion``, default ``l1``) is computed here.
    Scores from ``rank`` are checked against this model's weights (a checksum).
    ``criterion="obs"``: the kept channels are chosen by the error the consumers' least-squares
    refit would suffer on ``calibration`` batches (``select_obs``); recover with
    ``recover(small, data, original=model, plan=info.plan)``. Works on any model the engine prunes (each
    unit's consumers are read off the dependency graph). With ``"policy": "obs"`` and a MACs/params target the
    keep counts are allocated by the same error too (``policy_obs``).
    ``residual``: None (the default) follows the model, except that a MACs/params budget out of reach without
    residual groups and within reach with them prunes them too (``auto_residual``; ``info.notes`` says so);
    False never prunes them.

    >>> small, info = compressor.prune(model, torch.randn(1, 3, 32, 32), {"target": {"macs": 0.5}})
    >>> print(info.summary())                                            # doctest: +SKIP
    """
    if rates is None:
        raise UserError("prune needs rates (a rates.yaml, a dict, a list or a target)", field="rates")
    dev = _check_device(device) or _device_of(model)
    obs = criterion == "obs"
    if obs and calibration is None:
        raise UserError("criterion 'obs' chooses channels by the reconstruction's error: pass calibration= "
                        "(batches of training images, the ones recover() refits on)", field="criterion")
    # obs: l1 scores only turn the policy or budget into keep counts
    crit_in = "l1" if obs and scores is None else criterion
    notes: list[str] = []
    if residual is None and auto_residual(model, rates, example_inputs=example_inputs, ignored_layers=ignored_layers,
                                          scores=scores):
        residual = True
        notes.append(AUTO_RESIDUAL)
    try:
        v, spec, per_unit, tiebreak, crit = _solve(model, example_inputs, ignored_layers, residual, rates, rounding,
                                                   round_to, scores, crit_in, seed, dev)
    except UserError as exc:
        if not notes:
            raise
        raise UserError(f"{_message(exc)} (residual groups were added because the budget is out of reach without "
                        "them)", source=exc.source, field=exc.field) from exc
    widths = {u.name: u.width for u in graph.units(v)}
    if policy.policy_config(spec).name == "obs":
        calibration = list(calibration or [])  # read twice: the error curves, then the selection
        spec, plan = _obs_allocation(v, spec, calibration, widths, obs, seed)
    else:
        plan = make_plan(per_unit, spec, widths, tiebreak=tiebreak, model=getattr(v, "arch", ""))
    selection = None
    if obs:
        from compressor.pruning.select_obs import select

        try:
            plan, selection = select(v, plan, calibration, seed=seed, progress=False)
        except ValueError as exc:
            raise UserError(str(exc), field="criterion") from exc
        crit = "obs"
    small = surgery.apply(v, plan, method=method, verify=verify)
    from compressor.training.finite import check_finite

    check_finite(small, what="the pruned model")
    lat = lt.verify_spec(v, small, spec)
    before, after = counting.count(v), counting.count(small)
    kept = {k: after[k] / before[k] for k in ("macs", "params")}
    notes += _lopsided(v, plan) if spec.target else []
    return small, PruneInfo(plan=plan, rates=spec, size_before=before, size_after=after, criterion=crit, kept=kept,
                            latency_check=lat, selection=selection, notes=notes)


AUTO_RESIDUAL = ("residual groups pruned too: the budget is out of reach without them (residual=False, or "
                 "--no-residual, refuses instead)")


def auto_residual(model: nn.Module, rates: Any, *, example_inputs: torch.Tensor | None = None,
                  ignored_layers: Sequence[nn.Module | str] | None = None, scores: Any = None) -> bool:
    """Whether ``prune`` with ``residual=None`` prunes residual groups too: only when they are off by the
    model's default and a MACs/params budget in ``rates`` is out of reach without them (every unit at ``min_keep``,
    within the policy's tolerance) but within reach with them. Rates without a budget never turn them on, nor do
    ``scores`` that do not cover the residual units (the budget's error then names ``--residual``)."""
    if rates is None:
        return False
    v = view(model, record_of(model, example_inputs, ignored_layers, None))
    if "residual" not in graph.discovery(v).skipped.values():
        return False
    spec = rates_spec(rates, v)
    target = {k: x for k, x in (spec.target or {}).items() if k in ("macs", "params")}
    if not target:
        return False
    cfg = policy.policy_config(spec)
    loose = {k: x * (1 + cfg.tolerance) for k, x in target.items()}  # what the solvers accept
    if graph.within_reach(v, loose, cfg.min_keep) or not graph.residual_hint(v, target, cfg.min_keep):
        return False
    if scores is not None:
        have = set(scores.scores[next(iter(scores.scores))]) if isinstance(scores, scores_mod.Scores) else set(scores)
        if not set(graph.discovery(v).skipped) <= have:
            return False
    return True


def _solve(model: nn.Module, example_inputs: torch.Tensor | None, ignored_layers: Any, residual: bool | None,
           rates: Any, rounding: str | None, round_to: int | None, scores: Any, criterion: str | None, seed: int,
           dev: torch.device) -> tuple[nn.Module, RateSpec, dict[str, torch.Tensor], Any, str]:
    """The model's view with ``residual``, its rates resolved against the policy and budget, and the scores."""
    v = view(model, record_of(model, example_inputs, ignored_layers, residual))
    units = graph.units(v)
    if not units:
        d = graph.discovery(v)
        why = "; ".join(f"{k}: {r}" for k, r in list({**d.refused, **d.skipped}.items())[:3])
        raise UserError(f"the model has no prunable unit{' (' + why + ')' if why else ''}", field="model")
    widths = {u.name: u.width for u in units}
    spec = rates_spec(rates, v, rounding=rounding, round_to=round_to)
    cfg = policy.policy_config(spec)
    policy.precheck(spec, str(dev))
    per_unit, tiebreak, crit = _scores_for(v, scores, criterion, seed)
    if cfg.name == "obs":  # allocated from the selection's error curves (prune)
        return v, spec, per_unit, tiebreak, crit
    sizer = SizeModel(v, graph.discovery(v))
    spec = policy.resolve(spec, v, per_unit, tiebreak=tiebreak, counter=sizer.count, widths=widths, device=str(dev))
    return v, spec, per_unit, tiebreak, crit


def _obs_allocation(v: nn.Module, spec: RateSpec, calibration: list, widths: Mapping[str, int], obs: bool,
                    seed: int) -> tuple[RateSpec, Plan]:
    """``policy: obs``: keep counts from the selection's error curves (``policy_obs``), as a resolved spec and a
    plan of those counts (``select`` then chooses which channels)."""
    from compressor.pruning import policy_obs

    cfg = policy.policy_config(spec)
    if not obs:
        raise UserError("policy obs needs criterion obs (it allocates by the error the obs selection computes)",
                        source=spec.source, field="policy")
    if cfg.round_to > 1:
        raise UserError("policy obs moves widths by the selection's steps; round_to is not supported with it",
                        source=spec.source, field="round_to")
    if not {"macs", "params"} & set(spec.target or {}) or set(spec.target or {}) - {"macs", "params"}:
        raise UserError("policy obs needs a MACs and/or params target (e.g. target: {macs: 0.5}), nothing else",
                        source=spec.source, field="target")
    if any(r > 0 for r in spec.rates.values()) or cfg.max_keep < 1.0:
        raise UserError("policy obs allocates every unit itself: per-layer rates and max_keep are not used with it",
                        source=spec.source, field="policy")
    d = graph.discovery(v)
    units = [u for u in graph.units(v) if u.name not in d.groups]
    sizer = SizeModel(v, d)
    curve = policy_obs.curves(v, calibration, units, cfg.min_keep, seed=seed)
    counts = policy_obs.allocate(curve, widths, sizer.count, dict(spec.target or {}))
    base, size = sizer.count({}), sizer.count(counts)
    target = dict(spec.target or {})
    achieved = {k: size[k] / base[k] for k in ("macs", "params")}
    resolved = {"policy": "obs", "min_keep": cfg.min_keep, "max_keep": cfg.max_keep, "target": target,
                "tolerance": cfg.tolerance, "achieved": achieved, "size": size, "base_size": base,
                "channels_kept": sum(counts.get(u, w) for u, w in widths.items()) / sum(widths.values()),
                "met": all(achieved[k] <= target[k] * (1 + cfg.tolerance) for k in target)}
    rates = {u: 1.0 - counts.get(u, w) / w for u, w in widths.items()}
    plan = Plan(keep={u: tuple(range(k)) for u, k in counts.items()}, widths=dict(widths),
                model=str(getattr(v, "arch", "")))
    return spec.replace(rates=rates, extra={**spec.extra, "resolved": resolved}), plan


def _lopsided(model: nn.Module, plan: Plan) -> list[str]:
    """A note when the budget was met by cutting residual or stem widths (the model's first conv) to under 3/4 of the
    median kept fraction of the other units (1.0 when there are none)."""
    units = graph.units(model)
    frac = {u.name: len(plan.kept(u.name)) / u.width if u.name in plan.keep else 1.0 for u in units}
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    first = next((n for n in graph.call_order(model, graph.example_input(model)) if n in convs), None)  # the stem
    special = {u.name for u in units if u.kind == "residual" or first in u.convs}
    rest = sorted(f for n, f in frac.items() if n not in special) or [1.0]
    median = rest[len(rest) // 2]
    low = [(n, frac[n]) for n in frac if n in special and frac[n] < 0.75 * median]
    if not low:
        return []
    shown = ", ".join(f"{n} {len(plan.kept(n))}/{plan.widths[n]}" for n, _ in low[:6])
    return [f"the budget was met by cutting residual/stem widths far below the rest: {shown}"
            f"{' …' if len(low) > 6 else ''} (the other units keep {median:.0%} at the median)"]


def _scores_for(model: nn.Module, scores: Any, criterion: str | None,
                seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, str]:
    if isinstance(scores, scores_mod.Scores):
        crit = criterion or next(iter(scores.scores))
        scores.check_model(model)
        return scores.for_criterion(crit), scores.tiebreak or None, crit
    if isinstance(scores, Mapping):
        return dict(scores), None, criterion or "given"
    crit = criterion or "l1"
    if crit not in WEIGHT_ONLY:
        raise UserError(f"criterion {crit!r} needs data: pass scores=compressor.rank(model, loader, [{crit!r}])",
                        field="criterion")
    sc = scores_mod.compute(model, [], [crit], n_images=0, seed=seed, progress=False)
    return sc.for_criterion(crit), None, crit


# ---------------------------------------------------------------- recover

@dataclass
class RecoveryReport:
    """What ``recover`` did, step by step (``steps``: e.g. ``["reconstruct"]`` or ``["bn", "finetune+kd"]``)."""

    steps: list[str] = field(default_factory=list)
    reconstruct: Any = None          # compressor.pruning.reconstruct.ReconstructReport
    blocks: Any = None               # compressor.pruning.refit_blocks.BlockRefitReport
    bn_images: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # fine-tune epoch rows

    @property
    def label(self) -> str:
        return "+".join(self.steps) or "none"


def _as_dataset(data: Any, what: str) -> torch.utils.data.Dataset:
    """A Dataset from a Dataset, a DataLoader, or an iterable of (images, labels) batches."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(data, Dataset):
        return data
    if isinstance(data, DataLoader):
        return data.dataset
    xs, ys = [], []
    for b in data:
        if not isinstance(b, (list, tuple)) or len(b) < 2:
            raise UserError("batches must be (images, labels) pairs", field=what)
        xs.append(b[0])
        ys.append(b[1])
    if not xs:
        raise UserError("no batches given", field=what)
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recover(pruned: nn.Module, data: Any, *, original: nn.Module | None = None, reconstruct: bool | None = None,
            bn: bool | None = None, block_steps: int = 0, epochs: int = 0, teacher: nn.Module | None = None, val_data: Any = None,
            plan: Plan | None = None, images: int = 512, lr: float = 0.01, batch_size: int = 128,
            warmup_epochs: float | None = None, train_config: Any = None, seed: int = 0, device: torch.device | str | None = None,
            out_dir: str | Path | None = None, in_place: bool = False,
            progress: bool = True) -> tuple[nn.Module, RecoveryReport]:
    """Recover a pruned model's accuracy: reconstruction, BN re-estimation, fine-tuning.

    - ``reconstruct`` (default: on when ``original`` is given): every layer that reads pruned
      channels is refit by least squares so its output on ``images`` calibration images matches
      ``original``'s (``plan`` names the kept channels; without it they are read off the weights).
    - ``block_steps`` > 0 (needs ``original``): then each block (a residual block, found from the
      pruned shapes) is refit by that many Adam steps so its output matches ``original``'s on the
      same calibration images, 1/8 of them held out to choose the weights (``refit_blocks``).
    - ``bn`` (default: on when there is neither reconstruction nor block refit and the model has BatchNorm): the BN
      running statistics are re-estimated on ``images`` images, no labels, no gradient.
    - ``epochs`` > 0: fine-tune on ``data`` (SGD, cosine, ``lr`` after a linear warm-up of
      ``warmup_epochs``: None takes the model's, ``recipes/models.yaml``, 0.1 by default; or a full
      ``train_config``), distilled from ``teacher`` if given; ``val_data`` selects nothing, it only draws the curve
      (``out_dir`` gets last.pt, best.pt, metrics.jsonl and recovery_curve.png).

    ``data``: a Dataset, a DataLoader or an iterable of ``(images, labels)`` batches from the
    training split (calibration draws a seeded subset of it), or a ``compressor.data.DataBundle``
    (its augmented ``train`` split trains, ``train_eval`` calibrates, ``val`` draws the curve). Returns a new model (``pruned`` is
    untouched unless ``in_place``) and a ``RecoveryReport``.

    >>> small, rep = compressor.recover(small, train_batches, original=model)
    >>> rep.label
    'reconstruct'
    """
    from compressor import data as data_mod
    from compressor.training.evaluation import recalibrate_bn

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise UserError(f"must be an integer >= 0, got {epochs!r}", field="epochs")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise UserError(f"must be a positive integer, got {images!r}", field="images")
    if isinstance(block_steps, bool) or not isinstance(block_steps, int) or block_steps < 0:
        raise UserError(f"must be an integer >= 0, got {block_steps!r}", field="block_steps")
    do_rec = (original is not None) if reconstruct is None else bool(reconstruct)
    if (do_rec or block_steps) and original is None:
        what = "reconstruction" if do_rec else "the block refit"
        raise UserError(f"{what} needs the unpruned model: pass original=", field="original")
    dev = _check_device(device) or _device_of(pruned)
    model = pruned if in_place else copy.deepcopy(pruned)
    model.to(dev)
    bundle = data if isinstance(data, data_mod.DataBundle) else None
    ds = bundle.train_eval if bundle is not None else _as_dataset(data, "data")
    calib = data_mod.calibration_subset(ds, min(images, len(ds)), seed + 2)
    report = RecoveryReport()
    if do_rec:
        from compressor.pruning.reconstruct import reconstruct as refit

        keep = plan.keep if plan is not None else None
        report.reconstruct = refit(original.to(dev), model, data_mod.loader(calib, 64, device=dev), keep=keep,
                                   seed=seed, device=dev, bn="keep", progress=progress)
        report.steps.append("reconstruct")
    if block_steps:
        report.blocks = _refit_blocks(original.to(dev), model, data_mod.loader(calib, 64, device=dev), plan,
                                      block_steps, seed, dev, progress)
        report.steps.append("blocks")
    do_bn = (not do_rec and not block_steps and _has_bn(model)) if bn is None else (bool(bn) and _has_bn(model))
    if do_bn:
        recal = data_mod.calibration_subset(ds, min(images, len(ds)), seed + 1)
        report.bn_images = recalibrate_bn(model, data_mod.loader(recal, 128, device=dev), dev, max_images=images)
        report.steps.append("bn")
    if epochs > 0:
        report.history = _finetune(model, bundle or ds, val_data, epochs, teacher, lr, warmup_epochs, batch_size,
                                   train_config, seed, dev, out_dir, plan, progress)
        report.steps.append("finetune" + ("+kd" if teacher is not None else ""))
    from compressor.training.finite import check_finite

    check_finite(model, what="the recovered model")
    return model, report


def _refit_blocks(original: nn.Module, model: nn.Module, loader: Any, plan: Plan | None, steps: int, seed: int,
                  dev: torch.device, progress: bool) -> Any:
    from compressor.pruning.reconstruct_kept import keep_from_plan
    from compressor.pruning.refit_blocks import refit_blocks

    keep = keep_from_plan(original, plan, _first_images(loader)[:1]) if plan is not None else None
    return refit_blocks(original, model, loader, steps=steps, seed=seed, keep=keep, device=dev, progress=progress)


def _finetune(model: nn.Module, ds: Any, val_data: Any, epochs: int, teacher: nn.Module | None, lr: float,
              warmup: float | None, batch_size: int, train_config: Any, seed: int, dev: torch.device, out_dir: Any,
              plan: Plan | None, progress: bool) -> list[dict[str, Any]]:
    from dataclasses import replace

    from compressor.data import DataBundle
    from compressor.training.train import TrainConfig, fit

    if train_config is None:
        from compressor.training.recipe import finetune_warmup

        warmup = finetune_warmup(str(getattr(model, "arch", "") or "")) if warmup is None else warmup
        try:
            cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, warmup_epochs=warmup)
        except ValueError as exc:
            raise UserError(str(exc), field="epochs/lr/batch_size/warmup_epochs") from exc
    else:
        cfg = replace(train_config, epochs=epochs)
    if isinstance(ds, DataBundle):
        bundle = ds
    else:
        val = _as_dataset(val_data, "val_data") if val_data is not None else torch.utils.data.Subset(ds, [])
        ncls = int(getattr(model, "num_classes", 0) or 0)
        size = getattr(model, "input_size", None) or 32
        bundle = DataBundle(name="user", train=ds, train_eval=ds, val=val, test=val, num_classes=ncls,
                            input_size=size if isinstance(size, int) else int(size[0]))
    if teacher is not None:  # training freezes and moves its teacher: the caller's model stays as it was
        teacher = copy.deepcopy(teacher).to(dev).eval()
    meta = {"plan": plan.to_json(), "metrics": {}} if plan is not None else None
    return fit(model, bundle, cfg, dev, progress, teacher=teacher, out_dir=out_dir, ckpt_meta=meta)


# ---------------------------------------------------------------- measure

def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device | str | None = None,
             progress: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%), mean cross-entropy and image count on ``(images, labels)`` batches.

    >>> compressor.evaluate(small, test_batches)                          # doctest: +SKIP
    {'top1': 91.2, 'top5': 99.6, 'loss': 0.31, 'n': 10000}
    """
    from compressor.training.evaluation import evaluate as _evaluate

    dev = _check_device(device) or _device_of(model)
    try:
        return _evaluate(model, loader, dev, progress)
    except ValueError as exc:
        raise UserError(str(exc), field="loader") from exc


def count(model: nn.Module, example_inputs: torch.Tensor | int | tuple[int, int] | None = None) -> dict[str, int]:
    """MACs (Conv2d and Linear multiply-accumulates) and params of one image, on the model as it is.

    ``example_inputs``: a tensor or an input size, needed when the model records none.

    >>> compressor.count(model, torch.randn(1, 3, 32, 32))               # doctest: +SKIP
    {'macs': 556651520, 'params': 11181642}
    """
    if torch.is_tensor(example_inputs):
        size: Any = (int(example_inputs.shape[2]), int(example_inputs.shape[3]))
        chans = int(example_inputs.shape[1])
    else:
        size, chans = example_inputs, int(getattr(model, "in_channels", 3))
    if size is None and getattr(model, "input_size", None) is None:
        raise UserError("pass example_inputs or an input size: the model records no input size",
                        field="example_inputs")
    if size is None:
        return counting.count(model)
    ex = torch.zeros(1, chans, *((size, size) if isinstance(size, int) else size))
    return counting.count(view(model, record_of(model, ex)))


def sensitivity(model: nn.Module, eval_loader: Iterable, *, scores: scores_mod.Scores | Mapping[str, torch.Tensor]
                | None = None, criterion: str | None = None, rates: Sequence[float] | None = None,
                units: Sequence[str] | None = None, example_inputs: torch.Tensor | None = None,
                recal_loader: Iterable | None = None, recal_images: int = 512,
                device: torch.device | str | None = None, progress: bool = False) -> Any:
    """Each unit pruned alone at each rate: the top-1 drop (``sensitivity.SensitivityResult``).

    >>> res = compressor.sensitivity(model, val_batches, rates=[0.25, 0.5])  # doctest: +SKIP
    >>> res.rows[0]["drop"]                                                   # doctest: +SKIP
    """
    from compressor.pruning import sensitivity_scan as sens

    dev = _check_device(device) or _device_of(model)
    if example_inputs is None and getattr(model, "input_size", None) is None:
        example_inputs = _first_images(eval_loader)[:1]
    v = view(model, record_of(model, example_inputs))
    per_unit, tiebreak, _ = _scores_for(v, scores, criterion, 0)
    kw: dict[str, Any] = {"rates": list(rates)} if rates is not None else {}
    return sens.analyze(v, per_unit, eval_loader, tiebreak=tiebreak, units=units, device=dev,
                        recal_loader=recal_loader, recal_images=recal_images, progress=progress, **kw)


# ---------------------------------------------------------------- files

def export(model: nn.Module, path: str | Path, *, example_inputs: torch.Tensor | None = None, opset: int | None = None,
           atol: float = 1e-4, n_real: int = 0, force: bool = False, int8: bool = False, calibration: Any = None,
           max_drop: float = 1.0, calib_method: str | None = None, n_calib: int = 256,
           n_test: int | None = None, seed: int = 0) -> Any:
    """ONNX with a dynamic batch, verified against onnxruntime before ``path`` is written.

    ``n_real`` test images of the model's own data (its contract) join the random checks; ``seed``
    draws them (and the int8 calibration images).
    Returns ``ExportResult`` (``ok``, ``checks``, ``bytes``); a failed check writes nothing.

    ``int8=True``: static post-training quantization (QDQ, per-channel weights), activations
    calibrated on ``calibration`` batches (or ``n_calib`` images of the model's own data) with
    ``calib_method`` (default minmax); refused (exit 3, nothing written) when its top-1 on the
    contract's test data falls more than ``max_drop`` points below float32's.

    >>> res = compressor.export(small, "small.onnx"); res.ok              # doctest: +SKIP
    True
    >>> compressor.export(small, "small.int8.onnx", int8=True, calibration=train_batches)  # doctest: +SKIP
    """
    from compressor.deploy import onnx_export as export_mod

    v = view(model, record_of(model, example_inputs))
    kw: dict[str, Any] = {"opset": opset} if opset is not None else {}
    if int8:
        kw.update(int8=True, calibration=calibration, max_drop=max_drop, calib_method=calib_method, n_calib=n_calib,
                  n_test=n_test)
    return export_mod.export(v, path, atol=atol, n_real=n_real, force=force, seed=seed, **kw)


def save(model: nn.Module, path: str | Path, **fields: Any) -> Path:
    """Write a pruned (or any) model as a plain-data checkpoint (``checkpoint.save``).

    >>> compressor.save(small, "pruned.pt")                               # doctest: +SKIP
    """
    if not hasattr(model, "arch"):
        raise UserError("save needs a model built by get_model or returned by prune/recover "
                        "(it must know its architecture reference)", field="model")
    return checkpoint.save(path, model, **fields)


def load(path: str | Path, model: str | nn.Module | None = None, **kwargs: Any) -> nn.Module:
    """Rebuild a checkpoint's model.

    ``model``: nothing for registered and ``torchvision:`` models; the ``module:builder`` the
    file was built from (user code is imported only when named here); or an instance of the
    user's unpruned ``nn.Module``, which the file's shapes then narrow.

    >>> small = compressor.load("pruned.pt", model=MyNet())               # doctest: +SKIP
    """
    if isinstance(model, nn.Module):
        net, obj = checkpoint.load_into(path, model, **kwargs)
        size = (obj.get("data") or {}).get("input_size") if isinstance(obj.get("data"), dict) else None
        if getattr(net, "input_size", None) is None and size:
            net.input_size = int(size[0]) if size[0] == size[1] else tuple(size)
        return net
    try:
        return checkpoint.load(path, model=model, **kwargs)[0]
    except UserError as exc:
        if "unknown model" in str(exc) and model is None:
            raise UserError(f"{_message(exc)}; a model of your own class loads with "
                            "compressor.load(path, model=MyNet(...))", source=exc.source, field=exc.field) from exc
        raise


def list_models() -> list[str]:
    """The registered model names (``torchvision:<name>``, ``timm:<name>`` and ``package.module:builder``
    work too)."""
    from compressor.models import list_models as _list

    return _list()


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A fresh (untrained) model by name: a registered one, ``torchvision:<name>``, ``timm:<name>`` or a
    user's ``package.module:builder``; ``kwargs`` go to the builder (``num_classes``, ``input_size``...).

    >>> net = compressor.build_model("resnet20")
    >>> net.num_classes
    10
    """
    from compressor.models import get_model

    return get_model(name, **kwargs)


@dataclass
class UnitInfo:
    """One prunable unit as the engine discovered it, with what its channels cost at the input size."""

    name: str  # the rates-file key
    width: int
    kind: str  # plain, residual, linear, grouped...
    macs: int  # what follows the unit's channels: its convs, their norms, the next layers' inputs
    params: int
    rank_points: list[str]  # "module+activation" where it is ranked
    coupled: list[str]  # other convs cut with it


@dataclass
class Description:
    units: list[UnitInfo]
    macs: int  # the whole model at its input size
    params: int
    input_size: Any
    skipped: dict[str, str]  # units off by default, and their kind ("residual": ``residual=True`` prunes them)
    refused: dict[str, str]  # channel spaces the engine cannot cut, and why


def describe(model: nn.Module, example_inputs: torch.Tensor | None = None, *,
             residual: bool | None = None) -> Description:
    """What ``prune`` would cut: each unit (in rates-list order) with its width, kind, rank points and the
    MACs/params that follow its channels, plus the units left out and why.

    >>> d = compressor.describe(compressor.build_model("resnet20"))
    >>> d.units[0].name, d.units[0].width                                  # doctest: +SKIP
    ('conv1', 16)
    """
    v = view(model, record_of(model, example_inputs, None, residual))
    units = graph.units(v)
    found = graph.discovery(v)
    sizer = SizeModel(v, found)
    total = sizer.count({})
    rows = []
    for u in units:
        gone = sizer.count({u.name: 0})
        acts = u.rank_acts or ("",) * len(u.rank_points)
        rows.append(UnitInfo(name=u.name, width=u.width, kind=u.kind, macs=total["macs"] - gone["macs"],
                             params=total["params"] - gone["params"],
                             rank_points=[f"{p}+{graph.activation_label(a)}" if a else p
                                          for p, a in zip(u.rank_points, acts)],
                             coupled=list(u.convs[1:])))
    return Description(units=rows, macs=total["macs"], params=total["params"], input_size=v.input_size,
                       skipped=dict(found.skipped), refused=dict(found.refused))


__all__ = ["Description", "ModelRecord", "PruneInfo", "RecoveryReport", "UnitInfo", "build_model", "count", "describe",
           "evaluate", "export", "list_models", "load", "prune", "rank", "rates_spec", "recover", "save", "sensitivity"]
