"""The notebook API on a user's own CNN: three calls, the input untouched, a checkpoint that reloads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compressor
from compressor.errors import UserError


class MyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a, self.bn, self.act = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU()
        self.dw, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32)
        self.head = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.act(self.bn(self.a(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.head(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def test_three_calls_prune_a_users_cnn_and_it_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    m = MyNet().eval()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(8, 3, 32, 32)
    scores = compressor.rank(m, [x[:4], x[4:]], criteria=["hrank", "l1"], progress=False)
    small, info = compressor.prune(m, x[:1], rates={"target": {"macs": 0.5}}, scores=scores, criterion="l1")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the input is untouched
    assert abs(info.kept["macs"] - 0.5) <= 0.005 and info.size_after["params"] < info.size_before["params"]
    assert small.dw.groups == small.dw.out_channels == small.a.out_channels < 32  # depthwise follows its producer
    assert small.fc.out_features == 5
    path = compressor.save(small, tmp_path / "p.pt")
    back = compressor.load(path, model=MyNet())
    with torch.no_grad():
        assert torch.equal(back.eval()(x), small.eval()(x))


def test_ignored_layers_are_kept_whole_and_weight_criteria_need_no_data() -> None:
    m = MyNet().eval()
    small, info = compressor.prune(m, torch.randn(1, 3, 32, 32), rates={"default": 0.5}, ignored_layers=[m.head])
    assert small.head.out_channels == 8 and small.fc.out_features == 5 and small.stem[0].out_channels == 8
    assert info.criterion == "l1"
    with pytest.raises(UserError, match="needs data"):
        compressor.prune(m, torch.randn(1, 3, 32, 32), rates={"default": 0.5}, criterion="hrank")
