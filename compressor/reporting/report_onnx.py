"""ONNX files (float32 and int8) as report rows, next to the checkpoints they were exported from.

An ``.onnx`` input is opened with ``onnx_model.load`` and evaluated with onnxruntime on the data
its metadata records (its data contract), like ``eval x.onnx``. Its params and MACs are the ones
``export`` recorded (counted on the physical model; a file from elsewhere has its weight
initializers counted and no MACs). Its **source** is the checkpoint in the inputs of the same
architecture, class count, params and MACs; the file then shares the source's baseline (Δtop-1,
reductions, speedup against it) and is timed interleaved in the same group, on the CPU, with
onnxruntime using torch's thread count. An int8 row also gets ``int8_vs`` (the float32 ``.onnx``
row of the same source, else the source checkpoint run by torch) and ``int8_speedup_<slot>`` =
that row's latency / the int8 row's: below 1.0 the int8 file is slower, and the report says so.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from compressor.deploy import onnx_model
from compressor.reporting.report import row_label


def is_onnx_entry(entry: Any) -> bool:
    return onnx_model.is_onnx(entry.path)


def _weights(path: Path) -> tuple[int, int]:
    """``(params, bytes)`` of the graph's initializers, quantization scales and zero points not counted as params."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    params = nbytes = 0
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        nbytes += a.nbytes
        if not (t.name.endswith("_scale") or t.name.endswith("_zero_point")):
            params += int(a.size) if a.ndim >= 1 else 0
    return params, nbytes


def add_rows(entries: Sequence[Any], loaded: Sequence[Any], rows: dict[str, dict[str, Any]], bl: Any, cfg: Any,
             bundles: dict[tuple, Any]) -> list[str]:
    """Evaluate and describe each ONNX entry into ``rows``; register it with its source's baseline in ``bl``.
    Returns the names of the ONNX rows."""
    from compressor.reporting import report

    threads = (cfg.latency.threads if cfg.latency is not None and cfg.latency.threads else torch.get_num_threads())
    taken = set(rows)
    names = []
    for e in entries:
        net = onnx_model.load(e.path, threads=threads)
        info = net.info()
        name = row_label(e.path, taken, suffix=True)
        params, nbytes = _weights(e.path)
        row: dict[str, Any] = {
            "name": name, "path": str(e.path), "model": net.arch, "role": f"onnx {info['precision']}",
            "runtime": "onnxruntime", "precision": info["precision"], "criterion": None, "rates": None,
            "target": None, "file_bytes": e.path.stat().st_size, "weights_bytes": nbytes,
            "params": info["params"] if info["params"] is not None else params,
            "macs": info["macs"] if info["macs"] is not None else 0,
            "macs_recorded": info["macs"] is not None,
        }
        if info["quantization"]:
            q = info["quantization"]
            row["quantization"] = json.dumps(q, sort_keys=True)
            row["calibration"] = f"{q.get('calibration_method')} on {q.get('calibration_images')} images, seed {q.get('seed')}"
        source = _source(row, net, loaded, rows)
        if source is not None:
            row["source"] = source.name
            for k in ("criterion", "rates", "rates_per_unit", "target"):
                row[k] = rows[source.name].get(k)
        if cfg.evaluate:
            item = report._Loaded(e, name, net, {}, row["role"], ("onnx", "", 0), {})
            row.update(report._evaluate(item, replace(cfg, device="cpu"), bundles))
        rows[name] = row
        bname = bl.of.get(source.name) if source is not None else None
        if not row["macs_recorded"]:
            bname = None  # nothing to compare sizes with
        bl.of[name] = bname
        bl.sizes[name] = net.input_size
        bl.groups.setdefault(bname or name, {})[name] = net
        row["baseline"] = ("(none: no source checkpoint in the inputs)" if bname is None
                           else rows[source.name]["baseline"] if source.name != bname else bname)
        names.append(name)
    return names


def _source(row: dict[str, Any], net: Any, loaded: Sequence[Any], rows: dict[str, dict[str, Any]]) -> Any:
    """The checkpoint in the inputs this file was exported from: same architecture, classes, params and MACs."""
    for item in loaded:
        r = rows[item.name]
        if net.arch in (r["model"], getattr(item.net, "arch", None)):
            if (r["params"], r["macs"]) == (row["params"], row["macs"]) and \
                    int(getattr(item.net, "num_classes", -1)) == int(net.num_classes or -2):
                return item
    return None


def drop_cuda_slots(timings: dict[str, dict[str, Any]], names: Sequence[str]) -> None:
    """onnxruntime runs on the CPU here: a ``cuda_*`` slot of an ONNX row would time the CPU under a GPU's name."""
    for n in names:
        for slot in [s for s in timings.get(n, {}) if not s.startswith("cpu")]:
            del timings[n][slot]


def int8_vs_float(rows: dict[str, dict[str, Any]], names: Sequence[str]) -> None:
    """For each int8 row: the float32 row it is compared with and the latency ratio per slot (float / int8)."""
    for n in names:
        r = rows[n]
        if r.get("precision") != "int8":
            continue
        peers = [m for m in names if rows[m].get("precision") == "float32" and rows[m].get("model") == r["model"]
                 and (rows[m]["params"], rows[m]["macs"]) == (r["params"], r["macs"])]
        peer = peers[0] if peers else r.get("source")
        if peer is None:
            continue
        r["int8_vs"] = peer + ("" if peers else " (torch)")
        for key in [k for k in r if k.startswith("lat_") and k.endswith("_ms") and not k.endswith("_iqr_ms")]:
            other = rows[peer].get(key)
            if other:
                r[f"int8_speedup_{key[4:-3]}"] = float(np.float64(other) / r[key])
