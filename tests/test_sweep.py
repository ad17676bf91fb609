"""Sweeps: budgets become uniform rates by bisection; an interrupted sweep resumes without redoing work."""

from __future__ import annotations

import json

import pytest
import torch

from tests import oracles
from compressor.storage import checkpoint
from compressor.pruning import counting
from compressor.jobs import pipeline
from compressor.jobs import sweep
from compressor.errors import UserError
from compressor.deploy.latency import LatencyConfig
from compressor.models import get_model
from compressor.pruning.plan import make_plan
from compressor.reporting.report import ReportConfig
from compressor.pruning.scores import Scores
from compressor.training.train import TrainConfig
from tests.conftest import one_thread

NARROW = [8, 8, "M", 8, 16, "M", 16, 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, 16]


@pytest.fixture
def baseline(tmp_path):
    torch.manual_seed(0)
    return checkpoint.save(tmp_path / "baseline.pt", get_model("vgg16_bn", cfg=list(NARROW)),
                           prov=checkpoint.provenance(data="digits"))


def job(base, out, budgets=(("macs", 0.6), ("macs", 0.3)), **kw):
    args = dict(checkpoint=str(base), out=str(out), budgets=budgets, n_images=32, device="cpu", progress=False,
                tolerance=0.1,  # a narrow model's channel steps are coarse
                finetune=TrainConfig(epochs=1, lr=0.01, batch_size=64),
                report=ReportConfig(device="cpu", latency=LatencyConfig(batch_sizes=(1,), warmup=0, repeats=1)))
    args.update(kw)
    return sweep.SweepJob(**args)


def random_scores(model):
    g = torch.Generator().manual_seed(0)
    return Scores(scores={"l1": {u.name: torch.rand(u.width, generator=g) for u in oracles.units_of(model)}})


def test_budget_becomes_exact_rates():
    """The policy's figures agree with an independent count of the plan's pruned cfg."""
    model = get_model("vgg16_bn", cfg=list(NARROW))
    sc = random_scores(model)
    widths = {u.name: u.width for u in oracles.units_of(model)}
    base = counting.count(model)
    with one_thread():
        for key, keep, policy in (("macs", 0.6, "local"), ("params", 0.3, "local"), ("macs", 0.4, "global")):
            spec = sweep.rates_for_budget(model, sc, "l1", key, keep, policy=policy, tolerance=0.1)
            plan = make_plan(sc.for_criterion("l1"), spec, widths, tiebreak=sc.tiebreak, model="vgg16_bn")
            got = counting.count(get_model("vgg16_bn", cfg=oracles.pruned_cfg(model, plan)))
            info = spec.extra["resolved"]
            assert got[key] / base[key] == pytest.approx(info["achieved"][key])
            assert info["met"] and got[key] / base[key] <= keep * 1.1
            if policy == "local":  # one uniform rate: layers of equal width keep equally many channels
                kept = spec.keep_counts(widths)
                assert len({kept[u] for u, w in widths.items() if w == 16}) == 1
        with pytest.raises(UserError, match="out of reach"):
            sweep.rates_for_budget(model, sc, "l1", "macs", 1e-4)
        with pytest.raises(UserError, match="fraction kept"):
            sweep.rates_for_budget(model, sc, "l1", "macs", 1.5)


def test_interrupted_sweep_resumes_without_redoing(baseline, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    real = pipeline.run_prune
    calls: list[str] = []

    def counting_prune(j):
        calls.append(j.out)
        return real(j)

    def dies_on_second(j):
        if calls:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during point 2
        return counting_prune(j)

    with one_thread():
        monkeypatch.setattr(pipeline, "run_prune", dies_on_second)
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(job(baseline, out))
        assert (out / "macs0.6" / "pruned.pt").is_file() and not (out / "macs0.3" / "pruned.pt").exists()
        state = json.loads((out / "sweep.json").read_text())
        assert [p.get("status") for p in state["points"]] == ["done", None]
        first = {p: (out / p).stat().st_mtime_ns for p in ("scores.pt", "macs0.6/pruned.pt", "macs0.6/rates.yaml")}

        calls.clear()
        monkeypatch.setattr(pipeline, "run_prune", counting_prune)
        res = sweep.run_sweep(job(baseline, out))
        assert calls == [str(out / "macs0.3")]  # only the unfinished point ran
        assert {p: (out / p).stat().st_mtime_ns for p in first} == first  # scores and point 1 untouched
        calls.clear()
        sweep.run_sweep(job(baseline, out, report=None))
        assert calls == []

    pts = {p["name"]: p for p in res["state"]["points"]}
    assert all(p["status"] == "done" for p in pts.values())
    assert pts["macs0.6"]["achieved"]["macs"] <= 0.66 and pts["macs0.3"]["achieved"]["macs"] <= 0.33
    for name in pts:  # the achieved fraction is that of the saved checkpoint
        net, ck = checkpoint.load(out / name / "pruned.pt")
        base_macs = counting.count_macs(get_model("vgg16_bn", cfg=list(NARROW)))
        assert counting.count_macs(net) / base_macs == pytest.approx(pts[name]["achieved"]["macs"])
        assert pts[name]["budget"] == {"macs": float(name[4:])} and pts[name]["met"]
        assert len(ck["metrics"]["finetune_history"]) == 1
    rows = {r["name"]: r for r in res["report"]["rows"]}
    bname = f"{baseline.parent.name}/baseline"
    assert set(rows) == {bname, "macs0.6/pruned", "macs0.3/pruned"}
    assert rows["macs0.3/pruned"]["baseline"] == bname and "top1" in rows["macs0.3/pruned"]
    assert rows["macs0.3/pruned"]["target"] == "macs 0.3 (local)"
    assert (out / "report" / "acc_vs_macs.png").is_file() and (out / "report" / "report.md").is_file()


def test_rates_file_points_and_guards(baseline, tmp_path):
    rates = tmp_path / "quarter.yaml"
    rates.write_text('rates: "[0.25]*13"\n')
    out = tmp_path / "sw"
    with one_thread():
        res = sweep.run_sweep(job(baseline, out, budgets=(), rates=(str(rates),), report=None,
                                  finetune=TrainConfig(epochs=0)))
    (pt,) = res["state"]["points"]
    assert pt["name"] == "quarter" and (out / "quarter" / "rates.yaml").read_text() == rates.read_text()
    # The folder belongs to this baseline: another one is refused before any work.
    other = checkpoint.save(tmp_path / "other.pt", get_model("vgg16_bn", cfg=list(NARROW)))
    with pytest.raises(UserError, match="another baseline"):
        sweep.run_sweep(job(other, out, budgets=(), rates=(str(rates),)))
    with pytest.raises(UserError, match="needs points"):
        sweep.run_sweep(job(baseline, tmp_path / "empty", budgets=()))
    with pytest.raises(UserError, match="fraction kept"):
        sweep.parse_budgets("0.5,1.5", "macs")


def test_sweep_folder_is_a_report_input(baseline, tmp_path):
    from compressor.reporting.report import collect

    out = tmp_path / "sw"
    with one_thread():
        sweep.run_sweep(job(baseline, out, budgets=(("params", 0.5),), report=None, finetune=TrainConfig(epochs=0)))
    entries = collect([str(out)])
    assert [e.path.name for e in entries] == ["baseline.pt", "pruned.pt"]
    assert entries[1].scores == out / "scores.pt" and str(entries[1].baseline_hint) == str(baseline)
    assert entries[1].target == "params 0.5 (local)"


def test_rates_file_keeps_its_own_rounding(baseline, tmp_path):
    """A drop_floor (HRank-style) rates file is pruned with drop_floor inside a sweep too."""
    rates = tmp_path / "hrank_style.yaml"
    rates.write_text('rates: "[0.3]*13"\nrounding: drop_floor\n')
    with one_thread():
        sweep.run_sweep(job(baseline, tmp_path / "sw", budgets=(), rates=(str(rates),), criterion="l1",
                            finetune=TrainConfig(epochs=0), report=None))
    net, _ = checkpoint.load(next((tmp_path / "sw").glob("*/pruned.pt")))
    assert net.cfg[0] == 8 - 2 and net.cfg[3] == 8 - 2  # drop_floor removes floor(8*0.3)=2; keep_floor keeps 5


def test_points_take_the_block_refit_and_report_its_accuracy(baseline, tmp_path):
    rates = tmp_path / "half.yaml"
    rates.write_text('rates: 0.5\n')
    out = tmp_path / "sw"
    with one_thread():
        res = sweep.run_sweep(job(baseline, out, budgets=(), rates=(str(rates),), criterion="l1", report=None,
                                  reconstruct=True, block_steps=5, finetune=TrainConfig(epochs=0)))
    (pt,) = res["state"]["points"]
    summary = json.loads((out / "half" / "summary.json").read_text())
    assert pt["recovery"] == summary["recovery"] == "reconstruct+blocks"
    assert pt["test_top1"] == summary["pruned_test_block_refit"]["top1"]
    # VGG's flat Sequentials are refit in segments: each conv (Linear) with its norm, ReLU and pooling
    names = [b["name"] for b in summary["block_refit"]["blocks"]]
    assert names[:2] == ["features.conv0…relu0", "features.conv1…pool2"] and len(names) == 14
    assert names[-1] == "classifier.linear1…relu1"
