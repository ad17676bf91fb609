"""Issue 23 item 3: train/eval/prune say in one line what data they use, and a --data-root override says so."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import torch

import compressor
from compressor import data
from compressor.data import contract, describe
from tests.test_imagefolder import _three_splits


def _fmt(vals) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in vals) + ")"


def test_digits_line_names_the_splits_input_and_default_normalisation() -> None:
    bundle, c = contract.load_data(None)
    line = describe.data_line(bundle, c)
    # 1,797 images: a stratified 20% test set is 360 (sklearn rounds up), 1,437 left; a tenth (143) is held out
    assert line.startswith("data: digits (scikit-learn's 1,797 8×8 digits, built in); ")
    assert "; train 1294, test 360 (20% of the digits, stratified, seed 0), " in line
    assert "selection 143 (10% of train held out, seed 0); input 32×32; " in line
    assert line.endswith("mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5) (the digits default)")
    assert "\n" not in line


def test_the_source_of_mean_std_is_the_flag_the_contract_or_the_model(capsys) -> None:
    net = torch.nn.Conv2d(3, 2, 1)
    _, made = contract.load_data(net, check_classes=False)
    contract.attach(net, replace(made, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)))
    b, c = contract.load_data(net, check_classes=False)
    assert describe.data_line(b, c).endswith("mean (0.1, 0.2, 0.3) std (1, 1, 1) (from the checkpoint's data contract)")
    b, c = contract.load_data(net, mean=(0.25,) * 3, std=(0.5,) * 3, check_classes=False)
    assert describe.data_line(b, c).endswith("mean (0.25, 0.25, 0.25) std (0.5, 0.5, 0.5) (from --mean/--std)")
    assert "note: --mean/--std override the checkpoint's normalisation" in capsys.readouterr().err
    plain = torch.nn.Conv2d(3, 2, 1)
    plain.mean, plain.std = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)  # what a model declares it was trained with
    b, c = contract.load_data(plain, check_classes=False)
    assert describe.data_line(b, c).endswith("mean (0.4, 0.4, 0.4) std (0.2, 0.2, 0.2) (declared by the model)")


def test_imagefolder_line_names_each_folder_and_the_estimated_stats(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")
    root = tmp_path / "d"
    made = _three_splits(root)  # train/ 5, val/ 2, test/ 3 images per class, two classes, 16 px
    bundle, c = contract.load_data(None, "imagefolder", str(root), input_size=16)
    px = np.stack(made["train"]).reshape(-1, 3).astype(np.float64) / 255.0
    line = describe.data_line(bundle, c)
    assert line == (f"data: imagefolder at {root}; train 10 (train/), test 6 (test/), selection 4 (val/); "
                    f"input 16×16; mean {_fmt(px.mean(0))} std {_fmt(px.std(0))} (estimated from the training split)")
    shutil.rmtree(root / "val")  # train/ and test/ only: the selection split is a seeded hold-out of train/
    bundle, c = contract.load_data(None, "imagefolder", str(root), input_size=32, val_size=2, seed=3)
    line = describe.data_line(bundle, c)
    assert "; train 8 (train/), test 6 (test/), selection 2 (20% of train held out, seed 3); " in line
    assert "; input 32×32 (from 16×16, bilinear); " in line


def test_eval_prints_the_line_and_a_data_root_override_gets_a_note(tmp_path, monkeypatch, capsys) -> None:
    from compressor.cli import main
    from compressor.models import get_model
    from tests.conftest import TINY_VGG

    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")
    root, moved = tmp_path / "d", tmp_path / "elsewhere"
    _three_splits(root)
    torch.manual_seed(0)
    net = get_model("vgg16_bn", cfg=list(TINY_VGG), num_classes=2)
    contract.attach(net, contract.load_data(net, "imagefolder", str(root))[1])
    ck = compressor.save(net, tmp_path / "m.pt")
    assert main(["eval", str(ck), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert f"data: imagefolder at {root}; train 10 (train/), test 6 (test/), selection 4 (val/)" in cap.out
    assert "note:" not in cap.err
    shutil.copytree(root, moved)
    assert main(["eval", str(ck), "--data-root", str(moved), "--no-progress", "--json"]) == 0
    cap = capsys.readouterr()
    assert f"note: --data-root {moved} overrides the checkpoint's data root ({root})" in cap.err
    res = json.loads(cap.out)  # --json: stdout stays one JSON document; the line is in it
    assert res["data_line"].startswith(f"data: imagefolder at {moved}; ") and res["n"] == 6
