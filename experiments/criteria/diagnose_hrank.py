"""Where does HRank lose? Swap its choices into the l1 plan one group of layers at a time.

    .venv/bin/python experiments/criteria/diagnose_hrank.py

Same model, rates, seeds, calibration images (128) and 2,000-image test subset as
``compare.py``. Each hybrid plan takes HRank's kept channels in one group of layers and
l1's elsewhere; top-1 is measured after BN re-estimation (no fine-tuning). Also prints, per
layer, the map size, the mean rank and how many channels share the rank at the cut.
"""

from __future__ import annotations

import sys
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
from compressor.training.evaluation import evaluate, recalibrate_bn  # noqa: E402
from compressor.pruning.plan import Plan, make_plan, rank_order  # noqa: E402
from compressor.pruning.rates import RateSpec, resolve_rates  # noqa: E402

RATES = "[0.21]*7+[0.75]*5"


def main() -> int:
    torch.set_num_threads(2)
    seed = 0
    bundle = data.load("cifar10", str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"), seed=seed)
    base, _ = checkpoint.load(str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"), model="vgg16_bn")
    base.eval()
    test = data.loader(data.calibration_subset(bundle.test, 2000, seed), 250)
    calib = data.loader(data.calibration_subset(bundle.train_eval, 128, seed), 64)
    recal = data.loader(data.calibration_subset(bundle.train_eval, 512, seed + 1), 128)
    units = graph.units(base)
    widths = {u.name: u.width for u in units}
    names = list(widths)
    spec = RateSpec(rates=resolve_rates(RATES, names, short_list=12))
    sc = scores_mod.compute(base, calib, ["hrank", "l1"], n_images=128, seed=seed, progress=False)
    plans = {c: make_plan(sc.for_criterion(c), spec, widths, tiebreak=sc.tiebreak) for c in ("hrank", "l1")}
    early, deep = names[:7], names[7:12]

    def hybrid(hrank_units: list[str]) -> Plan:
        keep = {u: (plans["hrank"] if u in hrank_units else plans["l1"]).kept(u) for u in names}
        return Plan(keep={u: k for u, k in keep.items() if len(k) < widths[u]}, widths=widths)

    lines = ["| plan | top-1 after BN re-estimation |", "|---|---|"]
    for label, hu in [("l1 everywhere", []), ("HRank in the 7 early layers (rate 0.21), l1 in the deep 5", early),
                      ("l1 early, HRank in the 5 deep layers (rate 0.75, 4×4 and 2×2 maps)", deep),
                      ("HRank everywhere", early + deep)]:
        m = surgery.apply(base, hybrid(hu), method="rebuild").eval()
        recalibrate_bn(m, recal, max_images=512)
        acc = evaluate(m, test)["top1"]
        lines.append(f"| {label} | {acc:.2f} |")
        print(lines[-1], flush=True)

    # rank statistics per layer
    hooks, sizes = [], {}
    for u in units:
        mod = base.get_submodule(u.rank_points[0])
        hooks.append(mod.register_forward_hook(lambda _m, _i, o, n=u.name: sizes.__setitem__(n, o.shape[-1])))
    base(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    lines += ["", "| layer | map | mean rank | rate | rank at the cut | channels tied at it | dead (rank 0) |",
              "|---|---|---|---|---|---|---|"]
    for u in names:
        r = sc.for_criterion("hrank")[u]
        k = spec.keep_counts({u: widths[u]})[u]
        order = rank_order(r, sc.tiebreak[u])
        cut = float(r[order[k - 1]]) if k < widths[u] else float("nan")
        tied = int((r == cut).sum()) if k < widths[u] else 0
        lines.append(f"| {u} | {sizes[u]}×{sizes[u]} | {float(r.mean()):.2f} | {spec.rates[u]:.2f} | {cut:.2f} | "
                     f"{tied} of {widths[u]} | {int((r == 0).sum())} |")
    text = "\n".join(lines) + "\n"
    print(text)
    io.write_text(ROOT / "experiments/criteria/diagnose_hrank.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
