"""The prune job: baseline -> scores -> plan -> surgery -> recovery -> evaluation -> outputs.

The CLI's ``prune`` is a thin wrapper over ``run_prune``, itself a list of named steps.
Every input is validated before anything is written, so a bad rates file or checkpoint
leaves no half-made output folder. Nothing here knows a model family: the units come from
the dependency graph, sizes from ``SizeModel``, and model-specific rate layouts from the
model itself (``hrankplus_rates``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor import checkpoint, counting, criteria, data as data_mod, io, latency, plots, policy, scores as scores_mod, surgery
from compressor.errors import UserError
from compressor.evaluate import evaluate, recalibrate_bn, resolve_device
from compressor.models import external, get_model
from compressor.plan import make_plan
from compressor.pruning import graph
from compressor.pruning.graph import units as units_of
from compressor.pruning.size import SizeModel
from compressor.rates import RateSpec, load_rates, parse_rate_string, read_yaml, spec_from_doc
from compressor.train import TrainConfig, check_finite, fit

log = logging.getLogger("compressor")


@dataclass
class PruneJob:
    model: str
    rates: str
    checkpoint: str | None = None
    data: str = "digits"
    data_root: str | None = None
    download: bool = False
    num_classes: int | None = None
    criterion: str = "hrank"
    scores: str | None = None
    import_hrank: str | None = None
    n_images: int = 768
    calib_batch: int = 128
    seed: int = 0
    hrank_compat: bool = False
    rank_rtol: float | None = None
    rank_atol: float = 0.0
    rounding: str | None = None
    surgery: str = "torch_pruning"
    bn_recalibrate: bool = True
    baseline_epochs: int | None = None  # None: the model's ``quick_baseline`` recipe
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0))
    weights: str | None = None        # a plain state_dict (torchvision, akamaster, HRank) for --model
    pretrained: bool = False          # torchvision weights API (needs the network)
    input_size: int | None = None     # external models: the traced/evaluated input size
    residual: bool | None = None      # prune residual groups (None: the model's default)
    reconstruct: bool = False         # least-squares refit of the layers consuming pruned channels
    reconstruct_images: int = 512
    teacher: str | None = None        # "self" (the unpruned model) or a checkpoint, for fine-tuning KD
    round_to: int | None = None
    device: str = "auto"
    out: str | None = None
    progress: bool = True


def default_out(job: PruneJob) -> Path:
    return Path("checkpoints") / f"{job.model}_{job.data}_{Path(job.rates).stem}"


def _load_rates(job: PruneJob, model: nn.Module) -> RateSpec:
    names = [u.name for u in units_of(model)]
    try:
        spec = load_rates(job.rates, names, model_name=job.model,
                          short_list=getattr(model, "short_rate_list", None))
    except UserError as exc:
        if exc.field:  # a layer the graph found but will not prune says why
            d = graph.discovery(model)
            for name in (exc.field, exc.field.strip("'")):
                if name in d.refused or name in d.skipped:
                    graph.check_prunable(model, [name])
        spec = _layout_rates(job, model)
        if spec is None:
            raise
    changes: dict[str, Any] = {}
    if job.rounding:
        changes["rounding"] = job.rounding
    if job.round_to:
        changes["round_to"] = job.round_to
    return spec.replace(**changes) if changes else spec


def _layout_rates(job: PruneJob, model: nn.Module) -> RateSpec | None:
    """A rate list in the model's published layout (HRankPlus/CHIP ResNet lists), if it is one."""
    if not hasattr(model, "hrankplus_rates"):
        return None
    doc = read_yaml(job.rates)
    raw = doc.get("rates") if isinstance(doc, dict) else None
    if isinstance(raw, str):
        raw = parse_rate_string(raw, job.rates)
    if not isinstance(raw, list):
        return None
    mapping = model.hrankplus_rates(raw)
    names = [u.name for u in units_of(model)]
    spec = spec_from_doc({**doc, "rates": {n: float(mapping.get(n, 0.0)) for n in names}}, names, source=job.rates,
                         model_name=job.model)
    return spec.replace(extra={**spec.extra, "layout": "hrankplus", "rates_string": str(doc.get("rates"))[:200]})


def quick_baseline_config(model: nn.Module, job: PruneJob) -> TrainConfig:
    """The model's quick recipe (``recipes/models.yaml``), with ``--baseline-epochs`` on top."""
    from compressor.recipe import model_recipe

    recipe = dict(model_recipe(getattr(model, "arch", job.model))["quick_baseline"])
    if job.baseline_epochs is not None:
        recipe["epochs"] = job.baseline_epochs
    return TrainConfig(seed=job.seed, **recipe)


def _model_kwargs(job: PruneJob) -> dict[str, Any]:
    return {"input_size": job.input_size} if (job.input_size and external.is_external(job.model)) else {}


def _set_input_size(model: nn.Module, job: PruneJob) -> nn.Module:
    if job.input_size and external.is_external(job.model):
        model.input_size = job.input_size
        model.builder_kwargs = {**getattr(model, "builder_kwargs", {}), "input_size": job.input_size}
    elif job.input_size and job.input_size != getattr(model, "input_size", job.input_size):
        raise UserError(f"{job.model} is built for {model.input_size}-px inputs; --input-size applies to "
                        "torchvision: and module: models", field="input-size")
    if job.residual is not None:
        model.prune_residual = job.residual
    return model


def _load_base(job: PruneJob) -> tuple[nn.Module | None, dict[str, Any]]:
    """The model to prune: a checkpoint, a plain weights file, pretrained weights, or none yet."""
    sources = [x for x in (job.checkpoint, job.weights, job.pretrained or None) if x]
    if len(sources) > 1:
        raise UserError("give one of --checkpoint, --weights and --pretrained", field="checkpoint")
    if job.checkpoint or job.weights:
        path = job.checkpoint or job.weights
        base, ck = checkpoint.load(path, model=job.model, num_classes=job.num_classes)
        return _set_input_size(base, job), ck
    if job.pretrained:
        base = get_model(job.model, num_classes=job.num_classes, **_model_kwargs(job))
        base.load_state_dict(external.pretrained_state_dict(job.model))
        return _set_input_size(base, job), {"provenance": {"imported_from": f"{job.model} pretrained weights"}}
    return None, {}


def _load_scores(job: PruneJob, base: nn.Module | None) -> scores_mod.Scores | None:
    if not (job.scores or job.import_hrank):
        return None
    if base is None:
        raise UserError("reusing scores needs the --checkpoint they were computed on", field="scores")
    sc = scores_mod.Scores.load(job.scores) if job.scores else scores_mod.import_hrank(job.import_hrank, base)
    sc.check_model(base, job.scores or job.import_hrank)
    sc.for_criterion(job.criterion)
    return sc


def _baseline(job: PruneJob, base: nn.Module | None, bundle: Any, ncls: int,
              device: torch.device) -> tuple[nn.Module, bool]:
    if base is not None:
        return base.to(device).eval(), False
    base = _set_input_size(get_model(job.model, num_classes=ncls, **_model_kwargs(job)), job)
    cfg = quick_baseline_config(base, job)
    log.info("no --checkpoint given: training a quick %d-epoch baseline on %s (lr %g, batch %d)",
             cfg.epochs, job.data, cfg.lr, cfg.batch_size)
    fit(base, bundle, cfg, device, job.progress)
    return base.to(device).eval(), True


def _rank(job: PruneJob, base: nn.Module, bundle: Any, device: torch.device,
          pre: scores_mod.Scores | None) -> scores_mod.Scores:
    if pre is not None:
        return pre
    calib = data_mod.calibration_subset(bundle.train_eval, job.n_images, job.seed)
    return scores_mod.compute(base, data_mod.loader(calib, job.calib_batch, device=device), [job.criterion],
                              n_images=job.n_images, seed=job.seed, compat=job.hrank_compat, device=device,
                              options={"rtol": job.rank_rtol, "atol": job.rank_atol}, progress=job.progress,
                              extra_meta={"data": job.data, "augmentation": "none"})


def _recover(job: PruneJob, base: nn.Module, pruned: nn.Module, plan: Any, bundle: Any, device: torch.device,
             test_loader: Any, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Reconstruction, BN re-estimation and fine-tuning, each measured on the way."""
    recovery = []
    if job.reconstruct:
        from compressor.reconstruct import reconstruct

        calib = data_mod.calibration_subset(bundle.train_eval, min(job.reconstruct_images, len(bundle.train_eval)),
                                            job.seed + 2)
        rep = reconstruct(base, pruned, data_mod.loader(calib, 64, device=device), keep=plan.keep, seed=job.seed,
                          device=device, bn="keep", progress=job.progress)
        metrics["reconstruct"] = rep.to_dict() if hasattr(rep, "to_dict") else str(rep)
        metrics["pruned_test_reconstructed"] = evaluate(pruned, test_loader, device, job.progress, "eval reconstructed")
        recovery.append("reconstruct")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pruned.modules())
    if job.bn_recalibrate and has_bn and not job.reconstruct:
        recal = data_mod.loader(data_mod.calibration_subset(bundle.train_eval, min(512, len(bundle.train_eval)),
                                                            job.seed + 1), 128, device=device)
        metrics["bn_recalibrated_images"] = recalibrate_bn(pruned, recal, device)
        metrics["pruned_test_bn_recalibrated"] = evaluate(pruned, test_loader, device, job.progress, "eval pruned+BN")
        recovery.append("bn")
    history: list[dict[str, Any]] = []
    if job.finetune.epochs > 0:
        teacher = _teacher(job, base, device)
        history = fit(pruned, bundle, job.finetune, device, job.progress, teacher=teacher)
        metrics["finetuned_test"] = evaluate(pruned, test_loader, device, job.progress, "eval fine-tuned")
        recovery.append("finetune" + ("+kd" if teacher is not None else ""))
        if teacher is not None:
            metrics["distillation"] = {"teacher": job.teacher, "temperature": job.finetune.kd_temperature,
                                       "alpha": job.finetune.kd_alpha}
    metrics["recovery"] = "+".join(recovery) or "none"
    return history


def _teacher(job: PruneJob, base: nn.Module, device: torch.device) -> nn.Module | None:
    if not job.teacher:
        return None
    if job.teacher == "self":
        return base.eval()
    t, _ = checkpoint.load(job.teacher)
    return t.to(device).eval()


def run_prune(job: PruneJob) -> dict[str, Any]:
    device = resolve_device(job.device)
    # 1. Validate every input before doing work or writing anything.
    criteria.get(job.criterion)
    base, ck = _load_base(job)
    probe = base if base is not None else _set_input_size(
        get_model(job.model, num_classes=job.num_classes, **_model_kwargs(job)), job)
    spec = _load_rates(job, probe)
    policy.policy_config(spec)  # check the policy keys before any work
    policy.precheck(spec, str(device))
    if base is not None:
        trained_on = (ck.get("provenance") or {}).get("data")
        if trained_on and trained_on != job.data:
            log.warning("warning: %s was trained on %s but ranking and evaluation use --data %s",
                        job.checkpoint, trained_on, job.data)
    size = probe.input_size if isinstance(probe.input_size, int) else int(probe.input_size[0])
    bundle = data_mod.load(job.data, job.data_root, input_size=size, seed=job.seed, download=job.download,
                           stats=data_mod.model_stats(probe))
    ncls = base.num_classes if base is not None else (job.num_classes or bundle.num_classes)
    data_mod.check_classes(bundle, ncls, field="data")
    pre_scores = _load_scores(job, base)
    out = io.check_writable(Path(job.out) if job.out else default_out(job))

    # 2. Baseline.
    test_loader = data_mod.loader(bundle.test, 256, device=device)
    base, baseline_trained = _baseline(job, base, bundle, ncls, device)
    acc_before = evaluate(base, test_loader, device, job.progress, "eval baseline")

    # 3. Scores, 4. plan and surgery.
    units = units_of(base)
    sc = _rank(job, base, bundle, device, pre_scores)
    widths = {u.name: u.width for u in units}
    sizer = SizeModel(base, graph.discovery(base))
    spec = policy.resolve(spec, base, sc.for_criterion(job.criterion), tiebreak=sc.tiebreak,
                          counter=sizer.count, widths=widths, device=str(device))
    log.info(policy.describe(spec))
    plan = make_plan(sc.for_criterion(job.criterion), spec, widths, tiebreak=sc.tiebreak, model=job.model)
    pruned = surgery.apply(base, plan, method=job.surgery)
    acc_pruned_raw = evaluate(pruned, test_loader, device, job.progress, "eval pruned")
    metrics: dict[str, Any] = {"baseline_test": acc_before, "pruned_test_no_finetune": acc_pruned_raw,
                               "policy": spec.extra.get("resolved")}
    lat_check = latency.verify_spec(base, pruned, spec)
    if lat_check is not None:
        log.info(lat_check["line"])
        metrics["latency_check"] = lat_check

    # 5. Recovery (the last fine-tuning epoch is reported; the test split never selects anything).
    history = _recover(job, base, pruned, plan, bundle, device, test_loader, metrics)
    check_finite(pruned, what="the pruned model")
    size_before, size_after = counting.count(base), counting.count(pruned)
    metrics["size_before"], metrics["size_after"] = size_before, size_after
    metrics["finetune_history"] = history

    # 6. Outputs (atomic writes).
    return _write_outputs(job, out, base, pruned, plan, spec, sc, metrics, baseline_trained, acc_before, units)


def _write_outputs(job: PruneJob, out: Path, base: nn.Module, pruned: nn.Module, plan: Any, spec: RateSpec,
                   sc: scores_mod.Scores, metrics: dict[str, Any], baseline_trained: bool, acc_before: Any,
                   units: list) -> dict[str, Any]:
    prov = checkpoint.provenance(seed=job.seed, data=job.data, criterion=job.criterion,
                                 n_images=sc.meta.get("n_images"), baseline_trained_here=baseline_trained,
                                 bn_recalibrated="bn" in metrics["recovery"].split("+"),
                                 recovery=metrics["recovery"])
    paths = {}
    device = next(base.parameters()).device
    if baseline_trained:
        paths["baseline"] = checkpoint.save(out / "baseline.pt", base.cpu(), metrics={"test": acc_before}, prov=prov)
        base.to(device)
    if not job.scores:  # computed or imported here: keep them with the run
        paths["scores"] = sc.save(out / "scores.pt")
    paths["plan"] = plan.save(out / "plan.json")
    paths["checkpoint"] = checkpoint.save(out / "pruned.pt", pruned.cpu(), rates=spec.to_dict(), plan=plan.to_json(),
                                          metrics=metrics, prov=prov)
    table = counting.size_table(base.cpu(), pruned, metrics["size_before"], metrics["size_after"])
    paths["size_table"] = io.write_text(out / "size_table.md", table + "\n")
    names = [u.name for u in units]
    paths["widths_plot"] = plots.widths(names, [u.width for u in units], [len(plan.kept(n)) for n in names],
                                        out / "widths.png", title=f"{job.model}: channels kept ({job.criterion})")
    paths["summary"] = io.write_json(out / "summary.json", json.loads(json.dumps(metrics, default=str)))
    return {"metrics": metrics, "table": table, "paths": {k: str(v) for k, v in paths.items()}, "out": str(out)}
