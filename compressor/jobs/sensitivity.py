"""The sensitivity job: each unit of a checkpoint pruned alone at several rates, on held-out images.

Writes ``sensitivity.csv``, ``sensitivity.png``, ``suggested_rates.yaml`` and ``sensitivity.json``;
the scan itself is the public ``compressor.sensitivity``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

import compressor
from compressor import data
from compressor.errors import UserError
from compressor.storage import checkpoint, io


@dataclass(frozen=True)
class SensitivityJob:
    checkpoint: str
    rates: tuple[float, ...]
    model: str | None = None
    criterion: str = "l1"
    layers: tuple[str, ...] | None = None  # default: every prunable unit
    n_eval: int = 1000
    n_images: int = 256
    batch_size: int = 128
    bn_recalibrate: int = 0
    tolerance: float = 1.0
    target: dict[str, float] | None = None
    min_keep: float = 0.1
    seed: int = 0
    out: str | None = None
    device: str = "auto"
    progress: bool = True


def safe_name(name: str) -> str:
    """A model reference as a folder name (``torchvision:resnet18`` -> ``torchvision_resnet18``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _check_layers(layers: Sequence[str] | None, units: Sequence[str]) -> None:
    for layer in layers or []:
        if layer not in units:
            raise UserError(f"unknown layer {layer!r}; valid: {', '.join(units)}", field="layers")


def run_sensitivity(job: SensitivityJob, load_data: Callable[[nn.Module, dict], data.DataBundle]) -> dict[str, Any]:
    """Scan, suggest rates for ``job.target`` within ``job.tolerance``, and write the files.

    Returns ``{"result", "suggestion", "tolerated", "paths", "out", "model"}``.
    """
    from compressor.pruning import sensitivity_scan as sens
    from compressor.training.evaluation import resolve_device

    device = resolve_device(job.device)
    compressor.check_criteria([job.criterion])
    model, ck = checkpoint.load(job.checkpoint, model=job.model)
    model = model.to(device).eval()
    name = job.model or ck["model"]
    _check_layers(job.layers, list(sens.unit_names(model)))  # the engine's units: the rates-file keys
    bundle = load_data(model, ck)
    data.check_classes(bundle, model.num_classes, field="data")
    if not 0 < job.n_eval <= len(bundle.val):
        raise UserError(f"--n-eval must be in [1, {len(bundle.val)}] (size of the val split)", field="n-eval")
    out = io.check_writable(Path(job.out or f"checkpoints/{safe_name(name)}_sensitivity"))

    calib = data.calibration_subset(bundle.train_eval, job.n_images, job.seed)
    scores = compressor.rank(model, data.loader(calib, job.batch_size, device=device), [job.criterion],
                             n_images=job.n_images, seed=job.seed, device=device, progress=job.progress)
    held_out = data.calibration_subset(bundle.val, job.n_eval, job.seed)
    recal = None
    if job.bn_recalibrate > 0:
        recal = data.loader(data.calibration_subset(bundle.train_eval, job.bn_recalibrate, job.seed + 1),
                            job.batch_size, device=device)
    result = compressor.sensitivity(model, data.loader(held_out, 256, device=device), scores=scores,
                                    criterion=job.criterion, rates=job.rates, units=job.layers, device=device,
                                    recal_loader=recal, recal_images=max(1, job.bn_recalibrate),
                                    progress=job.progress)
    result.meta.update({"model": name, "checkpoint": job.checkpoint, "criterion": job.criterion,
                        "n_eval": job.n_eval, "eval_split": "val", "seed": job.seed, "data": bundle.name})
    spec, info = sens.suggest(result, model, job.tolerance, target=job.target, min_keep=job.min_keep)
    target = ",".join(f"{k}={v:g}" for k, v in (job.target or {}).items())
    header = (f"suggested by: python -m compressor sensitivity --model {name} --criterion {job.criterion} "
              f"--tolerance {job.tolerance}" + (f" --target {target}" if target else ""))
    paths = {
        "csv": sens.write_csv(result, out / "sensitivity.csv"),
        "plot": sens.plot(result, out / "sensitivity.png",
                          f"{name}: per-layer sensitivity ({job.criterion}, {job.n_eval} val images)"),
        "rates": io.write_text(out / "suggested_rates.yaml", sens.suggestion_yaml(spec, info, name, header)),
        "summary": io.write_json(out / "sensitivity.json", {"baseline_top1": result.baseline_top1, **result.meta,
                                                            "suggestion": dict(info)}),
    }
    return {"result": result, "suggestion": info, "tolerated": sens.tolerated_rates(result, job.tolerance),
            "paths": paths, "out": out, "model": name}
