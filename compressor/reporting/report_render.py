"""Report tables: markdown, CSV (JSON is the rows as they are). Rows come from ``compressor.reporting.report``."""

from __future__ import annotations

import csv
import io as _io
import re
from typing import Any, Sequence


def _m(n: float) -> str:
    return f"{n / 1e6:.3f}M" if n < 1e7 else f"{n / 1e6:.1f}M"


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    slots = meta.get("latency_slots", [])
    head = ["model", "name", "criterion", "rates / target", "data", "top-1", "top-5", "Δtop-1", "params (−%)",
            "MACs (−%)", "file MB (weights)"]
    head += [f"{s.replace('_b', ' b')} ms ±IQR/2 (×, ×/MACs)" for s in slots]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        # A budget's resolved per-layer rates are long: the table shows the budget, the CSV/JSON both.
        rt = r.get("target") or r.get("rates") or ("unpruned" if r["role"] == "baseline" else "–")
        cells = [r["model"], r["name"], r.get("criterion") or "–", rt, r.get("data", "–"), _f(r.get("top1")),
                 _f(r.get("top5")), _f(r.get("top1_delta"), "{:+.2f}"),
                 f"{_m(r['params'])} ({_f(r.get('params_reduction_pct'), '{:.1f}%')})",
                 f"{_m(r['macs'])} ({_f(r.get('macs_reduction_pct'), '{:.1f}%')})",
                 f"{r['file_bytes'] / 1e6:.2f} ({r['weights_bytes'] / 1e6:.2f})"]
        for s in slots:
            if f"lat_{s}_ms" not in r:
                cells.append("–")
                continue
            if f"speedup_{s}" not in r:  # no baseline to compare with
                cells.append(f"{r[f'lat_{s}_ms']:.2f}")
                continue
            flag = "≈" if r.get(f"speedup_{s}_uncertain") else ""
            iqr = r.get(f"lat_{s}_iqr_ms")
            spread = f" ±{iqr / 2:.2f}" if iqr is not None else ""  # no spread recorded: none shown
            cells.append(f"{r[f'lat_{s}_ms']:.2f}{spread} "
                         f"({flag}{r[f'speedup_{s}']:.2f}×, {r[f'speedup_per_mac_{s}']:.2f})")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lc = meta.get("latency") or {}
    notes = [
        "",
        f"- Counted: {meta['counted']} (`compressor.pruning.counting`).",
        "- Δtop-1 = model top-1 − baseline top-1, same test split (a drop is negative); baselines are matched by "
        "architecture, builder arguments, classes and the unit widths recorded in the pruned model's plan.",
    ]
    if lc:
        be = meta.get("backends") or {}
        notes.append(f"- Latency: median of {lc['repeats']} runs after {lc['warmup']} warm-up runs, random inputs, "
                     f"models of one baseline group timed interleaved (ABAB…); ±IQR/2 = half the interquartile "
                     f"range; CPU threads: {meta['cpu_threads']}; mkldnn "
                     f"{'on' if be.get('mkldnn_enabled') else 'off'}; "
                     f"{'channels_last' if lc.get('channels_last') else 'contiguous'} tensors"
                     + (f"; CUDA: {meta['cuda']} (CUDA-event timing)" if meta.get("cuda") else "; no CUDA device")
                     + ".")
        notes.append("- ≈ marks a speedup whose IQR overlaps the baseline's: not separated by this measurement.")
        notes.append("- × = speedup vs baseline; ×/MACs = speedup ÷ (baseline MACs / model MACs), 1.0 = latency "
                     "falls as fast as MACs.")
    syn = meta.get("synthetic_baselines") or {}
    if syn:
        notes.append(f"- Baselines not in the inputs were rebuilt with random weights for counting/latency: "
                     f"{', '.join(syn)}.")
    lone = [f"{r['name']} {r['baseline'][1:-1]}" for r in rows if str(r.get("baseline", "")).startswith("(none")]
    if lone:
        notes.append(f"- No baseline to compare with (no reductions, Δ or speedups): {'; '.join(lone)}.")
    bn_note = _bn_note(rows)
    if bn_note:
        notes.append(bn_note)
    notes += _onnx_notes(rows)
    notes.append(f"- Generated {meta['time']} with torch {meta['torch']}.")
    return "\n".join(lines + notes) + "\n"


def _bn_note(rows: Sequence[dict[str, Any]]) -> str | None:
    """Which pruned models had their BN statistics re-estimated after surgery (none without BatchNorm)."""
    pruned = [r for r in rows if r["role"] == "pruned"]
    groups: dict[str, list[str]] = {"re-estimated": [], "not re-estimated": [], "no BatchNorm layers (nothing to "
                                    "re-estimate)": [], "not recorded": []}
    keys = list(groups)
    for r in pruned:
        k = keys[2] if r.get("has_bn") is False else keys[0] if r.get("bn_recalibrated") is True \
            else keys[1] if r.get("bn_recalibrated") is False else keys[3]
        groups[k].append(r["name"])
    if not pruned or len(groups[keys[3]]) == len(pruned):
        return None
    parts = []
    for k, names in groups.items():
        if names:
            parts.append(f"{k}: {'all pruned models' if len(names) == len(pruned) else ', '.join(names)}")
    return "- BN statistics after surgery: " + "; ".join(parts) + "."


def _onnx_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """ONNX rows: how they ran, and for each int8 row whether it is faster or slower than its float32 peer."""
    onnx_rows = [r for r in rows if r.get("runtime") == "onnxruntime"]
    if not onnx_rows:
        return []
    out = ["- `.onnx` rows run in onnxruntime on the CPU (torch's thread count), timed interleaved with their "
           "source checkpoint's group; their params/MACs are the ones recorded at export."]
    for r in onnx_rows:
        if r.get("quantization"):
            out.append(f"- {r['name']}: int8 (QDQ), calibration {r.get('calibration', '–')}.")
        ratios = {k[len("int8_speedup_"):]: v for k, v in r.items() if k.startswith("int8_speedup_")}
        if not ratios:
            continue
        parts = [f"{slot.replace('_b', ' b')} {v:.2f}× ({'faster' if v >= 1 else 'SLOWER'})"
                 for slot, v in sorted(ratios.items())]
        slower = [s for s, v in ratios.items() if v < 1]
        verdict = (f"int8 is slower than float32 on this CPU at {', '.join(s.replace('_b', ' b') for s in sorted(slower))}"
                   if slower else "int8 is faster than float32 on this CPU")
        out.append(f"- {r['name']} vs {r['int8_vs']}: {'; '.join(parts)}: {verdict}.")
    return out


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")

