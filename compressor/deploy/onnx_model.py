"""An exported ONNX file as a module: onnxruntime behind ``forward``, with its metadata and data contract.

``eval x.onnx`` runs the same evaluation as for a checkpoint; the file's metadata (written by
``export``) says the architecture, class count, input size and data contract, so the same data
and preprocessing are used without being retyped.

A file is untrusted input. Before a session is made, what it declares is counted and sized:
metadata (entries, characters, JSON nesting, one integer per numeric field), graph size, no
control flow (``Loop``/``Scan``/``If``: a CNN classifier has none, and their run time has no
bound), an input side of at most ``MAX_INPUT_SIDE`` and no statically known tensor over
``MAX_TENSOR_BYTES`` (an ``Expand``/``ConstantOfShape`` to GBs). onnxruntime's constant folding
is off, so nothing of the graph runs while the session is made, and every run is stopped after
``RUN_SECONDS``. Each refusal is one line naming the file and the field.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.data import contract
from compressor.errors import UserError

MAX_FILE_BYTES = 2 << 30  # protobuf's own limit; weights in external files are not read
MAX_META_ENTRIES = 64
MAX_META_CHARS = 1 << 20  # one metadata entry (a data contract with 1,000 class names: about 20 KB)
MAX_JSON_DEPTH = 32
MAX_GRAPH_NODES = 50_000  # an int8 ResNet-152: about 1,500
MAX_INPUT_SIDE = 1024  # pixels: one float image of 3x1024x1024 is 12 MB, a batch of 256 of them 3.2 GB
MAX_CLASSES = 1_000_000
MAX_TENSOR_BYTES = 1 << 30  # any tensor whose shape the file fixes (a symbolic batch counted as 1)
RUN_SECONDS = 300.0  # one batch through onnxruntime
NO_FOLDING = ["ConstantFolding"]  # a constant subgraph would run, unbounded, inside InferenceSession()
_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2}


def is_onnx(path: str | Path) -> bool:
    return str(path).lower().endswith(".onnx")


class _Watchdog:
    """One daemon thread that stops onnxruntime runs past their deadline (``RunOptions.terminate``,
    which onnxruntime checks between nodes and loop iterations). Registering a run costs a dict
    insert, so timing a small model is not disturbed by starting a timer thread per call."""

    def __init__(self) -> None:
        self._runs: dict[int, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, opts: Any, seconds: float) -> int:
        with self._lock:
            key = id(opts)
            self._runs[key] = (time.monotonic() + seconds, opts)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="onnx-run-deadline", daemon=True)
                self._thread.start()
        return key

    def done(self, key: int) -> None:
        with self._lock:
            self._runs.pop(key, None)

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                for deadline, opts in self._runs.values():
                    if now >= deadline:
                        opts.terminate = True
                left = [d for d, _ in self._runs.values()]
            time.sleep(min(0.05, max(0.005, min(left, default=now + 0.05) - now)))


_WATCHDOG = _Watchdog()


class OnnxModule(nn.Module):
    """Logits from onnxruntime (CPU) for float32 NCHW inputs; no parameters, never trained."""

    def __init__(self, session: Any, meta: dict[str, str], source: str = "<onnx>",
                 num_classes: int | None = None, input_size: int = 32) -> None:
        super().__init__()
        self.session, self.meta, self.source = session, meta, source
        self.input_name = session.get_inputs()[0].name
        self.arch = meta.get("arch", "onnx")
        self.num_classes = num_classes
        self.input_size = input_size
        self.quantization: dict[str, Any] | None = None  # the int8 export's record (``onnx_int8``), else None
        self.precision = meta.get("precision", "float32")
        self.run_seconds = RUN_SECONDS

    def info(self) -> dict[str, Any]:
        """What the file says about itself: precision, params and MACs (None when not recorded), quantization."""
        return {"precision": self.precision, "params": _meta_int(self.meta, "params", 0, 10**15, self.source),
                "macs": _meta_int(self.meta, "macs", 0, 10**18, self.source), "quantization": self.quantization}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import onnxruntime as ort

        opts = ort.RunOptions()
        opts.log_severity_level = 4  # its own report of a stopped run would be a second line
        key = _WATCHDOG.watch(opts, self.run_seconds)
        try:
            out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()}, opts)[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a graph it cannot run
            from compressor.deploy.onnx_export import _why

            if opts.terminate:
                raise UserError(f"one batch ran longer than {self.run_seconds:g} s (a graph that does not "
                                "finish?); stopped", source=self.source, field="graph") from None
            raise UserError(f"onnxruntime cannot run the graph on a batch of shape {tuple(x.shape)} ({_why(exc)})",
                            source=self.source, field="graph") from None
        finally:
            _WATCHDOG.done(key)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def load(path: str | Path, threads: int | None = None) -> OnnxModule:
    """Open an ONNX file for evaluation (float32 or int8 QDQ); an unreadable file, bad metadata or a
    graph past the bounds above is one line. ``threads``: onnxruntime's intra-op threads (None: its
    default, one per physical core)."""
    from compressor.deploy.onnx_export import _require_onnx, _why

    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise UserError("ONNX file not found", source=src)
    if p.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"is larger than {MAX_FILE_BYTES >> 30} GiB; refused", source=src)
    onnx, ort = _require_onnx()
    try:
        blob = p.read_bytes()
        proto = onnx.load_from_string(blob)
    except Exception as exc:  # noqa: BLE001 - a bad file raises many types
        raise UserError(f"not a readable ONNX model ({_why(exc)})", source=src) from exc
    meta = _metadata(proto, src)
    num_classes, input_size = _check_graph(proto, meta, src)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        session = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"], disabled_optimizers=NO_FOLDING)
    except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime raise many types for a bad file
        raise UserError(f"not a readable ONNX model ({_why(exc)})", source=src) from exc
    module = OnnxModule(session, meta, src, num_classes, input_size)
    module.info()  # params/macs: one integer each, or refused now rather than mid-report
    if "quantization" in meta:
        q = _json(meta, "quantization", src)
        if not isinstance(q, dict):
            raise UserError("quantization metadata must be a mapping", source=src, field="quantization")
        module.quantization = q
    if "data_contract" in meta:
        c = contract.DataContract.from_dict(_json(meta, "data_contract", src), src)
        side = max(c.input_size)
        if side > MAX_INPUT_SIDE:
            raise UserError(f"an input of {c.input_size[0]}x{c.input_size[1]} px is past the {MAX_INPUT_SIDE} px this "
                            "reader allows", source=src, field="data_contract.input_size")
        contract.attach(module, c)
        module.input_size = c.input_size[0]
    return module


# --------------------------------------------------------------------------- metadata
def _metadata(proto: Any, src: str) -> dict[str, str]:
    props = proto.metadata_props
    if len(props) > MAX_META_ENTRIES:
        raise UserError(f"has {len(props):,} metadata entries; at most {MAX_META_ENTRIES} are read", source=src,
                        field="metadata")
    meta: dict[str, str] = {}
    for e in props:
        key = e.key[:80]
        if len(e.key) > 200 or len(e.value) > MAX_META_CHARS:
            raise UserError(f"entry too large ({len(e.value):,} characters; at most {MAX_META_CHARS:,})", source=src,
                            field=f"metadata.{key}")
        meta[e.key] = e.value
    for key, most in (("arch", 200), ("precision", 32)):
        if len(meta.get(key, "")) > most:
            raise UserError(f"must be a name of at most {most} characters", source=src, field=f"metadata.{key}")
    return meta


def _meta_int(meta: dict[str, str], key: str, lo: int, hi: int, src: str) -> int | None:
    """A numeric metadata entry: absent is None; anything but one integer in ``[lo, hi]`` is refused."""
    text = meta.get(key)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and lo <= int(text) <= hi):
        raise UserError(f"must be an integer in [{lo:,}, {hi:,}], got {text[:40]!r}", source=src, field=f"metadata.{key}")
    return int(text)


def json_too_deep(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``[``/``{`` nest more than ``max_depth`` deep outside strings (checked before ``json.loads``,
    which recurses once per level)."""
    depth, in_str, escaped = 0, False, False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _json(meta: dict[str, str], key: str, src: str) -> Any:
    text = meta[key]
    if json_too_deep(text):
        raise UserError(f"metadata JSON is nested more than {MAX_JSON_DEPTH} levels deep; refused", source=src,
                        field=key)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise UserError(f"{key} metadata is not JSON ({why})", source=src, field=key) from None


# --------------------------------------------------------------------------- graph
def _dims(value_info: Any) -> list[int | None]:
    """Static dimensions of a graph value (None: symbolic or unknown)."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _check_graph(proto: Any, meta: dict[str, str], src: str) -> tuple[int | None, int]:
    """Bounds on what the graph declares, before a session exists; returns (classes, input side)."""
    graph = proto.graph
    if len(graph.node) > MAX_GRAPH_NODES:
        raise UserError(f"has {len(graph.node):,} nodes; at most {MAX_GRAPH_NODES:,} are read", source=src,
                        field="graph")
    for i, node in enumerate(graph.node):
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH / GRAPHS: Loop, Scan, If, SequenceMap
            raise UserError(f"node {node.op_type} {node.name[:60]!r} holds a subgraph (control flow, which a CNN "
                            "classifier has none of and whose run has no bound); refused", source=src,
                            field=f"graph.node[{i}]")
    stored = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in stored]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise UserError(f"must take one input image batch, takes {len(inputs)}", source=src, field="graph.input")
    in_dims = _dims(inputs[0])
    if len(in_dims) != 4:
        raise UserError(f"input must be [N, C, H, W], has {len(in_dims)} dimensions", source=src, field="graph.input")
    for d in in_dims[2:]:
        if d is not None and not 1 <= d <= MAX_INPUT_SIDE:
            raise UserError(f"an input side of {d} px is past the {MAX_INPUT_SIDE} px this reader allows", source=src,
                            field="graph.input")
    side = _meta_int(meta, "input_size", 1, MAX_INPUT_SIDE, src)
    fixed = next((d for d in in_dims[2:] if d is not None), None)
    if side is not None and fixed is not None and side != fixed:
        raise UserError(f"says {side} px, the graph takes {fixed} px", source=src, field="metadata.input_size")
    out_dims = _dims(graph.output[0])
    graph_classes = out_dims[1] if len(out_dims) == 2 and out_dims[1] else None
    ncls = _meta_int(meta, "num_classes", 1, MAX_CLASSES, src)
    if ncls is not None and graph_classes is not None and ncls != graph_classes:
        raise UserError(f"says {ncls} classes, the graph's output has {graph_classes}", source=src,
                        field="metadata.num_classes")
    ncls = ncls if ncls is not None else graph_classes
    if ncls is None:
        raise UserError("no class count: neither the metadata nor the graph's output [N, classes] says it", source=src,
                        field="metadata.num_classes")
    if ncls > MAX_CLASSES:
        raise UserError(f"{ncls:,} classes is past the {MAX_CLASSES:,} this reader allows", source=src,
                        field="graph.output")
    _check_static_sizes(proto, src)
    return ncls, side or fixed or 32


def _check_static_sizes(proto: Any, src: str) -> None:
    """Refuse a tensor whose shape the file fixes and whose size is past ``MAX_TENSOR_BYTES``
    (shape inference with data propagation: an ``Expand`` or ``ConstantOfShape`` to a constant shape)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot follow is left to onnxruntime
        return
    g = inferred.graph
    for v in [*g.value_info, *g.output]:
        elem = _DTYPE_BYTES.get(v.type.tensor_type.elem_type, 8)
        size = elem
        for d in _dims(v):
            size *= d if d else 1
            if size > MAX_TENSOR_BYTES:
                raise UserError(f"tensor {v.name[:60]!r} would hold {size / (1 << 30):.1f}+ GiB (shape "
                                f"{[d if d else '?' for d in _dims(v)]}); at most {MAX_TENSOR_BYTES >> 20:,} MiB "
                                "is allowed", source=src, field="graph.value")
