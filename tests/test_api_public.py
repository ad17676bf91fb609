"""The public names beyond the notebook flow: describe, build_model, criteria, recipes, report from Python."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compressor
from compressor.errors import UserError


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_describe_counts_what_follows_each_unit_by_hand() -> None:
    net, x = _net(), torch.randn(1, 3, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    d = compressor.describe(net, x)
    # unit 0: its conv (8·3·9 MACs per pixel, 64 pixels) and conv 3's 8 input columns (4·8 per pixel);
    # params: conv 216 + bias 8 + BN γ/β 16, and conv 3's 32 weights
    # unit 3: conv 3 (4·8·64) + the Linear's 4·2; params 32 + 4 bias + the Linear's 8 weights
    assert [(u.name, u.width, u.kind, u.macs, u.params) for u in d.units] == [
        ("0", 8, "plain", 8 * 27 * 64 + 4 * 8 * 64, 216 + 8 + 16 + 32),
        ("3", 4, "plain", 4 * 8 * 64 + 8, 32 + 4 + 8)]
    assert (d.macs, d.params) == (8 * 27 * 64 + 4 * 8 * 64 + 8, 216 + 8 + 16 + 32 + 4 + 8 + 2)
    assert d.units[0].rank_points == ["1+relu"] and d.input_size == 8
    assert compressor.count(net, x) == {"macs": d.macs, "params": d.params}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not hasattr(net, "input_size")  # the caller's model is not written on


def test_describe_names_what_is_left_out() -> None:
    net = compressor.build_model("torchvision:resnet18", input_size=32)
    d = compressor.describe(net)  # 8 block-inner convs; the stem and 3 stage spaces are residual groups
    assert len(d.units) == 8 and set(d.skipped) == {"conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"}
    assert set(d.skipped.values()) == {"residual"}
    wide = compressor.describe(net, residual=True)
    assert len(wide.units) == 12 and not wide.skipped and wide.macs == d.macs


def test_build_model_takes_builder_arguments_and_refuses_unknown_names() -> None:
    net = compressor.build_model("torchvision:resnet18", num_classes=7, input_size=64)
    assert net.fc.out_features == 7
    with pytest.raises(UserError, match="unknown model"):
        compressor.build_model("resnet21")


def test_criteria_are_checked_by_name() -> None:
    assert {"hrank", "l1", "random"} <= set(compressor.list_criteria())
    assert compressor.check_criteria("hrank, l1,hrank") == ["hrank", "l1"]
    with pytest.raises(UserError, match="did you mean|valid"):
        compressor.check_criteria(["hrnak"])
    with pytest.raises(UserError, match="no criterion named"):
        compressor.check_criteria(" , ")


def test_model_recipe_prefers_the_longest_matching_name() -> None:
    assert compressor.model_recipe("squeezenet1_1")["source"].endswith(":squeezenet")
    assert compressor.model_recipe("torchvision:resnet18")["source"].endswith(":defaults")


def test_report_from_python_on_a_pruned_resnet(tmp_path) -> None:
    net = compressor.build_model("resnet20").eval()
    small, info = compressor.prune(net, None, {"target": {"macs": 0.5}})
    base, pruned = compressor.save(net, tmp_path / "r20.pt"), compressor.save(small, tmp_path / "r20_half.pt")
    res = compressor.report([base, pruned], tmp_path / "rep", evaluate=False, latency=None, plots=False)
    assert (tmp_path / "rep" / "report.md").is_file() and "r20_half" in res["markdown"]
    macs = {r["path"].split("/")[-1]: r["macs"] for r in res["rows"]}
    assert macs == {"r20.pt": info.size_before["macs"], "r20_half.pt": info.size_after["macs"]}
    with pytest.raises(UserError, match="give checkpoints"):
        compressor.report([], tmp_path / "rep2")
