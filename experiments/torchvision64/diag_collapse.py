"""Why does the distilled epoch of mobilenet_v3_small's l1 start collapse (58% -> 35%) when the obs start gains?

    .venv/bin/python experiments/torchvision64/diag_collapse.py [--steps 60]

For each start (checkpoints/tv64/mobilenet_v3_small_{l1,obs}/pruned.pt, teacher: the baseline):
1. on one augmented training batch: top-1 and the KD loss in eval mode and in train mode (a copy, so the
   running statistics are not touched), and per BN layer how far the batch statistics are from the running ones;
2. ``--steps`` optimisation steps with the finetune recipe (SGD, lr 0.01 constant, momentum 0.9, wd 5e-4, KD T=4
   alpha 0.5): loss and gradient norm per step, eval top-1 on 1,000 validation images every 10 steps, and the
   layers whose weights moved most (relative change) by the end.
Everything is printed; nothing is written.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from compressor import data  # noqa: E402
from compressor.data import contract  # noqa: E402
from compressor.storage import checkpoint  # noqa: E402
from compressor.training.config import TrainConfig, loss_fn, make_optimizer  # noqa: E402

CK = ROOT / "checkpoints/tv64"


def bn_drift(net: nn.Module, x: torch.Tensor) -> list[tuple[float, str]]:
    """Per BN: mean over channels of |batch var / running var - 1| in a train-mode forward (on a copy)."""
    rows: list[tuple[float, str]] = []
    hooks = []
    m2 = copy.deepcopy(net).train()
    for name, m in m2.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def hook(mod, inp, out, name=name):
                v = inp[0].transpose(0, 1).flatten(1).var(1)
                rows.append((float(((v + mod.eps) / (mod.running_var + mod.eps) - 1).abs().mean()), name))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        m2(x)
    for h in hooks:
        h.remove()
    return sorted(rows, reverse=True)


def top1(net: nn.Module, loader) -> float:
    net.eval()
    hit = n = 0
    with torch.no_grad():
        for x, y in loader:
            hit += int((net(x).argmax(1) == y).sum())
            n += len(y)
    return 100.0 * hit / n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher, _ = checkpoint.load(CK / "mobilenet_v3_small_base/best.pt")
    teacher.eval()
    bundle, _ = contract.load_data(teacher, seed=0)
    val = data.loader(torch.utils.data.Subset(bundle.val, range(1000)), 250)
    cfg = TrainConfig(lr=args.lr, epochs=1, schedule="constant")
    for crit in ("l1", "obs"):
        net, _ = checkpoint.load(CK / f"mobilenet_v3_small_{crit}/pruned.pt")
        train = data.loader(bundle.train, 128, shuffle=True, seed=0, drop_last=True)
        x, y = next(iter(train))
        with torch.no_grad():
            t_out = teacher(x)
            e_out = net.eval()(x)
            tr_out = copy.deepcopy(net).train()(x)
        print(f"== {crit}: val top-1 {top1(net, val):.2f}; one train batch: eval top-1 "
              f"{100 * (e_out.argmax(1) == y).float().mean():.1f} loss {loss_fn(e_out, y, cfg, t_out):.3f}; "
              f"train-mode top-1 {100 * (tr_out.argmax(1) == y).float().mean():.1f} "
              f"loss {loss_fn(tr_out, y, cfg, t_out):.3f}", flush=True)
        print("   BN var drift, worst 6: " + ", ".join(f"{n} {d:.2f}" for d, n in bn_drift(net, x)[:6]), flush=True)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = make_optimizer(net, cfg)
        it = iter(train)
        for step in range(args.steps):
            net.train()
            x, y = next(it)
            with torch.no_grad():
                t_out = teacher(x)
            loss = loss_fn(net(x), y, cfg, t_out)
            opt.zero_grad()
            loss.backward()
            g = torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters() if p.grad is not None))
            opt.step()
            if step % 5 == 0 or step == args.steps - 1:
                msg = f"   step {step:3d} loss {loss.item():.3f} grad norm {g.item():.2f}"
                if step % 10 == 0 or step == args.steps - 1:
                    msg += f" val top-1 {top1(net, val):.2f}"
                print(msg, flush=True)
        moved = sorted(((float((p.detach() - before[n]).norm() / (before[n].norm() + 1e-12)), n)
                        for n, p in net.named_parameters()), reverse=True)[:8]
        print("   moved most: " + ", ".join(f"{n} {d:.3f}" for d, n in moved), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
