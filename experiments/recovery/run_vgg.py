"""Recovery without fine-tuning on VGG16-BN: BN re-estimation vs layer-wise least-squares reconstruction.

    .venv/bin/python experiments/recovery/run_vgg.py                 # the main table
    .venv/bin/python experiments/recovery/run_vgg.py --ablations     # ridge / positions / layers / images (l1)

For CHIP-58 ``[0.21]*7+[0.75]*5`` and CHIP-79 ``[0.45]*7+[0.78]*5`` (conv 13 whole, keep_floor)
and the criteria l1, hrank and random, on the shared JPEG-CIFAR-10 VGG16-BN baseline:

1. scores from the calibration set (512 unaugmented training images, seed 0), plan, surgery;
2. top-1 on the full 10,000-image test split: right after surgery; after BN re-estimation
   (``recalibrate_bn`` on the calibration set); after ``reconstruct`` with the original BN
   statistics kept; and after ``reconstruct`` followed by BN re-estimation on the same images
   (what ``reconstruct(bn="recalibrate")`` does);
3. the reconstruction's wall time (it includes its own forward passes; not the evaluation).

Results are appended to ``results_vgg.json`` (one row per configuration, rewritten
atomically after each), and ``table()`` renders them for RESULTS_recovery.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
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
from compressor.pruning import scores as scores_mod
from compressor.pruning import surgery
from compressor.pruning.counting import count  # noqa: E402
from compressor.training.evaluation import evaluate, recalibrate_bn  # noqa: E402
from compressor.pruning.plan import make_plan  # noqa: E402
from compressor.pruning.rates import RateSpec, resolve_rates  # noqa: E402
from compressor.pruning.reconstruct import reconstruct  # noqa: E402

RATES = {"CHIP-58": "[0.21]*7+[0.75]*5", "CHIP-79": "[0.45]*7+[0.78]*5"}
OUT = Path(__file__).resolve().parent


def machine() -> dict:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()}


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bundle = data.load("cifar10", args.data_root, input_size=32, seed=0)
        self.base, _ = checkpoint.load(args.checkpoint, model="vgg16_bn")
        self.base.eval()
        self.test = data.loader(self.bundle.test, 500)
        self.calib_ds = data.calibration_subset(self.bundle.train_eval, args.n_calib, args.seed)
        self.calib = data.loader(self.calib_ds, 128)
        self.widths = {u.name: u.width for u in graph.units(self.base)}
        self.scores: dict[str, dict] = {}
        self.path = Path(args.out)
        self.doc = json.loads(self.path.read_text()) if self.path.exists() else {"rows": []}
        self.doc.setdefault("runs", []).append({"command": " ".join(sys.argv), "machine": machine()})

    def acc(self, model: torch.nn.Module) -> float:
        return evaluate(model, self.test)["top1"]

    def criterion_scores(self, name: str) -> dict:
        if name not in self.scores:
            sc = scores_mod.compute(self.base, self.calib, [name], n_images=self.args.n_calib, seed=self.args.seed,
                                    options={"seed": self.args.seed}, progress=False)
            self.scores[name] = {"scores": sc.scores[name], "tiebreak": sc.tiebreak}
        return self.scores[name]

    def pruned(self, rate: str, crit: str) -> torch.nn.Module:
        spec = RateSpec(rates=resolve_rates(RATES[rate], list(self.widths), short_list=12), rounding="keep_floor")
        sc = self.criterion_scores(crit)
        plan = make_plan(sc["scores"], spec, self.widths, tiebreak=sc["tiebreak"], model="vgg16_bn")
        return surgery.apply(self.base, plan, method="rebuild").eval()

    def save(self, row: dict) -> None:
        self.doc["rows"].append(row)
        io.write_json(self.path, self.doc)
        io.write_text(OUT / "table_vgg.md", table(self.doc))
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)

    def run(self, rate: str, crit: str, full: bool = True, **recon) -> None:
        pruned = self.pruned(rate, crit)
        row = {"rate": rate, "criterion": crit, "n_calib": self.args.n_calib, "seed": self.args.seed,
               **count(pruned), "settings": recon}
        if full:
            row["surgery"] = self.acc(pruned)
            m = copy.deepcopy(pruned)
            recalibrate_bn(m, self.calib, max_images=self.args.n_calib)
            row["bn"] = self.acc(m)
        t0 = time.perf_counter()
        rep = reconstruct(self.base, pruned, self.calib, seed=self.args.seed, progress=False, **recon)
        row["recon_s"] = time.perf_counter() - t0
        row["recon"] = self.acc(pruned)
        recalibrate_bn(pruned, self.calib, max_images=self.args.n_calib)
        row["recon_bn"] = self.acc(pruned)
        row["report"] = rep.to_dict()
        row["loadavg_end"] = os.getloadavg()
        self.save(row)


def table(doc: dict) -> str:
    head = ("| rates | criterion | settings | MACs | params | after surgery | + BN re-est. | + reconstruct (BN kept) "
            "| + reconstruct + BN re-est. | reconstruct s |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        s = r.get("settings") or {}
        st = ", ".join(f"{k}={v}" for k, v in s.items()) or "defaults"
        if r.get("n_calib", 512) != 512:
            st += f", {r['n_calib']} images"
        f = (lambda k: f"{r[k]:.2f}" if k in r else "")
        lines.append(f"| {r['rate']} | {r['criterion']} | {st} | {r['macs'] / 1e6:.2f}M | {r['params'] / 1e6:.2f}M | "
                     f"{f('surgery')} | {f('bn')} | {f('recon')} | {f('recon_bn')} | {r['recon_s']:.1f} |")
    return "\n".join(lines) + "\n"


ABLATIONS = [
    {"ridge_to": "zero"},
    {"ridge": 1e-2},
    {"ridge": 1e-4},
    {"positions": 512},
    {"layers": "all"},
]


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--rates", default="CHIP-58,CHIP-79")
    ap.add_argument("--criteria", default="l1,hrank,random")
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablations", action="store_true", help="l1 only: vary one reconstruction setting at a time")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="reconstruct() settings for the main rows, e.g. --set positions=32 ridge=1e-2")
    ap.add_argument("--no-full", action="store_true", help="skip the surgery / BN-only columns")
    ap.add_argument("--out", default=str(OUT / "results_vgg.json"))
    args = ap.parse_args()
    recon = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    torch.set_num_threads(2)
    r = Runner(args)
    if "baseline" not in r.doc:
        r.doc["baseline"] = r.acc(r.base)
        print(f"baseline top-1 {r.doc['baseline']:.2f}%", flush=True)
    for rate in args.rates.split(","):
        if args.ablations:
            for ab in ABLATIONS:
                r.run(rate, "l1", full=False, **ab)
        else:
            for crit in args.criteria.split(","):
                r.run(rate, crit, full=not args.no_full, **recon)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
