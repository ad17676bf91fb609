"""`prune --reconstruct --block-refit` and `--teacher self` through the CLI, on every registered CIFAR family and
on the engine's models, with tiny widths: the recovery path is recorded, reconstruction lowers every refit layer's
calibration error, and every family has blocks to refit."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.storage import checkpoint
from compressor.cli import main
from compressor.models import get_model
from tests.conftest import one_thread, randomize_bn

MODELS = ["vgg16_bn", "mobilenet_v1", "mobilenet_v2", "mobilenet_v2_res", "squeezenet1_1", "resnet20"]


def _tiny_ckpt(name: str, tmp_path):
    torch.manual_seed(0)
    full = get_model(name)
    cfg = getattr(full, "cfg", None)
    m = get_model(name, cfg=[c if c == "M" else max(4, c // 8) for c in cfg]) if cfg is not None else full
    return checkpoint.save(tmp_path / f"{name}.pt", randomize_bn(m))


@pytest.mark.parametrize("name", MODELS)
def test_prune_reconstruct_and_self_distillation(name: str, tmp_path, capsys) -> None:
    epochs = 1 if name == "vgg16_bn" else 0  # the distilled fine-tune once; reconstruction on every family
    ck = _tiny_ckpt(name, tmp_path)
    rates = tmp_path / "r.yaml"
    rates.write_text("default: 0.5\n")
    out = tmp_path / "out"
    with one_thread():
        code = main(["prune", "--model", name, "--checkpoint", str(ck), "--rates", str(rates), "--criterion", "l1",
                     "--reconstruct", "--reconstruct-images", "64", "--block-refit", "3",
                     "--finetune-epochs", str(epochs),
                     "--teacher", "self", "--batch-size", "64",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    want = "reconstruct+blocks+finetune+kd" if epochs else "reconstruct+blocks"
    assert summary["recovery"] == want
    assert summary["block_refit"]["blocks"], summary["block_refit"]["skipped"]  # every family has blocks
    if epochs:
        assert summary["distillation"]["teacher"] == "self"
    layers = summary["reconstruct"]["layers"]
    assert layers and all(f["error_after"] <= f["error_before"] + 1e-9 for f in layers)
    assert "reconstructed" in capsys.readouterr().out
    back, meta = checkpoint.load(out / "pruned.pt")
    assert meta["provenance"]["recovery"] == want


def test_prune_block_refit_on_a_residual_net(tmp_path, capsys) -> None:
    """`--block-refit` after `--reconstruct` on resnet20 with its residual widths pruned: the blocks are the
    residual blocks (their kept channels from the plan), each refit keeps weights no worse on held-out images."""
    ck = _tiny_ckpt("resnet20", tmp_path)
    rates = tmp_path / "r.yaml"
    rates.write_text("default: 0.5\n")
    out = tmp_path / "out"
    with one_thread():
        code = main(["prune", "--model", "resnet20", "--checkpoint", str(ck), "--rates", str(rates),
                     "--criterion", "l1", "--reconstruct", "--reconstruct-images", "64", "--block-refit", "10",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recovery"] == "reconstruct+blocks"
    blocks = summary["block_refit"]["blocks"]
    assert [b["name"] for b in blocks] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert all(b["held_images"] == 8 for b in blocks)
    better = [b for b in blocks if b["accepted"]]
    assert better and all(b["error_after"] < b["error_before"] for b in better)
    assert all(b["error_after"] == b["error_before"] for b in blocks if not b["accepted"])
    assert "pruned_test_block_refit" in summary and "pruned_test_bn_recalibrated" not in summary
    assert summary["block_refit"]["settings"]["keep_given"] is True
    assert "block refit" in capsys.readouterr().out
    assert checkpoint.load(out / "pruned.pt")[1]["provenance"]["recovery"] == "reconstruct+blocks"
    with one_thread():
        assert main(["prune", "--model", "resnet20", "--checkpoint", str(ck), "--rates", str(rates),
                     "--block-refit", "-1", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()
