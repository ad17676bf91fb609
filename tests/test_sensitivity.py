"""Sensitivity: exact drops on constructed models, files written atomically, suggestions that load."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from compressor.storage import checkpoint
from compressor.pruning import policy
from compressor.cli import main
from compressor.models import get_model
from compressor.pruning.graph import units as units_of
from compressor.pruning.rates import load_rates

from compressor.pruning import sensitivity_scan as sens

TINY_VGG = [4, 4, "M", 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, 8]


def dead_channel_vgg() -> nn.Module:
    """Tiny VGG whose conv0 channels 0 and 1 are dead (BN γ = β = 0, so ReLU outputs 0)."""
    torch.manual_seed(0)
    m = get_model("vgg16_bn", cfg=TINY_VGG).eval()
    with torch.no_grad():
        bn = m.features.norm0
        bn.weight[:2] = 0.0
        bn.bias[:2] = 0.0
    return m


def self_labelled(m: nn.Module, n: int = 16) -> list:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = m(x).argmax(1)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def test_pruning_dead_channels_costs_nothing_and_files_are_written(tmp_path):
    m = dead_channel_vgg()
    scores = {u.name: torch.arange(u.width, dtype=torch.float32) for u in units_of(m)}  # 0, 1 lowest
    res = sens.analyze(m, scores, self_labelled(m), [0.5, 0.75], units=["features.conv0", "features.conv1"])
    assert res.baseline_top1 == 100.0
    assert len(res.rows) == 4 and res.units() == ["features.conv0", "features.conv1"]
    row = res.rows[0]
    assert (row["unit"], row["rate"], row["kept"], row["drop"]) == ("features.conv0", 0.5, 2, 0.0)
    assert 0 < row["macs_kept"] < 1 and 0 < row["params_kept"] < 1
    sens.write_csv(res, tmp_path / "s.csv")
    back = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [r["unit"] for r in back] == [r["unit"] for r in res.rows] and float(back[0]["drop"]) == 0.0
    sens.plot(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def _synthetic(m: nn.Module) -> sens.SensitivityResult:
    rows = []
    for i, u in enumerate(units_of(m)):
        for rate in (0.2, 0.4, 0.6, 0.8):
            drop = rate * (1 + i) * 2.0  # later layers are more sensitive
            if i == 0 and rate == 0.8:
                drop = 0.1  # a non-monotone blip must not extend the tolerated range
            rows.append({"unit": u.name, "rate": rate, "width": u.width, "kept": 0, "top1": 90 - drop, "drop": drop,
                         "macs_kept": 1.0, "params_kept": 1.0})
    return sens.SensitivityResult(baseline_top1=90.0, rows=rows)


def test_tolerated_rates_and_budget_suggestion(tmp_path):
    m = get_model("vgg16_bn")
    res = _synthetic(m)
    tol = sens.tolerated_rates(res, 1.0)
    names = [u.name for u in units_of(m)]
    assert tol[names[0]] == 0.4 and tol[names[1]] == 0.2 and tol[names[-1]] == 0.0
    assert sens.predicted_drop(res, names[1], 0.3) == pytest.approx(1.2)  # 4 · rate
    spec, info = sens.suggest(res, m, 1.0, target={"macs": 0.6})
    assert abs(info["achieved"]["macs"] / 0.6 - 1) <= 0.01
    assert spec.rates[names[0]] > 0.4 and spec.rates[names[-1]] == 0.0  # the robust layer pays, not the fragile one
    text = sens.suggestion_yaml(spec, info, "vgg16_bn", header="made by a test")
    p = tmp_path / "suggested.yaml"
    p.write_text(text)
    loaded = load_rates(p, names, model_name="vgg16_bn")
    w = {u.name: u.width for u in units_of(m)}
    assert loaded.keep_counts(w) == spec.keep_counts(w)
    assert policy.SizeCounter(m).fractions(loaded.keep_counts(w))["macs"] == pytest.approx(info["achieved"]["macs"])


def test_cli_sensitivity_on_digits(tmp_path, capsys):
    torch.manual_seed(0)
    ck = checkpoint.save(tmp_path / "tiny.pt", get_model("vgg16_bn", cfg=TINY_VGG))
    out = tmp_path / "sens"
    rc = main(["sensitivity", "--model", "vgg16_bn", "--checkpoint", str(ck), "--layers", "features.conv0",
               "--rates", "0.5,0.25", "--n-eval", "32", "--n-images", "8", "--criterion", "hrank", "--no-progress",
               "--target", "macs=0.8", "--out", str(out)])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"sensitivity.csv", "sensitivity.png", "suggested_rates.yaml",
                                               "sensitivity.json"}
    assert "suggested rates keep" in capsys.readouterr().out
    assert main(["sensitivity", "--model", "vgg16_bn", "--checkpoint", str(ck), "--layers", "conv0",
                 "--out", str(out)]) == 2
