"""The data contract: set by the first training run, carried through prune -> finetune -> export,
and followed by every command that is not told otherwise (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import data
from compressor.storage import checkpoint
from compressor.data import contract
from compressor.pruning import counting
from compressor.cli import main
from compressor.errors import UserError
from compressor.models import get_model

CLASSES = ["c0", "c1", "c2", "c3"]


def make_folder(root: Path, classes=CLASSES, n_train: int = 24, n_test: int = 6, size: int = 8, seed: int = 0) -> Path:
    """A small ImageFolder whose classes are colour layouts plus noise (learnable, not trivial)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(len(classes), 2, 2, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.kron(protos[c], np.ones((size // 2, size // 2, 1))) + rng.normal(0, 40, (size, size, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")


@pytest.fixture
def trained(tmp_path, capsys):
    """squeezenet1_1 trained for one epoch on a 4-class ImageFolder of 8x8 images."""
    root = make_folder(tmp_path / "photos")
    out = tmp_path / "train"
    assert main(["train", "--model", "squeezenet1_1", "--data", "imagefolder", "--data-root", str(root), "--epochs", "1",
                 "--batch-size", "32", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    return root, out / "best.pt"


def _contract(path: Path) -> dict:
    return torch.load(path, weights_only=True)["data"]


def test_first_training_run_sets_the_contract(trained):
    root, best = trained
    c = _contract(best)
    assert c["dataset"] == "imagefolder" and c["root"] == str(root.resolve()) and c["classes"] == CLASSES
    assert c["input_size"] == [32, 32] and c["channels"] == 3
    assert c["resize"] == {"policy": "bilinear", "from": [8, 8], "to": [32, 32]}
    # Normalisation: estimated from the training split (not ImageNet's, not CIFAR's) and recorded.
    bundle = data.load("imagefolder", root, input_size=32)
    assert c["mean"] == pytest.approx(bundle.notes["normalisation"]["mean"])
    assert c["mean"] != pytest.approx(list(data.IMAGENET_MEAN), abs=1e-3)
    net, _ = checkpoint.load(best)
    assert contract.of(net).to_dict() == c


def test_contract_round_trip_through_prune_finetune_export_and_onnx_eval(trained, tmp_path, capsys):
    root, best = trained
    want = _contract(best)
    rates = tmp_path / "r.yaml"
    rates.write_text("default: 0.5\n")
    # prune: no --model and no --data; the checkpoint says both.
    assert main(["prune", "--checkpoint", str(best), "--rates", str(rates), "--criterion", "l1", "--n-images", "32",
                 "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert _contract(tmp_path / "p" / "pruned.pt") == want
    assert main(["finetune", "--checkpoint", str(tmp_path / "p" / "pruned.pt"), "--epochs", "1", "--batch-size", "32",
                 "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    ft = tmp_path / "ft" / "best.pt"
    assert _contract(ft) == want
    onnx_path = tmp_path / "m.onnx"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ft), "--out", str(onnx_path), "--n-real", "8"]) == 0
    assert "imagefolder test images (8)" in capsys.readouterr().out  # verified on its own data, not digits
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["data_contract"]) == want and json.loads(meta["classes"]) == CLASSES
    # eval x.onnx == eval x.pt: same data from the file alone, logits within 1e-4.
    from compressor.deploy import onnx_model

    net, _ = checkpoint.load(ft)
    om = onnx_model.load(onnx_path)
    assert contract.of(om).to_dict() == want
    bundle, _ = contract.load_data(net)
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    with torch.no_grad():
        assert (om(x) - net.eval()(x)).abs().max().item() <= 1e-4
    results = []
    for path in (ft, onnx_path):
        assert main(["eval", "--checkpoint", str(path), "--json", "--no-progress"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["data"] == results[1]["data"] == "imagefolder" and results[0]["n"] == 4 * 6
    assert results[0]["top1"] == results[1]["top1"] and results[1]["runtime"] == "onnxruntime"


def test_data_that_breaks_the_contract_is_one_line(trained, tmp_path, capsys):
    root, best = trained
    other = make_folder(tmp_path / "other", classes=["c0", "c1", "c2", "kitten"])
    assert main(["eval", "--checkpoint", str(best), "--data", "imagefolder", "--data-root", str(other),
                 "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("resizing")]
    assert len(err) == 2 and err[0].startswith("note: --data imagefolder --data-root")  # says what it overrides
    assert err[1] == f"error: {best}: classes: class 3 is 'kitten' in the data but 'c3' in the checkpoint"
    assert main(["eval", "--checkpoint", str(best), "--data", "digits"]) == 2
    assert "classes: the data has 10 classes, the checkpoint 4" in capsys.readouterr().err


def test_normalisation_override_says_what_it_overrides(trained, capsys):
    _, best = trained
    assert main(["eval", "--checkpoint", str(best), "--json", "--no-progress"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(best), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
                 "--json", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "--mean/--std override the checkpoint's normalisation" in cap.err
    assert json.loads(cap.out)["loss"] != pytest.approx(own["loss"], rel=1e-6)  # the override is applied
    assert main(["eval", "--checkpoint", str(best), "--mean", "0.5", "0.5", "0.5"]) == 2
    assert "give --mean and --std together" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, why", [
    ("classes", "abc", "must be a list"),
    ("input_size", [32], r"must be \[H, W\]"),
    ("channels", True, "must be an integer"),
    ("mean", [0.1, float("nan"), 0.1], "must be 3 finite numbers"),
    ("std", [0.2, 0.0, 0.2], "> 0"),
    ("resize", {"policy": {"nested": 1}}, "small mapping"),
])
def test_a_hand_edited_contract_is_refused_by_field(key, value, why):
    good = contract.DataContract("digits", None, ("0", "1"), (32, 32), 3, (0.5,) * 3, (0.5,) * 3, {}).to_dict()
    assert contract.DataContract.from_dict(good).to_dict() == good
    with pytest.raises(UserError, match=why) as ei:
        contract.DataContract.from_dict({**good, key: value}, "x.pt")
    assert ei.value.field == f"data.{key}"


def test_input_size_is_recorded_and_counted(tmp_path, capsys):
    root = make_folder(tmp_path / "photos", n_train=12, n_test=2)
    out = tmp_path / "t64"
    assert main(["train", "--model", "squeezenet1_1", "--input-size", "64", "--data", "imagefolder", "--data-root",
                 str(root), "--epochs", "1", "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    assert "resizing 8×8 → 64×64" in capsys.readouterr().err
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["builder_kwargs"]["input_size"] == 64 and ck["data"]["input_size"] == [64, 64]
    net, _ = checkpoint.load(out / "last.pt")
    at64, at32 = counting.count(net)["macs"], counting.count(get_model("squeezenet1_1", num_classes=4))["macs"]
    assert at64 == counting.count(get_model("squeezenet1_1", num_classes=4, input_size=64))["macs"] and at64 > 3.5 * at32
    # HRank's VGG flattens a fixed 1x1 map: it cannot take 64 px, and says so.
    assert main(["train", "--model", "vgg16_bn", "--input-size", "64", "--epochs", "0", "--out", str(tmp_path / "v")]) == 2
    assert "vgg16_bn is built for 32-px inputs and cannot take 64 px" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_prune_reuses_a_recorded_baseline_and_takes_an_eval_budget(trained, tmp_path, capsys):
    _, best = trained
    rates = tmp_path / "r.yaml"
    rates.write_text("default: 0.25\n")
    recorded = torch.load(best, weights_only=True)["metrics"]["test"]

    def prune(out: str, *extra: str) -> dict:
        assert main(["prune", "--checkpoint", str(best), "--rates", str(rates), "--criterion", "l1", "--n-images", "32", "--out",
                     str(tmp_path / out), "--no-progress", *extra]) == 0
        return json.loads((tmp_path / out / "summary.json").read_text())

    m = prune("a")
    assert m["baseline_test"]["reused"] is True and m["baseline_test"]["top1"] == recorded["top1"]
    assert "(recorded)" in capsys.readouterr().out
    m = prune("b", "--baseline-eval", "measure")
    assert "reused" not in m["baseline_test"] and m["baseline_test"]["top1"] == pytest.approx(recorded["top1"])
    m = prune("c", "--eval-split", "val", "--eval-n", "5")
    assert m["eval"] == {"split": "val", "n": 5} and m["baseline_test"]["n"] == 5 and "reused" not in m["baseline_test"]
    m = prune("d", "--baseline-eval", "skip")
    assert m["baseline_test"] is None


def test_run_folders_do_not_mix(trained, tmp_path, capsys, monkeypatch):
    _, best = trained
    rates = tmp_path / "r.yaml"
    rates.write_text("default: 0.25\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    args = ["prune", "--checkpoint", str(best), "--rates", str(rates), "--criterion", "l1", "--n-images", "32", "--out", str(out),
            "--no-progress"]
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("resizing")]
    assert len(err) == 1 and "not empty and not written by this run" in err[0] and "notes.txt" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # A run that fails after its folder was claimed leaves nothing behind.
    from compressor.pruning import surgery

    def broken(*a, **k):
        raise UserError("surgery exploded", field="test")

    monkeypatch.setattr(surgery, "apply", broken)
    fresh = tmp_path / "fresh"
    assert main(args[:-3] + ["--out", str(fresh), "--no-progress"]) == 2
    assert "surgery exploded" in capsys.readouterr().err and not fresh.exists()


def test_a_new_user_trains_squeezenet_on_an_image_folder_with_the_defaults(tmp_path, capsys):
    """Only --model, --data, --data-root and --out: the model's recipe (lr 0.02, 1 warm-up epoch) learns."""
    root = make_folder(tmp_path / "photos", n_train=60, n_test=15)
    assert main(["train", "--model", "squeezenet1_1", "--data", "imagefolder", "--data-root", str(root),
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "train recipe models.yaml:squeezenet: lr 0.02, warmup_epochs 1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best"]["test"]["top1"] >= 50.0  # 4 classes: chance is 25%


def test_eval_save_imports_a_plain_file_once(trained, tmp_path, capsys):
    """A plain state_dict (HRank/akamaster style) has no contract; eval --save gives it one, with the
    accuracy it measured, which prune then reuses instead of measuring again."""
    root, best = trained
    net, _ = checkpoint.load(best)
    plain = tmp_path / "plain.pt"
    torch.save(net.state_dict(), plain)
    imported = tmp_path / "imported.pt"
    assert main(["eval", "--checkpoint", str(plain), "--model", "squeezenet1_1", "--data", "imagefolder",
                 "--data-root", str(root), "--save", str(imported), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    ck = torch.load(imported, weights_only=True)
    assert ck["data"] == _contract(best) and ck["metrics"]["test"]["top1"] == res["top1"]
    rates = tmp_path / "r.yaml"
    rates.write_text("default: 0.25\n")
    assert main(["prune", "--checkpoint", str(imported), "--rates", str(rates), "--criterion", "l1", "--n-images", "32",
                 "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert m["baseline_test"]["reused"] is True and m["baseline_test"]["top1"] == res["top1"]
