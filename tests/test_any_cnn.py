"""Issue 24, "Any CNN, really": norms with an activation inside, grouped convs, bounded discovery.

Every new kind of unit is checked the same way, on a small constructed model and on one real
model: rate 0 gives identical logits, pruning dead channels (norm γ = β = 0, or conv rows 0)
gives identical logits (float64), and the masked-model check (``surgery.verify_masked``) passes.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from compressor.pruning import surgery
from compressor.errors import UserError
from compressor.pruning.plan import Plan
from compressor.pruning import graph
from tests import oracles
from tests.conftest import one_thread, randomize_bn
from tests.oracles import assert_same_function


def _x(model: nn.Module, n: int = 2) -> torch.Tensor:
    return graph.example_input(model, n, generator=torch.Generator().manual_seed(7))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _keep(m: nn.Module, u, frac: float, g: torch.Generator) -> tuple[int, ...]:
    """A random keep set that the unit accepts (the same number per group for grouped units)."""
    groups = graph.keep_multiple(m, u.name)
    k = max(groups, (int(u.width * (1 - frac)) // groups) * groups)
    return graph.balanced_keep(torch.randperm(u.width, generator=g).tolist(), k, u.width, groups)


def check_exact(m: nn.Module, *, kinds: set[str] | None = None, frac: float = 0.5) -> list:
    """Rate 0 and dead channels give identical logits; the masked check passes. Returns the units."""
    units = graph.units(m)
    assert units
    if kinds is not None:
        units = [u for u in units if u.kind in kinds]
    x = _x(m)
    full = Plan(keep={u.name: tuple(range(u.width)) for u in units}, widths={u.name: u.width for u in units})
    assert torch.equal(_logits(surgery.apply(m, full), x), _logits(m, x))
    g = torch.Generator().manual_seed(1)
    plan = Plan(keep={u.name: _keep(m, u, frac, g) for u in units}, widths={u.name: u.width for u in units})
    dead = oracles.dead_copy(m, plan, units)
    pruned, masks = surgery.cut(dead, plan)
    surgery.verify_masked(dead, pruned, masks)
    assert_same_function(pruned, dead, x)
    # and through the public path (surgery.apply verifies the masked model itself)
    surgery.apply(m, plan)
    return units


# ---------------------------------------------------------------- 1. activations inside norm modules


class _BNAct(nn.BatchNorm2d):
    """A BatchNorm that applies its activation itself (as timm's BatchNormAct2d does)."""

    def __init__(self, n: int, act: nn.Module) -> None:
        super().__init__(n)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class _NormActNet(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 12, 3, padding=1, bias=False), _BNAct(12, act())
        self.c1, self.b1 = nn.Conv2d(12, 16, 3, padding=1, bias=False), _BNAct(16, act())
        self.c2, self.b2 = nn.Conv2d(16, 8, 1, bias=False), _BNAct(8, nn.Identity())  # a linear bottleneck
        self.c3, self.b3 = nn.Conv2d(8, 10, 1, bias=False), _BNAct(10, act())
        self.fc = nn.Linear(10, 5)
        self.input_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.c3(self.b2(self.c2(self.b1(self.c1(self.b0(self.c0(x))))))))
        return self.fc(x.mean((2, 3)))


def test_norm_with_activation_inside_is_a_plain_unit_ranked_on_its_output() -> None:
    torch.manual_seed(0)
    m = randomize_bn(_NormActNet()).eval()
    d = graph.discover(m)
    assert d.kinds == {"c0": "plain", "c1": "plain", "c2": "linear", "c3": "plain"}
    u = d.unit("c1")
    assert u.rank_points == ("b1",) and u.rank_acts == ("",) and u.bns == ("b1",)
    assert graph.norms_with_activation(m, _x(m)) == {"b0", "b1", "b3"}
    with one_thread():
        check_exact(m)


def test_norm_activation_capture_sees_the_activated_output() -> None:
    from compressor.pruning.capture import MeanActivation, record

    torch.manual_seed(0)
    m = randomize_bn(_NormActNet(nn.ReLU)).eval()
    acc = MeanActivation()
    record(m, [_x(m, 4)], graph.units(m), [acc], progress=False)
    assert (acc.result()["c1"] >= 0).all()  # ReLU applied inside the norm module


def test_timm_norm_act_models_prune_by_default() -> None:
    timm = pytest.importorskip("timm")
    with one_thread():
        torch.manual_seed(0)
        m = randomize_bn(timm.create_model("mobilenetv2_050", num_classes=10)).eval()
        m.input_size = 32
        d = graph.discover(m)
        assert d.kinds["conv_stem"] == "plain" and d.kinds["blocks.1.0.conv_pw"] == "plain"
        assert d.kinds["blocks.1.0.conv_pwl"] == "residual" and d.kinds["blocks.0.0.conv_pw"] == "linear"
        assert len(d.units) >= 15
        check_exact(m)


# ---------------------------------------------------------------- 4. a time bound on graph discovery


def test_grouping_that_does_not_finish_is_refused_in_one_line(monkeypatch) -> None:
    """A deadline of ~0 s stands in for a grouping that never ends (swin_v2_t, rexnet_100)."""
    from compressor.pruning import bounded

    torch.manual_seed(0)
    m = _NormActNet().eval()
    dg = graph.build_graph(m, _x(m))
    with pytest.raises(UserError, match=r"^.*_NormActNet: torch-pruning's grouping \(get_all_groups\) did not "
                                        r"finish within 1e-09 s") as e:
        with bounded.within(m, "grouping (get_all_groups)", seconds=1e-9):
            list(dg.get_all_groups(root_module_types=[nn.Conv2d]))
    assert "\n" not in str(e.value)
    monkeypatch.setenv("COMPRESSOR_GRAPH_TIMEOUT", "0.000000001")
    with pytest.raises(UserError, match="_NormActNet: torch-pruning's tracing .*did not finish"):
        graph.discover(m)
    monkeypatch.delenv("COMPRESSOR_GRAPH_TIMEOUT")
    assert graph.discover(m).units  # no deadline left behind: the wrappers pass through again


def test_one_width_whose_grouping_does_not_finish_is_refused_and_the_rest_is_grouped(monkeypatch) -> None:
    """A per-root bound inside the whole grouping's: a width torch-pruning loops on (rexnet_100) is refused alone."""
    torch.manual_seed(0)
    m = _NormActNet().eval()
    real = graph.root_s
    monkeypatch.setattr(graph, "root_s", lambda: 1e-9)
    d = graph.discover(m)
    assert not d.units and set(d.refused) == {"c0", "c1", "c2", "c3"}
    assert all("grouping of these channels did not finish within 1e-09 s" in r for r in d.refused.values())
    monkeypatch.setattr(graph, "root_s", real)
    assert {u.name for u in graph.discover(m).units} == {"c0", "c1", "c3"}  # the bound is per call, nothing left


# ---------------------------------------------------------------- 2. grouped convs


class _GroupedNet(nn.Module):
    """A ResNeXt/RegNet-style bottleneck: 1x1 -> grouped 3x3 (groups=4) -> 1x1, plus a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a, self.ba = nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.b, self.bb = nn.Conv2d(24, 24, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(24)
        self.c, self.bc = nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.d = nn.Conv2d(16, 32, 3, padding=1, groups=2)  # grouped, no BN, with bias, out != in
        self.fc = nn.Linear(32, 5)
        self.input_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bs(self.stem(x)))
        y = torch.relu(self.ba(self.a(x)))
        y = torch.relu(self.bb(self.b(y)))
        x = torch.relu(x + self.bc(self.c(y)))
        return self.fc(torch.relu(self.d(x)).mean((2, 3)))


def test_grouped_conv_units_keep_groups_and_are_exact() -> None:
    torch.manual_seed(0)
    m = randomize_bn(_GroupedNet()).eval()
    m.prune_grouped = False  # grouped units are pruned by default; switched off they are listed as skipped
    d = graph.discover(m)
    assert d.groups == {"stem": 2, "a": 4, "b": 4, "d": 2} and not d.refused
    assert d.skipped == {"stem": "residual", "a": "grouped", "b": "grouped", "d": "grouped"}
    with pytest.raises(UserError, match="grouped unit, not pruned by default"):
        graph.check_prunable(m, ["a"])
    m.prune_grouped = True
    assert [u.name for u in graph.units(m)] == ["a", "b", "d"]
    with one_thread():
        check_exact(m)
    m.prune_residual = True  # the residual stem group is read by a grouped conv (d, groups=2)
    with one_thread():
        units = check_exact(m)
    assert {u.name for u in units} == {"stem", "a", "b", "d"}
    g = torch.Generator().manual_seed(3)
    plan = Plan(keep={u.name: _keep(m, u, 0.5, g) for u in units}, widths={u.name: u.width for u in units})
    pruned = surgery.apply(m, plan)
    assert pruned.b.groups == 4 and pruned.b.in_channels == 12 and pruned.d.groups == 2
    from compressor.pruning import shapes
    from compressor.pruning.size import SizeModel
    from compressor.pruning import counting

    assert SizeModel(m, graph.discovery(m)).count({u: len(k) for u, k in plan.keep.items()}) == counting.count(pruned)
    fresh = _GroupedNet()
    shapes.shrink(fresh, shapes.changed_shapes(_GroupedNet(), pruned))
    fresh.load_state_dict(pruned.state_dict())
    x = _x(m)
    assert torch.equal(_logits(fresh, x), _logits(pruned, x))


def test_unbalanced_cut_of_a_grouped_conv_is_an_error_not_a_wrong_model() -> None:
    torch.manual_seed(0)
    m = randomize_bn(_GroupedNet()).eval()
    m.prune_grouped = True
    plan = Plan(keep={"a": tuple(range(12))}, widths={"a": 24})  # groups 0 and 1 whole, 2 and 3 empty
    with pytest.raises(UserError, match="same number of input channels in every group"):
        surgery.cut(m, plan)
    assert graph.balanced_keep(list(range(24))[::-1], 12, 24, 4) == (3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23)


@pytest.mark.parametrize("name", ["regnet_x_400mf", "resnext50_32x4d"])
def test_torchvision_grouped_models_are_exact(name: str) -> None:
    from compressor.models import get_model

    with one_thread():
        torch.manual_seed(0)
        m = randomize_bn(get_model(f"torchvision:{name}", num_classes=10, input_size=32)).eval()
        m.prune_grouped = True
        d = graph.discovery(m)
        assert d.groups and not d.refused
        check_exact(m)


# ---------------------------------------------------------------- 3. residual groups named when they would help


class _ResNet(nn.Module):
    """Most MACs sit in the residual width (stem and the blocks' last convs): only ``a`` is plain."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.c, self.bc = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.a, self.ba = nn.Conv2d(64, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bb = nn.Conv2d(8, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)
        self.input_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bs(self.stem(x)))
        x = torch.relu(x + self.bc(self.c(x)))
        x = torch.relu(x + self.bb(self.b(torch.relu(self.ba(self.a(x))))))
        return self.fc(x.mean((2, 3)))


def test_budget_out_of_reach_without_residual_groups_prunes_them_and_says_so() -> None:
    """``residual=None`` (the default): a MACs budget that only residual groups can reach prunes them too, with a
    note; ``residual=False`` refuses with the hint; a budget within reach without them leaves them alone."""
    import compressor
    from compressor import api

    torch.manual_seed(0)
    m = randomize_bn(_ResNet()).eval()
    with one_thread():
        assert graph.discovery(m).skipped == {"stem": "residual"} and [u.name for u in graph.units(m)] == ["a"]
        with pytest.raises(UserError, match=r"out of reach.*--residual, or residual=True in the API\) it is within "
                                            r"reach") as e:
            compressor.prune(m, rates={"target": {"macs": 0.5}}, residual=False)
        assert "\n" not in str(e.value)
        assert api.auto_residual(m, {"target": {"macs": 0.5}}) and not api.auto_residual(m, {"target": {"macs": 0.98}})
        assert not api.auto_residual(m, {"rates": {"a": 0.5}})  # explicit rates never turn them on
        small, info = compressor.prune(m, rates={"target": {"macs": 0.5}})
        assert abs(info.kept["macs"] - 0.5) <= 0.01 and len(info.plan.kept("stem")) < 64
        assert info.notes[0].startswith("residual groups pruned too") and info.notes[0] in info.summary()
        wide, winfo = compressor.prune(m, rates={"target": {"macs": 0.5}}, residual=True)
        assert winfo.plan.keep == info.plan.keep and not any("residual groups" in n for n in winfo.notes)
        x = _x(m)
        assert _logits(small, x).shape == (2, 5) and torch.equal(_logits(small, x), _logits(wide, x))
        _, near = compressor.prune(m, rates={"target": {"macs": 0.98}})
        assert set(near.plan.keep) == {"a"} and not near.notes
        with pytest.raises(UserError, match="out of reach") as e:  # not even with residual groups: no hint
            compressor.prune(m, rates={"target": {"macs": 0.001}})
        assert "--residual" not in str(e.value)


def res_net(num_classes: int = 10) -> nn.Module:
    """``_ResNet`` as a user's ``module:builder`` for the CLI."""
    return _ResNet(num_classes)


def test_cli_prunes_residual_groups_for_an_out_of_reach_budget_and_says_so(tmp_path, capsys, caplog) -> None:
    """The CLI ranks and prunes with the residual groups when the budget needs them (hrank scores them too), and
    ``--no-residual`` refuses in one line, leaving no run folder."""
    import json

    from compressor.cli import main
    from compressor.storage import checkpoint

    from compressor.models import get_model

    torch.manual_seed(0)
    net = randomize_bn(get_model("tests.test_any_cnn:res_net", num_classes=10, input_size=16)).eval()
    base = checkpoint.save(tmp_path / "base.pt", net)
    (tmp_path / "r.yaml").write_text("target: {macs: 0.5}\n")
    argv = ["prune", "--model", "tests.test_any_cnn:res_net", "--checkpoint", str(base), "--rates",
            str(tmp_path / "r.yaml"), "--criterion", "hrank", "--n-images", "16", "--data", "digits", "--eval-n", "32",
            "--batch-size", "32", "--device", "cpu", "--no-progress"]
    with one_thread():
        assert main([*argv, "--out", str(tmp_path / "auto")]) == 0
        assert "residual groups pruned too: the budget is out of reach without them" in caplog.text
        assert "| stem | 64 → " in capsys.readouterr().out  # the printed table lists the residual width
        units = json.loads((tmp_path / "auto" / "plan.json").read_text())["units"]
        assert len(units["stem"]["keep"]) < 64
        size = json.loads((tmp_path / "auto" / "summary.json").read_text())
        assert size["residual"].startswith("auto")
        assert size["size_after"]["macs"] / size["size_before"]["macs"] == pytest.approx(0.5, abs=0.01)
        # the run's scores.pt (residual units included) is reused as it is: the same plan
        assert main([*argv, "--scores", str(tmp_path / "auto" / "scores.pt"), "--out", str(tmp_path / "again")]) == 0
        assert json.loads((tmp_path / "again" / "plan.json").read_text())["units"] == units
        assert main([*argv, "--no-residual", "--out", str(tmp_path / "off")]) == 2
    err = capsys.readouterr().err.strip()
    assert "out of reach" in err and "--residual" in err and "\n" not in err
    assert not (tmp_path / "off").exists()


def test_lopsided_budget_is_named_in_the_summary() -> None:
    """When the budget is met by cutting the residual width far below the rest, the summary says so."""
    import compressor

    torch.manual_seed(0)
    m = randomize_bn(_ResNet()).eval()
    with one_thread():
        scores = {"stem": torch.linspace(0.01, 0.02, 64), "a": torch.linspace(10, 11, 8)}  # the stem ranks lowest
        _, info = compressor.prune(m, rates={"target": {"macs": 0.5}, "policy": {"name": "global", "tolerance": 0.03}},
                                   residual=True,
                                   scores=scores)
        assert info.notes == ["the budget was met by cutting residual/stem widths far below the rest: stem 44/64 (the "
                              "other units keep 100% at the median)"] and info.notes[0] in info.summary()
        _, even = compressor.prune(m, rates={"target": {"macs": 0.5}}, residual=True)  # stem 45/64, a 5/8
        assert not even.notes
        _, given = compressor.prune(m, rates={"rates": {"stem": 0.8}}, residual=True)  # rates, not a budget
        assert not given.notes


# ---------------------------------------------------------------- 3b. channel splits and shuffles


class _SplitNet(nn.Module):
    """Res2Net's pattern: a conv's output split into chunks of a size fixed in the code, each chunk its own conv."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.stem, self.bs = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.p, self.q = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(12, 5)
        self.input_size = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bs(self.stem(x)))
        a, b = torch.split(torch.relu(self.b1(self.c1(x))), 4, dim=self.dim)
        y = torch.cat([torch.relu(self.p(a)), torch.relu(self.q(b))], 1)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("dim", [1, -3])
def test_a_width_split_by_fixed_sizes_is_refused_and_the_rest_prunes_exactly(dim: int) -> None:
    torch.manual_seed(0)
    m = randomize_bn(_SplitNet(dim)).eval()
    d = graph.discover(m)
    assert "Split on channels" in d.refused["c1"] and "fixed in the model's code" in d.refused["c1"]
    assert {u.name for u in d.units} == {"stem", "p", "q"}
    check_exact(m)


class _GhostNet(nn.Module):
    """GhostNet's module: a 1x1 conv and its depthwise copy concatenated, then a depthwise conv over the concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.p, self.bp = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.cheap, self.bc = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.BatchNorm2d(12)
        self.dw, self.bdw = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False), nn.BatchNorm2d(24)
        self.head = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(16, 5)
        self.input_size = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bs(self.stem(x)))
        a = torch.relu(self.bp(self.p(x)))
        y = torch.cat([a, torch.relu(self.bc(self.cheap(a)))], 1)
        return self.fc(torch.relu(self.head(self.bdw(self.dw(y)))).mean((2, 3)))


def test_a_width_with_its_depthwise_copy_concatenated_prunes_both_copies_exactly() -> None:
    """The depthwise conv over ``cat([a, dw(a)])`` loses two channels per cut channel of ``a``; sizes follow."""
    from compressor.pruning.size import SizeModel

    torch.manual_seed(0)
    m = randomize_bn(_GhostNet()).eval()
    d = graph.discover(m)
    assert {u.name for u in d.units} >= {"stem", "p", "head"} and "p" not in d.refused
    assert {(x.name, x.n) for x in d.members["p"] if x.role == "out"} >= {("p", 12), ("cheap", 12), ("dw", 24)}
    check_exact(m)
    keep = {"p": 5}
    small = surgery.apply(m, Plan(keep={"p": tuple(range(0, 12, 2))[:5]}, widths={"p": 12}))
    assert small.dw.out_channels == 10 and small.cheap.out_channels == 5
    from compressor.pruning import counting

    assert SizeModel(m, d).count(keep) == counting.count(small)


def test_timm_ghostnet_prunes_exactly_to_half_its_macs() -> None:
    timm = pytest.importorskip("timm")
    import compressor

    with one_thread():
        torch.manual_seed(0)
        m = randomize_bn(timm.create_model("ghostnet_050", num_classes=10)).eval()
        m.input_size = 32
        assert any(u.name.endswith("ghost1.primary_conv.0") for u in graph.units(m))
        check_exact(m)
        _, info = compressor.prune(m, rates={"target": {"macs": 0.5}})
        assert abs(info.kept["macs"] - 0.5) <= 0.01


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class _ShuffleNet(nn.Module):
    """ShuffleNet v2's unit: half the channels pass, the other half go through 1x1 -> dw 3x3 -> 1x1, then a
    channel shuffle; the widths inside the branch never meet the shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a, self.ba = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.dw, self.bdw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.BatchNorm2d(12)
        self.b, self.bb = nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head, self.bh = nn.Conv2d(16, 20, 1, bias=False), nn.BatchNorm2d(20)
        self.fc = nn.Linear(20, 5)
        self.input_size = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bs(self.stem(x)))
        x1, x2 = x.chunk(2, dim=1)
        y = torch.relu(self.bb(self.b(self.bdw(self.dw(torch.relu(self.ba(self.a(x2))))))))
        x = _shuffle(torch.cat([x1, y], 1), 2)
        return self.fc(torch.relu(self.bh(self.head(x))).mean((2, 3)))


def test_channel_shuffle_is_refused_where_it_maps_channels_and_the_branch_widths_prune_exactly() -> None:
    torch.manual_seed(0)
    m = randomize_bn(_ShuffleNet()).eval()
    d = graph.discover(m)
    assert {u.name for u in d.units} == {"a", "head"}
    assert set(d.refused) == {"stem", "b"}  # the chunked stem and the branch output that is shuffled
    check_exact(m)


def test_torchvision_shufflenet_v2_prunes_exactly_to_half_its_macs() -> None:
    import compressor
    from compressor.models import get_model

    with one_thread():
        torch.manual_seed(0)
        m = randomize_bn(get_model("torchvision:shufflenet_v2_x0_5", num_classes=10, input_size=32)).eval()
        d = graph.discovery(m)
        inner = {u.name for u in d.units}
        assert {f"stage2.{i}.branch2.0" for i in range(4)} <= inner and "conv1.0" in inner
        assert all(n.endswith("branch2.5") or n.endswith("branch1.2") or "branch" in n for n in d.refused)
        check_exact(m)
        small, info = compressor.prune(m, rates={"target": {"macs": 0.5}})
        assert abs(info.kept["macs"] - 0.5) <= 0.01


# ---------------------------------------------------------------- 5. a timm model source


def test_timm_source_builds_without_weights_and_protects_the_classifier() -> None:
    pytest.importorskip("timm")
    from compressor.models import timm_source

    with pytest.raises(UserError, match="unknown timm model 'resnet1'.*resnet18"):
        timm_source.build("timm:resnet1")
    m = timm_source.build("timm:resnet18", num_classes=7, input_size=32)
    assert (m.arch, m.num_classes, m.input_size, m.in_channels) == ("timm:resnet18", 7, 32, 3)
    assert timm_source.classifier_name(m) == "fc" and m._compressor_ignored == ("fc",)
    cfg = timm_source.data_config(m)
    assert cfg["input_size"] == (3, 224, 224) and len(cfg["mean"]) == 3 and 0 < cfg["crop_pct"] <= 1
    assert timm_source.build("timm:resnet18").input_size == 224
    with one_thread():
        assert "fc" not in {u.name for u in graph.units(m)}


def test_conv_relu_bn_order_keeps_its_conv_rank_point() -> None:
    """Only the norm op is stepped over: a ReLU between a conv and its BN is the unit's activation."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)
            self.input_size = 8

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.b0(torch.relu(self.c0(x))).mean((2, 3)))

    u = graph.discover(Net().eval()).unit("c0")
    assert (u.kind, u.rank_points, u.rank_acts) == ("plain", ("c0",), ("relu",))


def test_a_timm_model_by_name_prunes_saves_and_reloads(tmp_path) -> None:
    """``timm:<name>`` is a model reference like ``torchvision:<name>``: built without weights at the given size,
    pruned through the API, saved and rebuilt from the file alone with identical logits."""
    pytest.importorskip("timm")
    import compressor
    from compressor.models import get_model

    torch.manual_seed(0)
    m = randomize_bn(get_model("timm:resnet18", num_classes=10, input_size=32)).eval()
    assert m.arch == "timm:resnet18" and m.num_classes == 10
    small, info = compressor.prune(m, torch.randn(1, 3, 32, 32), {"target": {"macs": 0.6}, "policy": "global"})
    assert abs(info.kept["macs"] - 0.6) <= 0.01
    back = compressor.load(compressor.save(small, tmp_path / "t.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), small.eval()(x))
