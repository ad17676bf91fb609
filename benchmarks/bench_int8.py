"""Issue 21: float32 unpruned → float32 pruned → int8 pruned, in one run, with onnxruntime on this CPU.

For one baseline and its pruned checkpoint: top-1 on the full test split of the pruned model's data
contract, file size, and onnxruntime latency at batch 1 and 64 (median and IQR, models timed
interleaved by ``compressor.deploy.latency.compare``) of

* the unpruned model exported to float32 ONNX,
* the pruned model exported to float32 ONNX (verified against torch),
* the pruned model quantized to int8 (QDQ, per-channel weights) with each calibration method asked for.

    python benchmarks/bench_int8.py --model vgg16_bn --baseline ../shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt \\
        --pruned /tmp/int8/vgg_pruned/pruned.pt --out /tmp/int8/bench_vgg
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.storage import checkpoint
from compressor.data import contract
from compressor.deploy import latency as lat
from compressor.deploy import onnx_int8
from compressor.deploy import onnx_model
from compressor.deploy.onnx_export import export, to_onnx_bytes  # noqa: E402


def top1_onnx(path: Path, test, batch: int = 256) -> float:
    m = onnx_model.load(path)
    hit = 0
    with torch.no_grad():
        for s in range(0, len(test), batch):
            items = [test[i] for i in range(s, min(s + batch, len(test)))]
            x = torch.stack([it[0] for it in items])
            y = torch.tensor([int(it[1]) for it in items])
            hit += int((m(x).argmax(1) == y).sum())
    return 100.0 * hit / len(test)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--baseline", required=True, help="unpruned checkpoint or plain weights for --model")
    ap.add_argument("--pruned", required=True, help="pruned checkpoint (its data contract gives the data)")
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument("--calib-n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for the timing")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load_start = os.getloadavg()  # the machine is shared: the load is part of the result
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load_start)}", flush=True)

    pruned, _ = checkpoint.load(args.pruned)
    base, _ = checkpoint.load(args.baseline, model=args.model)
    c = contract.of(pruned)
    if contract.of(base) is None and c is not None:
        contract.attach(base, c)  # the plain weights file records no contract: same data as the pruned model
    bundle, _ = contract.load_data(pruned)
    test = bundle.test
    print(f"data: {c.describe() if c else 'digits'}; {len(test)} test images", flush=True)

    files: dict[str, Path] = {}
    files["float32 unpruned"] = out / "unpruned.fp32.onnx"
    files["float32 unpruned"].write_bytes(to_onnx_bytes(base))
    res = export(pruned, out / "pruned.fp32.onnx", n_real=64)
    assert res.ok, res.to_dict()
    files["float32 pruned"] = out / "pruned.fp32.onnx"

    rows: dict[str, dict] = {}
    for name in ("float32 unpruned", "float32 pruned"):
        rows[name] = {"top1": top1_onnx(files[name], test), "bytes": files[name].stat().st_size}
        print(f"{name}: top-1 {rows[name]['top1']:.2f}%  {rows[name]['bytes'] / 1e6:.2f} MB", flush=True)
    for method in args.methods.split(","):
        name = f"int8 pruned ({method})"
        t = time.time()
        r = onnx_int8.export_int8(pruned, out / f"pruned.int8.{method}.onnx", n_calib=args.calib_n, method=method,
                                  seed=args.seed, max_drop=100.0)
        files[name] = Path(r.path)
        rows[name] = {"top1": r.top1_int8, "bytes": r.bytes, "top1_float_check": r.top1_float, "agree": r.agree,
                      "export_s": time.time() - t, "calibration_images": r.calibration_images}
        print(f"{name}: top-1 {r.top1_int8:.2f}% (float32 {r.top1_float:.2f}%, agree {100 * r.agree:.2f}%)  "
              f"{r.bytes / 1e6:.2f} MB  export {time.time() - t:.0f}s", flush=True)

    mods = {n: onnx_model.load(p, threads=args.threads) for n, p in files.items()}
    cfg = lat.LatencyConfig(batch_sizes=(1, 64), warmup=args.warmup, repeats=args.repeats)
    timings = lat.compare(mods, int(pruned.input_size), cfg, "cpu")
    for n, per in timings.items():
        for b, t in per.items():
            rows[n][f"b{b}_ms"], rows[n][f"b{b}_iqr_ms"] = t.median_ms, t.iqr_ms
    ref = rows["float32 pruned"]
    lines = ["| model | top-1 % | Δ vs fp32 pruned | file MB | × fp32 pruned file | b1 ms (IQR) | b64 ms (IQR) | "
             "b64 speedup vs fp32 pruned |", "|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['top1']:.2f} | {r['top1'] - ref['top1']:+.2f} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['bytes'] / ref['bytes']:.2f} | {r['b1_ms']:.2f} ({r['b1_iqr_ms']:.2f}) | "
                     f"{r['b64_ms']:.1f} ({r['b64_iqr_ms']:.1f}) | {ref['b64_ms'] / r['b64_ms']:.2f}× |")
    table = "\n".join(lines)
    print(table)
    import onnxruntime

    doc = {"args": vars(args), "rows": rows, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
           "test_images": len(test), "latency": {"repeats": cfg.repeats, "warmup": cfg.warmup,
                                                 "ort_threads": args.threads, "interleaved": True},
           "seconds": time.time() - t0, "load_average_start": load_start, "load_average_end": os.getloadavg()}
    (out / "bench_int8.json").write_text(json.dumps(doc, indent=2))
    (out / "bench_int8.md").write_text(table + "\n")
    print(f"done in {time.time() - t0:.0f}s; {out / 'bench_int8.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
