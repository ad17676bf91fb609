"""Top-1 after BN re-estimation (no fine-tuning) of the sensitivity-suggested rates vs HRankPlus's, both l1.

    .venv/bin/python experiments/criteria/check_suggested.py

Same checkpoint, 128 calibration images, 512 BN images and 2,000-image test subset (seed 0) as compare.py.
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
from compressor.pruning import criteria
from compressor.pruning import policy
from compressor.pruning import surgery
from compressor.training.evaluation import evaluate, recalibrate_bn  # noqa: E402
from compressor.pruning.plan import make_plan  # noqa: E402
from compressor.pruning.rates import RateSpec, load_rates, resolve_rates  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    bundle = data.load("cifar10", str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"), seed=0)
    base, _ = checkpoint.load(str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"), model="vgg16_bn")
    base.eval()
    test = data.loader(data.calibration_subset(bundle.test, 2000, 0), 250)
    recal = data.loader(data.calibration_subset(bundle.train_eval, 512, 1), 128)
    widths = {u.name: u.width for u in graph.units(base)}
    scores = criteria.get("l1").score(base, graph.units(base), None)
    specs = {
        "HRankPlus [0.21]*7+[0.75]*5": RateSpec(rates=resolve_rates("[0.21]*7+[0.75]*5", list(widths), short_list=12)),
        "sensitivity-suggested (macs=0.42)": load_rates(ROOT / "experiments/criteria/sensitivity_vgg16_l1/"
                                                        "suggested_rates.yaml", list(widths)),
    }
    for label, spec in specs.items():
        frac = policy.achieved(spec, base)
        m = surgery.apply(base, make_plan(scores, spec, widths), method="rebuild").eval()
        recalibrate_bn(m, recal, max_images=512)
        print(f"| {label} | {frac['macs']:.2%} | {frac['params']:.2%} | {evaluate(m, test)['top1']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
