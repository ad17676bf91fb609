"""Policies: budget targets met within 1% on every model, global never empties a layer, exact counts."""

from __future__ import annotations

import math

import pytest
import torch

from tests import oracles
from compressor.pruning.graph import units as units_of
from compressor.pruning import counting
from compressor.pruning import criteria
from compressor.pruning import policy
from compressor.errors import UserError
from compressor.models import get_model, list_models
from compressor.pruning.plan import make_plan
from compressor.pruning.rates import RateSpec, load_rates, resolve_rates

CIFAR_MODELS = [m for m in list_models() if not m.endswith("_imagenet")]
# Models built from a cfg (counted by a meta-device rebuild); the others go through the any-CNN engine.
CFG_MODELS = [m for m in CIFAR_MODELS if hasattr(get_model(m), "cfg")]


def widths(m) -> dict[str, int]:
    return policy.unit_widths(m)


def random_scores(m, seed: int = 0) -> dict[str, torch.Tensor]:
    if oracles.described(m):
        return criteria.get("random", seed=seed).score(m, units_of(m), None)
    g = torch.Generator().manual_seed(seed)
    return {u: torch.rand(w, generator=g) for u, w in widths(m).items()}


def spec_for(m, **kw) -> RateSpec:
    rates = kw.pop("rates", None)
    return RateSpec(rates=rates or {u: 0.0 for u in widths(m)}, **kw)


@pytest.mark.parametrize("model_name", CFG_MODELS)
def test_size_counter_matches_rebuilt_model(model_name):
    m = get_model(model_name)
    g = torch.Generator().manual_seed(1)
    keep = {u: max(1, int(w * float(torch.rand((), generator=g) * 0.9 + 0.1))) for u, w in widths(m).items()}
    plan = make_plan(random_scores(m), RateSpec(rates={u: (w - keep[u]) / w for u, w in widths(m).items()}),
                     widths(m), model=model_name)
    assert {u: len(plan.kept(u)) for u in keep} == keep
    assert policy.SizeCounter(m)(keep) == counting.count(oracles.rebuild(m, plan))


@pytest.mark.parametrize("model_name", CIFAR_MODELS)
@pytest.mark.parametrize("pol,target", [("local", {"macs": 0.42}), ("global", {"params": 0.2})])
def test_budget_target_met_within_one_percent(model_name, pol, target):
    m = get_model(model_name)
    out = policy.resolve(spec_for(m, target=target, extra={"policy": pol}), m, random_scores(m))
    r = out.extra["resolved"]
    counts = out.keep_counts(widths(m))
    got = policy.SizeCounter(m).fractions(counts)
    for k, v in target.items():
        assert abs(got[k] / v - 1.0) <= 0.01, (k, got[k])
        assert r["achieved"][k] == pytest.approx(got[k])
    assert r["met"] and "met within 1%" in policy.describe(out)
    assert all(k >= 1 for k in counts.values())


def test_profile_is_scaled_and_matches_the_published_row():
    m = get_model("vgg16_bn")
    names = list(widths(m))
    rates = resolve_rates("[0.21]*7+[0.75]*5", names, short_list=12)
    # the published HRankPlus row keeps 131.17M MACs (41.8% of this counter's 313.46M)
    out = policy.resolve(RateSpec(rates=rates, target={"macs": 131.38e6 / 313.46e6}), m)
    r = out.extra["resolved"]
    assert abs(r["achieved"]["macs"] / r["target"]["macs"] - 1) <= 0.01
    assert 0.9 < r["scale"] < 1.1
    assert out.rates[names[-1]] == 0.0  # conv 13: not in the profile, never pruned
    for u, w in widths(m).items():  # every rate is α·profile, up to one channel of rounding
        assert abs(out.rates[u] - min(1.0, r["scale"] * rates[u])) <= 1.0 / w + 1e-9


def test_local_without_target_is_unchanged_and_bounds_apply_when_given():
    m = get_model("vgg16_bn")
    spec = spec_for(m, rates={u: 0.95 for u in widths(m)})
    assert policy.resolve(spec, m).keep_counts(widths(m)) == spec.keep_counts(widths(m))
    bounded = policy.resolve(spec_for(m, rates={u: 0.95 for u in widths(m)}, extra={"min_keep": 0.25}), m)
    assert all(k >= w // 4 for (u, w), k in zip(widths(m).items(), bounded.keep_counts(widths(m)).values()))


def test_global_never_empties_a_layer():
    m = get_model("vgg16_bn")
    sc = random_scores(m)
    first = next(iter(sc))
    sc[first] = sc[first] * 1e-9  # this layer looks useless next to the others
    for min_keep, rate in ((0.0, 0.9), (0.2, 0.75)):
        extra = {"policy": {"name": "global", "normalize": "none"}, "min_keep": min_keep}
        out = policy.resolve(spec_for(m, rates={u: rate for u in widths(m)}, extra=extra), m, sc)
        counts = out.keep_counts(widths(m))
        assert counts[first] == max(1, math.ceil(min_keep * widths(m)[first]))
        assert all(k >= max(1, min_keep * widths(m)[u]) for u, k in counts.items())
        assert sum(widths(m).values()) - sum(counts.values()) == round(rate * sum(widths(m).values()))
    with pytest.raises(UserError, match="outside what min_keep"):
        policy.resolve(spec_for(m, rates={u: 0.9 for u in widths(m)}, extra={"policy": "global", "min_keep": 0.2}),
                       m, sc)


def test_global_rate_and_normalization():
    m = get_model("vgg16_bn")
    w = widths(m)
    names = list(w)
    sc = {u: torch.ones(n) * (10.0 if i < 2 else 1.0) for i, (u, n) in enumerate(w.items())}
    sc[names[0]] = sc[names[0]].clone()
    sc[names[0]][:8] = 0.0  # 8 clearly weak channels in layer 0
    for how in ("mean", "max", "l2"):  # layer scale no longer matters: the 8 weak ones go first
        extra = {"policy": {"name": "global", "normalize": how}, "min_keep": 0.0}
        out = policy.resolve(RateSpec(rates={u: 0.0 for u in w}, extra=extra), m, sc)
        total = sum(w.values())
        assert out.extra["resolved"]["global_rate"] == 0.0
        out = policy.resolve(RateSpec(rates={u: 8 / total for u in w}, extra=extra), m, sc)
        assert out.keep_counts(w)[names[0]] == w[names[0]] - 8
        assert sum(out.keep_counts(w).values()) == total - 8
    # raw scores: the 10× layers are safe, the 1× layers go first
    extra = {"policy": {"name": "global", "normalize": "none"}, "min_keep": 0.0}
    out = policy.resolve(RateSpec(rates={u: 0.5 for u in w}, extra=extra), m, sc)
    assert out.keep_counts(w)[names[1]] == w[names[1]]


def test_global_plan_keeps_the_globally_chosen_channels():
    m = get_model("vgg16_bn")
    w = widths(m)
    sc = random_scores(m, seed=5)
    out = policy.resolve(RateSpec(rates={u: 0.5 for u in w}, extra={"policy": "global"}), m, sc)
    plan = make_plan(sc, out, w)
    for u, s in sc.items():  # within a layer the plan keeps exactly the top-k by score
        kept = set(plan.kept(u))
        if kept and len(kept) < w[u]:
            assert s[list(kept)].min() >= s[[i for i in range(w[u]) if i not in kept]].max()


def test_unreachable_target_and_bad_keys_say_why(tmp_path):
    m = get_model("vgg16_bn")
    with pytest.raises(UserError, match="out of reach"):
        policy.resolve(spec_for(m, target={"macs": 0.001}, extra={"min_keep": 0.5}), m)
    with pytest.raises(UserError, match="global needs scores"):
        policy.resolve(spec_for(m, extra={"policy": "global"}), m)
    for extra, msg in [({"policy": "globl"}, "unknown policy"), ({"min_keep": 0.8, "max_keep": 0.5}, "min_keep"),
                       ({"policy": {"name": "global", "normalise": "max"}}, "unknown policy option"),
                       ({"policy": {"name": "global", "normalize": "median"}}, "unknown normalization")]:
        with pytest.raises(UserError, match=msg):
            policy.resolve(spec_for(m, extra=extra), m, random_scores(m))


def test_rates_file_with_target_and_policy(tmp_path):
    m = get_model("vgg16_bn")
    p = tmp_path / "r.yaml"
    p.write_text("policy: {name: global, normalize: max}\ntarget: {macs: 0.5}\nmin_keep: 0.2\n")
    spec = load_rates(p, list(widths(m)), model_name="vgg16_bn", short_list=12)
    out = policy.resolve(spec, m, random_scores(m))
    r = out.extra["resolved"]
    assert r["policy"] == "global" and r["normalize"] == "max" and r["met"]
    assert all(k >= 0.2 * w for k, w in zip(out.keep_counts(widths(m)).values(), widths(m).values()))


@pytest.mark.parametrize("pol", ["local", "global"])
def test_injected_counter_and_widths_replace_the_cfg_rebuild(pol):
    """A model not built from a cfg passes its own counter; the answer is the same as the cfg path's."""
    m = get_model("mobilenet_v1")
    w = widths(m)
    ref_counter = policy.SizeCounter(m)
    seen: list[dict[str, int]] = []

    def counter(keep):
        seen.append(dict(keep))
        return ref_counter(keep)

    sc = random_scores(m)
    spec = RateSpec(rates={u: 0.0 for u in w}, target={"macs": 0.4}, extra={"policy": pol})
    ref = policy.resolve(spec, m, sc)
    got = policy.resolve(spec, None, sc, counter=counter, widths=w)
    assert got.keep_counts(w) == ref.keep_counts(w)
    assert got.extra["resolved"]["achieved"] == ref.extra["resolved"]["achieved"]
    assert seen and all(set(k) == set(w) for k in seen)  # the counter always sees every unit
    with pytest.raises(UserError, match="needs the model's conv shapes"):
        policy.resolve(RateSpec(rates={u: 0.0 for u in w}, target={"latency": 0.5}), None, counter=counter, widths=w)
