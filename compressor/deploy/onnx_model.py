"""An exported ONNX file as a module: onnxruntime behind ``forward``, with its metadata and data contract.

``eval x.onnx`` runs the same evaluation as for a checkpoint; the file's metadata (written by
``export``) says the architecture, class count, input size and data contract, so the same data
and preprocessing are used without being retyped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.data import contract
from compressor.errors import UserError

MAX_META_CHARS = 2_000_000  # a hostile metadata entry is refused before it is parsed


def is_onnx(path: str | Path) -> bool:
    return str(path).lower().endswith(".onnx")


class OnnxModule(nn.Module):
    """Logits from onnxruntime (CPU) for float32 NCHW inputs; no parameters, never trained."""

    def __init__(self, session: Any, meta: dict[str, str]) -> None:
        super().__init__()
        self.session, self.meta = session, meta
        self.input_name = session.get_inputs()[0].name
        self.arch = meta.get("arch", "onnx")
        self.num_classes = int(meta["num_classes"]) if meta.get("num_classes", "").isdigit() else None
        self.input_size = int(meta["input_size"]) if meta.get("input_size", "").isdigit() else 32
        self.quantization: dict[str, Any] | None = None  # the int8 export's record (``onnx_int8``), else None
        self.precision = meta.get("precision", "float32")

    def info(self) -> dict[str, Any]:
        """What the file says about itself: precision, params and MACs (None when not recorded), quantization."""
        def num(key: str) -> int | None:
            return int(self.meta[key]) if self.meta.get(key, "").isdigit() else None

        return {"precision": self.precision, "params": num("params"), "macs": num("macs"),
                "quantization": self.quantization}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def load(path: str | Path, threads: int | None = None) -> OnnxModule:
    """Open an ONNX file for evaluation (float32 or int8 QDQ); an unreadable file or bad metadata is one line.
    ``threads``: onnxruntime's intra-op threads (None: its default, one per physical core)."""
    from compressor.deploy.onnx_export import _require_onnx, _why

    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise UserError("ONNX file not found", source=src)
    onnx, ort = _require_onnx()
    try:
        proto = onnx.load(str(p), load_external_data=False)
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        session = ort.InferenceSession(p.read_bytes(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime raise many types for a bad file
        raise UserError(f"not a readable ONNX model ({_why(exc)})", source=src) from exc
    meta = {e.key: e.value for e in proto.metadata_props}
    if any(len(v) > MAX_META_CHARS for v in meta.values()):
        raise UserError("metadata entry too large", source=src, field="metadata")
    module = OnnxModule(session, meta)
    if "quantization" in meta:
        try:
            q = json.loads(meta["quantization"])
        except json.JSONDecodeError as exc:
            raise UserError(f"quantization metadata is not JSON ({exc.msg})", source=src, field="quantization") from exc
        if not isinstance(q, dict):
            raise UserError("quantization metadata must be a mapping", source=src, field="quantization")
        module.quantization = q
    if "data_contract" in meta:
        try:
            doc = json.loads(meta["data_contract"])
        except json.JSONDecodeError as exc:
            raise UserError(f"data_contract metadata is not JSON ({exc.msg})", source=src, field="data_contract") from exc
        c = contract.DataContract.from_dict(doc, src)
        contract.attach(module, c)
        module.input_size = c.input_size[0]
    return module
