"""Re-time the ONNX files a bench_int8 run wrote (same harness: compressor.deploy.latency.compare, interleaved),
to see how much of a latency ratio is the shared machine's load. Usage: retime.py BENCH_DIR THREADS REPEATS"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from compressor.deploy import latency as lat
from compressor.deploy import onnx_model


def main() -> int:
    folder, threads, repeats = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    files = {"float32 unpruned": "unpruned.fp32.onnx", "float32 pruned": "pruned.fp32.onnx",
             "int8 pruned (minmax)": "pruned.int8.minmax.onnx"}
    mods = {n: onnx_model.load(folder / f, threads=threads) for n, f in files.items()}
    size = int(next(iter(mods.values())).input_size)
    load0 = os.getloadavg()
    timings = lat.compare(mods, size, lat.LatencyConfig(batch_sizes=(1, 64), warmup=2, repeats=repeats), "cpu")
    rows = {n: {f"b{b}_ms": t.median_ms for b, t in per.items()} | {f"b{b}_iqr_ms": t.iqr_ms for b, t in per.items()}
            for n, per in timings.items()}
    ref = rows["float32 pruned"]
    for n, r in rows.items():
        print(f"{n}: b1 {r['b1_ms']:.2f} ms (IQR {r['b1_iqr_ms']:.2f}), b64 {r['b64_ms']:.1f} ms "
              f"(IQR {r['b64_iqr_ms']:.1f}), b64 speedup vs fp32 pruned {ref['b64_ms'] / r['b64_ms']:.2f}x, "
              f"b1 {ref['b1_ms'] / r['b1_ms']:.2f}x")
    print(json.dumps({"rows": rows, "threads": threads, "repeats": repeats, "load_start": load0,
                      "load_end": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
