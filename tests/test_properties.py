"""Property-based tests (hypothesis): random rates on every registered CIFAR model.

For any per-unit rates in [0, 0.95] and either rounding rule, the pruned model runs with
the right output shape, keeps exactly ``n_keep`` (>= 1) channels per unit, never has more
params or MACs than the original, and survives a checkpoint save/load with identical
logits; its plan survives a JSON round trip. HRank rate strings round trip through the
parser. Models use tiny widths and few examples, so the file stays fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compressor.pruning.graph import units as units_of
from compressor.storage import checkpoint
from compressor.pruning import surgery
from compressor.pruning.counting import count
from compressor.models import get_model, list_models
from compressor.pruning.plan import Plan, make_plan
from compressor.pruning.rates import ROUNDING, RateSpec, n_keep, parse_rate_string
from tests.conftest import TINY_VGG, randomize_bn

# cfg-built models (the properties below rebuild from a cfg); the ResNets are in test_engine/test_resnet_cifar
CIFAR_MODELS = [n for n in list_models() if get_model(n).input_size == 32 and hasattr(get_model(n), "cfg")]
PROPS = settings(max_examples=10, deadline=None, derandomize=True, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@lru_cache(maxsize=None)
def _tiny_cfg(name: str) -> tuple:
    if name == "vgg16_bn":
        return tuple(TINY_VGG)
    return tuple(c if c == "M" else max(4, c // 8) for c in get_model(name).cfg)


@lru_cache(maxsize=None)
def _base_state(name: str) -> dict:
    torch.manual_seed(0)
    m = randomize_bn(get_model(name, cfg=list(_tiny_cfg(name))))
    with torch.no_grad():  # non-zero biases too, so equality checks are not vacuous
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.normal_(0, 0.1)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _base(name: str) -> nn.Module:
    m = get_model(name, cfg=list(_tiny_cfg(name)))
    m.load_state_dict(_base_state(name))
    return m.eval()


def _x(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_every_cifar_family_is_covered():
    assert {"vgg16_bn", "mobilenet_v1", "mobilenet_v2", "squeezenet1_0", "squeezenet1_1"} <= set(CIFAR_MODELS)


@pytest.mark.parametrize("name", CIFAR_MODELS)
@PROPS
@given(data=st.data())
def test_random_rates_give_a_valid_smaller_model(name, data):
    base = _base(name)
    units = units_of(base)
    widths = {u.name: u.width for u in units}
    rates = data.draw(st.lists(st.floats(0.0, 0.95), min_size=len(units), max_size=len(units)), label="rates")
    rounding = data.draw(st.sampled_from(ROUNDING), label="rounding")
    method = data.draw(st.sampled_from(surgery.METHODS), label="surgery")
    seed = data.draw(st.integers(0, 2**16), label="score seed")
    spec = RateSpec(rates=dict(zip(widths, rates)), rounding=rounding)
    g = torch.Generator().manual_seed(seed)
    plan = make_plan({u: torch.rand(w, generator=g) for u, w in widths.items()}, spec, widths, model=name)

    pruned = surgery.apply(base, plan, method=method).eval()
    x = _x(base.input_size)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (2, base.num_classes) and torch.isfinite(out).all()

    # Exactly n_keep channels per unit, never fewer than 1; every conv/linear keeps >= 1 in and out.
    after = {u.name: pruned.get_submodule(u.name).out_channels for u in units}
    assert after == {u: n_keep(w, spec.rates[u], rounding) for u, w in widths.items()}
    assert min(after.values()) >= 1
    for mod in pruned.modules():
        if isinstance(mod, nn.Conv2d):
            assert mod.in_channels >= 1 and mod.out_channels >= 1
        elif isinstance(mod, nn.Linear):
            assert mod.in_features >= 1 and mod.out_features >= 1

    c0, c1 = count(base), count(pruned)
    assert c1["params"] <= c0["params"] and c1["macs"] <= c0["macs"]
    if all(after[u] == w for u, w in widths.items()):
        assert c1 == c0

    # Plan JSON: text, dict and the kept channels all survive exactly.
    text = json.dumps(plan.to_json())
    back = Plan.from_json(json.loads(text))
    assert json.dumps(back.to_json()) == text
    assert back.widths == plan.widths and all(back.kept(u) == plan.kept(u) for u in widths)

    # Checkpoint round trip: same cfg, same tensors, same logits.
    with tempfile.TemporaryDirectory() as d:
        path = checkpoint.save(Path(d) / "p.pt", pruned, plan=plan.to_json(), rates=spec.to_dict())
        net, meta = checkpoint.load(path, model=name)
        assert sorted(p.name for p in Path(d).iterdir()) == ["p.pt"]  # no temp file left behind
    assert net.cfg == pruned.cfg and meta["plan"] == plan.to_json()
    with torch.no_grad():
        assert torch.equal(net.eval()(x), out)
    for u in units_of(net):
        assert net.get_submodule(u.name).cp_rate == pytest.approx(1 - after[u.name] / widths[u.name])


# --------------------------------------------------------------------------- rate strings
_RATE = st.floats(0.0, 0.999, allow_nan=False, allow_infinity=False)
_RUNS = st.lists(st.tuples(st.lists(_RATE, min_size=1, max_size=3), st.integers(0, 6)), min_size=1, max_size=6)


def _format(runs) -> str:
    """HRank's syntax with full float precision: ``[a, b]*n+[c]``."""
    return "+".join("[" + ", ".join(repr(float(v)) for v in block) + "]" + (f"*{n}" if n != 1 else "")
                    for block, n in runs)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(runs=_RUNS)
def test_rate_string_round_trip(runs):
    expected = [v for block, n in runs for v in block * n]
    assert parse_rate_string(_format(runs)) == expected
    assert parse_rate_string(" " + _format(runs).replace("+", " + ").replace("*", " * ") + " ") == expected


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rates=st.lists(st.integers(0, 99).map(lambda i: i / 100), min_size=1, max_size=20))
def test_report_rate_string_round_trips_hrank_style_rates(rates):
    from compressor.reporting.report import rate_string

    assert parse_rate_string(rate_string(rates)) == rates


@settings(max_examples=20, deadline=None, derandomize=True)
@given(rates=st.lists(_RATE, min_size=1, max_size=20))
def test_report_rate_string_round_trips_any_rate(rates):
    from compressor.reporting.report import rate_string

    assert parse_rate_string(rate_string(rates)) == rates
