"""Training throughput of ``compressor.training.train.fit`` against a plain fp32 loop, side by side.

Same model and initial weights, same in-memory images, same batch size and optimizer. The two
loops alternate epoch by epoch (after one warm-up epoch each), so load from other processes
hits both alike; the medians of each and of the per-round ratios are reported. On CPU the target
is >= 0.95: the library loop's extras (sampler, NaN checks, metrics, checkpoint-free) must cost
almost nothing. On a GPU the library loop also uses AMP and channels_last, so the ratio is the
speed-up over plain fp32.

    python benchmarks/bench_train.py                       # squeezenet1_1, 256 images/round, batch 64
    python benchmarks/bench_train.py --model vgg16_bn --images 512 --batch-size 128 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.data import DataBundle  # noqa: E402
from compressor.training.evaluation import resolve_device  # noqa: E402
from compressor.models import get_model, list_models  # noqa: E402
from compressor.training.train import TrainConfig, fit, make_optimizer  # noqa: E402

NARROW_VGG = [16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M", 64, 64, 64, 64]


def plain_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, cfg: TrainConfig,
                device: torch.device) -> tuple[float, float]:
    """The reference: slice tensors, forward, cross-entropy, backward, SGD step. Returns img/s (wall, CPU)."""
    opt = make_optimizer(model, cfg)
    model.train()
    n = (len(x) // batch) * batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, n, batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="squeezenet1_1" if "squeezenet1_1" in list_models() else "vgg16_bn")
    p.add_argument("--images", type=int, default=256, help="images per epoch (per round, per loop)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg_w = NARROW_VGG if args.model == "vgg16_bn" else None
    model0 = get_model(args.model, num_classes=10, cfg=cfg_w)
    size = model0.input_size
    x = torch.randn(args.images, 3, size, size)
    y = torch.randint(0, 10, (args.images,))
    ds = TensorDataset(x, y)
    bundle = DataBundle("bench", ds, ds, TensorDataset(x[:0], y[:0]), ds, 10, size)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01, schedule="constant")
    xd, yd = (x.to(device), y.to(device)) if device.type == "cuda" else (x, y)

    plain_m, ours_m = copy.deepcopy(model0).to(device), copy.deepcopy(model0)
    n = (args.images // args.batch_size) * args.batch_size
    rows = []
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        a, a_cpu = plain_epoch(plain_m, xd, yd, args.batch_size, cfg, device)
        c0 = time.process_time()  # includes fit's set-up (loader, optimizer): counts against it
        b = fit(ours_m, bundle, cfg, device, progress=False)[0]["img_per_s"]
        b_cpu = n / (time.process_time() - c0)
        if r:
            rows.append((a, b, a_cpu, b_cpu))
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: plain {a:7.1f} img/s ({a_cpu:7.1f} per CPU-s)   "
              f"compressor.fit {b:7.1f} img/s ({b_cpu:7.1f} per CPU-s)", flush=True)
    med = statistics.median
    mp, mo = med(r[0] for r in rows), med(r[1] for r in rows)
    ratios = [b / a for a, b, _, _ in rows]
    cpu_ratios = [d / c for _, _, c, d in rows]
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()}-thread CPU"
    print(f"\n{time.strftime('%Y-%m-%d')}  {dev}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"command: python benchmarks/bench_train.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"model {args.model}{' (narrow cfg)' if cfg_w else ''}, {args.images} images {size}x{size} in memory, "
          f"batch {args.batch_size}, median of {args.rounds} alternating epochs")
    print(f"plain fp32 loop     {mp:8.1f} img/s")
    print(f"compressor.fit      {mo:8.1f} img/s  ({'AMP + channels_last' if device.type == 'cuda' else 'fp32'})")
    print(f"ratio fit / plain   {med(ratios):8.3f}  wall clock: median of per-round ratios "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}; ratio of medians {mo / mp:.3f})"
          + ("  target >= 0.95 on CPU" if device.type == "cpu" else ""))
    if device.type == "cpu":  # robust to other processes on a shared machine
        print(f"ratio fit / plain   {med(cpu_ratios):8.3f}  per CPU-second: median of per-round ratios "
              f"(range {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
