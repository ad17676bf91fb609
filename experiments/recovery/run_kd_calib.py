"""Beyond the linear refit: a few passes of logit distillation on a small training subset, after reconstruction.

    .venv/bin/python experiments/recovery/run_kd_calib.py --data-root ../shared/data/cifar10-jpeg.tar.gz \
        --checkpoint ../shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt

VGG16-BN, CHIP-58, l1, reconstruction with the library defaults (512 calibration images, BN kept), then for each
setting: SGD (nesterov, momentum 0.9, no weight decay) on ``--n-kd`` training images (seed 1, no augmentation),
loss = KL(teacher || student) at temperature T (pure distillation, no labels), BN statistics frozen (the model
stays in eval mode: the reconstruction's targets assume the original statistics). Selection on a fixed 2,000-image
subset of the validation split after every pass; the test split is evaluated once, for the selected weights.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("run_vgg", HERE / "run_vgg.py")
run_vgg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_vgg)  # Runner: data, baseline, l1 scores and the CHIP rates, as in the main table

from compressor import data# noqa: E402
from compressor.storage import io
from compressor.training.evaluation import evaluate  # noqa: E402
from compressor.pruning.reconstruct import reconstruct  # noqa: E402


def kd_passes(student, teacher, loader, val, lr: float, passes: int, temperature: float) -> tuple[list, dict]:
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True)
    curve, best = [(0, evaluate(student, val)["top1"])], None
    best = (curve[0][1], copy.deepcopy(student.state_dict()), 0)
    for p in range(1, passes + 1):
        student.eval()  # BN frozen
        for x, _ in loader:
            with torch.no_grad():
                t = F.log_softmax(teacher(x) / temperature, 1)
            s = F.log_softmax(student(x) / temperature, 1)
            loss = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = evaluate(student, val)["top1"]
        curve.append((p, acc))
        if acc > best[0]:
            best = (acc, copy.deepcopy(student.state_dict()), p)
    return curve, {"val": best[0], "pass": best[2], "state": best[1]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-kd", type=int, default=2048)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--settings", default="0.001:4,0.0003:4", help="lr:temperature,...")
    ap.add_argument("--out", default=str(HERE / "results_kd_calib.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    r = run_vgg.Runner(argparse.Namespace(**vars(args), ))
    val = data.loader(data.calibration_subset(r.bundle.val, 2000, 0), 500)
    kd_set = data.loader(data.calibration_subset(r.bundle.train_eval, args.n_kd, args.seed + 1), 64, shuffle=True,
                         seed=args.seed)
    rows = []
    pruned0 = r.pruned("CHIP-58", "l1")
    t0 = time.perf_counter()
    reconstruct(r.base, pruned0, r.calib, seed=args.seed, progress=False)
    recon_s = time.perf_counter() - t0
    start = {"test": r.acc(pruned0), "val2000": evaluate(pruned0, val)["top1"], "reconstruct_s": recon_s}
    print(json.dumps(start), flush=True)
    for item in args.settings.split(","):
        lr, temp = (float(v) for v in item.split(":"))
        student = copy.deepcopy(pruned0)
        t0 = time.perf_counter()
        curve, best = kd_passes(student, r.base, kd_set, val, lr, args.passes, temp)
        secs = time.perf_counter() - t0
        student.load_state_dict(best["state"])
        row = {"lr": lr, "temperature": temp, "n_kd": args.n_kd, "passes": args.passes, "val_curve": curve,
               "selected_pass": best["pass"], "selected_val2000": best["val"], "test_selected": r.acc(student),
               "kd_s": secs, "loadavg": os.getloadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    io.write_json(args.out, {"command": " ".join(sys.argv), "start": start, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
