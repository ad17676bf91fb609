"""Latency: trustworthy timings (median, IQR, interleaving, settings recorded) and latency budgets."""

from __future__ import annotations

import math

import pytest
import torch

from tests import oracles
from compressor.pruning import criteria
from compressor.deploy import latency as lat
from compressor.deploy import latency_table as lt
from compressor.pruning import policy
from compressor.errors import UserError
from compressor.models import get_model
from compressor.pruning.plan import make_plan
from compressor.pruning.rates import RateSpec, load_rates
from tests.conftest import TINY_VGG


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))


def widths(m) -> dict[str, int]:
    return {u.name: u.width for u in oracles.units_of(m)}


def out_channels_cost(shape: lt.ConvShape, _s: lt.MeasureSettings) -> float:
    """A stub with a known answer: a conv costs its output width in ms (nothing else costs, Linear neither)."""
    return 0.0 if shape.linear else float(shape.c_out)


def macs_cost(shape: lt.ConvShape, _s: lt.MeasureSettings) -> float:
    """Cost proportional to MACs (a Linear's too: kernel 1×1, ``hw[0]`` rows)."""
    kh, kw = shape.kernel
    return shape.c_in * shape.c_out // shape.groups * kh * kw * shape.hw[0] * shape.hw[1] / 1e6


def test_compare_records_spread_and_settings():
    a, b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 2, 3)
    cfg = lat.LatencyConfig(batch_sizes=(2,), warmup=1, repeats=5, threads=1, channels_last=True)
    res = lat.compare({"a": a, "b": b}, 8, cfg)
    t = res["a"][2]
    assert t.q1_ms <= t.median_ms <= t.q3_ms and t.iqr_ms >= 0 and t.min_ms <= t.q1_ms and t.q3_ms <= t.max_ms
    assert t.channels_last and t.threads == 1
    assert t.backends["mkldnn_enabled"] in (True, False) and t.backends["torch"] == torch.__version__
    assert set(t.to_dict()) >= {"median_ms", "iqr_ms", "q1_ms", "q3_ms", "backends"}
    assert a.weight.is_contiguous()  # memory format restored


def test_overlap_and_quartiles():
    mk = lambda q1, q3: lat.Timing("cpu", 1, (q1 + q3) / 2, q1, q3, 5, 1, 1, q1_ms=q1, q3_ms=q3)  # noqa: E731
    assert lat.overlaps(mk(1, 2), mk(1.5, 3)) and not lat.overlaps(mk(1, 2), mk(2.5, 3))
    assert lat.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert lat.quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_conv_shapes_see_bn_activation_and_depthwise():
    with torch.device("meta"):
        m = get_model("mobilenet_v1")
    shapes = lt.conv_shapes(m, m.input_size)
    first = shapes["features.conv_bn.conv"]
    assert (first.c_in, first.c_out, first.hw, first.bn, first.act) == (3, 32, (32, 32), True, "ReLU")
    assert shapes["features.conv_dw1.dw"].depthwise


def _table(m, settings, timer):
    counter = policy.SizeCounter(m)
    return lt.LatencyTable(counter.conv_shapes, widths(m), settings, timer=timer)


def test_cache_is_keyed_by_threads_batch_and_shape():
    m = get_model("vgg16_bn", cfg=list(TINY_VGG))
    calls: list[lt.ConvShape] = []

    def counting(shape, s):
        calls.append(shape)
        return 1.0

    s1 = lt.MeasureSettings(batch_size=1, threads=1)
    t = _table(m, s1, counting)
    first = len(calls)
    assert first > 0 and t.cache.misses == first and t.cache.path.is_file()
    assert str(t.cache.path).startswith(str(lt.cache_dir()))
    _table(m, s1, counting)
    assert len(calls) == first  # everything from disk
    _table(m, lt.MeasureSettings(batch_size=1, threads=2), counting)
    assert len(calls) == 2 * first  # a changed thread count misses
    _table(m, lt.MeasureSettings(batch_size=8, threads=1), counting)
    assert len(calls) == 3 * first  # and so does a changed batch size
    m2 = get_model("vgg16_bn", cfg=[w * 2 if isinstance(w, int) else w for w in TINY_VGG])
    _table(m2, s1, counting)
    assert len(calls) > 3 * first  # other layer shapes: measured
    key = lt.MeasureSettings(device="cpu", threads=3, batch_size=4).env_key("t")
    assert "cpu" in key and "3t" in key and "b4" in key and torch.__version__ in key


def test_interpolation_is_exact_for_mac_proportional_cost():
    m = get_model("vgg16_bn")
    t = _table(m, lt.MeasureSettings(), macs_cost)
    keep = {u: max(1, int(w * f)) for (u, w), f in zip(widths(m).items(), [0.37, 0.81, 0.2, 0.66] * 4)}
    counter = policy.SizeCounter(m)
    truth = sum(macs_cost(s, None) for s in counter.conv_shapes(keep).values())
    assert t.predict(keep) == pytest.approx(truth, rel=1e-9)


@pytest.mark.parametrize("pol", ["local", "global"])
def test_stub_timer_solver_finds_the_known_answer(pol):
    """Cost = output width, so the latency kept is exactly the fraction of channels kept."""
    m = get_model("vgg16_bn")
    sc = criteria.get("random", seed=0).score(m, oracles.units_of(m), None)
    spec = RateSpec(rates={u: 0.0 for u in widths(m)}, target={"latency": 0.5}, extra={"policy": pol},
                    latency_options={"batch_size": 64, "threads": 1})
    out = policy.resolve(spec, m, sc, latency_timer=out_channels_cost)
    r = out.extra["resolved"]
    counts = out.keep_counts(widths(m))
    assert sum(counts.values()) / sum(widths(m).values()) == pytest.approx(0.5, abs=1 / 4224)
    assert r["achieved"]["latency"] == pytest.approx(r["channels_kept"])
    assert r["met"] and r["latency"]["batch_size"] == 64 and r["latency"]["threads"] == 1
    assert r["latency"]["device"] == "cpu" and r["latency"]["torch"] == torch.__version__
    # and the prediction is the stub's cost of the model surgery really builds
    small = oracles.rebuild(m, make_plan(sc, out, widths(m)))
    built = sum(out_channels_cost(s, None) for s in lt.conv_shapes(small, 32).values())
    assert built / r["latency"]["predicted_full_ms"] == pytest.approx(r["achieved"]["latency"])
    assert "of predicted latency" in policy.describe(out)


def test_unreachable_latency_target_names_the_closest_figure():
    m = get_model("vgg16_bn")
    spec = RateSpec(rates={u: 0.0 for u in widths(m)}, target={"latency": 0.1}, extra={"min_keep": 0.5})
    with pytest.raises(UserError, match=r"out of reach.*latency 0\.5\d*") as ei:
        policy.resolve(spec, m, latency_timer=out_channels_cost)
    assert ei.value.exit_code == 2 and "\n" not in str(ei.value)
    with pytest.raises(UserError, match="out of reach"):  # a constant part no pruning removes
        policy.resolve(RateSpec(rates={u: 0.0 for u in widths(m)}, target={"latency": 0.3}), m,
                       latency_timer=out_channels_cost, latency_overhead_ms=10_000)


def test_latency_defaults_and_rates_file(tmp_path):
    m = get_model("vgg16_bn", cfg=list(TINY_VGG))
    p = tmp_path / "r.yaml"
    p.write_text("target: {latency: 0.6, batch_size: 2}\nmin_keep: 0.05\n")
    spec = load_rates(p, list(widths(m)))
    assert spec.target == {"latency": 0.6} and spec.latency_options == {"batch_size": 2}
    spec = RateSpec(rates=spec.rates, target=spec.target, latency_options=spec.latency_options,
                    extra={**spec.extra, "policy": {"name": "local", "tolerance": 0.1}})
    out = policy.resolve(spec, m, latency_timer=out_channels_cost)
    r = out.extra["resolved"]["latency"]
    assert (r["batch_size"], r["threads"], r["device"]) == (2, torch.get_num_threads(), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_latency_without_a_gpu_is_a_user_error():
    m = get_model("vgg16_bn", cfg=list(TINY_VGG))
    spec = RateSpec(rates={u: 0.0 for u in widths(m)}, target={"latency": 0.5}, latency_options={"device": "cuda"})
    with pytest.raises(UserError, match="needs a GPU"):
        policy.precheck(spec)  # before any work
    with pytest.raises(UserError, match="needs a GPU"):
        policy.resolve(spec, m, latency_timer=out_channels_cost)


def test_real_timer_and_verify_on_a_tiny_model():
    torch.manual_seed(0)
    m = get_model("vgg16_bn", cfg=list(TINY_VGG)).eval()
    w = widths(m)
    spec = RateSpec(rates={u: 0.0 for u in w}, target={"latency": 0.7}, latency_options={"threads": 1},
                    extra={"policy": {"name": "local", "tolerance": 0.3}})
    out = policy.resolve(spec, m)  # the torch timer, measured overhead
    info = out.extra["resolved"]["latency"]
    assert info["cache_misses"] > 0 and info["predicted_full_ms"] > 0
    assert math.isfinite(info["overhead_ms"]) and info["overhead_ms"] < info["predicted_full_ms"]
    # closed loop: the candidate itself was timed, and the achieved figure is the measured one
    assert 1 <= len(info["refine"]) <= 3 and all(h["measured"] > 0 for h in info["refine"])
    assert out.extra["resolved"]["achieved"]["latency"] == info["measured_fraction"]
    assert "of measured latency" in policy.describe(out)
    sc = criteria.get("random", seed=0).score(m, oracles.units_of(m), None)
    small = oracles.rebuild(m, make_plan(sc, out, w))
    v = lt.verify_spec(m, small, out, repeats=3, warmup=1)
    assert v is not None and v["measured_fraction"] > 0 and not math.isnan(v["relative_error"])
    assert "predicted" in v["line"] and "measured" in v["line"] and "\n" not in v["line"]
    assert lt.verify_spec(m, small, RateSpec(rates={})) is None
