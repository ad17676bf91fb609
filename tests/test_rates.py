"""The rates file: grammar, forms, rounding and one-line errors."""

from __future__ import annotations

import pytest

from compressor.errors import UserError
from compressor.pruning.rates import RateSpec, load_rates, n_keep, parse_rate_string, resolve_rates

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
    assert resolve_rates(0.25, UNITS) == {u: 0.25 for u in UNITS} == resolve_rates(0.25, UNITS, default=0.5)
    assert resolve_rates(0, UNITS) == {u: 0.0 for u in UNITS}


@pytest.mark.parametrize("value", [1.0, -0.5, float("nan"), float("inf"), True])
def test_one_number_for_every_unit_is_checked(value):
    with pytest.raises(UserError, match="r.yaml: rates"):
        resolve_rates(value, UNITS, source="r.yaml")


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


# ----------------------------------------------------------------------------- hardening
BOMB = ("a: &a [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]\n"
        + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
        + "rates: *i\n")


@pytest.mark.parametrize("text,match", [
    (BOMB, "expands to more than"),
    ("rates: &a [0.1, *a]\n", "recursive alias"),
    ("rates: '[0.1]*13'\nrates: '[0.2]*13'\n", "duplicate key 'rates' \\(line 2\\)"),
    ("rates: {u1: 0.1, u1: 0.2}\n", "duplicate key 'u1'"),
    ('rates: "[0.2]*100000000"\n', "has at least 100000000 rates"),
    ('rates: "[0.2]*' + "9" * 5000 + '"\n', "repeat count of 5000 digits"),
    ("rates: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
    ("rates: [" + "0.1, " * 60000 + "]\n", "larger than 256 KiB"),
    ("policy: global\nrates: '[0.1]*13'\ntarget: {macs: 0.5}\n", "rates' would be ignored"),
    ("target: {macs: 0.5, threads: 2}\n", "only apply to a latency budget"),
    ("target: {latency: 0.5, device: tpu}\n", "target.device: must be 'cpu' or 'cuda"),
    ("target: {latency: 0.5, batch_size: 0}\n", "target.batch_size: must be a positive integer"),
    ("target: {batch_size: 4}\n", "needs a budget"),
    ("x" * 1000 + ": 1\n", "unknown key"),
    ("model: " + "y" * 5000 + "\n", "is for model"),
    ("rates: {" + "z" * 1000 + ": 0.1}\n", "unknown layer"),
    ("rates: " + "q" * 5000 + "\n", "malformed rate string"),
    ("rates: [" + "[0.1], " * 5 + "0.1]\n", "has 6 rates"),
    ("rates: {u1: [" + ", ".join(["0.5"] * 5000) + "]}\n", "rate must be a number"),
    ("rates: {u1: 1" + "0" * 400 + "}\n", "rate must be in"),
    ("target: {macs: 1" + "0" * 400 + "}\n", "budget must be a fraction"),
    ("default: 0.5\nmin_keep: 1" + "0" * 400 + "\n", None),
])
def test_hostile_files_are_one_short_line(tmp_path, text, match):
    p = write(tmp_path, text)
    if match is None:  # accepted by the file reader; the policy rejects it
        from compressor.pruning.policy import policy_config

        with pytest.raises(UserError, match="min_keep") as ei:
            policy_config(load_rates(p, UNITS))
    else:
        with pytest.raises(UserError, match=match) as ei:
            load_rates(p, UNITS, model_name="m")
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < len(str(p)) + 300, msg
    assert ei.value.exit_code == 2


def test_rates_and_target_together_mean_the_target_scales_the_profile(tmp_path):
    spec = load_rates(write(tmp_path, "rates: {u0: 0.5, u1: 0.25}\ntarget: {macs: 0.5}\n"), UNITS)
    assert spec.rates["u0"] == 0.5 and spec.rates["u1"] == 0.25 and spec.target == {"macs": 0.5}
    # the scaling itself: tests/test_policy.py::test_profile_is_scaled_and_matches_the_published_row


def test_merge_keys_are_not_duplicates(tmp_path):
    spec = load_rates(write(tmp_path, "rates: {<<: {u0: 0.5}, u1: 0.2}\n"), UNITS)
    assert spec.rates["u0"] == 0.5 and spec.rates["u1"] == 0.2


# ----------------------------------------------------------------------------- fuzz
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**400), 10**400), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["[0.5]*13", "[0.2]*99999999", "keep_floor", "global",
                                                           "u1", ".nan", "~", "[0.1]*7+[0.2]*6"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                       st.dictionaries(st.one_of(st.sampled_from(UNITS + [
                                                           "rates", "target", "macs", "latency", "name"]),
                                                           st.text(max_size=8)), inner, max_size=5)),
                      max_leaves=25)
keys = st.sampled_from(["model", "rates", "default", "rounding", "round_to", "target", "policy", "min_keep",
                        "max_keep", "notes", "ratez", "batch_size"])


def _dump(v) -> str:
    import json

    return json.dumps(v, allow_nan=True)  # JSON is YAML; nan/inf become YAML strings or errors


@st.composite
def documents(draw) -> str:
    body = draw(st.dictionaries(keys, values, max_size=6))
    lines = [f"{k}: {_dump(v)}" for k, v in body.items()]
    if draw(st.booleans()):  # anchors and aliases, sometimes nested, sometimes recursive
        depth = draw(st.integers(1, 8))
        width = draw(st.integers(1, 12))
        lines.append("a0: &a0 [0.1]")
        for i in range(1, depth + 1):
            lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
        lines.append(f"{draw(st.sampled_from(['rates', 'notes', 'target', 'policy']))}: *a{depth}")
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["rates: &r [*r]", "rates: [0.1]", "{", "- 1", "rates: !!binary aGk=",
                                           "rates: '" + "[0.1]*9" * 50 + "'", "x: " + "[" * 100])))
    return "\n".join(draw(st.permutations(lines))) + "\n"


@settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(text=documents())
def test_fuzz_rates_files_end_in_success_or_user_error(tmp_path, text):
    import time

    p = tmp_path / "fuzz.yaml"
    p.write_text(text)
    t0 = time.perf_counter()
    try:
        spec = load_rates(p, UNITS, model_name="m", short_list=12)
        assert set(spec.rates) == set(UNITS)
    except UserError as exc:
        msg = str(exc)
        assert "\n" not in msg and len(msg) < len(str(p)) + 400, msg
    assert time.perf_counter() - t0 < 2.0
