"""Time the any-CNN engine: unit discovery, planning and surgery (with its masked-model check).

    python benchmarks/bench_engine.py                      # torchvision resnet50 at 224 px, 1 thread
    python benchmarks/bench_engine.py --models resnet18,mobilenet_v3_large --size 224

Each model is built with random weights (no downloads), then: discovery (the dependency
graph), the size model, a plan at rate 0.5 on every unit, and surgery, which traces the graph
again and checks the pruned network against the masked unpruned one. Printed side by side
with one forward pass at batch 1, so the costs read as multiples of a forward.
"""

from __future__ import annotations

import argparse
import time

import torch

from compressor.models import get_model
from compressor.pruning.plan import make_plan
from compressor.pruning import graph
from compressor.pruning.size import SizeModel
from compressor.pruning.rates import RateSpec
from compressor.pruning import surgery


def _time(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} thread(s), input {args.size}px, rate 0.5 on every unit")
    print("| model | units | forward b1 (s) | discover (s) | size model (s) | surgery + check (s) | MACs kept |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        m = get_model(f"torchvision:{name}", num_classes=1000, input_size=args.size).eval()
        x = graph.example_input(m)
        with torch.no_grad():
            m(x)
            t_fwd, _ = _time(lambda: m(x))
        t_disc, found = _time(lambda: graph.discovery(m))
        t_size, sizer = _time(lambda: SizeModel(m, found))
        units = graph.units(m)
        widths = {u.name: u.width for u in units}
        g = torch.Generator().manual_seed(0)
        scores = {u.name: torch.rand(u.width, generator=g) for u in units}
        plan = make_plan(scores, RateSpec(rates={n: 0.5 for n in widths}), widths)
        t_cut, pruned = _time(lambda: surgery.apply(m, plan))
        kept = sizer.count({u: len(k) for u, k in plan.keep.items()})["macs"] / sizer.count({})["macs"]
        print(f"| {name} | {len(units)} | {t_fwd:.3f} | {t_disc:.2f} | {t_size:.2f} | {t_cut:.2f} | {kept:.3f} |")


if __name__ == "__main__":
    main()
