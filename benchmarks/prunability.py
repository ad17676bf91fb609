"""Which classifiers prune to 50% MACs: compressor's defaults vs torch-pruning's BasePruner, side by side.

Every torchvision classification model and a list of timm CNNs, built without weights at a small
input size, each tool on each model in its own process with a timeout (a hang is a row, not a stuck
run). compressor: ``compressor.prune(model, rates={"target": {"macs": 0.5}})`` with defaults (its
masked-model check runs inside). torch-pruning: ``BasePruner`` with L1 magnitude importance, the
classifier ignored, 20 iterative steps up to ratio 0.9, stopped at the first step at or under 50%.

    .venv/bin/python benchmarks/prunability.py [--timm] [--torchvision] [--size 64] [--timeout 180]
                                               [--tools compressor,tp] [--only NAME ...] [--match regnet resnext]
                                               [--no-grouped] [--jsonl rows.jsonl] > table.md

compressor's row also checks the pruned model's forward and output shape, and says whether the MACs
kept are within 2% of the target (``within 2%``). ``--no-grouped`` sets ``model.prune_grouped = False``
(grouped-conv units skipped, as before they were pruned by default) to compare.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time

TIMM_CNNS = [
    "resnet18", "resnet50d", "seresnet18", "resnext26ts", "dla34", "cspresnet50", "cspdarknet53", "densenet121",
    "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_lite0", "mnasnet_100",
    "ghostnet_100", "regnetx_002", "regnety_002", "rexnet_100", "res2net50_26w_4s", "repvgg_a0", "convnext_atto",
    "hrnet_w18_small", "vgg11_bn", "dpn68", "selecsls42b", "tinynet_a", "lcnet_050", "mixnet_s", "fbnetc_100",
    "efficientnet_lite0", "semnasnet_100",
]


# torchvision models that do not run at the common size: the smallest each accepts
MIN_SIZE = {"inception_v3": 75, "maxvit_t": 224, "vit_h_14": 70}  # vit_h_14: 14-px patches


def size_for(source: str, name: str, size: int) -> int:
    return max(size, MIN_SIZE.get(name, 0)) if source == "torchvision" else size


def _build(source: str, name: str, size: int):
    import torch

    torch.manual_seed(0)
    if source == "timm":
        import timm

        m = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        import torchvision

        kw = {"image_size": size} if name.startswith("vit_") else {}  # a ViT is built for one input size
        m = torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
    m.eval()
    m.input_size = size
    return m


TARGET = 0.5


def _run_compressor(source: str, name: str, size: int, grouped: bool = True) -> dict:
    import torch

    import compressor

    m = _build(source, name, size)
    if not grouped:
        m.prune_grouped = False
    small, info = compressor.prune(m, rates={"target": {"macs": TARGET}})  # the masked check runs inside
    with torch.no_grad():
        out = small.eval()(torch.randn(1, 3, size, size))
    if tuple(out.shape) != (1, 10):
        raise RuntimeError(f"output shape {tuple(out.shape)}")
    return {"macs": info.kept["macs"], "within_2pct": abs(info.kept["macs"] / TARGET - 1) <= 0.02}


def _run_tp(source: str, name: str, size: int) -> dict:
    import torch
    import torch_pruning as tp
    from torch import nn

    m = _build(source, name, size)
    x = torch.randn(1, 3, size, size)
    base, _ = tp.utils.count_ops_and_params(m, x)
    last = [mod for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))][-1]
    pruner = tp.pruner.BasePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.9,
                                  iterative_steps=20, ignored_layers=[last])
    macs = base
    for _ in range(20):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(m, x)
        if macs <= 0.5 * base:
            break
    with torch.no_grad():
        out = m(x)
    if tuple(out.shape) != (1, 10):
        raise RuntimeError(f"output shape {tuple(out.shape)}")
    return {"macs": macs / base}


def _child(tool: str, source: str, name: str, size: int, timeout: float, q: mp.Queue, grouped: bool = True) -> None:
    import os

    import torch

    # the graph's own time bound well inside the process timeout, so a hang is refused, not killed
    os.environ.setdefault("COMPRESSOR_GRAPH_TIMEOUT", str(max(10, timeout / 3)))
    torch.set_num_threads(1)
    t = time.time()
    try:
        res = _run_compressor(source, name, size, grouped) if tool == "compressor" else _run_tp(source, name, size)
        res.update(status="ok")
    except Exception as exc:  # noqa: BLE001 - every failure is a row
        from compressor.errors import UserError

        res = {"status": "refused" if isinstance(exc, UserError) else "crash",
               "why": f"{'' if isinstance(exc, UserError) else type(exc).__name__ + ': '}{str(exc)}"[:160]}
    res["s"] = time.time() - t
    q.put(res)


def run_one(tool: str, source: str, name: str, size: int, timeout: float, grouped: bool = True) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(tool, source, name, size, timeout, q, grouped))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return {"status": "timeout", "why": f"killed at {timeout:g} s", "s": timeout}
    try:
        return q.get(timeout=5)
    except Exception:  # noqa: BLE001
        return {"status": "crash", "why": f"process exited {p.exitcode}", "s": 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timm", action="store_true")
    ap.add_argument("--torchvision", action="store_true")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--tools", default="compressor,tp")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--match", nargs="*", help="keep models whose name contains one of these")
    ap.add_argument("--no-grouped", action="store_true", help="compressor with model.prune_grouped = False")
    ap.add_argument("--jsonl")
    a = ap.parse_args(argv)
    models: list[tuple[str, str]] = []
    if a.torchvision or not a.timm:
        import torchvision

        models += [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if a.timm:
        models += [("timm", n) for n in TIMM_CNNS]
    if a.only:
        models = [(s, n) for s, n in models if n in a.only]
    if a.match:
        models = [(s, n) for s, n in models if any(k in n for k in a.match)]
    tools = a.tools.split(",")
    print("| source | model | " + " | ".join(f"{t} status | {t} MACs kept | {t} s" for t in tools)
          + " | compressor reason |")
    print("|" + "---|" * (3 + 3 * len(tools)))
    out = open(a.jsonl, "a") if a.jsonl else None
    for source, name in models:
        size = size_for(source, name, a.size)
        row = {t: run_one(t, source, name, size, a.timeout, not a.no_grouped) for t in tools}
        cells = []
        for t in tools:
            r = row[t]
            miss = " (not within 2%)" if r.get("within_2pct") is False else ""
            cells += [r["status"] + miss, f"{r['macs']:.3f}" if "macs" in r else "", f"{r['s']:.0f}"]
        why = row.get("compressor", {}).get("why", "").replace("|", "/").replace("\n", " ")
        print(f"| {source} | {name} | " + " | ".join(cells) + f" | {why} |", flush=True)
        if out:
            out.write(json.dumps({"source": source, "model": name, "size": size, **row}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
