"""Issue 24 item 1: grouped convs (``1 < groups``, not depthwise) are pruned by default.

A unit whose channels a grouped conv reads or makes keeps the same number of channels in every
group (so the conv keeps ``groups``): the policy keeps its counts multiples of lcm(round_to, groups)
and ``make_plan`` picks each group's best (``graph.balanced_keep``). Checked on a small constructed
model (conv -> grouped conv (groups=4) -> conv, with BN/ReLU) and on torchvision's regnet_x_400mf:
rate 0 and dead channels give identical logits, and a MACs budget is met within 2% through
``compressor.prune`` with its defaults.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import compressor
from compressor.pruning import graph, policy
from compressor.pruning.plan import make_plan
from compressor.pruning.rates import RateSpec
from tests import oracles
from tests.conftest import one_thread, randomize_bn

GROUPS = 4


class _GroupedChain(nn.Module):
    """stem -> a (1x1, 48) -> b (3x3, groups=4, 64) -> c (1x1) -> classifier, each conv with BN and ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a, self.ba = nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48)
        self.b, self.bb = nn.Conv2d(48, 64, 3, padding=1, groups=GROUPS, bias=False), nn.BatchNorm2d(64)
        self.c, self.bc = nn.Conv2d(64, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)
        self.input_size = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bs(self.stem(x)))
        x = torch.relu(self.ba(self.a(x)))
        x = torch.relu(self.bb(self.b(x)))
        x = torch.relu(self.bc(self.c(x)))
        return self.fc(x.mean((2, 3)))


def _net() -> _GroupedChain:
    torch.manual_seed(0)
    return randomize_bn(_GroupedChain()).eval()


def _l1(model: nn.Module) -> dict[str, torch.Tensor]:
    return {u.name: model.get_submodule(u.convs[0]).weight.detach().abs().sum((1, 2, 3)) for u in graph.units(model)}


def _per_group(keep: tuple[int, ...], width: int, groups: int) -> list[int]:
    size = width // groups
    return [sum(1 for i in keep if i // size == k) for k in range(groups)]


# ---------------------------------------------------------------- constructed model


def test_grouped_units_are_pruned_by_default_with_their_groups() -> None:
    m = _net()
    d = graph.discovery(m)
    assert d.groups == {"a": GROUPS, "b": GROUPS} and not d.refused and not d.skipped
    assert [u.name for u in d.units] == ["stem", "a", "b", "c"]
    assert graph.keep_multiple(m, "a") == GROUPS and graph.keep_multiple(m, "stem") == 1
    off = _net()
    off.prune_grouped = False
    assert graph.discovery(off).skipped == {"a": "grouped", "b": "grouped"}


def test_make_plan_keeps_each_groups_best_and_the_same_count_per_group() -> None:
    # scores rise with the index, so each group of 6 (a) / 8 (b) keeps its last positions
    widths = {"a": 24, "b": 32}  # (plain numbers: make_plan needs no model)
    scores = {u: torch.arange(float(w)) for u, w in widths.items()}
    spec = RateSpec(rates={"a": 0.5, "b": 0.25})
    plan = make_plan(scores, spec, widths, groups={"a": 4, "b": 4})
    assert plan.kept("a") == (3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23)
    assert _per_group(plan.kept("b"), 32, 4) == [6, 6, 6, 6]
    assert plan.kept("b") == tuple(i for i in range(32) if i % 8 >= 2)
    # without groups the same scores keep the top of the whole layer (groups 0 and 1 emptied)
    assert make_plan(scores, spec, widths).kept("a") == tuple(range(12, 24))
    # a count that is not a multiple of the groups is rounded to the nearest one (18 -> 20 of 24)
    odd = make_plan(scores, RateSpec(rates={"a": 0.25}), {"a": 24}, groups={"a": 4})
    assert _per_group(odd.kept("a"), 24, 4) == [5, 5, 5, 5]


def test_policy_steps_are_lcm_of_round_to_and_groups() -> None:
    cfg = policy.PolicyConfig(round_to=8, multiples={"a": 6, "b": 4})
    assert (cfg.step("a"), cfg.step("b"), cfg.step("stem")) == (24, 8, 8)
    assert cfg.clamp(96, 40, unit="a") == 48 and cfg.clamp(96, 30, unit="a") == 24
    plain = policy.PolicyConfig(multiples={"a": 4})
    assert plain.stepped and plain.clamp(24, 13, unit="a") == 12 and plain.clamp(24, 13) == 13
    assert not policy.PolicyConfig().stepped


@pytest.mark.parametrize("extra", [{}, {"policy": "global"}, {"policy": "global", "round_to": 8}])
def test_budget_within_2_percent_and_exact_on_the_constructed_model(extra: dict) -> None:
    m = _net()
    target = 0.5
    with one_thread():
        small, info = compressor.prune(m, rates={"target": {"macs": target}, **extra})
    assert abs(info.kept["macs"] / target - 1) <= 0.02
    counts = {u: len(info.plan.kept(u)) for u in info.plan.widths}
    step = {"a": math.lcm(extra.get("round_to", 1), GROUPS), "b": math.lcm(extra.get("round_to", 1), GROUPS)}
    for u, s in step.items():
        assert counts[u] % s == 0 and _per_group(info.plan.kept(u), info.plan.widths[u], GROUPS) == [counts[u] // 4] * 4
    assert small.b.groups == GROUPS and small.b.in_channels == counts["a"] and small.b.out_channels == counts["b"]
    assert counts["a"] < 48 and counts["b"] < 64  # the grouped widths are cut, not only the plain ones
    with one_thread():
        oracles.assert_exact(m, info.plan)


def test_rates_file_without_target_rounds_grouped_counts_only() -> None:
    m = _net()
    spec = RateSpec(rates={"stem": 0.25, "a": 0.375, "b": 0.5, "c": 0.25})  # keeps 12/16, 30/48, 32/64, 24/32
    out = policy.resolve(spec, m)
    assert out.keep_counts(policy.unit_widths(m)) == {"stem": 12, "a": 32, "b": 32, "c": 24}  # a: 30 -> 32
    assert out.extra["resolved"]["groups"] == {"a": GROUPS, "b": GROUPS}
    plan = make_plan(_l1(m), out, policy.unit_widths(m))
    assert _per_group(plan.kept("a"), 48, GROUPS) == [8] * 4
    with one_thread():
        oracles.assert_exact(m, plan)


def test_shrunk_copy_for_latency_keeps_groups() -> None:
    m = _net()
    small = policy.shrunk(m, {"a": 12, "b": 8})
    assert (small.b.groups, small.b.in_channels, small.b.out_channels) == (GROUPS, 12, 8)


# ---------------------------------------------------------------- one real model


def test_regnet_prunes_by_default_within_2_percent_and_exact() -> None:
    from compressor.models import get_model

    with one_thread():
        torch.manual_seed(0)
        m = randomize_bn(get_model("torchvision:regnet_x_400mf", num_classes=10, input_size=32)).eval()
        small, info = compressor.prune(m, rates={"target": {"macs": 0.5}})  # its masked check runs inside
        assert abs(info.kept["macs"] / 0.5 - 1) <= 0.02
        groups = graph.discovery(m).groups
        cut = [u for u in info.plan.keep if u in groups]
        assert cut, "no grouped width was cut"
        for u in cut:
            k = len(info.plan.kept(u))
            assert k % groups[u] == 0
            assert set(_per_group(info.plan.kept(u), info.plan.widths[u], groups[u])) == {k // groups[u]}
        grouped = [n for n, c in small.named_modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
        assert [small.get_submodule(n).groups for n in grouped] == [m.get_submodule(n).groups for n in grouped]
        oracles.assert_exact(m, info.plan)


def test_sensitivity_scan_cuts_grouped_units_per_group() -> None:
    from compressor.pruning.sensitivity_scan import analyze

    m = _net()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 5, (4,), generator=g))]
    with one_thread():
        res = analyze(m, _l1(m), batches, rates=(0.3,), units=["a", "b"])
    kept = {r["unit"]: r["kept"] for r in res.rows}
    assert kept == {"a": 32, "b": 44}  # 33 of 48 rounded to a multiple of 4; 44 of 64 is one


def test_describe_says_grouped_units_are_cut_per_group() -> None:
    m = _net()
    out = policy.resolve(RateSpec(rates={}, target={"macs": 0.5}), m)
    assert "2 unit(s) read by grouped convs cut the same number per group" in policy.describe(out)
