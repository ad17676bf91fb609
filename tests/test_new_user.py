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
