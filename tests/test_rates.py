"""The rates file: grammar, forms, rounding and one-line errors."""

from __future__ import annotations

import pytest

from compressor.errors import UserError
from compressor.rates import RateSpec, load_rates, n_keep, parse_rate_string, resolve_rates

UNITS = [f"u{i}" for i in range(13)]


def test_hrank_string_grammar():
    assert parse_rate_string("[0.21]*7+[0.75]*5") == [0.21] * 7 + [0.75] * 5
    assert parse_rate_string(" [0.95] + [0.5]*6 + [0.9]*4+[0.8]*2 ") == [0.95] + [0.5] * 6 + [0.9] * 4 + [0.8] * 2
    assert parse_rate_string("[0.1, .2, 3e-1]*2") == [0.1, 0.2, 0.3] * 2
    assert parse_rate_string("[0.]*0+[0.5]") == [0.5]


@pytest.mark.parametrize("bad", ["[0.5]*", "[0.5]*-1", "__import__('os')", "[0.5", "0.5", "[0.5]*2.5",
                                 "[0.5]+", "[]", "", "[0.5]*2 [0.1]", "[0.5];import os"])
def test_malformed_strings_are_user_errors(bad):
    with pytest.raises(UserError, match="malformed rate string"):
        parse_rate_string(bad, "r.yaml")


def test_list_string_and_mapping_forms():
    s = resolve_rates("[0.1]*13", UNITS)
    assert s == {u: 0.1 for u in UNITS}
    short = resolve_rates("[0.2]*12", UNITS, short_list=12)
    assert short["u11"] == 0.2 and short["u12"] == 0.0
    m = resolve_rates({"u3": 0.5}, UNITS, default=0.25)
    assert m["u3"] == 0.5 and m["u0"] == 0.25


def test_wrong_length_names_count():
    with pytest.raises(UserError, match="has 11 rates, the model has 12 or 13"):
        resolve_rates([0.1] * 11, UNITS, short_list=12, source="r.yaml")


@pytest.mark.parametrize("value", [1.0, -0.1, "half", True, float("nan")])
def test_rate_out_of_range(value):
    with pytest.raises(UserError, match=r"r.yaml: rates.u1"):
        resolve_rates({"u1": value}, UNITS, source="r.yaml")


def test_unknown_layer_suggests_nearest():
    with pytest.raises(UserError, match="did you mean: u1"):
        resolve_rates({"u1x": 0.1}, UNITS)


def test_rounding_rules():
    # HRankPlus keeps floor(C(1-r)); HRank removes floor(C r); both keep >= 1 channel.
    assert n_keep(64, 0.21, "keep_floor") == 50
    assert n_keep(64, 0.21, "drop_floor") == 51
    assert n_keep(100, 0.3) == 70  # 100*0.7 = 69.999... in floats
    assert n_keep(4, 0.99) == 1 and n_keep(4, 0.99, "drop_floor") == 1
    with pytest.raises(UserError):
        RateSpec(rates={}, rounding="nearest")


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_load_rates_file(tmp_path):
    spec = load_rates(write(tmp_path, 'model: m\nrates: "[0.5]*13"\nrounding: drop_floor\n'), UNITS, model_name="m")
    assert spec.rates["u12"] == 0.5 and spec.rounding == "drop_floor"
    assert spec.keep_counts({"u0": 10}) == {"u0": 5}


@pytest.mark.parametrize("text,match", [
    ("rates: [0.1\n", "not valid YAML"),
    ("- 0.1\n", "must be a YAML mapping"),
    ("ratez: [0.1]\n", "unknown key 'ratez'"),
    ("model: other\nrates: '[0.1]*13'\n", "is for model 'other'"),
    ("target: {macs: 1.5}\n", "target.macs"),
    ("target: {flops: 0.5}\n", "unknown budget"),
])
def test_load_rates_errors_name_file_and_field(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(UserError, match=match) as ei:
        load_rates(p, UNITS, model_name="m")
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_missing_rates_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_rates(tmp_path / "nope.yaml", UNITS)
