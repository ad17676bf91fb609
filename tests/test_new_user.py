"""What a new user trips on (issue 23): names and messages."""

from __future__ import annotations

import torch

import compressor

def test_list_layers_names_relu6_and_count_takes_a_size_without_a_record(capsys) -> None:
    """Issue 23: ReLU6 is shown as relu6 (torch traces it as hardtanh); a size passed to count needs none recorded."""
    import torchvision

    from compressor.cli import main
    from compressor.pruning import counting

    assert main(["list-layers", "mobilenet_v2"]) == 0
    out = capsys.readouterr().out
    assert "+relu6" in out and "hardtanh" not in out
    m = torchvision.models.resnet18(num_classes=10)
    assert counting.count(m, 64)["macs"] == compressor.count(m, torch.zeros(1, 3, 64, 64))["macs"]


def test_eval_takes_the_file_positionally_or_as_weights_and_prune_takes_a_budget_flag(tmp_path, capsys) -> None:
    """Issue 23 item 4: `eval best.pt`, `eval --weights plain.pt --model M`, `prune --macs 0.5`."""
    import json

    from compressor.cli import main
    from compressor.models import get_model
    from tests.conftest import TINY_VGG, randomize_bn

    torch.manual_seed(0)
    net = randomize_bn(get_model("vgg16_bn", cfg=[c if c == "M" else 2 * c for c in TINY_VGG])).eval()
    ck = compressor.save(net, tmp_path / "base.pt")
    plain = tmp_path / "plain.pt"
    torch.save(net.state_dict(), plain)
    assert main(["eval", str(ck), "--json", "--no-progress"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["eval", "--weights", str(plain), "--model", "vgg16_bn", "--json", "--no-progress"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["top1"] == b["top1"] and a["n"] == b["n"] == 360
    assert main(["eval", str(ck), "--checkpoint", str(ck)]) == 2
    assert "give one file" in capsys.readouterr().err
    assert main(["eval", "--weights", str(plain)]) == 2
    assert "needs --model" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["prune", "--checkpoint", str(ck), "--macs", "0.5", "--criterion", "l1", "--eval-n", "40",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["size_after"]["macs"] / summary["size_before"]["macs"] - 0.5) <= 0.01
    capsys.readouterr()
    assert main(["prune", "--checkpoint", str(ck), "--macs", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "fraction kept" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", str(ck), "--out", str(tmp_path / "y")]) == 2
    assert "--rates FILE, or a budget" in capsys.readouterr().err


def test_list_layers_shows_the_cost_of_each_unit_and_the_total(capsys) -> None:
    """Issue 23 item 8: the total MACs/params at the input size, and what follows each unit's channels."""
    from compressor.cli import main
    from compressor.models import get_model

    assert main(["list-layers", "vgg16_bn"]) == 0
    out = capsys.readouterr().out
    total = compressor.count(get_model("vgg16_bn"))
    assert f"{total['macs'] / 1e6:.2f}M MACs" in out and f"{total['params'] / 1e6:.3f}M params at 32 px" in out
    rows = [ln.split("|") for ln in out.splitlines() if ln.startswith("| 0 |")]
    # features.conv0: 64 3x3x3 filters at 32x32 (1.77M) and conv1's 64 input channels (37.75M)
    assert rows and rows[0][5].strip() == f"{(64 * 27 * 1024 + 64 * 64 * 9 * 1024) / 1e6:.2f}M"


def test_heartbeat_line_and_fit_prints_it_without_a_bar(capsys) -> None:
    """Issue 23 item 8: without a progress bar, a line every ``heartbeat_s`` (0 here: after every batch)."""
    import re

    from compressor.training.train import TrainConfig, fit, heartbeat_line
    from tests.test_train import tiny_bundle, tiny_model

    # 40 of 391 batches (5,120 images) in 40 s: 128 img/s; 351 batches left (351 s), then 4 epochs of 391
    assert heartbeat_line(0, 5, 40, 391, 2.1031, 5120, 40.0) == (
        "epoch 1/5, batch 40/391, loss 2.103, 128 img/s, eta 5m51s for the epoch, 31m55s for the run")
    assert heartbeat_line(4, 5, 391, 391, 0.5, 50000, 7200.0).endswith("eta 0s for the epoch, 0s for the run")
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01)
    fit(tiny_model(), tiny_bundle(n_train=64, n_val=8), cfg, progress=False, heartbeat_s=0)
    beats = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    pattern = r"epoch (\d)/2, batch (\d)/4, loss [\d.e+-]+, \d+ img/s, eta \w+ for the epoch, \w+ for the run"
    got = [re.fullmatch(pattern, ln) for ln in beats]
    assert all(got) and [(int(m[1]), int(m[2])) for m in got] == [(e, b) for e in (1, 2) for b in (1, 2, 3, 4)], beats
    assert beats[-1].endswith("eta 0s for the epoch, 0s for the run")
    short = TrainConfig(epochs=1, batch_size=16, lr=0.01)
    fit(tiny_model(), tiny_bundle(n_train=32, n_val=8), short, progress=False)  # the default: once a minute
    fit(tiny_model(), tiny_bundle(n_train=32, n_val=8), short, progress=True, heartbeat_s=0)  # the bar is the heartbeat
    assert "batch" not in capsys.readouterr().out


def test_prune_draws_the_baseline_in_its_own_recovery_curve_and_logs_the_data_line(tmp_path, monkeypatch,
                                                                                  caplog) -> None:
    """Issue 23 item 7: prune --finetune-epochs N's finetune/recovery_curve.png has the baseline's top-1 as a
    reference line (labelled with split and count), as ``report --curves`` draws it; item 3: the data line."""
    import logging

    from compressor.jobs.pipeline import PruneJob, run_prune
    from compressor.models import get_model
    from compressor.reporting import plots
    from compressor.training.train import TrainConfig
    from tests.conftest import TINY_VGG, randomize_bn

    drawn = []
    real = plots.recovery_figure
    monkeypatch.setattr(plots, "recovery_figure", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    torch.manual_seed(0)
    ck = compressor.save(randomize_bn(get_model("vgg16_bn", cfg=list(TINY_VGG))).eval(), tmp_path / "base.pt")
    with caplog.at_level(logging.INFO, logger="compressor"):
        res = run_prune(PruneJob(model="vgg16_bn", rates={"rates": "[0.5]*13"}, checkpoint=str(ck), criterion="l1",
                                 n_images=32, eval_n=40, finetune=TrainConfig(epochs=1, batch_size=256, lr=0.01),
                                 out=str(tmp_path / "p"), progress=False, device="cpu", bn_recalibrate=False))
    assert "data: digits (scikit-learn's 1,797 8×8 digits, built in); train 1294, " in caplog.text
    top1 = res["metrics"]["baseline_test"]["top1"]
    assert (tmp_path / "p" / "finetune" / "recovery_curve.png").is_file()
    lines = drawn[-1].axes[0].get_lines()
    refs = [ln for ln in lines if ln.get_label() == f"baseline {top1:.2f}% (test, 40 images)"]
    assert len(refs) == 1 and list(refs[0].get_ydata()) == [top1, top1]
    curve = [ln for ln in lines if ln is not refs[0]]
    assert len(curve) == 1 and len(curve[0].get_xdata()) == 2  # the start (right after pruning) and epoch 1
