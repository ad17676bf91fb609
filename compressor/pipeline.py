"""The prune job: baseline -> scores -> plan -> surgery -> (BN re-estimate) -> fine-tune -> report.

The CLI's ``prune`` is a thin wrapper over ``run_prune``. Every input is validated before
anything is written, so a bad rates file or checkpoint leaves no half-made output folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from compressor.pruning.graph import units as units_of
from compressor import checkpoint, counting, criteria, data as data_mod, io, plots, policy, scores as scores_mod, surgery
from compressor.errors import UserError
from compressor.evaluate import evaluate, recalibrate_bn, resolve_device
from compressor.models import get_model
from compressor.plan import make_plan
from compressor.rates import RateSpec, load_rates
from compressor.train import TrainConfig, fit

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
    device: str = "auto"
    out: str | None = None
    progress: bool = True


def default_out(job: PruneJob) -> Path:
    return Path("checkpoints") / f"{job.model}_{job.data}_{Path(job.rates).stem}"


def _load_rates(job: PruneJob, model: nn.Module) -> RateSpec:
    spec = load_rates(job.rates, [u.name for u in units_of(model)], model_name=job.model,
                      short_list=getattr(model, "short_rate_list", None))
    if job.rounding:
        spec = RateSpec(rates=spec.rates, rounding=job.rounding, source=spec.source, target=spec.target, extra=spec.extra)
    return spec


def quick_baseline_config(model: nn.Module, job: PruneJob) -> TrainConfig:
    """The model's own quick recipe (``quick_baseline``), with ``--baseline-epochs`` on top."""
    recipe = {"epochs": 3, "lr": 0.02, "batch_size": 32, **getattr(model, "quick_baseline", {})}
    if job.baseline_epochs is not None:
        recipe["epochs"] = job.baseline_epochs
    return TrainConfig(seed=job.seed, **recipe)


def run_prune(job: PruneJob) -> dict[str, Any]:
    device = resolve_device(job.device)
    # 1. Validate every input before doing work or writing anything.
    probe = get_model(job.model, num_classes=job.num_classes)
    spec = _load_rates(job, probe)
    policy.policy_config(spec)  # check the policy keys before any work
    criteria.get(job.criterion)
    if job.checkpoint:
        base, ck = checkpoint.load(job.checkpoint, model=job.model, num_classes=job.num_classes)
        trained_on = (ck.get("provenance") or {}).get("data")
        if trained_on and trained_on != job.data:
            log.warning("warning: %s was trained on %s but ranking and evaluation use --data %s",
                        job.checkpoint, trained_on, job.data)
    else:
        base = None
    bundle = data_mod.load(job.data, job.data_root, input_size=probe.input_size, seed=job.seed, download=job.download)
    ncls = base.num_classes if base is not None else (job.num_classes or bundle.num_classes)
    if bundle.num_classes != ncls:
        raise UserError(f"the data has {bundle.num_classes} classes, the model {ncls}", field="data")
    pre_scores = None
    if job.scores or job.import_hrank:
        if base is None:
            raise UserError("reusing scores needs the --checkpoint they were computed on", field="scores")
        pre_scores = (scores_mod.Scores.load(job.scores) if job.scores
                      else scores_mod.import_hrank(job.import_hrank, base))
        pre_scores.check_model(base, job.scores or job.import_hrank)
        pre_scores.for_criterion(job.criterion)
    out = io.check_writable(Path(job.out) if job.out else default_out(job))

    # 2. Baseline.
    test_loader = data_mod.loader(bundle.test, 256, device=device)
    baseline_trained = base is None
    if base is None:
        base = get_model(job.model, num_classes=ncls)
        cfg = quick_baseline_config(base, job)
        log.info("no --checkpoint given: training a quick %d-epoch baseline on %s (lr %g, batch %d)",
                 cfg.epochs, job.data, cfg.lr, cfg.batch_size)
        fit(base, bundle, cfg, device, job.progress)
    base.to(device).eval()
    acc_before = evaluate(base, test_loader, device, job.progress, "eval baseline")

    # 3. Scores.
    units = units_of(base)
    if pre_scores is not None:
        sc = pre_scores
    else:
        calib = data_mod.calibration_subset(bundle.train_eval, job.n_images, job.seed)
        sc = scores_mod.compute(base, data_mod.loader(calib, job.calib_batch, device=device), [job.criterion],
                                n_images=job.n_images, seed=job.seed, compat=job.hrank_compat, device=device,
                                options={"rtol": job.rank_rtol, "atol": job.rank_atol}, progress=job.progress,
                                extra_meta={"data": job.data, "augmentation": "none"})
    # 4. Plan and surgery.
    spec = policy.resolve(spec, base, sc.for_criterion(job.criterion), tiebreak=sc.tiebreak)
    log.info(policy.describe(spec))
    plan = make_plan(sc.for_criterion(job.criterion), spec, {u.name: u.width for u in units},
                     tiebreak=sc.tiebreak, model=job.model)
    pruned = surgery.apply(base, plan, method=job.surgery)
    acc_pruned_raw = evaluate(pruned, test_loader, device, job.progress, "eval pruned")
    metrics: dict[str, Any] = {"baseline_test": acc_before, "pruned_test_no_finetune": acc_pruned_raw,
                               "policy": spec.extra.get("resolved")}
    if job.bn_recalibrate:
        recal = data_mod.loader(data_mod.calibration_subset(bundle.train_eval, min(512, len(bundle.train_eval)),
                                                            job.seed + 1), 128, device=device)
        metrics["bn_recalibrated_images"] = recalibrate_bn(pruned, recal, device)
        metrics["pruned_test_bn_recalibrated"] = evaluate(pruned, test_loader, device, job.progress, "eval pruned+BN")

    # 5. Fine-tune (last epoch is reported; the test split never selects anything).
    history: list[dict[str, Any]] = []
    if job.finetune.epochs > 0:
        history = fit(pruned, bundle, job.finetune, device, job.progress)
        metrics["finetuned_test"] = evaluate(pruned, test_loader, device, job.progress, "eval fine-tuned")
    size_before, size_after = counting.count(base), counting.count(pruned)
    metrics["size_before"], metrics["size_after"] = size_before, size_after
    metrics["finetune_history"] = history

    # 6. Outputs (atomic writes).
    prov = checkpoint.provenance(seed=job.seed, data=job.data, criterion=job.criterion,
                                 n_images=sc.meta.get("n_images"),
                                 baseline_trained_here=baseline_trained, bn_recalibrated=job.bn_recalibrate)
    paths = {}
    if baseline_trained:
        paths["baseline"] = checkpoint.save(out / "baseline.pt", base.cpu(), metrics={"test": acc_before}, prov=prov)
        base.to(device)
    if not job.scores:  # computed or imported here: keep them with the run
        paths["scores"] = sc.save(out / "scores.pt")
    paths["plan"] = plan.save(out / "plan.json")
    paths["checkpoint"] = checkpoint.save(out / "pruned.pt", pruned.cpu(), rates=spec.to_dict(), plan=plan.to_json(),
                                          metrics=metrics, prov=prov)
    table = counting.size_table(base.cpu(), pruned, size_before, size_after)
    paths["size_table"] = io.write_text(out / "size_table.md", table + "\n")
    names = [u.name for u in units]
    paths["widths_plot"] = plots.widths(names, [u.width for u in units], [len(plan.kept(n)) for n in names],
                                        out / "widths.png", title=f"{job.model}: channels kept ({job.criterion})")
    paths["summary"] = io.write_json(out / "summary.json", json.loads(json.dumps(metrics, default=str)))
    return {"metrics": metrics, "table": table, "paths": {k: str(v) for k, v in paths.items()}, "out": str(out)}
