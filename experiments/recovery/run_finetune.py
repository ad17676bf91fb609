"""One CPU epoch of fine-tuning after reconstruction (VGG16-BN, CHIP-58), with a validation curve.

    .venv/bin/python experiments/recovery/run_finetune.py --kd 0.5     # distil from the unpruned model
    .venv/bin/python experiments/recovery/run_finetune.py --kd 0       # plain cross-entropy

Start: l1 plan at ``[0.21]*7+[0.75]*5``, then ``reconstruct`` with the default settings on 512
unaugmented training images (seed 0), BN statistics as ``--start-bn`` says. Then one pass over the
45,000 augmented training images (SGD nesterov momentum 0.9, wd 5e-4, batch ``--batch``, lr
``--lr`` cosine to 0 over the epoch; loss ``compressor.training.train.loss_fn``: cross-entropy, plus
Hinton KD from the unpruned model's logits with weight ``--kd`` at T=4). The 5,000-image
validation split (held out from train) is evaluated ``--evals`` times during the epoch; it
selects the best point. The test split is evaluated only at the end, for the last and for the
validation-selected weights. Writes ``finetune_<tag>.json`` and ``recovery_curve_<tag>.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compressor.storage import io
from compressor.training.evaluation import evaluate, recalibrate_bn  # noqa: E402
from compressor.pruning.reconstruct import reconstruct  # noqa: E402
from compressor.training.train import TrainConfig, loss_fn  # noqa: E402
from run_vgg import OUT, Runner, machine  # noqa: E402


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["fraction"] for p in doc["curve"]]
    ax.plot(xs, [p["val"] for p in doc["curve"]], "o-", label=f"pruned (CHIP-58, l1), KD α={doc['config']['kd']}")
    ax.axhline(doc["baseline_val"], color="k", ls="--", lw=1, label=f"unpruned baseline {doc['baseline_val']:.2f}%")
    ax.axhline(doc["baseline_val"] - 0.3, color="gray", ls=":", lw=1, label="baseline − 0.3")
    ax.set_xlabel("fraction of one training epoch (45k images)")
    ax.set_ylabel("validation top-1 (%), 5,000 held-out training images")
    ax.set_title("VGG16-BN recovery: reconstruction, then fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    io.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kd", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--evals", type=int, default=8)
    ap.add_argument("--start-bn", choices=["keep", "recalibrate"], default="keep")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tag = args.tag or f"kd{args.kd:g}_lr{args.lr:g}"
    r = Runner(argparse.Namespace(**vars(args), out=str(OUT / f".scratch_{tag}.json")))
    model = r.pruned("CHIP-58", "l1")
    rep = reconstruct(r.base, model, r.calib, seed=args.seed, bn=args.start_bn, progress=False)
    val = DataLoader(r.bundle.val, batch_size=500)
    doc = {"config": vars(args), "machine": machine(), "command": " ".join(sys.argv),
           "reconstruct_s": rep.seconds, "baseline_val": evaluate(r.base, val)["top1"], "curve": []}

    torch.manual_seed(args.seed)  # the augmentation draws use the global generator
    dl = DataLoader(r.bundle.train, batch_size=args.batch, shuffle=True, drop_last=True,
                    generator=torch.Generator().manual_seed(args.seed))
    steps = len(dl)
    marks = {round(steps * k / args.evals) for k in range(1, args.evals + 1)}
    cfg = TrainConfig(kd_alpha=args.kd, kd_temperature=4.0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    teacher = r.base.eval().requires_grad_(False) if args.kd > 0 else None

    def point(step: int, loss: float, t0: float) -> None:
        acc = evaluate(model, val)["top1"]
        doc["curve"].append({"step": step, "fraction": step / steps, "val": acc, "train_loss": loss,
                             "train_s": time.perf_counter() - t0})
        print(f"step {step}/{steps}  val {acc:.2f}  loss {loss:.4f}", flush=True)

    t0 = time.perf_counter()
    point(0, float("nan"), t0)
    best = (doc["curve"][0]["val"], copy.deepcopy(model.state_dict()))
    loss_sum = n = 0.0
    model.train()
    for step, (x, y) in enumerate(dl, start=1):
        out = model(x)
        t_out = None
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(x)
        loss = loss_fn(out, y, cfg, t_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum, n = loss_sum + loss.item() * y.numel(), n + y.numel()
        if step in marks:
            tt = time.perf_counter()
            point(step, loss_sum / n, t0)
            t0 += time.perf_counter() - tt  # train_s excludes the validation passes
            loss_sum = n = 0.0
            if doc["curve"][-1]["val"] > best[0]:
                best = (doc["curve"][-1]["val"], copy.deepcopy(model.state_dict()))
            model.train()
            io.write_json(OUT / f"finetune_{tag}.json", doc)
    model.eval()
    doc["test_last"] = evaluate(model, r.test)["top1"]
    model.load_state_dict(best[1])
    doc["best_val"] = best[0]
    doc["test_best_val"] = evaluate(model, r.test)["top1"]
    doc["train_s_total"] = doc["curve"][-1]["train_s"]
    io.write_json(OUT / f"finetune_{tag}.json", doc)
    plot(doc, OUT / f"recovery_curve_{tag}.png")
    print(f"test: last {doc['test_last']:.2f}  best-on-val {doc['test_best_val']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
