"""Latency budgets on every model the engine prunes: conv shapes at any widths come from the one size
model (``SizeModel``), and a ``target: {latency: …}`` goes through ``compressor.prune`` end to end."""

from __future__ import annotations

import statistics

import pytest
import torch

import compressor
from compressor.pruning import counting
from compressor.deploy import latency_table as lt
from compressor.pruning import policy
from compressor.errors import UserError
from compressor.models import get_model
from compressor.pruning.graph import discovery
from compressor.pruning.size import SizeModel
from compressor.pruning.rates import RateSpec
from tests.conftest import TINY_VGG, one_thread

# A quarter-width VGG16-BN: big enough that its latency is measurable on a loaded CPU, small enough to time fast.
QUARTER_VGG = [16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M", 128, 128, 128, 128]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "vgg16_bn":
        return get_model("vgg16_bn", cfg=list(TINY_VGG)).eval()
    if name == "vgg16_bn_quarter":
        return get_model("vgg16_bn", cfg=list(QUARTER_VGG)).eval()
    if name.startswith("torchvision:"):
        m = get_model(name.split("+")[0], num_classes=10, input_size=32).eval()
    else:
        m = get_model(name.split("+")[0]).eval()
    if name.endswith("+residual"):
        m.prune_residual = True
    return m


def macs_cost(shape: lt.ConvShape, _s: lt.MeasureSettings) -> float:
    kh, kw = shape.kernel
    return shape.c_in * shape.c_out // shape.groups * kh * kw * shape.hw[0] * shape.hw[1] / 1e6


# Plain chains, residual groups (torchvision's and MobileNet v2's, pruned when asked), depthwise followers
# (MobileNet v1/v2), concat consumers (SqueezeNet), option-A pad shortcuts (refused groups), Linear heads.
SHAPE_MODELS = ["vgg16_bn", "torchvision:resnet18", "torchvision:resnet18+residual", "resnet20", "mobilenet_v1",
                "mobilenet_v2", "mobilenet_v2_res", "squeezenet1_1"]


@pytest.mark.parametrize("name", SHAPE_MODELS)
def test_size_model_shapes_are_those_of_the_cut_model(name):
    """Every conv's and Linear's shape predicted at uneven keep counts is the one surgery builds."""
    m = build(name)
    sm = SizeModel(m, discovery(m))
    g = torch.Generator().manual_seed(3)
    keep = {u: max(1, int(w * float(torch.rand((), generator=g) * 0.8 + 0.15))) for u, w in sm.widths.items()}
    pred = sm.conv_shapes(keep)
    small = policy.shrunk(m, keep)
    built = lt.conv_shapes(small)
    assert {n: s for n, s in pred.items() if not s.linear} == built
    mods = dict(small.named_modules())
    linears = {n: s for n, s in pred.items() if s.linear}
    assert set(linears) == {n for n, mod in mods.items() if isinstance(mod, torch.nn.Linear)}  # SqueezeNet: none
    assert all((s.c_in, s.c_out) == (mods[n].in_features, mods[n].out_features) for n, s in linears.items())
    assert sm.count(keep) == counting.count(small)  # the same size model counts it


def test_latency_conv_shapes_and_size_model_share_one_walk():
    m = build("mobilenet_v2")
    sm = SizeModel(m, discovery(m))
    full = {n: s for n, s in sm.conv_shapes({}).items() if not s.linear}
    assert full == lt.conv_shapes(m)
    dw = [s for s in full.values() if s.depthwise]
    assert dw and all(s.bn and s.act == "ReLU6" for s in dw)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "resnet20", "squeezenet1_1"])
def test_stub_latency_budget_on_models_without_a_cfg(name):
    """A MAC-proportional stub timer: the table's latency fraction is the conv MACs fraction, exactly."""
    m = build(name)
    w = policy.unit_widths(m)
    spec = RateSpec(rates={u: 0.0 for u in w}, target={"latency": 0.7},
                    extra={"policy": {"name": "local", "tolerance": 0.02}}, latency_options={"threads": 1})
    sizer = SizeModel(m, discovery(m))
    out = policy.resolve(spec, m, counter=sizer, widths=w, latency_timer=macs_cost)
    r = out.extra["resolved"]
    assert r["met"] and abs(r["achieved"]["latency"] / 0.7 - 1) <= 0.02
    counts = out.keep_counts(w)
    small = policy.shrunk(m, counts)
    truth = sum(macs_cost(s, None) for s in lt.conv_shapes(small).values())
    full = sum(macs_cost(s, None) for s in lt.conv_shapes(m).values())
    lin = sum(macs_cost(s, None) for s in sizer.conv_shapes(counts).values() if s.linear)
    lin_full = sum(macs_cost(s, None) for s in sizer.conv_shapes({}).values() if s.linear)
    assert (truth + lin) / (full + lin_full) == pytest.approx(r["achieved"]["latency"], rel=1e-9)
    # the bound ``count`` (what api.py passes today) and no counter at all give the same answer
    again = policy.resolve(spec, m, counter=sizer.count, widths=w, latency_timer=macs_cost)
    assert again.keep_counts(w) == counts
    assert policy.resolve(spec, m, latency_timer=macs_cost).keep_counts(w) == counts


def test_a_callable_counter_without_a_model_still_says_what_latency_needs():
    m = build("resnet20")
    w = policy.unit_widths(m)
    count = SizeModel(m, discovery(m)).count
    with pytest.raises(UserError, match="needs the model's conv shapes"):
        policy.resolve(RateSpec(rates={u: 0.0 for u in w}, target={"latency": 0.5}), None,
                       counter=lambda k: count(k), widths=w, latency_timer=macs_cost)


# Measured end to end, on the real timer. On the 2 shared cores this was written on (one thread per run),
# repeated 21-round interleaved timings of one fixed pair of models agreed within ±5% at load average ~2, and
# ranged ±30% at load 3–4 (resnet20: 0.49–0.94 for the same pair; IQRs of half the median). The solver fits its
# correction over 3 timed candidates (``policy._slope``) and solves to its tolerance, so its own estimate is
# held to 15%. The result is timed 3 × 15 rounds and the median held to 15% when those timings are steady
# (interquartile range under 15% of the median); on a machine too loaded for that, only to having saved time.
# resnet20 at batch 8 is so small that fixed per-layer costs keep ~0.71 of its time even at min_keep 0.1 on a
# doubly loaded machine (seen when two suites ran at once): it is asked for 0.8.
@pytest.mark.parametrize("name,target", [("vgg16_bn_quarter", 0.7), ("torchvision:resnet18", 0.7), ("resnet20", 0.8)])
def test_latency_budget_through_prune_is_measured_on_the_result(name, target, capsys):
    m = build(name)
    x = torch.randn(1, 3, 32, 32)
    with one_thread():
        small, info = compressor.prune(m, x, rates={"target": {"latency": target, "batch_size": 8, "threads": 1}})
    r = info.rates.extra["resolved"]
    li = r["latency"]
    assert (li["batch_size"], li["threads"], li["device"]) == (8, 1, "cpu")
    assert li["refine"] and all(h["measured"] > 0 for h in li["refine"])
    assert r["achieved"]["latency"] == li["measured_fraction"]
    assert abs(li["measured_fraction"] / target - 1) <= 0.15
    assert info.kept["macs"] < 1.0
    got = [lt.verify_spec(m, small, info.rates, repeats=15, warmup=2) for _ in range(3)]
    measured = statistics.median(v["measured_fraction"] for v in got)
    steady = all(v[k]["iqr_ms"] < 0.15 * v[k]["median_ms"] for v in got for k in ("base", "pruned"))
    with capsys.disabled():
        print(f"\n{name}: latency target {target}, solver estimate {li['measured_fraction']:.3f}, table predicted "
              f"{r['achieved']['latency_predicted']:.3f}, measured on the result {measured:.3f} "
              f"({measured / target - 1:+.1%}, timings {'steady' if steady else 'disturbed'}); "
              f"MACs kept {info.kept['macs']:.3f}")
    assert measured < 0.95
    if steady:
        assert abs(measured / target - 1) <= 0.15


def test_closed_loop_curve_pools_disturbed_timings_and_inverts():
    """The solver's correction: measured vs table fraction through (1, 1); out-of-order points are pooled."""
    h = [{"predicted": 0.7, "measured": 0.82}]
    c = policy._curve(h)
    assert c == [(0.7, 0.82), (1.0, 1.0)]
    assert policy._table_at(c, 0.7) == pytest.approx(0.7 - 0.12 / 0.6)  # extrapolated on the segment's slope
    h.append({"predicted": 0.5, "measured": 0.52})
    c = policy._curve(h)
    assert policy._table_at(c, 0.7) == pytest.approx(0.5 + 0.2 * 0.18 / 0.30)  # between the two timed points
    assert policy._measured_at(c, 0.6) == pytest.approx(0.67)
    h.append({"predicted": 0.6, "measured": 0.9})  # out of order (a disturbed timing): pooled with (0.7, 0.82)
    c = policy._curve(h)
    assert [m for _, m in c] == sorted(m for _, m in c) and len(c) == 3
    assert policy._first_slope([(0.9, 0.99), (1.0, 1.0)]) == 0.5  # a flat segment is bounded


def test_local_profile_walks_units_that_cross_a_step_together():
    """resnet20's 16/32/64-wide units round at the same α: one unit at a time reaches a 1% budget (without
    the walk, 50 of 152 MACs/params targets from 0.20 to 0.95 failed here, with it 7 do: steps of one channel)."""
    m = build("resnet20")
    w = policy.unit_widths(m)
    sizer = SizeModel(m, discovery(m))
    for t in (0.33, 0.49, 0.55, 0.72):  # each failed before the walk (one α step moved several units)
        out = policy.resolve(RateSpec(rates={u: 0.0 for u in w}, target={"macs": t}), m, counter=sizer)
        assert out.extra["resolved"]["met"], t


@pytest.mark.parametrize("name", ["vgg16_bn_quarter", "torchvision:resnet18"])
def test_latency_budget_through_the_prune_command(name, tmp_path, capsys):
    """The same budget from the CLI: the prune job runs compressor.prune and records the check on the result."""
    import json

    from compressor.cli import main

    ck = compressor.save(build(name), tmp_path / "base.pt")
    rates = tmp_path / "lat.yaml"
    # 0.8, not lower: a quarter-width VGG16-BN at batch 8 cannot go below ~0.74 of its latency on a loaded CPU
    # (fixed per-layer overhead), so a lower target tests the machine's load rather than the command
    rates.write_text("target: {latency: 0.8, batch_size: 8, threads: 1}\n")
    out = tmp_path / "run"
    with one_thread():
        rc = main(["prune", "--checkpoint", str(ck), "--rates", str(rates), "--criterion", "l1", "--eval-n", "40",
                   "--n-images", "32", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    check = summary["latency_check"]
    assert 0 < check["measured_fraction"] < 0.95 and "latency" in check["line"]
    achieved = summary["policy"]["achieved"]
    assert abs(achieved["latency"] / 0.8 - 1) <= 0.15
    assert summary["size_after"]["macs"] < summary["size_before"]["macs"]
