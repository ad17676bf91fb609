"""The any-CNN engine: units from the dependency graph, exact surgery, sizes, v2 checkpoints.

Parametrized over every registered model (tiny widths where the model has a cfg) and the
torchvision classifiers the issue lists, at 32 px so that the suite stays fast.
"""

from __future__ import annotations


import pytest
import torch
import torchvision
from torch import nn

from compressor.storage import checkpoint
from compressor.pruning import counting
from compressor.pruning import policy
from compressor.pruning import surgery
from compressor.pruning.capture import MeanActivation, record
from compressor.errors import UserError
from compressor.models import get_model, list_models
from compressor.pruning.plan import Plan, make_plan
from compressor.pruning import graph
from compressor.pruning.size import SizeModel
from compressor.pruning.rates import RateSpec
from tests import oracles
from tests.oracles import assert_same_function
from tests.conftest import one_thread, randomize_bn

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121"]


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    full = get_model(name)
    cfg = getattr(full, "cfg", None)
    if cfg is None:
        return randomize_bn(full).eval()
    tiny = [c if c == "M" else max(4, c // 8) for c in cfg]
    return randomize_bn(get_model(name, cfg=tiny)).eval()


def _tv(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(get_model(f"torchvision:{name}", num_classes=10, input_size=32)).eval()


MODELS = {**{n: (lambda n=n: _tiny(n)) for n in list_models()}, **{f"tv_{n}": (lambda n=n: _tv(n)) for n in TORCHVISION}}
_BUILT: dict[str, nn.Module] = {}


def _model(key: str) -> nn.Module:
    if key not in _BUILT:
        with one_thread():
            _BUILT[key] = MODELS[key]()
    return _BUILT[key]


def _x(model: nn.Module, n: int = 2) -> torch.Tensor:
    return graph.example_input(model, n, generator=torch.Generator().manual_seed(7))


def _plan(model: nn.Module, frac: float, seed: int = 1) -> Plan:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    units = graph.units(model)
    for u in units:
        groups = graph.keep_multiple(model, u.name)  # a grouped conv's unit keeps the same number per group
        k = max(groups, int(u.width * (1 - frac)) // groups * groups)
        keep[u.name] = graph.balanced_keep(torch.randperm(u.width, generator=g).tolist(), k, u.width, groups)
    return Plan(keep=keep, widths={u.name: u.width for u in units})


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_rate_zero_and_dead_channels_give_identical_logits(key: str) -> None:
    with one_thread():
        m = _model(key)
        units = graph.units(m)
        assert units, key
        x = _x(m)
        full = Plan(keep={u.name: tuple(range(u.width)) for u in units}, widths={u.name: u.width for u in units})
        assert torch.equal(_logits(surgery.apply(m, full), x), _logits(m, x))
        # dead channels: every norm layer that follows a cut channel outputs 0 there (γ = β = 0),
        # or, without a norm, the producing conv's rows are 0; pruning them changes nothing.
        # (Residual groups fed through a channel-mapping shortcut need a dead source as well:
        # test_resnet_cifar builds that case by hand.)
        plan = _plan(m, 0.5)
        plan = Plan(keep={u.name: plan.keep[u.name] for u in units if u.kind != "residual"}, widths=plan.widths)
        units = [u for u in units if u.kind != "residual"]
        dead = oracles.dead_copy(m, plan, units)
        pruned = surgery.apply(dead, plan)
        assert_same_function(pruned, dead, x)
        assert counting.count_params(pruned) < counting.count_params(m)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_size_model_counts_what_the_pruned_model_has(key: str) -> None:
    with one_thread():
        m = _model(key)
        plan = _plan(m, 0.4, seed=3)
        sizer = SizeModel(m, graph.discovery(m))
        assert sizer.count({}) == counting.count(m)
        pruned = surgery.apply(m, plan, verify=False)
        assert sizer.count({u: len(k) for u, k in plan.keep.items()}) == counting.count(pruned)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_v2_checkpoint_round_trip_and_macs_budget(key: str, tmp_path) -> None:
    with one_thread():
        m = _model(key)
        units = graph.units(m)
        widths = {u.name: u.width for u in units}
        g = torch.Generator().manual_seed(5)
        scores = {u.name: torch.rand(u.width, generator=g) for u in units}
        sizer = SizeModel(m, graph.discovery(m))
        # the global policy: at tiny widths one channel of a uniform profile is a coarse step; regnet's
        # grouped units move one channel per group at a time (pruned by default, like every other unit)
        target = 0.6
        spec = policy.resolve(RateSpec(rates={}, target={"macs": target}, extra={"policy": "global"}), m, scores,
                              counter=sizer.count, widths=widths)
        plan = make_plan(scores, spec, widths)
        pruned = surgery.apply(m, plan)
        got = counting.count(pruned)["macs"] / counting.count(m)["macs"]
        assert abs(got - target) <= 0.01 * target, got
        path = checkpoint.save(tmp_path / "p.pt", pruned)
        back, obj = checkpoint.load(path)
        assert obj["format_version"] == 2
        x = _x(m)
        assert torch.equal(_logits(back, x), _logits(pruned, x))


@pytest.mark.parametrize("key", ["vgg16_bn", "mobilenet_v2", "squeezenet1_1", "resnet20", "tv_resnet18",
                                 "tv_mobilenet_v3_large", "tv_efficientnet_b0"])
def test_onnx_export_of_a_pruned_model_verifies(key: str) -> None:
    from compressor.deploy import onnx_export as export

    with one_thread():
        m = _model(key)
        pruned = surgery.apply(m, _plan(m, 0.5), verify=False)
        blob = export.to_onnx_bytes(pruned)
        checks = export.compare(pruned, blob, [("random", _x(m, 3))])
        assert all(c.max_abs_diff <= 1e-4 for c in checks), checks


@pytest.mark.parametrize("name", ["vgg16_bn", "vgg16_bn_imagenet", "mobilenet_v1", "mobilenet_v2", "mobilenet_v2_res",
                                  "squeezenet1_0", "squeezenet1_1"])
def test_discovered_units_equal_the_hand_descriptions(name: str) -> None:
    """The family descriptions are oracles: the graph finds the same units, convs, BNs and
    widths, and its rank points (BN output + activation) capture the same maps."""
    m = _tiny(name)
    hand = {u.name: u for u in oracles.units_of(m)}
    found = {u.name: u for u in graph.discover(m).units}
    assert list(found) == list(hand)
    for n, h in hand.items():
        assert (found[n].convs, found[n].bns, found[n].width) == (h.convs, h.bns, h.width), n
    plain = [u for u in found.values() if u.kind == "plain"]
    a, b = MeanActivation(), MeanActivation()
    x = _x(m, 3)
    record(m, [x], plain, [a], progress=False)
    record(m, [x], [hand[u.name] for u in plain], [b], progress=False)
    for u in plain:
        torch.testing.assert_close(a.result()[u.name], b.result()[u.name], rtol=0, atol=0)


class _ReusedRelu(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)
        self.input_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_reused_relu_is_captured_once_per_unit() -> None:
    m = randomize_bn(_ReusedRelu()).eval()
    units = graph.discover(m).units
    assert [(u.rank_points, u.rank_acts) for u in units] == [(("b1",), ("relu",)), (("b2",), ("relu",))]
    acc = MeanActivation()
    x = torch.randn(4, 3, 16, 16)
    record(m, [x], units, [acc], progress=False)
    want = torch.relu(m.b1(m.c1(x))).mean((0, 2, 3))
    torch.testing.assert_close(acc.result()["c1"], want.detach(), rtol=1e-6, atol=1e-6)
    # the named ReLU as a rank point fires twice per forward: refused, not mixed
    bad = [units[0].__class__(name="c1", convs=("c1",), bns=("b1",), rank_points=("relu",), cfg_index=(), width=8)]
    with pytest.raises(RuntimeError, match="fired 2 times"):
        record(m, [x], bad, [MeanActivation()], progress=False)


class _PadShortcutNet(nn.Module):
    """Option-A shortcuts written with F.pad, as in akamaster's code: the graph merges widths."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)
        self.input_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b0(self.c0(x)))
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        y = torch.relu(y + nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)))
        return self.fc(y.mean((2, 3)))


def test_channel_pad_is_refused_with_the_op_named() -> None:
    m = _PadShortcutNet().eval()
    d = graph.discover(m, residual=True)
    assert "c0" in d.refused and "ConstantPadNd" in d.refused["c0"] and "(0, 0, 0, 0, 4, 4)" in d.refused["c0"]
    assert [u.name for u in d.units] == ["c1"]  # the block-inner conv is still prunable
    with pytest.raises(UserError, match="cannot be pruned safely: op ConstantPadNd"):
        graph.check_prunable(m, ["c0"])


def test_widths_through_a_channel_shuffle_are_refused_in_one_line_each() -> None:
    """ShuffleNet v2: every width that reaches the shuffle (chunk, concat, view/transpose) is refused with its
    reason; the widths inside each branch are units (tests/test_any_cnn.py proves them exact)."""
    m = torchvision.models.shufflenet_v2_x0_5(num_classes=4).eval()
    m.input_size = 32
    d = graph.discover(m)
    assert "stage2.0.branch1.2" in d.refused and "stage2.0.branch2.5" in d.refused and "conv1.0" in {u.name for u in d.units}
    for why in d.refused.values():
        assert "\n" not in why and any(k in why for k in ("Transpose", "Split", "cannot map these channels"))
    with pytest.raises(UserError, match="cannot be pruned safely"):
        graph.check_prunable(m, ["stage2.0.branch2.5"])


def test_layernorm_over_channels_is_refused_not_pruned_wrongly() -> None:
    """ConvNeXt's stage channels are residual and LayerNorm normalises over them: they are refused with
    the norm named, even with residual=True (no cut of them is exact); what is pruned is its MLP hidden
    widths (Linear-rooted units, tests/test_linear_units.py)."""
    with one_thread():
        m = get_model("torchvision:convnext_tiny", num_classes=4, input_size=32).eval()
        d = graph.discover(m, residual=True)
        assert set(d.refused) == {"features.0.0", "features.2.1", "features.4.1", "features.6.1"}
        assert all("LayerNorm" in r and "normalizes across these channels" in r for r in d.refused.values())
        assert len(d.units) == 18 and all(isinstance(m.get_submodule(u.name), nn.Linear) for u in d.units)
        with pytest.raises(UserError, match="cannot be pruned safely: LayerNorm"):
            graph.check_prunable(m, ["features.0.0"])


def test_surgery_keeps_the_callers_dtype_and_rng() -> None:
    m = _tiny("mobilenet_v2").to(torch.float64)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    pruned = surgery.apply(m, _plan(m, 0.5))
    assert torch.equal(torch.get_rng_state(), before)
    assert next(pruned.parameters()).dtype == torch.float64
