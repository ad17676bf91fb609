"""CPU latency of pruned vs unpruned models, timed side by side (interleaved) in one run.

For each model: the unpruned network and its pruned versions are timed round-robin (one run
of each, then the next round) at batch 1 and 64; the median after warm-up is reported. Random
scores pick the kept channels: latency depends on the widths, not on which channels survive.

    python benchmarks/bench_latency.py                          # all settings below
    python benchmarks/bench_latency.py --models vgg16_bn --repeats 20 --threads 1
Prints a markdown table: params and MACs before → after, latency and speedups, and the
speedup as a fraction of the MAC reduction (1.0 = latency falls as fast as MACs).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from compressor import counting, surgery
from compressor.latency import LatencyConfig, compare
from compressor.models import get_model, list_models
from compressor.plan import make_plan
from compressor.rates import RateSpec, resolve_rates

# vgg16_bn: the three HRankPlus/CHIP CIFAR-10 settings; other families: uniform rates.
SETTINGS: dict[str, list[str]] = {
    "vgg16_bn": ["[0.21]*7+[0.75]*5", "[0.3]*7+[0.75]*5", "[0.45]*7+[0.78]*5"],
    "mobilenet_v1": ["uniform 0.3", "uniform 0.5", "uniform 0.7"],
    "mobilenet_v2": ["uniform 0.3", "uniform 0.5", "uniform 0.7"],
    "squeezenet1_0": ["uniform 0.3", "uniform 0.5", "uniform 0.7"],
    "squeezenet1_1": ["uniform 0.3", "uniform 0.5", "uniform 0.7"],
}


def pruned(model: torch.nn.Module, setting: str, seed: int = 0) -> torch.nn.Module:
    units = [u.name for u in model.prunable_units()]
    widths = {u.name: u.width for u in model.prunable_units()}
    if setting.startswith("uniform "):
        rates = {u: float(setting.split()[1]) for u in units}
    else:
        rates = resolve_rates(setting, units, short_list=getattr(model, "short_rate_list", None))
    g = torch.Generator().manual_seed(seed)
    scores = {u: torch.rand(w, generator=g) for u, w in widths.items()}
    plan = make_plan(scores, RateSpec(rates=rates), widths, model=model.arch)
    return surgery.apply(model, plan, method="rebuild", verify=False).eval()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SETTINGS), help="comma-separated (unregistered ones are skipped)")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's current)")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args(argv)
    cfg = LatencyConfig(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), warmup=args.warmup,
                        repeats=args.repeats, threads=args.threads, cuda=False)
    registered = set(list_models())
    names = [m for m in args.models.split(",") if m]
    skipped = [m for m in names if m not in registered]
    bs = cfg.batch_sizes
    head = ["model", "setting", "params before → after", "MACs before → after"]
    head += [f"b{b} median ms base → pruned (×, ×/MACs)" for b in bs] + [f"b{b} × from min" for b in bs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    raw = []
    t_start = time.perf_counter()
    for name in names:
        if name in skipped:
            continue
        torch.manual_seed(0)
        base = get_model(name).eval()
        models = {"base": base, **{s: pruned(base, s) for s in SETTINGS.get(name, ["uniform 0.3", "uniform 0.5"])}}
        counts = {k: counting.count(m) for k, m in models.items()}
        res = compare(models, base.input_size, cfg, "cpu")
        for s in models:
            if s == "base":
                continue
            cb, cp = counts["base"], counts[s]
            cells = [name, f"`{s}`", f"{_m(cb['params'])} → {_m(cp['params'])} (−{100 * (1 - cp['params'] / cb['params']):.1f}%)",
                     f"{_m(cb['macs'])} → {_m(cp['macs'])} (−{100 * (1 - cp['macs'] / cb['macs']):.1f}%)"]
            for b in bs:
                tb, tp = res["base"][b].median_ms, res[s][b].median_ms
                sp = tb / tp
                cells.append(f"{tb:.2f} → {tp:.2f} ({sp:.2f}×, {sp / (cb['macs'] / cp['macs']):.2f})")
            cells += [f"{res['base'][b].min_ms / res[s][b].min_ms:.2f}×" for b in bs]
            lines.append("| " + " | ".join(cells) + " |")
            raw.append({"model": name, "setting": s, "before": cb, "after": cp,
                        "latency_ms": {str(b): {"base": res["base"][b].to_dict(), "pruned": res[s][b].to_dict()}
                                       for b in bs}})
        print(f"[{name} done, {time.perf_counter() - t_start:.0f}s]", file=sys.stderr, flush=True)
    threads = cfg.threads or torch.get_num_threads()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print("\n".join(lines))
    print()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, load average {load} at the end (a shared machine: "
          f"medians include waiting for the CPU; minimums are the less disturbed figure).")
    print(f"{threads} torch threads, torch {torch.__version__}; "
          f"median of {cfg.repeats} runs after {cfg.warmup} warm-up runs, models of one row group timed interleaved; "
          f"random inputs at each model's input size (32×32); random scores choose the kept channels. "
          f"× = baseline/pruned latency; ×/MACs = × ÷ (MACs before/after).")
    if skipped:
        print(f"not registered, skipped: {', '.join(skipped)}")
    if args.json:
        from compressor import io

        io.write_json(args.json, {"threads": threads, "repeats": cfg.repeats, "warmup": cfg.warmup, "rows": raw})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
