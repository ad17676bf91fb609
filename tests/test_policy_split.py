"""``compressor.pruning.policy`` split into policy_size / policy_solve / policy_latency: its names stay
importable from it, and ``resolve``'s latency options come as one ``LatencyHooks`` (or the older keywords)."""

from __future__ import annotations

import pytest

from compressor.deploy import latency_table as lt
from compressor.pruning import policy, policy_latency, policy_size, policy_solve
from compressor.pruning.rates import RateSpec
from tests.test_grouped import GROUPS, _net

PUBLIC = {
    policy_size: ["BUDGETS", "SizeCounter", "achieved", "engine_counter", "keep_counts_for", "size_model",
                  "unit_groups", "unit_widths"],
    policy_solve: ["NORMALIZERS", "POLICIES", "CoarseSteps", "GlobalOrder", "PolicyConfig", "global_order",
                   "normalized", "policy_config", "precheck", "solve_global", "solve_local"],
    policy_latency: ["LatencyHooks", "attach_latency", "measured_fraction", "shrunk", "_curve", "_first_slope",
                     "_measured_at", "_table_at", "_refine_latency"],
}


def test_every_name_is_still_importable_from_policy() -> None:
    for module, names in PUBLIC.items():
        for name in names:
            assert getattr(policy, name) is getattr(module, name), name
    assert set(policy.__all__) >= {n for names in PUBLIC.values() for n in names if not n.startswith("_")}


def _width_cost(shape: lt.ConvShape, _s: lt.MeasureSettings) -> float:
    """A stub with a known answer: a conv costs its output width in ms."""
    return 0.0 if shape.linear else float(shape.c_out)


def test_latency_hooks_and_the_older_keywords_give_the_same_counts_with_grouped_units() -> None:
    m = _net()
    spec = RateSpec(rates={}, target={"latency": 0.6}, latency_options={"batch_size": 1, "threads": 1})
    hooks = policy.LatencyHooks(timer=_width_cost, cache=False, overhead_ms=0.0)
    a = policy.resolve(spec, m, latency=hooks)
    b = policy.resolve(spec, m, latency_timer=_width_cost, latency_cache=False, latency_overhead_ms=0.0)
    w = policy.unit_widths(m)
    counts = a.keep_counts(w)
    assert counts == b.keep_counts(w)
    assert counts["a"] % GROUPS == 0 and counts["b"] % GROUPS == 0
    r = a.extra["resolved"]
    assert r["met"] and r["achieved"]["latency"] == pytest.approx(0.6, rel=0.01)
    # cost = output width: the latency kept is the fraction of output channels kept (c's 32 and stem's 16 too)
    assert r["achieved"]["latency"] == pytest.approx(sum(counts.values()) / sum(w.values()))


def test_bad_latency_keywords_are_type_errors() -> None:
    m = _net()
    spec = RateSpec(rates={}, target={"macs": 0.5})
    with pytest.raises(TypeError, match="latency_timr"):
        policy.resolve(spec, m, latency_timr=_width_cost)
    with pytest.raises(TypeError, match="not both"):
        policy.resolve(spec, m, latency=policy.LatencyHooks(), latency_cache=False)
