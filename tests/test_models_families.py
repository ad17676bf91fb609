"""MobileNet v1/v2 and SqueezeNet 1.0/1.1: metadata, surgery and scoring properties.

Models are built with tiny cfgs (default widths // 8) and random BN statistics and biases,
so the properties are checked on non-trivial logits while the file stays fast.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

from tests import oracles
from compressor.pruning import scores as scores_mod
from compressor.pruning import surgery
from compressor.pruning.counting import count
from compressor.pruning.criteria import get as get_criterion
from compressor.errors import UserError
from compressor.models import get_model, list_models
from compressor.pruning.plan import make_plan
from compressor.pruning.rates import RateSpec, load_rates
from tests.conftest import (assert_same_state as _assert_same_state, logits as _logits,
                            model_input as _x, random_plan as _random_plan, unit_widths as _widths)

CIFAR = ["mobilenet_v1", "mobilenet_v2", "squeezenet1_0", "squeezenet1_1"]
IMAGENET = [f"{n}_imagenet" for n in CIFAR]
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

@lru_cache(maxsize=None)
def _tiny_cfg(name: str) -> tuple:
    return tuple(max(4, c // 8) for c in get_model(name).cfg)


def _model(name: str, seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    m = get_model(name, num_classes=num_classes, cfg=list(_tiny_cfg(name)))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.normal_(0, 0.1)
    return m.eval()


def _feeds_ignored(model: nn.Module) -> set[str]:
    """Units whose channels an ignored layer (the classifier) reads."""
    names = {m: n for n, m in model.named_modules()}
    slots = oracles.channel_map_of(model)
    out: set[str] = set()
    for layer in model.ignored_layers():
        slot = slots.get(f"{names[layer]}.weight")
        if slot is not None:
            out |= {p for p in slot.inp if isinstance(p, str)}
    return out


# --------------------------------------------------------------------------- structure


def test_registered() -> None:
    assert set(CIFAR + IMAGENET) <= set(list_models())


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_forward_shape(name: str) -> None:
    m = _model(name, num_classes=7)
    assert m.arch == name and m.num_classes == 7
    assert m.input_size == (224 if name.endswith("_imagenet") else 32)
    assert _logits(m, _x(m)).shape == (2, 7)


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_metadata_is_consistent(name: str) -> None:
    """Units, cfg positions, channel_map slots and tensor shapes agree with each other."""
    m = get_model(name, cfg=list(_tiny_cfg(name)))
    units = oracles.units_of(m)
    widths = _widths(m)
    assert len(widths) == len(units)
    modules = dict(m.named_modules())
    for u in units:
        assert all(m.cfg[i] == u.width for i in u.cfg_index)
        for c in u.convs:
            assert isinstance(modules[c], nn.Conv2d) and modules[c].out_channels == u.width
            assert modules[c].cp_rate == 0.0
        assert all(modules[b].num_features == u.width for b in u.bns)
        assert all(isinstance(modules[p], (nn.ReLU, nn.ReLU6)) for p in u.rank_points)
    state = m.state_dict()
    for key, slot in oracles.channel_map_of(m).items():
        t = state[key]
        if slot.out is not None:
            assert t.shape[0] == widths[slot.out], key
        if slot.inp:
            assert t.shape[1] == sum(widths[p] if isinstance(p, str) else p for p in slot.inp) * slot.repeat, key
    ignored = m.ignored_layers()
    assert ignored and all(getattr(layer, "out_channels", getattr(layer, "out_features", None)) == m.num_classes
                           for layer in ignored)
    assert not {id(modules[c]) for u in units for c in u.convs} & {id(layer) for layer in ignored}


@pytest.mark.parametrize("name", CIFAR)
def test_bad_cfg_is_a_user_error(name: str) -> None:
    cfg = list(_tiny_cfg(name))
    with pytest.raises(UserError):
        get_model(name, cfg=cfg[:-1])
    with pytest.raises(UserError):
        get_model(name, cfg=cfg[:-1] + [0])


def test_mobilenet_v2_residual_outputs_must_be_tied() -> None:
    cfg = list(get_model("mobilenet_v2").cfg)
    cfg[3] = 20  # output of block 2, tied by a residual add to block 3's output (cfg[5])
    with pytest.raises(UserError, match="tied"):
        get_model("mobilenet_v2", cfg=cfg)


# --------------------------------------------------------------------------- surgery


@pytest.mark.parametrize("name", CIFAR + ["mobilenet_v2_res"])
def test_rate_zero_gives_identical_logits(name: str) -> None:
    m = _model(name)
    x = _x(m)
    plan = make_plan(get_criterion("l1").score(m, oracles.units_of(m), None),
                     RateSpec(rates={u: 0.0 for u in _widths(m)}), _widths(m))
    assert plan.keep == {}
    for method in surgery.METHODS:
        p = surgery.apply(m, plan, method=method)
        assert p is not m and p.cfg == m.cfg
        assert torch.equal(_logits(p, x), _logits(m, x))


def _kill(model: nn.Module, dead: dict[str, list[int]]) -> None:
    """Make channels dead: BN γ=β=0 on every BN that follows the unit (producer and depthwise);
    for units without BN (SqueezeNet), zero the producing conv's weight and bias rows."""
    units = {u.name: u for u in oracles.units_of(model)}
    with torch.no_grad():
        for key, slot in oracles.channel_map_of(model).items():
            if slot.out not in dead:
                continue
            mod_name, attr = key.rsplit(".", 1)
            mod = model.get_submodule(mod_name)
            idx = torch.tensor(dead[slot.out])
            if isinstance(mod, nn.BatchNorm2d) and attr in ("weight", "bias"):
                getattr(mod, attr)[idx] = 0.0
            elif not units[slot.out].bns and mod_name in units[slot.out].convs:
                getattr(mod, attr)[idx] = 0.0


@pytest.mark.parametrize("name", CIFAR)
def test_pruning_dead_channels_keeps_logits(name: str) -> None:
    m = _model(name)
    x = _x(m)
    plan = _random_plan(m, 1 / 3, seed=2)
    _kill(m, {u: [i for i in range(plan.widths[u]) if i not in k] for u, k in plan.keep.items()})
    before = _logits(m, x)
    assert before.abs().sum() > 0 and before.std() > 0
    torch.testing.assert_close(_logits(oracles.rebuild(m, plan), x), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(surgery.apply(m, plan), x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CIFAR)
def test_torch_pruning_matches_rebuild(name: str) -> None:
    m = _model(name)
    x = _x(m)
    plan = _random_plan(m, 0.5, seed=3)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    a = surgery.apply(m, plan, method="torch_pruning", verify=False)
    b = oracles.rebuild(m, plan)
    _assert_same_state(a, b)
    assert a.cfg == b.cfg != m.cfg
    assert torch.equal(_logits(a, x), _logits(b, x))
    for u in oracles.units_of(m):
        rate = 1 - len(plan.kept(u.name)) / u.width
        for c in u.convs:
            assert a.get_submodule(c).cp_rate == pytest.approx(rate) == b.get_submodule(c).cp_rate
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items()), "the input model was mutated"


@pytest.mark.parametrize("name", CIFAR)
def test_torch_pruning_units_feeding_the_classifier(name: str) -> None:
    m = _model(name)
    plan = _random_plan(m, 0.5, seed=4, units=_feeds_ignored(m))
    assert plan.keep
    p = surgery.apply(m, plan)  # verifies against the rebuild path
    assert _logits(p, _x(m)).shape == (2, m.num_classes)


@pytest.mark.parametrize("name", CIFAR)
def test_checkpoint_round_trip(name: str) -> None:
    m = _model(name)
    x = _x(m)
    pruned = oracles.rebuild(m, _random_plan(m, 0.4, seed=5))
    again = get_model(name, num_classes=pruned.num_classes, cfg=pruned.cfg)
    again.load_state_dict(pruned.state_dict())
    assert _widths(again) == _widths(pruned)
    assert torch.equal(_logits(again, x), _logits(pruned, x))
    assert get_model(name).cfg_from_state_dict(pruned.state_dict()) == pruned.cfg


def test_mobilenet_v2_cfg_from_state_dict_reads_block_outputs() -> None:
    cfg = list(_tiny_cfg("mobilenet_v2"))
    cfg[3] = cfg[5] = 3  # stage 2's tied outputs, narrower
    m = get_model("mobilenet_v2", cfg=cfg)
    assert get_model("mobilenet_v2").cfg_from_state_dict(m.state_dict()) == cfg


@pytest.mark.parametrize("name", CIFAR)
def test_classifier_width_unchanged(name: str) -> None:
    m = _model(name, num_classes=13)
    plan = _random_plan(m, 0.6, seed=6)
    for p in (oracles.rebuild(m, plan), surgery.apply(m, plan)):
        layer = p.ignored_layers()[0]
        assert getattr(layer, "out_channels", getattr(layer, "out_features", None)) == 13
        assert _logits(p, _x(m)).shape == (2, 13)


@pytest.mark.parametrize("name", CIFAR)
def test_counts_fall_as_rates_grow(name: str) -> None:
    m = _model(name)
    l1 = get_criterion("l1").score(m, oracles.units_of(m), None)
    counts = []
    for rate in (0.0, 0.3, 0.6):
        plan = make_plan(l1, RateSpec(rates={u: rate for u in _widths(m)}), _widths(m))
        counts.append(count(oracles.rebuild(m, plan)))
    assert counts[0] == count(m)
    for a, b in zip(counts, counts[1:]):
        assert b["params"] < a["params"] and b["macs"] < a["macs"]


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("name", CIFAR)
def test_hrank_scores_every_unit_at_activations(name: str) -> None:
    m = _model(name)
    s = scores_mod.compute(m, [_x(m)], ["hrank"], n_images=2, seed=0, progress=False)
    ranks = s.for_criterion("hrank")
    assert set(ranks) == set(_widths(m))
    modules = dict(m.named_modules())
    for u in oracles.units_of(m):
        assert ranks[u.name].shape == (u.width,) and torch.isfinite(ranks[u.name]).all()
        assert s.tiebreak[u.name].shape == (u.width,)
        # Rank points are activations (ReLU/ReLU6): never a linear-bottleneck (BN, no activation) output.
        for p in u.rank_points:
            assert isinstance(modules[p], (nn.ReLU, nn.ReLU6)), p


@pytest.mark.parametrize("name", CIFAR)
def test_hrank_of_a_dead_channel_is_zero_and_of_a_live_one_is_bounded_by_the_map(name: str) -> None:
    """Known answers: a channel whose BN outputs 0 (gamma = beta = 0) has an all-zero map after the
    activation, rank 0; every rank is at most the map's smaller side."""
    import copy

    from compressor.pruning import graph

    m = copy.deepcopy(_model(name))
    u = graph.units(m)[0]
    norms = [m.get_submodule(mb.name) for mb in graph.discovery(m).members[u.name]  # depthwise followers' too
             if mb.role == "out" and isinstance(m.get_submodule(mb.name), nn.BatchNorm2d)]
    for layer in norms or [m.get_submodule(c) for c in u.convs]:  # no norm (SqueezeNet): the conv's row
        layer.weight.data[1] = 0
        layer.bias.data[1] = 0
    sizes: dict[str, int] = {}
    hooks = [m.get_submodule(p).register_forward_hook(
        lambda mod, i, o, p=p: sizes.__setitem__(p, min(o.shape[-2:]))) for p in u.rank_points]
    try:
        ranks = scores_mod.compute(m, [_x(m)], ["hrank"], n_images=2, seed=0, progress=False).for_criterion("hrank")
    finally:
        for h in hooks:
            h.remove()
    assert ranks[u.name][1] == 0
    assert (ranks[u.name] <= min(sizes.values())).all() and ranks[u.name].max() > 0


def test_mobilenet_v2_never_ranks_linear_bottlenecks() -> None:
    m = get_model("mobilenet_v2", cfg=list(_tiny_cfg("mobilenet_v2")))
    points = {p for u in oracles.units_of(m) for p in u.rank_points}
    convs = {c for u in oracles.units_of(m) for c in u.convs}
    for i in range(1, 18):
        block = m.features[i].conv
        project_bn, project = f"features.{i}.conv.{len(block) - 1}", f"features.{i}.conv.{len(block) - 2}"
        assert isinstance(block[-1], nn.BatchNorm2d) and isinstance(block[-2], nn.Conv2d)
        assert project_bn not in points and project not in convs and f"features.{i}" not in points


# --------------------------------------------------------------------------- interop


@pytest.mark.parametrize("name", ["mobilenet_v2_imagenet", "squeezenet1_0_imagenet", "squeezenet1_1_imagenet"])
def test_torchvision_weights_load(name: str) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = getattr(tv.models, name.removesuffix("_imagenet"))().eval()
    ours = get_model(name, num_classes=1000)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(_logits(ours, x), _logits(ref, x))


def test_mobilenet_v1_hrankplus_keys() -> None:
    from compressor.models.hrank import hrankplus_mobilenet_v1_state_dict as hrankplus_state_dict

    ours = _model("mobilenet_v1")
    seed = nn.Module()  # HRankPlus's positional layout, sharing our tensors
    blocks = list(ours.features.children())
    seed.conv1 = nn.Sequential(*blocks[0].children())
    seed.features = nn.Sequential(*[nn.Sequential(*b.children()) for b in blocks[1:]])
    seed.classifier = nn.Sequential(ours.fc)
    assert "features.12.3.weight" in seed.state_dict()
    fresh = get_model("mobilenet_v1", cfg=ours.cfg)
    fresh.load_state_dict(hrankplus_state_dict(seed.state_dict()))
    x = _x(ours)
    assert torch.equal(_logits(fresh, x), _logits(ours, x))


@pytest.mark.parametrize("path", sorted(p for n in CIFAR for p in (EXPERIMENTS / f"{n}_cifar10").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_rate_files(path: Path) -> None:
    arch = path.parent.name.removesuffix("_cifar10")
    m = get_model(arch, cfg=list(_tiny_cfg(arch)))
    spec = load_rates(path, list(_widths(m)), model_name=arch)
    assert set(spec.rates) == set(_widths(m)) and any(r > 0 for r in spec.rates.values())
    full = get_model(arch)
    plan = make_plan(get_criterion("l1").score(full, oracles.units_of(full), None), spec, _widths(full))
    cfg = oracles.pruned_cfg(full, plan)
    assert get_model(arch, cfg=cfg).cfg == cfg


# --------------------------------------------------------------------------- HRank bookkeeping (models.hrank)

@pytest.mark.parametrize("name", ["vgg16_bn", "vgg16_bn_imagenet", "mobilenet_v2_res"] + CIFAR + IMAGENET)
def test_hrank_bookkeeping_from_names_equals_the_hand_descriptions(name: str) -> None:
    """The cfg positions, compat rank points and group members the library derives from module names are
    exactly the oracle's hand-written ones; so are the cfg and cp_rate it writes for a random plan."""
    from compressor.models import hrank

    m = get_model(name)
    hand = {u.name: u for u in oracles.units_of(m)}
    notes = m.unit_annotations()
    assert notes.keys() == hand.keys()
    assert {u: n["cfg_index"] for u, n in notes.items()} == {u: h.cfg_index for u, h in hand.items()}
    assert {u: n.get("compat_rank_points") for u, n in notes.items()} == {u: h.compat_rank_points for u, h in hand.items()}
    assert hrank.unit_convs(m) == {u: h.convs for u, h in hand.items()}
    plan = _random_plan(m, 0.4, 1)
    assert hrank.pruned_cfg(m, {u: len(plan.kept(u)) for u in plan.widths}) == oracles.pruned_cfg(m, plan)
    ref = get_model(name)
    hrank.set_cp_rates(m, hrank.rates_of_plan(plan))
    oracles.set_cp_rates(ref, plan)
    rates = {n: c.cp_rate for n, c in m.named_modules() if hasattr(c, "cp_rate")}
    assert rates == {n: c.cp_rate for n, c in ref.named_modules() if hasattr(c, "cp_rate")} and any(rates.values())
    assert hrank.rates_of_plan(plan.to_json()) == pytest.approx(hrank.rates_of_plan(plan))


@pytest.mark.parametrize("name", ["vgg16_bn", "vgg16_bn_imagenet"] + CIFAR)
def test_cfg_is_read_off_a_pruned_state_dict(name: str) -> None:
    from compressor.models import hrank

    m = get_model(name)
    cfg = oracles.pruned_cfg(m, _random_plan(m, 0.4, 0))
    assert cfg != m.cfg
    with torch.device("meta"):
        small = get_model(name, cfg=cfg)
    assert hrank.cfg_from_state_dict(m, small.state_dict()) == cfg
