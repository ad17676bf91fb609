"""The tradeoff report, built from small real runs (a narrow VGG16-BN on the digits data)."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from compressor import data
from compressor.storage import checkpoint
from compressor.pruning import counting
from compressor.reporting import plots
from compressor.reporting import report
from compressor.errors import UserError
from compressor.deploy.latency import LatencyConfig, compare
from compressor.models import get_model
from compressor.jobs.pipeline import PruneJob, run_prune
from compressor.training.train import TrainConfig, fit
from tests.conftest import one_thread

NARROW = [8, 8, "M", 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, 16]
FAST = LatencyConfig(batch_sizes=(1, 64), warmup=1, repeats=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-epoch baseline and two prune runs of it (different criteria and rates)."""
    with one_thread():
        return _make_runs(tmp_path_factory.mktemp("runs"))


def _make_runs(root):
    torch.manual_seed(0)
    base = get_model("vgg16_bn", cfg=list(NARROW))
    fit(base, data.load("digits", input_size=32), TrainConfig(epochs=1, lr=0.05, batch_size=32), "cpu", False)
    base_path = checkpoint.save(root / "base" / "baseline.pt", base, prov=checkpoint.provenance(data="digits"))
    out = {"root": root, "baseline": base_path}
    for name, crit, rates in (("half", "hrank", '"[0.5]*13"'), ("light", "l1", '"[0.25]*7+[0.5]*6"')):
        (root / f"{name}.yaml").write_text(f"rates: {rates}\n")
        run_prune(PruneJob(model="vgg16_bn", rates=str(root / f"{name}.yaml"), checkpoint=str(base_path),
                           criterion=crit, n_images=64, out=str(root / name), progress=False, device="cpu"))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def built(runs):
    cfg = report.ReportConfig(device="cpu", latency=FAST)
    inputs = [str(runs["half"]), str(runs["light"] / "pruned.pt"), str(runs["baseline"])]
    with one_thread():
        res = report.run_report(inputs, runs["root"] / "report", cfg)
    return res, {r["name"]: r for r in res["rows"]}


def test_rows_and_baseline_matching(runs, built):
    _, rows = built
    assert set(rows) == {"base/baseline", "half/pruned", "light/pruned"}
    assert rows["base/baseline"]["role"] == "baseline" and rows["base/baseline"]["baseline"] == "(itself)"
    for name, crit, rates in (("half/pruned", "hrank", "[0.5]*13"), ("light/pruned", "l1", "[0.25]*7+[0.5]*6")):
        r = rows[name]
        # the rates column names the rates file (half.yaml), not a re-expansion of the per-unit rates
        assert r["rates"] == f"{name.split('/')[0]}.yaml" and r["rates_source"].endswith(r["rates"])
        assert (r["role"], r["criterion"], r["rates_per_unit"], r["baseline"]) == ("pruned", crit, rates, "base/baseline")
        assert r["data"] == "digits" and r["bn_recalibrated"] is True and r["finetune_epochs"] == 0
        assert r["has_bn"] is True


def test_numbers_are_the_checkpoints_own(runs, built):
    """Recomputed here, independently of the report: load each file, evaluate on the digits test split."""
    from compressor.training.evaluation import evaluate

    _, rows = built
    base = rows["base/baseline"]
    test = data.load("digits", input_size=32).test
    for r in rows.values():
        net, _ = checkpoint.load(r["path"])
        with one_thread():
            ref = evaluate(net, data.loader(test, 256), "cpu")
        assert ref["n"] == len(test) > 0
        assert (r["top1"], r["top5"], r["loss"], r["n_test"]) == (ref["top1"], ref["top5"], ref["loss"], ref["n"])
        size = counting.count(net)
        assert (r["params"], r["macs"], r["file_bytes"]) == (size["params"], size["macs"], os.path.getsize(r["path"]))
        assert r["macs_reduction_pct"] == pytest.approx(100 * (1 - r["macs"] / base["macs"]))
        assert r["params_reduction_pct"] == pytest.approx(100 * (1 - r["params"] / base["params"]))
        assert r["top1_delta"] == pytest.approx(r["top1"] - base["top1"])  # model - baseline: a drop is negative
    assert rows["half/pruned"]["macs"] < rows["light/pruned"]["macs"] < base["macs"]


def test_finetune_outputs_keep_how_they_were_pruned(runs, tmp_path, monkeypatch):
    """finetune (and its resume, and a fine-tune of it) carries the source's criterion, BN step and epochs."""
    import copy

    from torch.utils.data import Subset

    from compressor.cli import main

    full = data.load("digits", input_size=32)
    small = copy.copy(full)
    small.train, small.val = Subset(full.train, range(64)), Subset(full.val, range(32))
    monkeypatch.setattr(data, "load", lambda *a, **k: small)
    pruned = runs["half"] / "pruned.pt"
    ft, ft2 = tmp_path / "ft", tmp_path / "ft2"
    common = ["--device", "cpu", "--no-progress"]
    with one_thread():
        assert main(["finetune", "--checkpoint", str(pruned), "--epochs", "1", "--batch-size", "32", "--out", str(ft),
                     *common]) == 0
        assert main(["finetune", "--resume", str(ft / "last.pt"), "--epochs", "2"]) == 0  # extended: 2 epochs
        assert main(["finetune", "--checkpoint", str(ft / "last.pt"), "--epochs", "1", "--batch-size", "32",
                     "--out", str(ft2), *common]) == 0
        res = report.run_report([str(ft / "last.pt"), str(ft / "best.pt"), str(ft2 / "last.pt"), str(pruned)],
                                tmp_path / "rep", report.ReportConfig(evaluate=False, latency=None, plots=False))
    rows = {r["name"]: r for r in res["rows"]}
    best_epoch = torch.load(ft / "best.pt", weights_only=True)["metrics"]["epoch"]
    for name, epochs in (("half/pruned", 0), ("ft/last", 2), ("ft/best", best_epoch), ("ft2/last", 3)):
        r = rows[name]
        assert (r["role"], r["criterion"], r["bn_recalibrated"], r["rates"]) == ("pruned", "hrank", True, "half.yaml"), name
        assert r["rates_per_unit"] == "[0.5]*13", name
        assert r["finetune_epochs"] == epochs, name
    src = torch.load(pruned, weights_only=True)
    ck = torch.load(ft / "last.pt", weights_only=True)
    assert ck["provenance"]["source"]["path"] == str(pruned) and ck["provenance"]["resumed_from"] == str(ft / "last.pt")
    assert ck["metrics"]["prune"]["pruned_test_bn_recalibrated"] == src["metrics"]["pruned_test_bn_recalibrated"]
    ck2 = torch.load(ft2 / "last.pt", weights_only=True)
    assert ck2["provenance"]["source"]["source"]["path"] == str(pruned)
    assert ck2["metrics"]["prune"] == ck["metrics"]["prune"] and len(ck2["metrics"]["finetune_history"]) == 2


def test_latency_columns(built):
    res, rows = built
    base = rows["base/baseline"]
    with open(res["paths"]["json"]) as fh:
        meta = json.load(fh)["meta"]
    slots = ["cpu_b1", "cpu_b64"] + (["cuda_b1", "cuda_b64"] if torch.cuda.is_available() else [])
    assert meta["latency_slots"] == sorted(slots) and meta["cpu_threads"] >= 1
    assert meta["latency"]["repeats"] == 2
    for r in rows.values():
        for s in slots:
            assert r[f"lat_{s}_ms"] > 0
            assert r[f"speedup_{s}"] == pytest.approx(base[f"lat_{s}_ms"] / r[f"lat_{s}_ms"])
            assert r[f"speedup_per_mac_{s}"] == pytest.approx(r[f"speedup_{s}"] * r["macs"] / base["macs"])
    assert base["speedup_cpu_b1"] == 1.0


def test_tables_written(built):
    res, rows = built
    with open(res["paths"]["markdown"]) as fh:
        md = fh.read()
    for name in rows:
        assert f"| {name} |" in md
    assert "median of 2 runs" in md
    with open(res["paths"]["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert [t["name"] for t in table] == [r["name"] for r in res["rows"]]
    assert [float(t["top1"]) for t in table] == pytest.approx([r["top1"] for r in res["rows"]])
    with open(res["paths"]["json"]) as fh:
        doc = json.load(fh)
    assert [r["name"] for r in doc["rows"]] == [r["name"] for r in res["rows"]]


def test_plots_are_real_pngs(built):
    from PIL import Image

    res, _ = built
    names = {p.rsplit("/", 1)[-1] for p in res["plots"]}
    assert {"acc_vs_macs.png", "acc_vs_params.png", "widths_half_pruned.png", "widths_light_pruned.png",
            "scores_half_scores.png", "scores_light_scores.png"} == names
    for p in res["plots"]:
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG"
            if "acc_vs" in p:
                assert im.size == (700, 450)
            else:  # 13 layers: max(6, 0.45*13 + 2) inches wide
                assert im.size == (round(100 * (0.45 * 13 + 2)), 450)
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # not a blank canvas
        assert os.path.getsize(p) > 10_000


def test_baseline_not_in_inputs_is_rebuilt_from_the_plan(runs):
    res = report.run_report([str(runs["half"])], runs["root"] / "rep_alone",
                            report.ReportConfig(evaluate=False, latency=None, plots=False))
    (row,) = res["rows"]
    ref = counting.count(get_model("vgg16_bn", cfg=list(NARROW)))
    assert "rebuilt from plan widths" in row["baseline"] and "top1" not in row
    assert row["macs_reduction_pct"] == pytest.approx(100 * (1 - row["macs"] / ref["macs"]))


def test_collect_globs_and_errors(runs):
    entries = report.collect([str(runs["root"] / "*" / "pruned.pt"), str(runs["root"] / "base")])
    assert sorted(e.path.parent.name for e in entries) == ["base", "half", "light"]
    assert next(e for e in entries if e.path.parent.name == "half").scores == runs["half"] / "scores.pt"
    with pytest.raises(UserError, match="nothing matches"):
        report.collect([str(runs["root"] / "nope*")])


def test_pareto_front_and_rate_string():
    pts = [(10, 70.0), (5, 60.0), (5, 65.0), (8, 64.0), (2, 40.0), (12, 69.0)]
    assert plots.pareto_front(pts) == [4, 2, 0]
    assert report.rate_string([0.21] * 7 + [0.75] * 5) == "[0.21]*7+[0.75]*5"
    assert report.rate_string([0.1, 0.2]) == "[0.1]+[0.2]"


def test_latency_compare_interleaves_and_restores():
    a, b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 2, 3)
    a.train()
    threads = torch.get_num_threads()
    res = compare({"a": a, "b": b}, 8, LatencyConfig(batch_sizes=(1, 2), warmup=0, repeats=3, threads=2))
    assert set(res) == {"a", "b"} and set(res["a"]) == {1, 2}
    t = res["b"][2]
    assert t.threads == 2 and t.repeats == 3 and t.min_ms <= t.median_ms <= t.max_ms and not math.isnan(t.median_ms)
    assert a.training and torch.get_num_threads() == threads


def test_cli_report(runs, capsys):
    from compressor.cli import main

    out = runs["root"] / "cli_report"
    rc = main(["report", str(runs["root"] / "*" / "pruned.pt"), "--out", str(out), "--no-eval", "--no-plots",
               "--repeats", "1", "--warmup", "0", "--batch-sizes", "1", "--no-progress"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "report.json"}
    assert "half/pruned" in capsys.readouterr().out
    assert main(["report", str(runs["root"] / "missing.pt"), "--out", str(out)]) == 2


def test_latency_spread_and_overlap_flags(built):
    res, rows = built
    slots = ["cpu_b1", "cpu_b64"]
    for name, r in rows.items():
        for s in slots:
            assert r[f"lat_{s}_iqr_ms"] >= 0
            assert isinstance(r[f"speedup_{s}_uncertain"], bool)
            if r["role"] == "baseline":
                assert r[f"speedup_{s}_uncertain"] is False  # itself: nothing to separate
    with open(res["paths"]["json"]) as fh:
        meta = json.load(fh)["meta"]
    assert "mkldnn_enabled" in meta["backends"] and meta["latency"]["channels_last"] is False
    assert "±IQR/2" in res["markdown"] and "mkldnn" in res["markdown"]


def test_markdown_marks_overlapping_speedups():
    base = {"model": "m", "name": "b", "role": "baseline", "params": 10, "macs": 10, "params_reduction_pct": 0.0,
            "macs_reduction_pct": 0.0, "file_bytes": 1, "weights_bytes": 1, "lat_cpu_b1_ms": 2.0,
            "lat_cpu_b1_iqr_ms": 0.4, "speedup_cpu_b1": 1.0, "speedup_per_mac_cpu_b1": 1.0,
            "speedup_cpu_b1_uncertain": False}
    near = {**base, "name": "p", "role": "pruned", "lat_cpu_b1_ms": 1.9, "speedup_cpu_b1": 2.0 / 1.9,
            "speedup_cpu_b1_uncertain": True}
    far = {**near, "name": "q", "lat_cpu_b1_ms": 1.0, "speedup_cpu_b1": 2.0, "speedup_cpu_b1_uncertain": False}
    meta = {"latency_slots": ["cpu_b1"], "latency": {"repeats": 5, "warmup": 1}, "cpu_threads": 1, "counted": "x",
            "time": "t", "torch": "v", "backends": {"mkldnn_enabled": True}}
    md = report.markdown([base, near, far], meta)
    lines = {ln.split(" | ")[1]: ln for ln in md.splitlines() if ln.startswith("| m |")}
    assert "(≈1.05×" in lines["p"] and "≈" not in lines["q"] and "2.00 ±0.20" in lines["b"]


# --- §7 fixes: Δtop-1 sign, BN label, rates label, latency spread ----------------------------

def _row(name, role, top1, **kw):
    return {"model": "m", "name": name, "role": role, "params": 100, "macs": 1000, "file_bytes": 1,
            "weights_bytes": 1, "data": "digits", "top1": top1, **kw}


def test_top1_delta_is_model_minus_baseline():
    base = _row("b", "baseline", 90.0)
    worse, better = _row("p", "pruned", 85.5, macs=500), _row("q", "pruned", 91.25, macs=400)
    for r in (base, worse, better):
        report.compare_to_baseline(r, base)
    assert worse["top1_delta"] == pytest.approx(-4.5) and better["top1_delta"] == pytest.approx(1.25)
    assert base["top1_delta"] == 0.0 and worse["macs_reduction_pct"] == pytest.approx(50.0)
    other = _row("o", "pruned", 50.0, data="cifar10")  # another test split: no delta
    report.compare_to_baseline(other, base)
    assert "top1_delta" not in other
    md = report.markdown([base, worse, better], {"counted": "x", "time": "t", "torch": "v"})
    cells = {ln.split(" | ")[1]: ln.split(" | ") for ln in md.splitlines() if ln.startswith("| m |")}
    head = next(ln for ln in md.splitlines() if ln.startswith("| model |")).split(" | ")
    col = head.index("Δtop-1")
    assert (cells["p"][col], cells["q"][col], cells["b"][col]) == ("-4.50", "+1.25", "+0.00")
    assert "Δtop-1 = model top-1 − baseline top-1" in md and "a drop is negative" in md


def test_model_without_batchnorm_is_never_bn_reestimated(tmp_path):
    """SqueezeNet has no BN: even a checkpoint that recorded bn_recalibrated=True is not labelled so."""
    net = get_model("squeezenet1_1")
    assert not report.has_batchnorm(net)
    prov = checkpoint.provenance(data="digits", criterion="l1", bn_recalibrated=True, recovery="bn")
    path = checkpoint.save(tmp_path / "sq" / "pruned.pt", net, plan={"units": {}}, metrics={"recovery": "bn"},
                           rates={"rates": {}, "source": str(tmp_path / "sq50.yaml")}, prov=prov)
    assert report.bn_reestimated(net, torch.load(path, weights_only=True)) is False
    res = report.run_report([str(path)], tmp_path / "rep", report.ReportConfig(evaluate=False, latency=None,
                                                                                plots=False))
    (row,) = res["rows"]
    assert row["role"] == "pruned" and row["has_bn"] is False and row["bn_recalibrated"] is False
    note = next(ln for ln in res["markdown"].splitlines() if ln.startswith("- BN statistics"))
    assert "no BatchNorm layers" in note and "re-estimated:" not in note.replace("not re-estimated:", "")
    assert row["rates"] == "sq50.yaml"
    # a BN model: the recorded recovery decides (a fine-tune carries it under metrics["prune"])
    vgg = get_model("vgg16_bn", cfg=list(NARROW))
    assert report.bn_reestimated(vgg, {"metrics": {"prune": {"recovery": "bn+finetune"}}}) is True
    assert report.bn_reestimated(vgg, {"metrics": {"recovery": "reconstruct"},
                                       "provenance": {"bn_recalibrated": True}}) is False
    assert report.bn_reestimated(vgg, {"provenance": {"source": {"bn_recalibrated": True}}}) is True
    assert report.bn_reestimated(vgg, {}) is None


def test_rates_label_prefers_what_was_written():
    assert report.rates_label({"source": "experiments/rates/chip58.yaml"}) == "chip58.yaml"
    assert report.rates_label({"source": "r/x.yaml", "rates_string": "[0.21]*7+[0.75]*5"}) == \
        "x.yaml: [0.21]*7+[0.75]*5"
    assert report.rates_label({"source": "<inline>", "extra": {"rates_string": "[0.5]*13"}}) == "[0.5]*13"
    assert report.rates_label({"source": "<sweep budget macs 0.5>"}) is None  # a budget: the target says it
    assert report.rates_label({"source": "sw/pt/rates.yaml"}, "orig/light.yaml") == "light.yaml"


def test_latency_cell_shows_spread_only_when_measured():
    row = {"model": "m", "name": "b", "role": "baseline", "params": 10, "macs": 10, "params_reduction_pct": 0.0,
           "macs_reduction_pct": 0.0, "file_bytes": 1, "weights_bytes": 1, "lat_cpu_b1_ms": 2.0,
           "speedup_cpu_b1": 1.0, "speedup_per_mac_cpu_b1": 1.0}
    meta = {"latency_slots": ["cpu_b1"], "counted": "x", "time": "t", "torch": "v"}
    assert "| 2.00 (1.00×, 1.00) |" in report.markdown([row], meta)
    assert "| 2.00 ±0.30 (1.00×, 1.00) |" in report.markdown([{**row, "lat_cpu_b1_iqr_ms": 0.6}], meta)


# --- issue 23: figure details --------------------------------------------------------------

def test_tradeoff_labels_at_one_place_are_stacked_and_the_frontier_has_a_legend_line():
    rows = [_row("base", "baseline", 90.0, macs=1000), _row("p1", "pruned", 80.0, macs=500),
            _row("p2", "pruned", 80.0, macs=500), _row("p3", "pruned", 80.0, macs=500),
            _row("q", "pruned", 70.0, macs=200)]
    fig = plots.tradeoff_figure(rows, "macs")
    ax = fig.axes[0]
    offsets = {t.get_text(): t.xyann for t in ax.texts}
    assert set(offsets) == {"base", "p1", "p2", "p3", "q"}
    same_place = [offsets[n] for n in ("p1", "p2", "p3")]
    assert len(set(same_place)) == 3  # one line apart, not printed over each other
    assert offsets["q"] == offsets["base"] == offsets["p1"]  # alone: the usual offset
    leg = ax.get_legend()
    handle = dict(zip([t.get_text() for t in leg.get_texts()], leg.legend_handles))["Pareto frontier"]
    assert handle.get_visible() and handle.get_linestyle() == "--" and handle.get_linewidth() >= 1.0
    xs = handle.get_xdata()
    assert handle.get_drawstyle() == "default" and xs[-1] - xs[0] >= 20  # a plain line 3 fonts long, not a step
    (step,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert list(step.get_xdata()) == pytest.approx([0.0002, 0.0005, 0.001])  # q, p1, base: the frontier


def test_curves_draw_the_recorded_baseline_as_a_reference_line(tmp_path, capsys):
    from compressor.cli import main
    from compressor.reporting.report_curves import baseline_label

    run = tmp_path / "ft"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch_frac": 0, "val_acc": 40.0}\n{"epoch_frac": 1, "val_acc": 80.0}\n')
    prune_metrics = {"baseline_test": {"top1": 91.5, "n": 360}, "eval": {"split": "test", "n": 360}}
    torch.save({"format": checkpoint.CKPT_FORMAT, "metrics": {"prune": prune_metrics}}, run / "last.pt")
    other = tmp_path / "train_only"  # a run whose checkpoint records no baseline: no line
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"epoch_frac": 0, "val_acc": 10.0}\n{"epoch_frac": 1, "val_acc": 60.0}\n')
    res = report.curves([str(run), str(other)], tmp_path / "c.png")
    rows = {r["run"]: r for r in res["rows"]}
    assert rows["ft"]["baseline"] == {"top1": 91.5, "split": "test", "n": 360, "source": str(run / "last.pt")}
    assert rows["train_only"]["baseline"] is None
    fig = plots.recovery_figure({"ft": [(0.0, 40.0), (1.0, 80.0)]},
                                baselines={baseline_label(rows["ft"]["baseline"]): 91.5})
    ax = fig.axes[0]
    ref = [ln for ln in ax.get_lines() if ln.get_label().startswith("baseline")]
    assert len(ref) == 1 and list(ref[0].get_ydata()) == [91.5, 91.5]
    assert ref[0].get_label() == "baseline 91.50% (test, 360 images)"
    assert main(["report", "--curves", str(run), "--out", str(tmp_path / "d.png")]) == 0
    assert "ft: baseline 91.50% (test, 360 images), recorded in" in capsys.readouterr().out


def test_a_baseline_that_cannot_be_rebuilt_is_said_not_invented(runs, tmp_path):
    """A plan wider than the architecture (a hand-edited file): no baseline, no reductions, one note."""
    ck = torch.load(runs["half"] / "pruned.pt", weights_only=True)
    unit = next(iter(ck["plan"]["units"]))
    ck["plan"]["units"][unit]["width"] = 4096
    odd = tmp_path / "odd" / "pruned.pt"
    odd.parent.mkdir()
    torch.save(ck, odd)
    res = report.run_report([str(odd)], tmp_path / "rep", report.ReportConfig(evaluate=False, latency=FAST,
                                                                               plots=False))
    (row,) = res["rows"]
    assert row["baseline"].startswith("(none: not in the inputs and not rebuilt:")
    assert "macs_reduction_pct" not in row and "speedup_cpu_b1" not in row and row["lat_cpu_b1_ms"] > 0
    line = next(ln for ln in res["markdown"].splitlines() if ln.startswith("| vgg16_bn | odd/pruned |"))
    assert f"{row['macs'] / 1e6:.3f}M (–)" in line
    assert "- No baseline to compare with" in res["markdown"]
