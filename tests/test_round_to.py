"""round_to: every kept width a multiple of N in every path (plain rates, local budget, global, groups)."""

from __future__ import annotations

import pytest
import torch

from tests import oracles
from compressor.pruning import criteria
from compressor.pruning import policy
from compressor.errors import UserError
from compressor.models import get_model
from compressor.pruning.plan import make_plan
from compressor.pruning.rates import RateSpec, load_rates, resolve_rates, round_keep


def widths(m) -> dict[str, int]:
    return {u.name: u.width for u in oracles.units_of(m)}


def scores(m, seed: int = 0) -> dict[str, torch.Tensor]:
    return criteria.get("random", seed=seed).score(m, oracles.units_of(m), None)


def assert_rounded(counts: dict[str, int], w: dict[str, int], n: int) -> None:
    for u, k in counts.items():
        assert 1 <= k <= w[u], u
        assert k % n == 0 or k == w[u], (u, k, w[u])
        if w[u] >= n:
            assert k >= n, (u, k)


def test_round_keep_rules():
    assert round_keep(64, 50, 8) == 48 and round_keep(64, 52, 8) == 56  # nearest; halves go up
    assert round_keep(64, 3, 8) == 8  # never below N
    assert round_keep(100, 99, 8) == 96  # never above the original
    assert round_keep(100, 100, 8) == 100  # a unit left whole stays whole
    assert round_keep(6, 3, 8) == 6  # narrower than N: kept whole
    assert round_keep(64, 50, 1) == 50
    assert round_keep(64, 11, 8, lo=11) == 16  # inside the policy's bounds when a multiple lies there
    assert round_keep(64, 40, 8, lo=1, hi=30) == 24


def test_plain_rates_are_rounded_in_the_plan(tmp_path):
    m = get_model("vgg16_bn")
    w = widths(m)
    p = tmp_path / "r.yaml"
    p.write_text('rates: "[0.21]*7+[0.75]*5"\nround_to: 8\n')
    spec = load_rates(p, list(w), model_name="vgg16_bn", short_list=12)
    assert spec.round_to == 8 and spec.to_dict()["round_to"] == 8
    out = policy.resolve(spec, m)
    plan = make_plan(scores(m), out, w)
    kept = {u: len(plan.kept(u)) for u in w}
    assert_rounded(kept, w, 8)
    assert kept["features.conv0"] == 48  # floor(64·0.79) = 50 → 48
    assert kept[list(w)[-1]] == 512  # conv 13 is not in the 12-entry profile: whole
    assert out.extra["resolved"]["round_to"] == 8 and "multiples of 8" in policy.describe(out)
    # the Python API, as --round-to will pass it
    api = RateSpec(rates=resolve_rates("[0.21]*7+[0.75]*5", list(w), short_list=12)).replace(round_to=8)
    assert api.keep_counts(w) == kept


@pytest.mark.parametrize("pol,target", [("local", {"macs": 0.5}), ("global", {"macs": 0.5}),
                                        ("local", {"params": 0.3}), ("global", {"params": 0.3})])
def test_budgets_meet_the_target_with_rounded_widths(pol, target):
    m = get_model("vgg16_bn")
    w = widths(m)
    spec = RateSpec(rates={u: 0.0 for u in w}, target=target, extra={"policy": pol}, round_to=8)
    out = policy.resolve(spec, m, scores(m))
    counts = out.keep_counts(w)
    assert_rounded(counts, w, 8)
    got = policy.SizeCounter(m).fractions(counts)
    for k, v in target.items():
        assert abs(got[k] / v - 1) <= 0.01
    assert out.extra["resolved"]["met"]
    assert len(make_plan(scores(m), out, w).kept("features.conv0")) == counts["features.conv0"]


@pytest.mark.parametrize("pol", ["local", "global"])
def test_residual_group_units_are_rounded_and_rebuild(pol):
    m = get_model("mobilenet_v2_res")
    w = widths(m)
    groups = [u.name for u in oracles.units_of(m) if len(u.convs) > 1]
    assert groups  # the residual stages are single units
    sc = scores(m)
    spec = RateSpec(rates={u: 0.0 for u in w}, target={"macs": 0.5}, extra={"policy": pol}, round_to=8)
    out = policy.resolve(spec, m, sc)
    counts = out.keep_counts(w)
    assert_rounded(counts, w, 8)
    assert any(counts[g] < w[g] for g in groups)
    small = oracles.rebuild(m, make_plan(sc, out, w, model="mobilenet_v2_res"))
    assert widths(small) == counts  # every conv of a group has the group's rounded width
    for u in oracles.units_of(small):
        for conv in u.convs:
            assert small.get_submodule(conv).out_channels == counts[u.name]


def test_min_keep_and_rounding_together():
    m = get_model("vgg16_bn")
    w = widths(m)
    spec = RateSpec(rates={u: 0.95 for u in w}, extra={"min_keep": 0.2}, round_to=16)
    counts = policy.resolve(spec, m).keep_counts(w)
    assert_rounded(counts, w, 16)
    assert all(k >= 0.2 * w[u] for u, k in counts.items())


def test_too_coarse_rounding_says_why():
    from tests.conftest import TINY_VGG

    m = get_model("vgg16_bn", cfg=list(TINY_VGG))  # widths 8–32: round_to 8 leaves 1–4 steps per layer
    spec = RateSpec(rates={u: 0.0 for u in widths(m)}, target={"macs": 0.37}, round_to=8)
    with pytest.raises(UserError, match="round_to 8") as ei:
        policy.resolve(spec, m)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("bad", ["round_to: 0", "round_to: -8", "round_to: 2.5", "round_to: true", "round_to: x",
                                 "round_to: 100000"])
def test_bad_round_to_is_a_user_error(tmp_path, bad):
    p = tmp_path / "r.yaml"
    p.write_text(f"default: 0.5\n{bad}\n")
    with pytest.raises(UserError, match="round_to: must be an integer"):
        load_rates(p, ["a", "b"])


@pytest.mark.skipif("resnet56" not in __import__("compressor.models", fromlist=["list_models"]).list_models(),
                    reason="needs the any-CNN engine's CIFAR ResNets")
def test_models_without_a_cfg_use_the_engine_counter_and_round():
    """CIFAR ResNet-56 has no cfg: its residual groups (16/32/64 wide) are counted by the engine."""
    m = get_model("resnet56")
    w = policy.unit_widths(m)
    g = torch.Generator().manual_seed(0)
    sc = {u: torch.rand(n, generator=g) for u, n in w.items()}
    out = policy.resolve(RateSpec(rates={u: 0.0 for u in w}, target={"macs": 0.5}, extra={"policy": "global"},
                                  round_to=8), m, sc)
    counts = out.keep_counts(w)
    assert_rounded(counts, w, 8)
    assert out.extra["resolved"]["met"]
    assert policy.SizeCounter(m).fractions(counts)["macs"] == pytest.approx(out.extra["resolved"]["achieved"]["macs"])
