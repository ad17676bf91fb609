"""MobileNetV2 with prunable residual groups (``mobilenet_v2_res``): one shared index set per stage.

A residual group is the output channel space of a stage whose blocks are tied by adds; its
unit cuts every member project conv + BN and every consumer's input with the same indices.
Models use tiny widths (default // 8) and random BN statistics, so logits are non-trivial.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests import oracles
from compressor.storage import checkpoint
from compressor.pruning import counting
from compressor.pruning import scores
from compressor.pruning import surgery
from compressor.pruning.criteria import get as get_criterion
from compressor.pruning.criteria.hrank import batch_ranks
from compressor.pruning.graph import units as units_of
from compressor.models import get_model
from compressor.models._spec import PrunableUnit
from compressor.pruning.plan import make_plan
from compressor.pruning.rates import RateSpec, load_rates
from tests.conftest import randomize_bn
from tests.conftest import (assert_same_state as _assert_same_state, logits as _logits,
                            model_input as _x, random_plan as _random_plan, unit_widths as _widths)

NAME = "mobilenet_v2_res"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / f"{NAME}_cifar10"
#: group unit name -> (stage width c, member blocks), from the (t, c, n, s) table
GROUPS = {
    "features.2.conv.2": (24, (2, 3)),
    "features.4.conv.2": (32, (4, 5, 6)),
    "features.7.conv.2": (64, (7, 8, 9, 10)),
    "features.11.conv.2": (96, (11, 12, 13)),
    "features.14.conv.2": (160, (14, 15, 16)),
}


def _tiny_cfg(name: str = NAME) -> list[int]:
    return [max(4, c // 8) for c in get_model(name).cfg]


def _model(name: str = NAME, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(get_model(name, cfg=_tiny_cfg(name)), seed=seed).eval()


def _groups(model: nn.Module) -> list[PrunableUnit]:
    return [u for u in oracles.units_of(model) if u.name in GROUPS]


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", [NAME, f"{NAME}_imagenet"])
def test_units_are_mobilenet_v2s_plus_one_per_residual_group(name: str) -> None:
    plain = get_model(name.replace("_res", ""), cfg=_tiny_cfg(name))
    m = get_model(name, cfg=_tiny_cfg(name))
    units = oracles.units_of(m)
    assert [u for u in units if u.name not in GROUPS] == oracles.units_of(plain)
    assert [u.name for u in _groups(m)] == list(GROUPS)  # network order: after the stage's first hidden unit
    names = [u.name for u in units]
    for g in GROUPS:
        assert names.index(g) == names.index(g.replace("conv.2", "conv.0.0")) + 1
    full = get_model(name)
    for u in _groups(full):
        c, members = GROUPS[u.name]
        assert u.width == c
        assert u.convs == tuple(f"features.{k}.conv.2" for k in members)
        assert u.bns == tuple(f"features.{k}.conv.3" for k in members)
        assert u.rank_points == tuple(f"features.{k}" for k in members)
        assert [full.cfg[i] for i in u.cfg_index] == [c] * len(members)
    # Stages with one block (16 and 320 wide) stay unpruned: blocks 1 and 17 are in no unit.
    convs = {c for u in units for c in u.convs}
    assert "features.1.conv.1" not in convs and "features.17.conv.2" not in convs


@pytest.mark.parametrize("name", [NAME, f"{NAME}_imagenet"])
def test_metadata_is_consistent(name: str) -> None:
    m = get_model(name, cfg=_tiny_cfg(name))
    widths = _widths(m)
    modules = dict(m.named_modules())
    for u in oracles.units_of(m):
        assert all(m.cfg[i] == u.width for i in u.cfg_index)
        assert all(isinstance(modules[c], nn.Conv2d) and modules[c].out_channels == u.width for c in u.convs)
        assert all(modules[c].cp_rate == 0.0 for c in u.convs)
        assert all(modules[b].num_features == u.width for b in u.bns)
    state = m.state_dict()
    slots = oracles.channel_map_of(m)
    for key, slot in slots.items():
        if slot.out is not None:
            assert state[key].shape[0] == widths[slot.out], key
        if slot.inp:
            assert state[key].shape[1] == sum(widths[p] if isinstance(p, str) else p for p in slot.inp), key
    # Every consumer of a group reads it: later members' expand convs and the next stage's first expand conv.
    readers = {g: sorted(k for k, s in slots.items() if g in s.inp) for g in GROUPS}
    for g, (_, members) in GROUPS.items():
        want = [f"features.{k}.conv.0.0.weight" for k in members[1:] + (members[-1] + 1,)]
        assert readers[g] == sorted(want)
        out = sorted(k for k, s in slots.items() if s.out == g)
        assert out == sorted([f"features.{k}.conv.2.weight" for k in members]
                             + [f"features.{k}.conv.3.{t}" for k in members
                                for t in ("weight", "bias", "running_mean", "running_var")])


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v2_imagenet"])
def test_a_mobilenet_v2_state_dict_loads(name: str) -> None:
    src = _model(name)
    dst = get_model(name.replace("v2", "v2_res"), cfg=src.cfg)
    dst.load_state_dict(src.state_dict())
    x = _x(src, n=1)
    assert torch.equal(_logits(dst, x), _logits(src, x))
    assert dst.cfg_from_state_dict(src.state_dict()) == src.cfg


# --------------------------------------------------------------------------- surgery


@pytest.mark.parametrize("which", ["groups", "all"])
def test_pruning_dead_group_channels_keeps_logits(which: str) -> None:
    """Zero γ and β of a channel in every member project BN: the first block's output channel is its
    BN output (0), every later block adds 0 to 0, so the channel is zero throughout the stage and
    its consumers read nothing from it; removing it leaves the logits unchanged."""
    m = _model()
    x = _x(m)
    plan = _random_plan(m, 1 / 3, seed=2, units=set(GROUPS) if which == "groups" else None)
    units = {u.name: u for u in oracles.units_of(m)}
    dead = {u: [i for i in range(plan.widths[u]) if i not in k] for u, k in plan.keep.items()}
    with torch.no_grad():
        for name, idx in dead.items():
            bns = units[name].bns if name in GROUPS else \
                [k.rsplit(".", 1)[0] for k, s in oracles.channel_map_of(m).items() if s.out == name and k.endswith(".1.weight")]
            for bn in bns:  # hidden units: the expand BN and the depthwise BN
                m.get_submodule(bn).weight[idx] = 0.0
                m.get_submodule(bn).bias[idx] = 0.0
    outs: dict[int, torch.Tensor] = {}
    hooks = [m.features[k].register_forward_hook(lambda _m, _i, o, k=k: outs.__setitem__(k, o))
             for _, members in GROUPS.values() for k in members]
    try:
        before = _logits(m, x)
    finally:
        for h in hooks:
            h.remove()
    for g, (_, members) in GROUPS.items():
        if g in dead:
            assert all(outs[k][:, dead[g]].abs().max() == 0 for k in members), g
    assert before.std() > 0
    for method in surgery.METHODS:
        torch.testing.assert_close(_logits(surgery.apply(m, plan, method=method), x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["groups", "all"])
def test_torch_pruning_matches_rebuild(which: str) -> None:
    m = _model()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    plan = _random_plan(m, 0.5, seed=3, units=set(GROUPS) if which == "groups" else None)
    a = surgery.apply(m, plan, method="torch_pruning", verify=False)
    b = oracles.rebuild(m, plan)
    _assert_same_state(a, b)
    assert a.cfg == b.cfg != m.cfg
    for g in _groups(m):  # every member conv of a group keeps the same channels
        keep = torch.tensor(plan.kept(g.name))
        for c in g.convs:
            assert torch.equal(a.get_submodule(c).weight, m.get_submodule(c).weight[keep].index_select(
                1, torch.tensor(plan.kept(c.replace("conv.2", "conv.0.0")))))
            assert a.get_submodule(c).cp_rate == pytest.approx(1 - len(keep) / g.width) == b.get_submodule(c).cp_rate
    x = _x(m)
    assert torch.equal(_logits(a, x), _logits(b, x))
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items()), "the input model was mutated"


def test_imagenet_variant_prunes_groups() -> None:
    m = _model(f"{NAME}_imagenet")
    p = surgery.apply(m, _random_plan(m, 0.5, seed=7))  # torch-pruning, verified against the rebuild
    assert _logits(p, _x(m, n=1)).shape == (1, 1000)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    m = _model()
    x = _x(m)
    plan = _random_plan(m, 0.4, seed=5)
    pruned = surgery.apply(m, plan)
    again = get_model(NAME, num_classes=pruned.num_classes, cfg=pruned.cfg)
    again.load_state_dict(pruned.state_dict())
    assert _widths(again) == _widths(pruned)
    assert torch.equal(_logits(again, x), _logits(pruned, x))
    assert get_model(NAME).cfg_from_state_dict(pruned.state_dict()) == pruned.cfg
    path = checkpoint.save(tmp_path / "p.pt", pruned, plan=plan.to_json())
    net, _ = checkpoint.load(path, model=NAME)
    assert net.cfg == pruned.cfg and torch.equal(_logits(net, x), _logits(pruned, x))
    for g in _groups(net):
        assert all(net.get_submodule(c).cp_rate == pytest.approx(1 - g.width / plan.widths[g.name]) for c in g.convs)


def test_counts_fall_as_the_group_rate_grows() -> None:
    m = _model()
    l1 = get_criterion("l1").score(m, oracles.units_of(m), None)
    counts = []
    for rate in (0.0, 0.3, 0.6):
        plan = make_plan(l1, RateSpec(rates={u: rate if u in GROUPS else 0.0 for u in _widths(m)}), _widths(m))
        counts.append(counting.count(oracles.rebuild(m, plan)))
    assert counts[0] == counting.count(m)
    for a, b in zip(counts, counts[1:]):
        assert b["params"] < a["params"] and b["macs"] < a["macs"]


# --------------------------------------------------------------------------- scoring


def test_l1_of_a_group_is_the_sum_of_member_row_norms() -> None:
    m = _model()
    l1 = get_criterion("l1").score(m, oracles.units_of(m), None)
    for g in _groups(m):
        rows = [m.get_submodule(c).weight.detach().flatten(1).abs().sum(1) for c in g.convs]
        torch.testing.assert_close(l1[g.name], torch.stack(rows).sum(0), rtol=1e-6, atol=0)


def test_hrank_of_a_group_is_the_sum_of_member_bn_ranks() -> None:
    """A residual group is ranked where each member's channels are unambiguous: every member's
    project-BN output (before the add), summed; the discovered rank points say so."""
    m = _model()
    x = _x(m, n=4)
    s = scores.compute(m, [x[:2], x[2:]], ["hrank"], n_images=4, seed=0, progress=False)
    ranks = s.for_criterion("hrank")
    assert set(ranks) == set(_widths(m))
    discovered = {u.name: u for u in units_of(m)}
    outs: dict[str, torch.Tensor] = {}
    bns = {f"features.{k}.conv.3": k for _, members in GROUPS.values() for k in members}
    hooks = [m.get_submodule(b).register_forward_hook(lambda _m, _i, o, b=b: outs.__setitem__(b, o)) for b in bns]
    try:
        _logits(m, x)
    finally:
        for h in hooks:
            h.remove()
    for g in _groups(m):
        members = tuple(f"features.{k}.conv.3" for k in GROUPS[g.name][1])
        assert discovered[g.name].rank_points == members and discovered[g.name].kind == "residual"
        assert ranks[g.name].shape == (g.width,) and s.tiebreak[g.name].shape == (g.width,)
        want = sum(batch_ranks(outs[b]).double().mean(0) for b in members)
        torch.testing.assert_close(ranks[g.name].double(), want.double(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- example rates


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_rate_files(path: Path) -> None:
    full = get_model(NAME)
    spec = load_rates(path, list(_widths(full)), model_name=NAME)
    assert set(spec.rates) == set(_widths(full)) and any(spec.rates[g] > 0 for g in GROUPS)
    plan = make_plan(get_criterion("l1").score(full, oracles.units_of(full), None), spec, _widths(full))
    cfg = oracles.pruned_cfg(full, plan)
    assert get_model(NAME, cfg=cfg).cfg == cfg
    assert all(cfg[i] < full.cfg[i] for g in _groups(full) if spec.rates[g.name] > 0 for i in g.cfg_index)
