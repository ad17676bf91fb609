"""Per-layer allocation at a fixed MACs budget on VGG16-BN: hand-set (CHIP) vs ``policy: global`` vs ``sensitivity``.

    .venv/bin/python experiments/allocation/run_alloc.py --stage main --budgets CHIP-58
    .venv/bin/python experiments/allocation/run_alloc.py --stage seeds
    .venv/bin/python experiments/allocation/run_alloc.py --stage main --budgets CHIP-79

For each budget (the MACs of CHIP's hand-set rates, counted on the rebuilt model) three allocations:

* ``chip``: CHIP's rates as published (``[0.21]*7+[0.75]*5`` / ``[0.45]*7+[0.78]*5``, conv 13 whole);
* ``global``: ``policy: global`` (normalize mean, min_keep 0.1, tolerance 1%) with ``target: {macs: F}``,
  F = the CHIP allocation's MACs ÷ the baseline's, on the l1 scores;
* ``sensitivity``: ``sensitivity.analyze`` (l1, the default rates 0.1…0.9, 1,000 *val* images, BN not
  re-estimated, as the CLI's defaults) then ``sensitivity.suggest(tolerance=1.0, target={macs: F}, min_keep=0.1)``.
  The curves are measured once and cached in ``sensitivity_l1_n1000/`` so the second budget reuses them.

Every allocation then goes through the same pipeline as experiments/recovery/run_vgg.py: l1 plan, surgery
(rebuild), top-1 on the full 10k test right after surgery, after BN re-estimation (512 calibration images),
after ``reconstruct`` with the original BN statistics kept (the default); val top-1 (5,000 held-out images)
of the reconstructed model. Nothing is selected on the test split.

``--stage seeds``: CHIP-58 rates, reconstruct only, for l1 with calibration/positions seed 0 and 1 and
for random with criterion/calibration/positions seed 0 and 1.

Rows are appended to ``results_alloc.json``; ``table_alloc.md`` is re-rendered after each row.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from compressor.pruning import graph
from compressor import data# noqa: E402
from compressor.storage import checkpoint
from compressor.storage import io
from compressor.pruning import policy
from compressor.pruning import scores as scores_mod
from compressor.pruning import surgery
from compressor.pruning import sensitivity_scan as sens
from compressor.pruning.counting import count  # noqa: E402
from compressor.training.evaluation import evaluate, recalibrate_bn  # noqa: E402
from compressor.pruning.plan import make_plan  # noqa: E402
from compressor.pruning.rates import RateSpec, resolve_rates  # noqa: E402
from compressor.pruning.reconstruct import reconstruct  # noqa: E402

RATES = {"CHIP-58": "[0.21]*7+[0.75]*5", "CHIP-79": "[0.45]*7+[0.78]*5"}
OUT = Path(os.environ.get("ALLOC_OUT", Path(__file__).resolve().parent))  # where results go
SENS_DIR = OUT / "sensitivity_l1_n1000"


def load_info() -> dict:
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"loadavg": os.getloadavg(), "uptime": up}


def machine() -> dict:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "compressor": str(ROOT),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **load_info()}


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bundle = data.load("cifar10", args.data_root, input_size=32, seed=0)
        self.base, _ = checkpoint.load(args.checkpoint, model="vgg16_bn")
        self.base.eval()
        self.test = data.loader(self.bundle.test, 500)
        self.val = data.loader(self.bundle.val, 500)
        self.widths = {u.name: u.width for u in graph.units(self.base)}
        self.counter = policy.SizeCounter(self.base)
        self._calib: dict[int, tuple] = {}
        self._scores: dict[tuple[str, int], dict] = {}
        self.path = Path(args.out)
        self.doc = json.loads(self.path.read_text()) if self.path.exists() else {"rows": []}
        self.doc.setdefault("runs", []).append({"command": " ".join(sys.argv), "machine": machine()})
        self.doc["base_size"] = dict(self.counter.base)

    def calib(self, seed: int):
        if seed not in self._calib:
            ds = data.calibration_subset(self.bundle.train_eval, self.args.n_calib, seed)
            self._calib[seed] = data.loader(ds, 128)
        return self._calib[seed]

    def scores(self, crit: str, seed: int) -> dict:
        key = (crit, seed)
        if key not in self._scores:
            sc = scores_mod.compute(self.base, self.calib(seed), [crit], n_images=self.args.n_calib, seed=seed,
                                    options={"seed": seed}, progress=False)
            self._scores[key] = {"scores": sc.scores[crit], "tiebreak": sc.tiebreak}
        return self._scores[key]

    # ------------------------------------------------------------ allocations -> RateSpec with exact rates

    def chip_spec(self, budget: str) -> RateSpec:
        return RateSpec(rates=resolve_rates(RATES[budget], list(self.widths), short_list=12), rounding="keep_floor")

    def macs_fraction(self, budget: str) -> float:
        keep = self.chip_spec(budget).keep_counts(self.widths)
        return self.counter.fractions(keep)["macs"]

    def global_spec(self, budget: str, normalize: str = "mean") -> tuple[RateSpec, dict]:
        sc = self.scores("l1", 0)
        f = self.macs_fraction(budget)
        spec = RateSpec(rates={}, target={"macs": f}, extra={"policy": {"name": "global", "normalize": normalize}})
        out = policy.resolve(spec, self.base, sc["scores"], tiebreak=sc["tiebreak"])
        info = dict(out.extra["resolved"])
        info["describe"] = policy.describe(out)
        return out, info

    def sensitivity_result(self) -> tuple[sens.SensitivityResult, float]:
        cache = SENS_DIR / "sensitivity_rows.json"
        if cache.exists():
            d = json.loads(cache.read_text())
            return sens.SensitivityResult(d["baseline_top1"], d["rows"], d["meta"]), d["analyze_s"]
        sc = self.scores("l1", 0)
        held_out = data.calibration_subset(self.bundle.val, self.args.n_eval, 0)
        t0 = time.perf_counter()
        res = sens.analyze(self.base, sc["scores"], data.loader(held_out, 256), sens.DEFAULT_RATES,
                           tiebreak=sc["tiebreak"], progress=False)
        took = time.perf_counter() - t0
        res.meta.update({"criterion": "l1", "n_eval": self.args.n_eval, "eval_split": "val", "seed": 0,
                         "analyze_s": took, **load_info()})
        SENS_DIR.mkdir(parents=True, exist_ok=True)
        sens.write_csv(res, SENS_DIR / "sensitivity.csv")
        sens.plot(res, SENS_DIR / "sensitivity.png", f"vgg16_bn: per-layer sensitivity (l1, {self.args.n_eval} val images)")
        io.write_json(cache, {"baseline_top1": res.baseline_top1, "rows": res.rows, "meta": res.meta, "analyze_s": took})
        print(f"sensitivity curves: {took:.1f}s, baseline on {self.args.n_eval} val images {res.baseline_top1:.2f}",
              flush=True)
        return res, took

    def sensitivity_spec(self, budget: str) -> tuple[RateSpec, dict, float]:
        res, analyze_s = self.sensitivity_result()
        f = self.macs_fraction(budget)
        t0 = time.perf_counter()
        spec, info = sens.suggest(res, self.base, 1.0, target={"macs": f}, min_keep=0.1)
        took = time.perf_counter() - t0
        io.write_text(OUT / f"suggested_rates_{budget}.yaml",
                      sens.suggestion_yaml(spec, info, "vgg16_bn",
                                           f"experiments/allocation/run_alloc.py: sensitivity.suggest, l1, "
                                           f"{self.args.n_eval} val images, tolerance 1.0, target macs={f:.6f} "
                                           f"(= {budget}'s MACs)"))
        return RateSpec(rates=spec.rates, rounding="keep_floor"), info, analyze_s + took

    # ------------------------------------------------------------ pipeline

    def acc(self, model, loader) -> float:
        return evaluate(model, loader)["top1"]

    def save(self, row: dict) -> None:
        self.doc["rows"].append(row)
        io.write_json(self.path, self.doc)
        io.write_text(OUT / "table_alloc.md", table(self.doc))
        print(json.dumps({k: v for k, v in row.items() if k not in ("report", "alloc_info", "keep")}), flush=True)

    def run(self, budget: str, allocation: str, spec: RateSpec, alloc_s: float, *, crit: str = "l1", seed: int = 0,
            full: bool = True, alloc_info: dict | None = None) -> None:
        start = load_info()
        t_row = time.perf_counter()
        sc = self.scores(crit, seed)
        t0 = time.perf_counter()
        plan = make_plan(sc["scores"], spec, self.widths, tiebreak=sc["tiebreak"], model="vgg16_bn")
        pruned = surgery.apply(self.base, plan, method="rebuild").eval()
        surgery_s = time.perf_counter() - t0
        keep = {u: len(plan.keep[u]) if u in plan.keep else w for u, w in self.widths.items()}
        row = {"budget": budget, "allocation": allocation, "criterion": crit, "seed": seed,
               "n_calib": self.args.n_calib, **count(pruned), "keep": keep, "alloc_s": alloc_s,
               "surgery_s": surgery_s, "loadavg_start": start["loadavg"], "uptime_start": start["uptime"]}
        if alloc_info is not None:
            row["alloc_info"] = alloc_info
        if full:
            row["surgery"] = self.acc(pruned, self.test)
            m = copy.deepcopy(pruned)
            recalibrate_bn(m, self.calib(seed), max_images=self.args.n_calib)
            row["bn"] = self.acc(m, self.test)
            del m
        t0 = time.perf_counter()
        rep = reconstruct(self.base, pruned, self.calib(seed), seed=seed, progress=False)
        row["recon_s"] = time.perf_counter() - t0
        row["recon"] = self.acc(pruned, self.test)
        row["val_recon"] = self.acc(pruned, self.val)
        row["report"] = rep.to_dict()
        end = load_info()
        row["loadavg_end"], row["uptime_end"] = end["loadavg"], end["uptime"]
        row["row_s"] = time.perf_counter() - t_row
        self.save(row)


def table(doc: dict) -> str:
    head = ("| budget | allocation | criterion | seed | MACs | params | after surgery | + BN re-est. | + reconstruct "
            "(BN kept) | val (+ reconstruct) | allocation s | reconstruct s | load avg (1 min, start→end) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        f = (lambda k: f"{r[k]:.2f}" if k in r else "")
        lines.append(f"| {r['budget']} | {r['allocation']} | {r['criterion']} | {r['seed']} | {r['macs'] / 1e6:.2f}M | "
                     f"{r['params'] / 1e6:.2f}M | {f('surgery')} | {f('bn')} | {f('recon')} | {f('val_recon')} | "
                     f"{r['alloc_s']:.1f} | {r['recon_s']:.1f} | {r['loadavg_start'][0]:.2f}→{r['loadavg_end'][0]:.2f} |")
    lines += ["", "Kept channels per conv (conv 0 … conv 12, conv 13):", ""]
    seen = set()
    for r in doc["rows"]:
        key = (r["budget"], r["allocation"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- {r['budget']} {r['allocation']}: " + " ".join(str(v) for v in r["keep"].values()))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--stage", choices=("main", "seeds", "global-normalize"), default="main")
    ap.add_argument("--budgets", default="CHIP-58")
    ap.add_argument("--allocations", default="chip,global,sensitivity")
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=1000, help="val images per sensitivity evaluation")
    ap.add_argument("--out", default=str(OUT / "results_alloc.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    r = Runner(args)
    if args.stage == "seeds":
        spec = r.chip_spec("CHIP-58")
        for crit, seed in (("l1", 1), ("random", 0), ("random", 1)):
            r.run("CHIP-58", "chip", spec, 0.0, crit=crit, seed=seed, full=False)
        return 0
    for budget in args.budgets.split(","):
        print(f"{budget}: MACs fraction {r.macs_fraction(budget):.6f}", flush=True)
        for alloc in args.allocations.split(","):
            if alloc == "chip":
                r.run(budget, "chip", r.chip_spec(budget), 0.0)
            elif alloc == "global":
                t0 = time.perf_counter()
                spec, info = r.global_spec(budget)
                r.run(budget, "global", spec, time.perf_counter() - t0, alloc_info=info)
            elif alloc.startswith("global-"):  # global-max, global-l2, global-rank: other normalizations
                t0 = time.perf_counter()
                spec, info = r.global_spec(budget, alloc.split("-", 1)[1])
                r.run(budget, alloc, spec, time.perf_counter() - t0, alloc_info=info)
            elif alloc == "sensitivity":
                spec, info, took = r.sensitivity_spec(budget)
                r.run(budget, "sensitivity", spec, took, alloc_info=info)
            else:
                raise SystemExit(f"unknown allocation {alloc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
