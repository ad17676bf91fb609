"""Surgery on VGG16-BN: exact logits where the math says so; two paths agree; counts match."""

from __future__ import annotations

import copy

import pytest
import torch

from tests import oracles
from compressor.pruning import counting
from compressor.pruning import surgery
from compressor.errors import UserError
from compressor.models import get_model
from compressor.pruning.plan import Plan, make_plan
from compressor.pruning.rates import RateSpec, resolve_rates


def widths(m):
    return {u.name: u.width for u in oracles.units_of(m)}


def random_plan(m, rate: float, seed: int = 0) -> Plan:
    g = torch.Generator().manual_seed(seed)
    w = widths(m)
    scores = {u: torch.rand(n, generator=g) for u, n in w.items()}
    return make_plan(scores, RateSpec(rates={u: rate for u in w}), w, model=m.arch)


def test_rate_zero_gives_identical_logits(tiny_vgg):
    x = torch.randn(3, 3, 32, 32)
    pruned = surgery.apply(tiny_vgg, random_plan(tiny_vgg, 0.0)).eval()
    assert torch.equal(pruned(x), tiny_vgg(x))


def test_dead_channels_prune_to_identical_logits(tiny_vgg):
    m = tiny_vgg
    plan_keep, g = {}, torch.Generator().manual_seed(1)
    for u in oracles.units_of(m):
        dead = torch.randperm(u.width, generator=g)[: u.width // 2]
        bn = m.get_submodule(u.bns[0])
        bn.weight.data[dead] = 0.0
        bn.bias.data[dead] = 0.0  # ReLU(0) = 0: the channel carries nothing
        plan_keep[u.name] = tuple(sorted(set(range(u.width)) - set(dead.tolist())))
    plan = Plan(keep=plan_keep, widths=widths(m))
    x = torch.randn(4, 3, 32, 32)
    pruned = surgery.apply(m, plan).eval()
    assert pruned.cfg[0] == 4 and pruned.classifier.linear1.in_features == 8  # conv 13 cut via linear1 columns
    assert torch.allclose(pruned(x), m(x), atol=1e-5)


def test_input_model_not_mutated(tiny_vgg):
    before = copy.deepcopy(tiny_vgg.state_dict())
    surgery.apply(tiny_vgg, random_plan(tiny_vgg, 0.5))
    after = tiny_vgg.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and tiny_vgg.cfg[0] == 8


@pytest.mark.parametrize("rate", [0.3, 0.7])
def test_torch_pruning_and_rebuild_agree(tiny_vgg, rate):
    plan = random_plan(tiny_vgg, rate, seed=2)
    a = surgery.prune_with_torch_pruning(tiny_vgg, plan).eval()
    b = oracles.rebuild(tiny_vgg, plan).eval()
    oracles.verify_same(a, b)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    assert a.cfg == b.cfg and all(
        c.cp_rate == pytest.approx(1 - len(plan.kept(n)) / w) for n, w in plan.widths.items()
        for c in [b.get_submodule(n)])


def test_transplant_keeps_every_tensor(tiny_vgg):
    plan = random_plan(tiny_vgg, 0.5, seed=3)
    new = oracles.rebuild(tiny_vgg, plan)
    k0 = torch.tensor(plan.kept("features.conv0"))
    k1 = torch.tensor(plan.kept("features.conv1"))
    assert torch.equal(new.features.conv1.weight, tiny_vgg.features.conv1.weight[k1][:, k0])
    for t in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new.features.norm1, t), getattr(tiny_vgg.features.norm1, t)[k1])
    k13 = torch.tensor(plan.kept("features.conv16"))
    assert torch.equal(new.classifier.linear1.weight, tiny_vgg.classifier.linear1.weight[:, k13])
    assert torch.equal(new.classifier.linear2.weight, tiny_vgg.classifier.linear2.weight)


def test_tampered_plan_detected(tiny_vgg):
    plan = random_plan(tiny_vgg, 0.5)
    bad = Plan(keep=dict(plan.keep), widths={**plan.widths, "features.conv0": 9})
    with pytest.raises(UserError, match="has 8"):
        surgery.apply(tiny_vgg, bad)


# Published (HRankPlus/CHIP READMEs, see ../shared/REFERENCE.md): params, MACs.
PUBLISHED = [
    ("[0.21]*7+[0.75]*5", 2.76e6, 131.17e6),
    ("[0.3]*7+[0.75]*5", 2.50e6, 104.78e6),
    ("[0.45]*7+[0.78]*5", 1.90e6, 66.95e6),
]


@pytest.mark.parametrize("rates,params,macs", PUBLISHED)
def test_published_vgg_counts_within_one_percent(rates, params, macs):
    m = get_model("vgg16_bn").eval()
    w = widths(m)
    spec = RateSpec(rates=resolve_rates(rates, list(w), short_list=12))
    plan = make_plan({u: torch.arange(float(n)) for u, n in w.items()}, spec, w)
    c = counting.count(surgery.apply(m, plan))
    assert abs(c["params"] / params - 1) < 0.01, c
    assert abs(c["macs"] / macs - 1) < 0.01, c


def test_baseline_counts():
    c = counting.count(get_model("vgg16_bn"))
    # conv + linear MACs only; the published 313.73M (HRank's counter) also counts more than that
    assert c["macs"] == 313_463_808 and abs(c["params"] / 14.98e6 - 1) < 0.01
