"""The prune job around the API: files, data, baseline, evaluation budget and outputs.

The pruning itself is the public API's (``api.rank`` -> ``api.prune`` -> ``api.recover``); this
module adds what a command-line run needs around it: loading the checkpoint and the data its
contract names, a quick baseline when there is none, the evaluation budget (split, subset,
recorded baselines), the run folder, and the files written. Every input is validated before
anything is written, so a bad rates file or checkpoint leaves no half-made output folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from compressor import api, data as data_mod
from compressor.models import hrank
from compressor.storage import checkpoint
from compressor.data import contract as contract_mod, describe
from compressor.pruning import criteria
from compressor.storage import io
from compressor.reporting import plots
from compressor.pruning import policy
from compressor.storage import runfolder
from compressor.pruning import counting
from compressor.pruning import scores as scores_mod
from compressor.errors import UserError
from compressor.training.evaluation import evaluate, resolve_device
from compressor.models import external, get_model
from compressor.pruning.graph import units as units_of
from compressor.pruning.rates import RateSpec
from compressor.record import record_of, view
from compressor.training.train import TrainConfig, fit

log = logging.getLogger("compressor")


@dataclass
class PruneJob:
    model: str
    rates: str | dict  # a rates.yaml path, or a rates-file-like dict (``--macs 0.5`` gives {"target": {"macs": 0.5}})
    checkpoint: str | None = None
    data: str | None = None           # None: the checkpoint's data contract, else the embedded digits
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
    block_steps: int = 0              # > 0: Adam steps per block against the unpruned block outputs (refit_blocks)
    teacher: str | None = None        # "self" (the unpruned model) or a checkpoint, for fine-tuning KD
    round_to: int | None = None
    eval_split: str = "test"          # where before/after accuracies are measured: test (report) or val
    eval_n: int | None = None         # None: the whole split; else a fixed seed-0 subset of this many images
    baseline_eval: str = "auto"       # auto: reuse a recorded matching result, else measure; measure; skip
    mean: tuple[float, ...] | None = None  # normalisation override (a new contract, or one overriding the checkpoint's)
    std: tuple[float, ...] | None = None
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False           # replace an earlier run's outputs in ``out``
    claim: bool = True                # False: the caller holds ``out`` (a sweep point's folder)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.eval_split not in EVAL_SPLITS:
            raise UserError(f"must be one of {', '.join(EVAL_SPLITS)}, got {self.eval_split!r}", field="eval-split")
        if self.baseline_eval not in BASELINE_EVAL:
            raise UserError(f"must be one of {', '.join(BASELINE_EVAL)}, got {self.baseline_eval!r}",
                            field="baseline-eval")
        if self.eval_n is not None and (isinstance(self.eval_n, bool) or not isinstance(self.eval_n, int)
                                        or self.eval_n < 1):
            raise UserError(f"must be a positive integer, got {self.eval_n!r}", field="eval-n")


EVAL_SPLITS = ("test", "val")
BASELINE_EVAL = ("auto", "measure", "skip")


def default_out(job: PruneJob, data_name: str | None = None) -> Path:
    tag = (Path(job.rates).stem if not isinstance(job.rates, dict)
           else "_".join(f"{k}{v:g}" for k, v in (job.rates.get("target") or {}).items()) or "rates")
    return Path("checkpoints") / f"{job.model.replace(':', '_')}_{data_name or job.data or 'digits'}_{tag}"


def _load_rates(job: PruneJob, model: nn.Module) -> RateSpec:
    return api.rates_spec(job.rates, model, rounding=job.rounding, round_to=job.round_to)


def quick_baseline_config(model: nn.Module, job: PruneJob) -> TrainConfig:
    """The model's quick recipe (``recipes/models.yaml``), with ``--baseline-epochs`` on top."""
    from compressor.training.recipe import model_recipe

    recipe = dict(model_recipe(getattr(model, "arch", job.model))["quick_baseline"])
    if job.baseline_epochs is not None:
        recipe["epochs"] = job.baseline_epochs
    return TrainConfig(seed=job.seed, **recipe)


def _model_kwargs(job: PruneJob) -> dict[str, Any]:
    return {"input_size": job.input_size} if job.input_size else {}


def _set_input_size(model: nn.Module, job: PruneJob) -> nn.Module:
    if job.input_size and external.is_external(job.model):
        model.input_size = job.input_size
        model.builder_kwargs = {**getattr(model, "builder_kwargs", {}), "input_size": job.input_size}
    elif job.input_size and job.input_size != getattr(model, "input_size", job.input_size):
        raise UserError(f"{job.checkpoint or job.weights} holds a model for {model.input_size}-px inputs; "
                        f"--input-size {job.input_size} applies to a model built here", field="input-size")
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
    sc = scores_mod.Scores.load(job.scores) if job.scores else hrank.import_rank_files(job.import_hrank, base)
    residual = job.residual
    if residual is None:  # scores from a run that pruned residual groups (--residual, or auto) check against them
        plain = {u.name for u in units_of(base)}
        residual = True if any(u not in plain for per in sc.scores.values() for u in per) else None
    sc.check_model(view(base, record_of(base, residual=residual)), job.scores or job.import_hrank)
    sc.for_criterion(job.criterion)
    return sc


def _baseline(job: PruneJob, base: nn.Module | None, bundle: Any, ncls: int,
              device: torch.device, contract: Any) -> tuple[nn.Module, bool]:
    if base is not None:
        return contract_mod.attach(base.to(device).eval(), contract), False
    torch.manual_seed(job.seed)  # the quick baseline's initial weights are a function of --seed, nothing else
    base = _set_input_size(get_model(job.model, num_classes=ncls, **_model_kwargs(job)), job)
    cfg = quick_baseline_config(base, job)
    log.info("no --checkpoint given: training a quick %d-epoch baseline on %s (lr %g, batch %d)",
             cfg.epochs, contract.dataset, cfg.lr, cfg.batch_size)
    fit(base, bundle, cfg, device, job.progress)
    return contract_mod.attach(base.to(device).eval(), contract), True


def eval_subset(ds: Any, n: int | None) -> Any:
    """The evaluation images: the whole split, or a fixed subset of ``n`` (seed 0, whatever ``--seed``,
    so results stay comparable and reusable across runs)."""
    if n is None or n >= len(ds):
        return ds
    import numpy as np
    from torch.utils.data import Subset

    return Subset(ds, sorted(np.random.default_rng(0).permutation(len(ds))[:n].tolist()))


def eval_key(job: PruneJob, contract: Any, n_images: int) -> dict[str, Any]:
    """What an accuracy was measured on: split, image count and the data contract."""
    return {"split": job.eval_split, "n": int(n_images), "data": contract.to_dict()}


def recorded_eval(ck: Mapping[str, Any], key: Mapping[str, Any]) -> dict[str, Any] | None:
    """A result the checkpoint records for exactly this split, count and contract, if any.

    Prune outputs list theirs in ``metrics["evaluations"]``; a training run's best.pt has the
    whole test split in ``metrics["test"]`` (measured on the contract the file carries).
    """
    m = ck.get("metrics") or {}
    for rec in m.get("evaluations") or []:
        if isinstance(rec, Mapping) and {k: rec.get(k) for k in key} == dict(key) and isinstance(rec.get("result"), Mapping):
            return dict(rec["result"])
    test = m.get("test")
    if (key["split"] == "test" and isinstance(test, Mapping) and test.get("n") == key["n"]
            and ck.get("data") == key["data"] and isinstance(test.get("top1"), (int, float))):
        return dict(test)
    return None


def _measure_baseline(job: PruneJob, base: nn.Module, ck: Mapping[str, Any], key: Mapping[str, Any],
                      loader: Any, device: torch.device, trained_here: bool) -> dict[str, Any] | None:
    if job.baseline_eval == "skip":
        log.info("baseline accuracy not measured (--baseline-eval skip)")
        return None
    if job.baseline_eval == "auto" and not trained_here:
        got = recorded_eval(ck, key)
        if got is not None:
            log.info("baseline top-1 %.2f%% on %s (%d images): recorded in the checkpoint, not re-measured "
                     "(--baseline-eval measure re-measures)", got["top1"], key["split"], key["n"])
            return {**got, "reused": True}
    return evaluate(base, loader, device, job.progress, "eval baseline")


def _rank(job: PruneJob, base: nn.Module, bundle: Any, device: torch.device,
          pre: scores_mod.Scores | None, residual: bool | None = None) -> scores_mod.Scores:
    if pre is not None:
        return pre
    calib = data_mod.calibration_subset(bundle.train_eval, job.n_images, job.seed)
    return api.rank(base, data_mod.loader(calib, job.calib_batch, device=device), [job.criterion],
                    n_images=job.n_images, seed=job.seed, compat=job.hrank_compat, device=device,
                    rtol=job.rank_rtol, atol=job.rank_atol, progress=job.progress, residual=residual,
                    extra_meta={"data": job.data, "augmentation": "none"})


def _recover(job: PruneJob, base: nn.Module, pruned: nn.Module, plan: Any, bundle: Any, device: torch.device,
             test_loader: Any, metrics: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Reconstruction, BN re-estimation and fine-tuning (``api.recover``, one step at a time, each measured).

    A fine-tune runs in ``out/finetune/`` (its metrics.jsonl, recovery_curve.png, last.pt and
    best.pt, selected on val); the pruned model keeps the last epoch's weights."""
    recovery = []
    common = {"plan": plan, "seed": job.seed, "device": device, "in_place": True, "progress": job.progress}
    if job.reconstruct:
        _, rep = api.recover(pruned, bundle, original=base, reconstruct=True, bn=False,
                             images=job.reconstruct_images, **common)
        metrics["reconstruct"] = rep.reconstruct.to_dict()
        metrics["pruned_test_reconstructed"] = evaluate(pruned, test_loader, device, job.progress, "eval reconstructed")
        recovery += rep.steps
    if job.block_steps:
        _, rep = api.recover(pruned, bundle, original=base, reconstruct=False, bn=False, block_steps=job.block_steps,
                             images=job.reconstruct_images, **common)
        metrics["block_refit"] = rep.blocks.to_dict()
        if rep.blocks.skipped and not job.reconstruct:
            log.warning("block refit: %d changed modules lie in no block and are not refit without --reconstruct "
                        "(%s)", len(rep.blocks.skipped), ", ".join(n for n, _ in rep.blocks.skipped[:5]))
        metrics["pruned_test_block_refit"] = evaluate(pruned, test_loader, device, job.progress, "eval block refit")
        recovery += rep.steps
    if job.bn_recalibrate and not job.reconstruct and not job.block_steps:
        _, rep = api.recover(pruned, bundle, reconstruct=False, bn=True, images=512, **common)
        if rep.steps:
            metrics["bn_recalibrated_images"] = rep.bn_images
            metrics["pruned_test_bn_recalibrated"] = evaluate(pruned, test_loader, device, job.progress,
                                                              "eval pruned+BN")
            recovery += rep.steps
    history: list[dict[str, Any]] = []
    if job.finetune.epochs > 0:
        teacher = _teacher(job, base, device)
        _, rep = api.recover(pruned, bundle, reconstruct=False, bn=False, epochs=job.finetune.epochs,
                             teacher=teacher, train_config=job.finetune, out_dir=out / "finetune", **common)
        history = rep.history
        _write_curve(out / "finetune", metrics.get("baseline_test"), metrics["eval"], job.model)
        metrics["finetuned_test"] = evaluate(pruned, test_loader, device, job.progress, "eval fine-tuned")
        recovery += rep.steps
        if teacher is not None:
            metrics["distillation"] = {"teacher": job.teacher, "temperature": job.finetune.kd_temperature,
                                       "alpha": job.finetune.kd_alpha}
    metrics["recovery"] = "+".join(recovery) or "none"
    return history


def _write_curve(run: Path, baseline: Mapping[str, Any] | None, where: Mapping[str, Any], model: str) -> Path | None:
    """The fine-tune's ``recovery_curve.png`` drawn again with the unpruned model's accuracy as a
    reference line (labelled with the split and image count it was measured on), as ``report --curves``
    draws it; without a measured baseline (``--baseline-eval skip``) the training loop's plot stays."""
    from compressor.reporting.report_curves import baseline_label, read_metrics
    from compressor.training.train import curve_points

    top1 = (baseline or {}).get("top1")
    if not isinstance(top1, (int, float)) or not (run / "metrics.jsonl").is_file():
        return None
    ref = {baseline_label({"top1": float(top1), "split": where.get("split"), "n": where.get("n")}): float(top1)}
    return plots.recovery_curves({"fine-tune (val)": curve_points(read_metrics(run / "metrics.jsonl"))},
                                 run / "recovery_curve.png", baselines=ref,
                                 title=f"{model} after pruning: validation top-1 while fine-tuning")


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
    if job.criterion == "obs":
        if job.scores or job.import_hrank:
            raise UserError("--criterion obs chooses channels itself: it takes no --scores/--import-hrank",
                            field="criterion")
    else:
        criteria.get(job.criterion)
    base, ck = _load_base(job)
    probe = base if base is not None else _set_input_size(
        get_model(job.model, num_classes=job.num_classes, **_model_kwargs(job)), job)
    spec = _load_rates(job, probe)
    policy.policy_config(spec)  # check the policy keys before any work
    policy.precheck(spec, str(device))
    bundle, contract = contract_mod.load_data(
        base, job.data, job.data_root, input_size=probe.input_size, seed=job.seed, download=job.download,
        mean=job.mean, std=job.std, recorded=ck.get("provenance"), source=job.checkpoint or job.weights)
    job = replace(job, data=contract.dataset)  # what was resolved, for the records below
    ncls = base.num_classes if base is not None else (job.num_classes or bundle.num_classes)
    data_mod.check_classes(bundle, ncls, field="data")
    pre_scores = _load_scores(job, base)
    checkpoint.check_teacher(job.teacher if job.finetune.epochs > 0 else None)  # not after ranking and surgery
    out = io.check_writable(Path(job.out) if job.out else default_out(job, contract.dataset))
    if not job.claim:
        return _prune_into(job, out, device, base, ck, bundle, contract, spec, ncls, pre_scores)
    with runfolder.claim(out, command="prune", overwrite=job.overwrite):  # a failed run leaves nothing
        return _prune_into(job, out, device, base, ck, bundle, contract, spec, ncls, pre_scores)


def _prune_into(job: PruneJob, out: Path, device: torch.device, base: nn.Module | None, ck: Mapping[str, Any],
                bundle: Any, contract: Any, spec: RateSpec, ncls: int, pre_scores: Any) -> dict[str, Any]:
    log.info(describe.data_line(bundle, contract))  # after every input was validated: an error stays one line
    # 2. Baseline.
    eval_ds = eval_subset(bundle.test if job.eval_split == "test" else bundle.val, job.eval_n)
    test_loader = data_mod.loader(eval_ds, 256, device=device)
    key = eval_key(job, contract, len(eval_ds))
    base, baseline_trained = _baseline(job, base, bundle, ncls, device, contract)
    acc_before = _measure_baseline(job, base, ck, key, test_loader, device, baseline_trained)

    # 3. Scores, 4. plan and surgery.
    residual = job.residual
    if residual is None and api.auto_residual(base, spec, scores=pre_scores):  # ranked and pruned with them too
        residual = True
        log.warning(api.AUTO_RESIDUAL)
    units = units_of(view(base, record_of(base, residual=residual)))
    calib = None
    if job.criterion == "obs":  # the images the reconstruction refits on choose the channels
        sc = None
        calib = data_mod.loader(data_mod.calibration_subset(
            bundle.train_eval, min(job.reconstruct_images, len(bundle.train_eval)), job.seed + 2), 64, device=device)
    else:
        sc = _rank(job, base, bundle, device, pre_scores, residual)
    pruned, info = api.prune(base, rates=spec, scores=sc, criterion=job.criterion, method=job.surgery,
                             seed=job.seed, device=device, calibration=calib, residual=residual)
    spec, plan = info.rates, info.plan
    log.info(policy.describe(spec))
    for note in info.notes:
        log.warning(note)
    pruned = contract_mod.attach(pruned, contract)
    acc_pruned_raw = evaluate(pruned, test_loader, device, job.progress, "eval pruned")
    metrics: dict[str, Any] = {"baseline_test": acc_before, "pruned_test_no_finetune": acc_pruned_raw,
                               "policy": spec.extra.get("resolved"),
                               "eval": {"split": key["split"], "n": key["n"]}}
    if info.selection is not None:
        metrics["selection"] = info.selection.to_dict()
    if residual and job.residual is None:
        metrics["residual"] = "auto: the budget is out of reach without residual groups"
    if info.notes:
        metrics["notes"] = list(info.notes)
    if info.latency_check is not None:
        log.info(info.latency_check["line"])
        metrics["latency_check"] = info.latency_check

    # 5. Recovery (the last fine-tuning epoch is reported; the test split never selects anything).
    history = _recover(job, base, pruned, plan, bundle, device, test_loader, metrics, out)
    size_before, size_after = counting.count(base), counting.count(pruned)
    metrics["size_before"], metrics["size_after"] = size_before, size_after
    metrics["finetune_history"] = history
    metrics["evaluations"] = [{**key, "result": final_accuracy(metrics)}]

    # 6. Outputs (atomic writes).
    return _write_outputs(job, out, base, pruned, plan, spec, sc, metrics, baseline_trained, acc_before, units)


def final_accuracy(metrics: Mapping[str, Any]) -> Any:
    """The pruned model's accuracy after the last recovery step it had."""
    for k in ("finetuned_test", "pruned_test_bn_recalibrated", "pruned_test_block_refit", "pruned_test_reconstructed",
              "pruned_test_no_finetune"):
        if metrics.get(k) is not None:
            return metrics[k]
    return None


def _write_outputs(job: PruneJob, out: Path, base: nn.Module, pruned: nn.Module, plan: Any, spec: RateSpec,
                   sc: scores_mod.Scores | None, metrics: dict[str, Any], baseline_trained: bool, acc_before: Any,
                   units: list) -> dict[str, Any]:
    data_c = contract_mod.of(pruned)
    prov = checkpoint.provenance(seed=job.seed, data=data_c.dataset if data_c else job.data,
                                 data_root=data_c.root if data_c else job.data_root, criterion=job.criterion,
                                 n_images=sc.meta.get("n_images") if sc is not None else None,
                                 baseline_trained_here=baseline_trained,
                                 bn_recalibrated="bn" in metrics["recovery"].split("+"),
                                 recovery=metrics["recovery"])
    paths = {}
    device = next(base.parameters()).device
    if baseline_trained:
        bm: dict[str, Any] = {"evaluations": [{**metrics["evaluations"][0], "result": acc_before}]}
        if metrics["eval"]["split"] == "test" and job.eval_n is None:
            bm["test"] = acc_before
        paths["baseline"] = checkpoint.save(out / "baseline.pt", base.cpu(), metrics=bm, prov=prov)
        base.to(device)
    if sc is not None and not job.scores:  # computed or imported here: keep them with the run
        paths["scores"] = sc.save(out / "scores.pt")
    paths["plan"] = plan.save(out / "plan.json")
    paths["checkpoint"] = checkpoint.save(out / "pruned.pt", pruned.cpu(), rates=spec.to_dict(), plan=plan.to_json(),
                                          metrics=metrics, prov=prov)
    table = counting.size_table(base.cpu(), pruned, metrics["size_before"], metrics["size_after"], units=units)
    paths["size_table"] = io.write_text(out / "size_table.md", table + "\n")
    names = [u.name for u in units]
    paths["widths_plot"] = plots.widths(names, [u.width for u in units], [len(plan.kept(n)) for n in names],
                                        out / "widths.png", title=f"{job.model}: channels kept ({job.criterion})")
    paths["summary"] = io.write_json(out / "summary.json", json.loads(json.dumps(metrics, default=str)))
    if (out / "finetune" / "recovery_curve.png").is_file():
        paths["curve"] = out / "finetune" / "recovery_curve.png"
    return {"metrics": metrics, "table": table, "paths": {k: str(v) for k, v in paths.items()}, "out": str(out)}
