"""Calibrated int8 ONNX export: static post-training quantization of a (pruned) model, verified on its own data.

The float32 graph of ``onnx_export`` (BatchNorm after a Conv is folded by torch's exporter in eval
mode; one after a Linear/Gemm is folded here) is quantized with ONNX Runtime's static quantizer:
QDQ format, int8 weights per output channel (symmetric), int8 activations per tensor whose ranges
are calibrated on a few hundred images of the model's own data (its data contract's unaugmented
training split, drawn by a seeded permutation) or on the images the caller passes. The int8 file
is then verified like a float export: top-1 of the int8 and of the float32 graph on the contract's
test data (both run in onnxruntime); a drop larger than ``max_drop`` points is refused
(``DropTooLarge``, exit code 3) and nothing is written. The data contract and a ``quantization``
record (scheme, calibration method, images, seed, the two accuracies) are stored as metadata.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from compressor.data import contract
from compressor.storage import io
from compressor.errors import UserError
from compressor.deploy.onnx_export import DEFAULT_OPSET, _require_onnx, _why, check_opset, checked_onnx_bytes, compare

# Measured on the pruned VGG16-BN (experiments/RESULTS.md, issue 21): see DEFAULT_METHOD.
METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "minmax"
DEFAULT_CALIB = 256  # calibration images
DEFAULT_MAX_DROP = 1.0  # top-1 points
SCHEME = ("static post-training int8, QDQ; weights int8 per output channel (symmetric, 7-bit range); activations "
          "int8 per tensor; the last layer (logits) float32")


class DropTooLarge(UserError):
    """The int8 model loses more top-1 than allowed: exit code 3, nothing written."""

    exit_code = 3
    result: "Int8Result | None" = None  # what was measured, when the check itself refused


@dataclass
class Int8Result:
    path: str | None
    bytes: int
    float_bytes: int
    method: str
    calibration_images: int
    calibration_source: str
    seed: int
    test_data: str
    n_test: int
    top1_float: float
    top1_int8: float
    agree: float  # fraction of test images whose top-1 class is the same in both graphs
    max_drop: float
    bn_folded: int
    bn_left: int
    seconds: float

    @property
    def drop(self) -> float:
        return self.top1_float - self.top1_int8

    @property
    def ok(self) -> bool:
        return self.drop <= self.max_drop

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"drop": self.drop, "ok": self.ok}


# --- graph surgery ------------------------------------------------------------------------

def _init_map(proto: Any) -> dict[str, Any]:
    return {t.name: t for t in proto.graph.initializer}


def fold_gemm_bn(proto: Any) -> int:
    """Fold each BatchNormalization that directly follows a Gemm (a Linear, ``transB=1``) into the Gemm's
    weight and bias, in place; returns how many were folded. (torch folds Conv+BN itself in eval mode.)"""
    from onnx import numpy_helper

    inits = _init_map(proto)
    nodes = list(proto.graph.node)
    users: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    outputs = {o.name for o in proto.graph.output}
    by_out = {o: n for n in nodes for o in n.output}
    folded = 0
    for bn in nodes:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        gemm = by_out.get(bn.input[0])
        if gemm is None or gemm.op_type != "Gemm" or users.get(gemm.output[0], 0) != 1 or gemm.output[0] in outputs:
            continue
        attrs = {a.name: a for a in gemm.attribute}
        if attrs.get("transA") and attrs["transA"].i or not (attrs.get("transB") and attrs["transB"].i == 1):
            continue
        if any(k in attrs and abs(attrs[k].f - 1.0) > 0 for k in ("alpha", "beta")):
            continue
        names = list(bn.input[1:5]) + [gemm.input[1]] + ([gemm.input[2]] if len(gemm.input) > 2 else [])
        if not all(n in inits for n in names):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        w = numpy_helper.to_array(inits[gemm.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[gemm.input[2]]).astype(np.float64) if len(gemm.input) > 2 \
            else np.zeros(w.shape[0])
        s = gamma / np.sqrt(var + eps)
        w_new, b_new = (w * s[:, None]).astype(np.float32), ((b - mean) * s + beta).astype(np.float32)
        wn, bname = gemm.input[1] + "_bnfold", gemm.output[0] + "_bnfold_bias"
        proto.graph.initializer.extend([numpy_helper.from_array(w_new, wn), numpy_helper.from_array(b_new, bname)])
        x_in = gemm.input[0]
        del gemm.input[:]
        gemm.input.extend([x_in, wn, bname])
        gemm.output[0] = bn.output[0]
        proto.graph.node.remove(bn)
        folded += 1
    _drop_unused_initializers(proto)
    return folded


def _drop_unused_initializers(proto: Any) -> None:
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def bn_count(proto: Any) -> int:
    return sum(n.op_type == "BatchNormalization" for n in proto.graph.node)


# --- data ---------------------------------------------------------------------------------

def _own_data(model: nn.Module) -> tuple[Any, str]:
    """The model's data bundle (its contract) and its name; the digits set without a contract."""
    from compressor import data

    if contract.of(model) is not None:
        bundle, c = contract.load_data(model)
        return bundle, c.dataset
    return data.load("digits", input_size=int(model.input_size)), "digits"


def _check_images(x: np.ndarray, model: nn.Module, what: str) -> np.ndarray:
    c = contract.of(model)
    size = int(model.input_size)
    want = (c.channels if c else 3, *(c.input_size if c else (size, size)))
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(want):
        raise UserError(f"{what} images have shape {list(x.shape)}, the model takes [N, {', '.join(map(str, want))}]",
                        field="calibration")
    if not np.isfinite(x).all():
        raise UserError(f"{what} images hold NaN or infinite values", field="calibration")
    return x


def _check_labels(y: Any, model: nn.Module) -> None:
    if y is None or not torch.is_tensor(y) or y.numel() == 0:
        return
    k = getattr(model, "num_classes", None) or len(getattr(contract.of(model), "classes", ()) or ())
    if k and (int(y.min()) < 0 or int(y.max()) >= int(k)):
        raise UserError(f"calibration labels run from {int(y.min())} to {int(y.max())}; the model has {k} classes",
                        field="calibration")


def _check_classes(obj: Any, model: nn.Module) -> None:
    """A dataset (or loader) that names its classes must name the model's, in the same order."""
    c = contract.of(model)
    ds = getattr(obj, "dataset", obj)
    while ds is not None and not hasattr(ds, "classes") and hasattr(ds, "dataset"):
        ds = ds.dataset  # Subset of a dataset
    classes = getattr(ds, "classes", None)
    if c is None or not c.classes or not isinstance(classes, (list, tuple)):
        return
    if tuple(str(v) for v in classes) != tuple(c.classes):
        raise UserError(f"the calibration data's classes ({len(classes)}: {', '.join(map(str, classes[:3]))}, …) are not "
                        f"the model's ({len(c.classes)}: {', '.join(c.classes[:3])}, …)", field="calibration")


def calibration_images(model: nn.Module, calibration: Any = None, n: int = DEFAULT_CALIB,
                       seed: int = 0) -> tuple[np.ndarray, str]:
    """``(images [N, C, H, W] float32, where they came from)``.

    ``calibration``: None (``n`` unaugmented training images of the model's own data, a seeded
    draw), a tensor/array of preprocessed images, or a DataLoader/iterable of ``x`` or ``(x, y)``
    batches (the first ``n`` images are used). Wrong shape, labels or class names: one line.
    """
    from compressor import data

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"must be >= 1, got {n!r}", field="calib-n")
    if calibration is None:
        bundle, name = _own_data(model)
        sub = data.calibration_subset(bundle.train_eval, min(n, len(bundle.train_eval)), seed)
        x = torch.stack([sub[i][0] for i in range(len(sub))]).numpy()
        src = f"{name} training split, unaugmented, seeded draw"
    elif torch.is_tensor(calibration) or isinstance(calibration, np.ndarray):
        x = np.asarray(calibration.detach().cpu() if torch.is_tensor(calibration) else calibration)[:n]
        src = "images passed by the caller"
    elif isinstance(calibration, Iterable):
        _check_classes(calibration, model)
        got: list[np.ndarray] = []
        count = 0
        for batch in calibration:
            xb = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(batch, (tuple, list)) and len(batch) > 1:
                _check_labels(batch[1], model)
            xb = np.asarray(xb.detach().cpu() if torch.is_tensor(xb) else xb)
            if xb.ndim == 3:
                xb = xb[None]
            got.append(xb)
            count += len(xb)
            if count >= n:
                break
        if not got:
            raise UserError("the calibration data is empty", field="calibration")
        try:
            x = np.concatenate(got)[:n]
        except ValueError as exc:
            raise UserError(f"calibration batches differ in shape ({exc})", field="calibration") from exc
        src = "loader passed by the caller"
    else:
        raise UserError(f"must be a DataLoader, an iterable of batches or a tensor, got {type(calibration).__name__}",
                        field="calibration")
    if len(x) == 0:
        raise UserError("the calibration data is empty", field="calibration")
    return _check_images(np.ascontiguousarray(x, dtype=np.float32), model, "calibration"), src


# --- quantization -------------------------------------------------------------------------

def quantize(float_blob: bytes, calib: np.ndarray, method: str = DEFAULT_METHOD, *, batch: int = 32,
             per_channel: bool = True, reduce_range: bool = True) -> bytes:
    """ONNX Runtime static quantization (QDQ, int8/int8) of ``float_blob``, activations calibrated on ``calib``;
    the node writing the graph's output (the classifier's last layer) is left in float32. ``reduce_range``: weights
    use 7 bits of the int8 range; without it, onnxruntime's x86 int8 kernels on CPUs without VNNI (u8s8 through
    VPMADDUBSW) saturate int16 sums, which cost the pruned VGG16-BN 1.8 top-1 points here, against 0.0 with it."""
    onnx, _ = _require_onnx()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if method not in METHODS:
        raise UserError(f"must be one of {', '.join(METHODS)}, got {method!r}", field="calib-method")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i:i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    root = logging.getLogger()
    level = root.level
    proto = onnx.load_from_string(float_blob)
    # The layer that writes the logits stays float32: int8 logits tie often, and it is a small layer.
    last = [n.name for n in proto.graph.node if set(n.output) & {o.name for o in proto.graph.output}]
    with tempfile.TemporaryDirectory(prefix="compressor-int8-") as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        Path(src).write_bytes(float_blob)
        root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process goes to the root logger
        try:
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=reduce_range,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=cm,
                            nodes_to_exclude=last, extra_options={"CalibTensorRangeSymmetric": False})
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the quantizer fails in many ways on ops it cannot handle
            raise UserError(f"int8 quantization failed ({_why(exc)})", field="int8") from exc
        finally:
            root.setLevel(level)
        proto = onnx.load(dst)
    return proto.SerializeToString()


def _session(blob: bytes, what: str) -> Any:
    _, ort = _require_onnx()
    try:
        return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise UserError(f"onnxruntime cannot run the {what} model ({_why(exc)})", field="onnxruntime") from exc


def _top1(logits: np.ndarray) -> np.ndarray:
    """The predicted class as ``evaluation.evaluate`` picks it (ties broken by ``topk``, not ``argmax``)."""
    out = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return out.topk(min(5, out.shape[1]), dim=1).indices[:, 0].numpy()


def top1_pair(float_sess: Any, int8_sess: Any, test: Any, n: int | None, batch: int = 256) -> tuple[int, float, float, float]:
    """``(images, float top-1 %, int8 top-1 %, top-1 agreement)`` on the first ``n`` (None: all) of ``test``."""
    total = len(test) if n is None else min(n, len(test))
    hit_f = hit_q = same = 0
    for start in range(0, total, batch):
        items = [test[i] for i in range(start, min(start + batch, total))]
        x = torch.stack([it[0] for it in items]).numpy().astype(np.float32)
        y = np.asarray([int(it[1]) for it in items])
        pf, pq = (_top1(sess.run(None, {"input": x})[0]) for sess in (float_sess, int8_sess))
        hit_f += int((pf == y).sum())
        hit_q += int((pq == y).sum())
        same += int((pf == pq).sum())
    if total == 0:
        raise UserError("the test split is empty", field="data")
    return total, 100.0 * hit_f / total, 100.0 * hit_q / total, same / total


def export_int8(model: nn.Module, path: str | Path | None, *, calibration: Any = None, n_calib: int = DEFAULT_CALIB,
                method: str = DEFAULT_METHOD, seed: int = 0, max_drop: float = DEFAULT_MAX_DROP,
                n_test: int | None = None, opset: int = DEFAULT_OPSET, atol: float = 1e-4) -> Int8Result:
    """Quantize, verify on the model's own test data, and write ``path`` only if the top-1 drop is within
    ``max_drop`` points (else ``DropTooLarge``, exit 3). ``n_test``: test images (None: the whole split)."""
    onnx, ort = _require_onnx()
    t0 = time.perf_counter()
    check_opset(opset)
    if not isinstance(max_drop, (int, float)) or isinstance(max_drop, bool) or not np.isfinite(max_drop) or max_drop < 0:
        raise UserError(f"must be a number >= 0, got {max_drop!r}", field="max-drop")
    if n_test is not None and (isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1):
        raise UserError(f"must be >= 1, got {n_test!r}", field="n-test")
    if method not in METHODS:
        raise UserError(f"must be one of {', '.join(METHODS)}, got {method!r}", field="calib-method")
    calib, src = calibration_images(model, calibration, n_calib, seed)  # bad calibration data: before any work
    blob = checked_onnx_bytes(model, opset)
    size = int(model.input_size)
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    bad = [c for c in compare(model, blob, [("random batch 2", probe)]) if not c.ok(atol)]
    if bad:
        raise UserError(f"the float32 graph differs from torch by {bad[0].max_abs_diff:.2e} (> {atol:g})",
                        field="export")
    proto = onnx.load_from_string(blob)
    folded = fold_gemm_bn(proto)
    left = bn_count(proto)
    float_blob = proto.SerializeToString()
    q_blob = quantize(float_blob, calib, method)
    float_sess, int8_sess = _session(float_blob, "float32"), _session(q_blob, "int8")
    bundle, name = _own_data(model)
    n, top_f, top_q, agree = top1_pair(float_sess, int8_sess, bundle.test, n_test)
    res = Int8Result(path=None, bytes=0, float_bytes=len(float_blob), method=method, calibration_images=len(calib),
                     calibration_source=src, seed=seed, test_data=f"{name} test split", n_test=n, top1_float=top_f,
                     top1_int8=top_q, agree=agree, max_drop=float(max_drop), bn_folded=folded, bn_left=left,
                     seconds=0.0)
    qproto = onnx.load_from_string(q_blob)
    record = {"scheme": SCHEME, "format": "QDQ", "weights": "int8 per-channel symmetric, reduce_range (7-bit)",
              "activations": "int8 per-tensor", "calibration_method": method, "calibration_images": len(calib),
              "calibration_source": src, "seed": seed, "bn_folded_into_gemm": folded, "bn_left": left,
              "test_data": res.test_data, "test_images": n, "top1_float32": round(top_f, 4),
              "top1_int8": round(top_q, 4), "onnxruntime": ort.__version__, "float32_bytes": len(float_blob)}
    meta = {e.key: e.value for e in qproto.metadata_props}
    meta.update({"precision": "int8", "quantization": json.dumps(record)})
    del qproto.metadata_props[:]
    for k, v in meta.items():
        e = qproto.metadata_props.add()
        e.key, e.value = k, str(v)
    out = qproto.SerializeToString()
    res.bytes, res.seconds = len(out), time.perf_counter() - t0
    if not res.ok:
        err = DropTooLarge(f"int8 top-1 {top_q:.2f}% is {res.drop:.2f} points below float32 {top_f:.2f}% on {n} "
                           f"{name} test images (limit {max_drop:g}; --max-drop raises it); nothing written",
                           field="int8")
        err.result = res  # the measured figures (path None: nothing written), for callers that record a refusal
        raise err
    if path is not None:
        io.atomic_write(path, lambda fh: fh.write(out))
        res.path = str(path)
    return res
