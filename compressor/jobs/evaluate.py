"""The eval job: a checkpoint or an ONNX file evaluated on the test split of its own data (its contract).

A checkpoint is run with torch and counted (params, MACs); an ``.onnx`` file with onnxruntime, its size
read from its metadata. ``save`` writes the evaluated model back as a checkpoint carrying its contract
and the measured accuracy (never a model with NaN/inf weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import compressor
from compressor import data
from compressor.data import contract
from compressor.errors import UserError
from compressor.storage import checkpoint, io


@dataclass(frozen=True)
class EvalJob:
    path: str
    model: str | None = None  # needed for plain state_dicts
    batch_size: int = 256
    device: str = "auto"
    save: str | None = None  # write the evaluated model here (checkpoints only)
    progress: bool = True


def _open(job: EvalJob) -> tuple[nn.Module, dict[str, Any], torch.device]:
    """The model (or ONNX session wrapper), the checkpoint's fields ({} for ONNX) and the device."""
    from compressor.deploy import onnx_model
    from compressor.training.evaluation import resolve_device
    from compressor.training.finite import check_finite

    if onnx_model.is_onnx(job.path):
        return onnx_model.load(job.path), {}, resolve_device("cpu")
    device = resolve_device(job.device)
    net, ck = checkpoint.load(job.path, model=job.model)
    if job.save:  # a NaN/inf model is never written (exit 3), and refused before the evaluation
        check_finite(net, source=job.path)
    return net, ck, device


def run_eval(job: EvalJob, load_data: Callable[[nn.Module, dict], data.DataBundle]) -> dict[str, Any]:
    """Top-1/top-5/loss on the test split, with size, file bytes, runtime and the data line."""
    from compressor.training.evaluation import evaluate

    if job.save:
        io.check_writable(Path(job.save).parent)  # before the evaluation, not after it
    net, ck, device = _open(job)
    bundle = load_data(net, ck)
    res = evaluate(net.to(device), data.loader(bundle.test, job.batch_size, device=device), device, job.progress,
                   "eval")
    if ck:
        res.update(compressor.count(net.cpu()))
    else:  # an .onnx file: what its metadata records (precision, params, MACs)
        res.update({k: v for k, v in net.info().items() if v is not None and k != "quantization"})
    measured = dict(res)
    if bundle.notes.get("test_split"):  # the folder the test figure came from (an ImageFolder's test/ or val/)
        res["test_split"] = f"{bundle.notes['test_split']}/"
    res.update({"checkpoint": job.path, "model": ck.get("model", getattr(net, "arch", "onnx")), "data": bundle.name,
                "data_line": bundle.notes.get("data_line"),
                "file_bytes": Path(job.path).stat().st_size, "runtime": "onnxruntime" if not ck else "torch"})
    if job.save:
        res["saved"] = str(_save(net, ck, measured, job.path, job.save))
    return res


def _save(net: nn.Module, ck: dict, measured: dict, path: str, dest: str) -> Path:
    """The evaluated model as a compressor checkpoint: its contract, and the test result under ``metrics["test"]``."""
    if not ck:
        raise UserError("--save needs a checkpoint, not an .onnx file", field="save")
    c = contract.of(net)
    prov = checkpoint.provenance(imported_from=path, data=c.dataset if c else None, data_root=c.root if c else None,
                                 source=(ck.get("provenance") or {}).get("source"))
    metrics = {**{k: v for k, v in (ck.get("metrics") or {}).items() if k not in ("test", "evaluations")},
               "test": measured}
    return checkpoint.save(dest, net.cpu(), rates=ck.get("rates"), plan=ck.get("plan"), metrics=metrics, prov=prov)
