"""Our HRank ranking vs HRank's reference algorithm, side by side on the same model and images.

Reference (HRank's ``rank_generation.py``): one full data pass per layer, and inside the hook
one ``matrix_rank`` call (and one sync) per image and per channel. Ours: one pass with hooks
on all layers, batched ``svdvals`` on [B, C, H, W]. The ranks must be identical.

    python benchmarks/bench_rank.py                    # VGG16-BN baseline + CIFAR-10 copy if present
    python benchmarks/bench_rank.py --n-images 128     # quicker
Prints: reference time, our time, their ratio, and our rank pass ÷ a plain forward pass.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from compressor.pruning import graph
from compressor import data
from compressor.storage import checkpoint
from compressor.pruning.capture import limit_images
from compressor.models import get_model
from compressor.pruning.scores import compute

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def reference_ranks(model, batches, units) -> dict[str, torch.Tensor]:
    """HRank's algorithm: per layer a full pass; per image, per channel a matrix_rank call."""
    out = {}
    modules = dict(model.named_modules())
    for u in units:
        total = torch.zeros(u.width, dtype=torch.float64)
        count = 0

        def hook(_m, _i, o):
            nonlocal total, count
            a = o.detach()
            ranks = torch.tensor([[torch.linalg.matrix_rank(a[i, j]).item() for j in range(a.shape[1])]
                                  for i in range(a.shape[0])], dtype=torch.float64)
            total += ranks.sum(0)
            count += a.shape[0]

        h = modules[u.rank_points[0]].register_forward_hook(hook)
        try:
            with torch.no_grad():
                for x in batches:
                    model(x)
        finally:
            h.remove()
        out[u.name] = (total / count).float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=640)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    ckpt, tar = SHARED / "pretrained" / "vgg16_bn_cifar10_jpeg.pt", SHARED / "cifar10-jpeg.tar.gz"
    if ckpt.exists() and tar.exists():
        model, _ = checkpoint.load(ckpt, model="vgg16_bn")
        bundle, what = data.load("cifar10", tar, seed=args.seed), "VGG16-BN baseline (87.86%), CIFAR-10 JPEG copy"
    else:
        model, bundle, what = get_model("vgg16_bn"), data.load("digits", seed=args.seed), "random VGG16-BN, digits"
    model.eval()
    calib = data.calibration_subset(bundle.train_eval, args.n_images, args.seed)
    batches = [x for x in limit_images(data.loader(calib, args.batch_size), args.n_images)]
    units = graph.units(model)

    with torch.no_grad():  # warm-up
        model(batches[0])
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    t_fwd = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = compute(model, batches, ["hrank"], n_images=args.n_images, seed=args.seed, progress=False)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = reference_ranks(model, batches, units)
    t_ref = time.perf_counter() - t0

    same = all(torch.equal(ref[u.name], ours.scores["hrank"][u.name]) for u in units)
    assert same, "ranks differ from the reference"
    print(f"# bench_rank  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model/data: {what}; {args.n_images} images, batch {args.batch_size}, 13 rank points (ReLU outputs)")
    print(f"ranks identical to the reference: {same}")
    print("| pass | seconds | ratio |\n|---|---|---|")
    print(f"| reference (HRank algorithm) | {t_ref:.2f} | {t_ref / t_ours:.1f}x ours |")
    print(f"| ours (one pass, batched svdvals) | {t_ours:.2f} | 1.0 |")
    print(f"| plain forward pass | {t_fwd:.2f} | ours = {t_ours / t_fwd:.2f}x forward |")


if __name__ == "__main__":
    main()
