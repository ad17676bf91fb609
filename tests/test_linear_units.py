"""Issue 24 item 1: Linear-rooted units (an MLP's hidden width) are discovered and pruned by default.

A Linear whose output feeds another Linear through an activation is a *plain* unit rooted at the
Linear: its rank point is the Linear's output with the activation applied. In a channels-last block
(ConvNeXt's ``Permute -> LayerNorm -> Linear -> GELU -> Linear -> Permute``) the channels are the
last dim, and ``capture`` hands the accumulators ``[N, C, H, W]`` maps; a plain MLP head's ``[N, C]``
becomes one 1x1 map per channel. The classifier (the last Linear) is never cut. Checked on two
constructed models and on torchvision's ConvNeXt class at tiny widths: rate 0 and dead channels give
identical logits, and a MACs budget is met within 2% through ``compressor.prune`` with its defaults.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressor
from compressor.pruning import capture, graph
from compressor.pruning.criteria.hrank import RankAccumulator
from compressor.pruning.plan import Plan
from tests import oracles
from tests.conftest import one_thread, randomize_bn


class _ChannelsLastBlock(nn.Module):
    """stem conv (16) -> x + Permute(LayerNorm -> fc1 (64) -> GELU -> fc2 (16)) -> mean -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.fc = nn.Linear(16, 5)
        self.input_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        y = self.fc2(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        x = x + y.permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


class _MLPHead(nn.Module):
    """conv (8) -> BN -> ReLU -> pool -> fc1 (32) -> ReLU -> fc2 (24) -> ReLU -> classifier (5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8 * 4, 32), nn.Linear(32, 24), nn.Linear(24, 5)
        self.input_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class _NoActivation(nn.Module):
    """conv -> pool -> fc1 (32) -> fc2 (5): fc1 feeds the classifier with no activation between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 5)
        self.input_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(torch.relu(self.conv(x)).mean((2, 3))))


def _made(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(cls()).eval()


def _tiny_convnext() -> nn.Module:
    """torchvision's ConvNeXt class (CNBlock, LayerNorm2d, layer scale) at widths 16/32, one block each."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    m = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5)
    for blk in m.modules():  # non-trivial layer scales and norms, so equality is not vacuous
        if hasattr(blk, "layer_scale"):
            blk.layer_scale.data = torch.rand_like(blk.layer_scale) + 0.5
        if isinstance(blk, nn.LayerNorm):
            blk.weight.data = torch.rand_like(blk.weight) + 0.5
            blk.bias.data = torch.randn_like(blk.bias) * 0.1
    m.input_size = 16
    return m.eval()


def _half_plan(model: nn.Module, names: list[str]) -> Plan:
    """Keep the even channels of each named unit."""
    widths = {u.name: u.width for u in graph.units(model) if u.name in names}
    return Plan(keep={u: tuple(range(0, w, 2)) for u, w in widths.items()}, widths=widths)


# ---------------------------------------------------------------- discovery


def test_channels_last_mlp_is_a_plain_linear_rooted_unit() -> None:
    m = _made(_ChannelsLastBlock)
    d = graph.discovery(m)
    assert [u.name for u in d.units] == ["fc1"]
    u = d.unit("fc1")
    assert (u.kind, u.width, u.convs, u.rank_points, u.rank_acts) == ("plain", 64, ("fc1",), ("fc1",), ("gelu",))
    # the stem width (tied to fc2's output by the add) is normalized by the LayerNorm: no cut of it is exact
    assert not d.skipped and list(d.refused) == ["stem"] and "LayerNorm norm normalizes across" in d.refused["stem"]
    assert graph.discover(m, residual=True).refused == d.refused
    roles = {mb.name: mb.role for mb in d.members["fc1"]}
    assert roles == {"fc1": "out", "fc2": "in"}


def test_mlp_head_units_and_the_classifier_is_never_cut() -> None:
    m = _made(_MLPHead)
    d = graph.discovery(m)
    assert [(u.name, u.kind, u.rank_points, u.rank_acts) for u in d.units] == [
        ("conv", "plain", ("bn",), ("relu",)), ("fc1", "plain", ("fc1",), ("relu",)),
        ("fc2", "plain", ("fc2",), ("relu",))]
    assert "fc3" not in d.kinds and "fc3" not in d.members
    with one_thread():
        small, info = compressor.prune(m, rates={"target": {"macs": 0.5}})
    assert small.fc3.out_features == 5 and small.fc3.in_features == len(info.plan.kept("fc2"))
    assert small.fc1.in_features == 4 * len(info.plan.kept("conv"))  # the flatten follows the conv unit


def test_linear_without_activation_is_a_linear_unit_off_by_default() -> None:
    m = _made(_NoActivation)
    d = graph.discovery(m)
    assert d.skipped == {"fc1": "linear"} and [u.name for u in d.units] == ["conv"]
    assert graph.discover(m, linear=True).unit("fc1").kind == "linear"


@pytest.mark.parametrize("groups,refused", [(4, True), (16, False)])
def test_group_norm_spanning_channels_is_refused(groups: int, refused: bool) -> None:
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(groups, 16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    m.input_size = 8
    d = graph.discovery(m)
    assert ("0" in d.refused) is refused and ("0" in {u.name for u in d.units}) is not refused
    if refused:
        assert d.refused["0"].startswith("GroupNorm 1 normalizes across these channels")


def test_registered_families_keep_their_conv_units_only() -> None:
    from compressor.models import get_model

    m = get_model("vgg16_bn", num_classes=10)  # HRank's VGG: linear1 -> BN1d -> ReLU -> linear2
    assert sum(isinstance(mod, nn.Linear) for mod in m.modules()) == 2
    assert all(isinstance(m.get_submodule(u.name), nn.Conv2d) for u in graph.units(m))
    assert [u.name for u in graph.units(m)] == [u.name for u in oracles.units_of(m)]


# ---------------------------------------------------------------- ranking on channels-last maps


def test_capture_hands_channels_last_outputs_as_channel_maps() -> None:
    m = _made(_ChannelsLastBlock)
    x = oracles.example(m)
    u = graph.discovery(m).unit("fc1")
    mean = capture.MeanActivation()
    capture.record(m, [x], [u], [mean], progress=False)
    with torch.no_grad():
        h = F.gelu(m.fc1(m.norm(torch.relu(m.bn(m.stem(x))).permute(0, 2, 3, 1))))  # [N, H, W, 64]
    torch.testing.assert_close(mean.result()["fc1"], h.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    t = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(capture.channel_maps(t, True)[0, 3], t[0, :, :, 3])
    assert capture.channel_maps(torch.ones(2, 7), True).shape == (2, 7, 1, 1)


def test_hrank_on_an_mlp_head_counts_non_zero_channels() -> None:
    m = _made(_MLPHead)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    u = graph.discovery(m).unit("fc1")
    ranks = RankAccumulator()
    capture.record(m, [x], [u], [ranks], progress=False)
    with torch.no_grad():
        h = torch.relu(m.fc1(F.adaptive_avg_pool2d(torch.relu(m.bn(m.conv(x))), 2).flatten(1)))
    torch.testing.assert_close(ranks.result()["fc1"], (h != 0).float().mean(0))


# ---------------------------------------------------------------- exactness and budgets


@pytest.mark.parametrize("cls,names", [(_ChannelsLastBlock, ["fc1"]), (_MLPHead, ["conv", "fc1", "fc2"])])
def test_rate_zero_and_dead_channels_are_exact(cls: type, names: list[str]) -> None:
    m = _made(cls)
    with one_thread():
        pruned = oracles.assert_exact(m, _half_plan(m, names))
    if cls is _ChannelsLastBlock:  # the hidden width is halved; LayerNorm and the stem width are kept
        assert (pruned.fc1.out_features, pruned.fc2.in_features, pruned.norm.normalized_shape) == (32, 32, (16,))


@pytest.mark.parametrize("cls", [_ChannelsLastBlock, _MLPHead])
def test_budget_within_2_percent_and_exact(cls: type) -> None:
    m = _made(cls)
    with one_thread():
        small, info = compressor.prune(m, oracles.example(m)[:1], {"target": {"macs": 0.5}})  # masked check inside
        assert abs(info.kept["macs"] / 0.5 - 1) <= 0.02
        oracles.assert_exact(m, info.plan)


def test_torchvision_convnext_prunes_its_mlp_widths_within_2_percent_and_exact() -> None:
    m = _tiny_convnext()
    d = graph.discovery(m)
    mlp = [u for u in d.units if isinstance(m.get_submodule(u.name), nn.Linear)]
    assert [(u.name, u.width, u.rank_acts) for u in mlp] == [
        ("features.1.0.block.3", 64, ("gelu",)), ("features.3.0.block.3", 128, ("gelu",))]
    assert "classifier.2" not in d.kinds
    with one_thread():
        small, info = compressor.prune(m, rates={"target": {"macs": 0.5}})
        assert abs(info.kept["macs"] / 0.5 - 1) <= 0.02
        for u in mlp:
            k = len(info.plan.kept(u.name))
            assert small.get_submodule(u.name).out_features == k < u.width
            assert small.get_submodule(u.name.replace("block.3", "block.5")).in_features == k
        oracles.assert_exact(m, info.plan)


def test_taylor_on_a_channels_last_unit_averages_over_its_positions() -> None:
    m = _made(_ChannelsLastBlock)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 3, 8, 8, generator=g), torch.randint(0, 5, (3,), generator=g)
    got = compressor.rank(m, [(x, y)], ["taylor"], progress=False).for_criterion("taylor")["fc1"]
    h = m.fc1(m.norm(torch.relu(m.bn(m.stem(x))).permute(0, 2, 3, 1)))  # [N, H, W, 64], the rank point
    z = m.fc2(F.gelu(h)).permute(0, 3, 1, 2) + torch.relu(m.bn(m.stem(x)))
    (grad,) = torch.autograd.grad(F.cross_entropy(m.fc(z.mean((2, 3))), y, reduction="sum"), [h])
    want = (h * grad).detach().mean((1, 2)).abs().mean(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
