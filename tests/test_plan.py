"""Plans: top-k selection, deterministic tie-breaks, JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.errors import UserError
from compressor.pruning.plan import Plan, make_plan, rank_order
from compressor.pruning.rates import RateSpec


def test_keeps_highest_scores_sorted():
    spec = RateSpec(rates={"a": 0.5})
    plan = make_plan({"a": torch.tensor([0.1, 5.0, 3.0, 0.2])}, spec, {"a": 4})
    assert plan.keep == {"a": (1, 2)}


def test_ties_break_by_tiebreak_then_index():
    s = torch.tensor([2.0, 2.0, 2.0, 1.0])
    assert list(rank_order(s, torch.tensor([0.1, 0.9, 0.5, 9.0]))) == [1, 2, 0, 3]
    assert list(rank_order(s)) == [0, 1, 2, 3]


def test_rate_zero_gives_empty_plan_and_full_kept():
    plan = make_plan({}, RateSpec(rates={"a": 0.0}), {"a": 3})
    assert plan.keep == {} and plan.kept("a") == (0, 1, 2)


def test_wrong_score_length_is_refused():
    with pytest.raises(UserError, match="have 3 entries, the layer has 4"):
        make_plan({"a": torch.ones(3)}, RateSpec(rates={"a": 0.5}), {"a": 4})


def test_json_round_trip(tmp_path):
    plan = make_plan({"a": torch.arange(8.0), "b": -torch.arange(4.0)}, RateSpec(rates={"a": 0.5, "b": 0.25}),
                     {"a": 8, "b": 4, "c": 2}, model="m")
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again == Plan.from_json(json.loads(path.read_text())) and again.to_json() == plan.to_json()
    assert again.kept("a") == (4, 5, 6, 7) and again.kept("b") == (0, 1, 2) and again.kept("c") == (0, 1)


@pytest.mark.parametrize("keep", [(), (2, 1), (0, 0), (0, 9)])
def test_invalid_plans_rejected(keep):
    with pytest.raises(ValueError):
        Plan(keep={"a": keep}, widths={"a": 4})
