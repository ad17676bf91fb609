"""Does pruning buy speed? Speedup ÷ MAC reduction, side by side in one run.

For each model, the unpruned network, its pruned version at a rate setting, and the same rate
profile with ``round_to: 8`` solved to the *same* MACs (``policy.resolve`` with a MACs target,
within 1%) are timed interleaved (ABAB…) at each batch size, once with contiguous tensors and
once channels_last. Random scores pick the kept channels: latency depends on the widths only.

    python benchmarks/bench_latency.py                                # VGG16-BN CHIP-58 + MobileNet v2, 1 thread
    python benchmarks/bench_latency.py --models vgg16_bn --repeats 20 --batch-sizes 1,64
Prints a markdown table: MACs, then per (batch, memory format) the median latency ± IQR/2, the
speedup × and ×/MACs = speedup ÷ (MACs before / after): 1.0 = latency falls exactly as fast as
MACs. ≈ marks a speedup whose IQR overlaps the baseline's. A second table compares round_to 8
with the unrounded widths at equal MACs (< 1.00 = rounding is faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.pruning import graph
from compressor.pruning import counting
from compressor.pruning import policy
from compressor.pruning import surgery
from compressor.deploy.latency import LatencyConfig, Timing, backend_settings, compare, overlaps  # noqa: E402
from compressor.models import get_model, list_models  # noqa: E402
from compressor.pruning.plan import make_plan  # noqa: E402
from compressor.pruning.rates import RateSpec, resolve_rates  # noqa: E402

# vgg16_bn: CHIP/HRankPlus CIFAR-10 58%-MACs rates; mobilenet_v2: a uniform rate.
SETTINGS: dict[str, str] = {
    "vgg16_bn": "[0.21]*7+[0.75]*5",
    "mobilenet_v2": "uniform 0.5",
    "mobilenet_v1": "uniform 0.5",
    "squeezenet1_1": "uniform 0.5",
}


def rates_of(model: torch.nn.Module, setting: str) -> dict[str, float]:
    units = [u.name for u in graph.units(model)]
    if setting.startswith("uniform "):
        return {u: float(setting.split()[1]) for u in units}
    return resolve_rates(setting, units, short_list=getattr(model, "short_rate_list", None))


def build(model: torch.nn.Module, spec: RateSpec, seed: int = 0) -> torch.nn.Module:
    widths = {u.name: u.width for u in graph.units(model)}
    g = torch.Generator().manual_seed(seed)
    scores = {u: torch.rand(w, generator=g) for u, w in widths.items()}
    plan = make_plan(scores, spec, widths, model=model.arch)
    return surgery.apply(model, plan, method="rebuild", verify=False).eval()


def variants(base: torch.nn.Module, setting: str, round_to: int) -> dict[str, tuple[torch.nn.Module, str]]:
    """{label: (model, note)}: the setting as given, and the same profile rounded at equal MACs."""
    rates = rates_of(base, setting)
    plain = build(base, RateSpec(rates=rates))
    frac = counting.count(plain)["macs"] / counting.count(base)["macs"]
    spec = policy.resolve(RateSpec(rates=rates, target={"macs": frac}, round_to=round_to), base)
    r = spec.extra["resolved"]
    rounded = build(base, spec)
    return {"pruned": (plain, f"`{setting}`"),
            f"round_to {round_to}": (rounded, f"same profile ×{r['scale']:.3f}, round_to {round_to}, MACs target "
                                              f"{frac:.4f} ({'met' if r['met'] else 'NOT met'})")}


def latency_budget(base: torch.nn.Module, setting: str, target: float, batch: int, threads: int) -> str:
    """Solve ``target: {latency: target}`` for the setting's profile and verify it by timing."""
    from compressor.deploy import latency_table as lt

    t0 = time.perf_counter()
    spec = RateSpec(rates=rates_of(base, setting), target={"latency": target},
                    latency_options={"batch_size": batch, "threads": threads, "device": "cpu"})
    spec = policy.resolve(spec, base)
    small = build(base, spec)
    v = lt.verify_spec(base, small, spec)
    r = spec.extra["resolved"]
    return (f"{base.arch} `{setting}` → {policy.describe(spec)}; MACs ÷{1 / r['achieved']['macs']:.2f}. "
            f"{v['line']}; table built in {r['latency']['build_s']:.0f}s ({r['latency']['cache_misses']} timings, "
            f"{r['latency']['cache_hits']} cached), {time.perf_counter() - t0:.0f}s in all")


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


def _cell(tb: Timing, tp: Timing, mac_x: float) -> str:
    sp = tb.median_ms / tp.median_ms
    flag = "≈" if overlaps(tb, tp) else ""
    return f"{tp.median_ms:.2f} ±{tp.iqr_ms / 2:.2f} ({flag}{sp:.2f}×, **{sp / mac_x:.2f}**)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16_bn,mobilenet_v2", help="comma-separated (unregistered ones are skipped)")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--latency-target", type=float, default=None,
                    help="also solve the profile for this fraction of measured latency (largest batch, contiguous) "
                         "with the latency table, and print predicted vs measured")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args(argv)
    bs = tuple(int(b) for b in args.batch_sizes.split(","))
    registered = set(list_models())
    names = [m for m in args.models.split(",") if m]
    skipped = [m for m in names if m not in registered]
    formats = (("contig", False), ("channels_last", True))
    slots = [(b, f) for b in bs for f, _ in formats]
    head = ["model", "variant", "MACs (÷)"] + [f"b{b} {f} ms ±IQR/2 (×, ×/MACs)" for b, f in slots]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cmp_head = ["model"] + [f"b{b} {f}" for b, f in slots]
    cmp_lines = ["| " + " | ".join(cmp_head) + " |", "|" + "---|" * len(cmp_head)]
    raw: list[dict] = []
    verified: list[str] = []
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    for name in names:
        if name in skipped:
            continue
        torch.manual_seed(0)
        base = get_model(name).eval()
        vs = variants(base, SETTINGS.get(name, "uniform 0.5"), args.round_to)
        models = {"base": base, **{k: m for k, (m, _) in vs.items()}}
        counts = {k: counting.count(m) for k, m in models.items()}
        res: dict[tuple[int, str], dict[str, Timing]] = {}
        for fname, cl in formats:
            cfg = LatencyConfig(batch_sizes=bs, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                cuda=False, channels_last=cl)
            out = compare(models, base.input_size, cfg, "cpu")
            for b in bs:
                res[(b, fname)] = {k: out[k][b] for k in models}
        cb = counts["base"]
        cells = [name, "unpruned", f"{_m(cb['macs'])}"]
        cells += [f"{res[s]['base'].median_ms:.2f} ±{res[s]['base'].iqr_ms / 2:.2f}" for s in slots]
        lines.append("| " + " | ".join(cells) + " |")
        for k, (_, note) in vs.items():
            mac_x = cb["macs"] / counts[k]["macs"]
            cells = [name, f"{k}: {note}", f"{_m(counts[k]['macs'])} (÷{mac_x:.2f})"]
            cells += [_cell(res[s]["base"], res[s][k], mac_x) for s in slots]
            lines.append("| " + " | ".join(cells) + " |")
        rk = f"round_to {args.round_to}"
        cmp_cells = [f"{name} ({_m(counts['pruned']['macs'])} vs {_m(counts[rk]['macs'])} MACs)"]
        for s in slots:
            a, r = res[s]["pruned"], res[s][rk]
            cmp_cells.append(f"{r.median_ms / a.median_ms:.3f}{' ≈' if overlaps(a, r) else ''}")
        cmp_lines.append("| " + " | ".join(cmp_cells) + " |")
        raw.append({"model": name, "counts": counts,
                    "latency_ms": {f"b{b}_{f}": {k: t.to_dict() for k, t in res[(b, f)].items()} for b, f in slots}})
        if args.latency_target:
            verified.append(latency_budget(base, SETTINGS.get(name, "uniform 0.5"), args.latency_target, max(bs),
                                           args.threads))
        print(f"[{name} done, {time.perf_counter() - t_start:.0f}s]", file=sys.stderr, flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    be = backend_settings()
    cmd = "python benchmarks/bench_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}  `{cmd.strip()}`")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, {args.threads} torch thread(s), torch {torch.__version__}, "
          f"mkldnn {'on' if be['mkldnn_enabled'] else 'off'}; load average {load} at the end.\n")
    print("\n".join(lines))
    print()
    print(f"round_to {args.round_to} latency ÷ unrounded latency, equal MACs (within 1%); < 1 = rounding is faster:\n")
    print("\n".join(cmp_lines))
    print()
    print(f"Median of {args.repeats} interleaved runs (ABAB…) after {args.warmup} warm-up runs; ±IQR/2 = half the "
          f"interquartile range; random 32×32 inputs; random scores choose the kept channels. "
          f"× = unpruned/pruned latency; ×/MACs = × ÷ (MACs before/after); ≈ = IQRs overlap.")
    if verified:
        print(f"\nLatency budget {args.latency_target:g} (the profile scaled with the measured per-conv table, then "
              "the pruned model timed against the unpruned one):\n")
        print("\n".join(f"- {v}" for v in verified))
    if skipped:
        print(f"not registered, skipped: {', '.join(skipped)}")
    if args.json:
        from compressor.storage import io

        io.write_json(args.json, {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                                  "backends": be, "rows": raw})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
