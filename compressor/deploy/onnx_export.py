"""ONNX export of a (pruned) checkpoint, verified against onnxruntime before it is written.

The graph takes ``input`` [N, 3, S, S] with a dynamic batch dimension N and returns ``logits``.
The exported bytes are checked (``onnx.checker``), then run in onnxruntime on random inputs
at two batch sizes (so the dynamic batch really works) and on real images; only when every
output agrees with torch within ``atol`` is the file written (atomically). The model's arch,
cfg, class count and data contract (classes, input size, normalisation, resize policy) are stored
as ONNX metadata, so the file says what it is and ``eval x.onnx`` needs nothing else. The real
images of the check are the model's own data (its contract), or digits when it has none.

The TorchScript-based exporter (``dynamo=False``) is used: it needs no extra packages, and
these models are plain feed-forward CNNs with no control flow.
"""

from __future__ import annotations

import io as _io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from compressor.data import contract
from compressor.storage import io
from compressor.errors import UserError

DEFAULT_OPSET = 17
MIN_OPSET = 7  # older opsets have no BatchNormalization onnxruntime can run


def max_opset() -> int:
    """The newest opset torch's TorchScript exporter writes."""
    try:
        from torch.onnx import _constants  # noqa: PLC0415 - private, but the only place torch says it

        return int(getattr(_constants, "ONNX_MAX_OPSET", 20))
    except ImportError:  # pragma: no cover
        return 20


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise UserError(f"must be an integer in [{MIN_OPSET}, {max_opset()}], got {opset!r}", field="opset")
    return opset


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): "
                        "pip install 'compressor[onnx]'") from exc
    return onnx, onnxruntime


def _counts(model: nn.Module, size: int) -> dict[str, str]:
    """The physical model's params and MACs (``compressor.pruning.counting``), for the file's metadata: a report row
    of the file then needs no checkpoint. Empty if the model cannot be counted."""
    try:
        from compressor.pruning import counting

        return {k: str(v) for k, v in counting.count(model, size).items()}
    except Exception:  # noqa: BLE001 - counting is a convenience here; the export itself does not need it
        return {}


def to_onnx_bytes(model: nn.Module, opset: int = DEFAULT_OPSET) -> bytes:
    """Serialized ONNX model with a dynamic batch dimension and metadata; the model is not changed."""
    onnx, _ = _require_onnx()
    was = model.training
    model.eval()
    size = int(model.input_size)
    buf = _io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)  # exporter chatter (e.g. old opsets); checks follow below
            first = next(iter(model.parameters()), None)  # the dummy input goes where the model is
            dummy = torch.zeros(1, 3, size, size, device=first.device if first is not None else "cpu")
            torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        counts = _counts(model, size)  # still in eval mode: counting runs a forward pass
    finally:
        model.train(was)
    proto = onnx.load_from_string(buf.getvalue())
    meta = {"arch": getattr(model, "arch", type(model).__name__), "num_classes": str(getattr(model, "num_classes", "")),
            "cfg": json.dumps(list(getattr(model, "cfg", None) or [])), "input_size": str(size), "producer": "compressor"}
    meta.update(counts)
    data_c = contract.of(model)
    if data_c is not None:  # what the inputs must be: classes, size, normalisation, resize policy
        meta.update({"data_contract": json.dumps(data_c.to_dict()), "classes": json.dumps(list(data_c.classes)),
                     "mean": json.dumps(list(data_c.mean)), "std": json.dumps(list(data_c.std))})
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


@dataclass
class Check:
    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    argmax_agree: float  # fraction of rows whose top-1 class agrees

    def ok(self, atol: float) -> bool:
        return self.max_abs_diff <= atol


@dataclass
class ExportResult:
    path: str | None
    bytes: int
    opset: int
    atol: float
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok(self.atol) for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "opset": self.opset, "atol": self.atol, "ok": self.ok,
                "checks": [c.__dict__ | {"shape": list(c.shape)} for c in self.checks]}


@torch.no_grad()
def compare(model: nn.Module, onnx_bytes: bytes, inputs: Sequence[tuple[str, torch.Tensor]]) -> list[Check]:
    """Run torch and onnxruntime (CPU) on the same inputs; max |difference| of the logits."""
    _, ort = _require_onnx()
    try:
        sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types (NotImplemented, Fail, ...)
        raise UserError(f"onnxruntime cannot run the exported model ({_why(exc)})", field="onnxruntime") from exc
    was = model.training
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    model.eval().cpu()
    out = []
    try:
        for name, x in inputs:
            ref = model(x.float()).numpy()
            got = sess.run(None, {"input": x.float().numpy()})[0]
            if got.shape != ref.shape:
                raise AssertionError(f"{name}: onnxruntime gave shape {got.shape}, torch {ref.shape}")
            out.append(Check(name, tuple(x.shape), float(np.abs(got - ref).max()),
                             float((got.argmax(1) == ref.argmax(1)).mean())))
    finally:
        model.train(was)
        model.to(device)  # the caller's model stays where it was
    return out


def real_images(model: nn.Module, n: int = 64) -> tuple[str, torch.Tensor]:
    """The first ``n`` test images of the model's own data (its contract), preprocessed as it expects;
    the digits set when the model has no contract or its data is not on this machine (said once)."""
    import sys

    from compressor import data

    name, test = "digits", None
    if contract.of(model) is not None:
        try:
            bundle, c = contract.load_data(model)
            test, name = bundle.test, c.dataset
        except UserError as exc:
            print(f"note: verifying on digits images: the checkpoint's data is not readable here ({exc})",
                  file=sys.stderr)
            name = "digits"
    if test is None:
        test = data.load("digits", input_size=int(model.input_size)).test
    return name, torch.stack([test[i][0] for i in range(min(n, len(test)))])


def checked_onnx_bytes(model: nn.Module, opset: int) -> bytes:
    """``to_onnx_bytes``, with any exporter or checker failure as one line naming the model and opset."""
    try:
        return to_onnx_bytes(model, opset)
    except Exception as exc:  # noqa: BLE001 - torch.onnx and onnx.checker fail in many ways
        if isinstance(exc, UserError):
            raise
        raise UserError(f"ONNX export (opset {opset}) of {getattr(model, 'arch', type(model).__name__)} failed: "
                        f"{_why(exc)}", field="export") from exc


def export(model: nn.Module, path: str | Path | None, *, opset: int = DEFAULT_OPSET, atol: float = 1e-4,
           batch_sizes: Sequence[int] = (1, 7), n_real: int = 64, seed: int = 0, force: bool = False,
           int8: bool = False, calibration: Any = None, max_drop: float = 1.0, n_calib: int = 256,
           calib_method: str | None = None, n_test: int | None = None) -> Any:
    """Export, verify, and write ``path`` only if every check passes (or ``force``).

    ``int8=True``: a calibrated int8 QDQ file instead (``onnx_int8.export_int8``), activations calibrated on
    ``calibration`` (a DataLoader, iterable of batches or tensor; None: ``n_calib`` images of the model's own
    training data) with ``calib_method`` (None: minmax), refused (``DropTooLarge``, exit 3, nothing written)
    when its top-1 on ``n_test`` test images (None: all) is more than ``max_drop`` points below float32's;
    returns ``onnx_int8.Int8Result``. ``force`` does not apply to it.
    """
    if int8:
        from compressor.deploy import onnx_int8

        return onnx_int8.export_int8(model, path, calibration=calibration, n_calib=n_calib,
                                     method=calib_method or onnx_int8.DEFAULT_METHOD, seed=seed, max_drop=max_drop,
                                     n_test=n_test, opset=opset, atol=atol)
    if n_real < 0:
        raise UserError(f"must be >= 0, got {n_real}", field="n-real")
    check_opset(opset)  # an opset out of range is the user's; anything failing after it is reported as itself
    blob = checked_onnx_bytes(model, opset)
    size = int(model.input_size)
    g = torch.Generator().manual_seed(seed)
    inputs = [(f"random batch {b}", torch.randn(b, 3, size, size, generator=g)) for b in batch_sizes]
    if n_real:
        name, imgs = real_images(model, n_real)
        inputs.append((f"{name} test images ({len(imgs)})", imgs))
    res = ExportResult(path=None, bytes=len(blob), opset=opset, atol=atol, checks=compare(model, blob, inputs))
    if path is not None and (res.ok or force):
        io.atomic_write(path, lambda fh: fh.write(blob))
        res.path = str(path)
    return res
