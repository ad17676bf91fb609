"""`report` and `sensitivity` on every kind of model the engine prunes: a CIFAR ResNet, a torchvision
classifier, a registered cfg family and a user's ``module:builder`` CNN.

Each model is pruned through the CLI to half its MACs (``target: {macs: 0.5}``) from a saved
checkpoint; the report over the run folder and the baseline must then match that baseline, count
what ``counting.count`` counts on the loaded files, and draw real PNGs; without the baseline, the
model before pruning is rebuilt from the architecture reference and the plan.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from compressor.storage import checkpoint
from compressor.pruning import counting
from compressor.reporting import report
from compressor.cli import main
from compressor.models import get_model
from compressor.pruning import graph
from compressor.pruning.rates import load_rates
from compressor.reporting.report_baseline import kept_widths
from tests.conftest import one_thread, randomize_bn

from compressor.pruning import sensitivity_scan as sens

# narrow, but wide enough for a 1%-close MACs budget (at 8-16 channels one channel is a coarser step)
NARROW_VGG = [16, 16, "M", 32, 32, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, 64]
USER = "tests.test_report_any_model:small_cnn"
MODELS = {  # id -> (reference, builder kwargs)
    "resnet20": ("resnet20", {}),
    "tv_resnet18": ("torchvision:resnet18", {"input_size": 32}),
    "vgg16_bn_narrow": ("vgg16_bn", {"cfg": NARROW_VGG}),
    "user_cnn": (USER, {"input_size": 32}),
}
COMMON = ["--device", "cpu", "--no-progress"]
FAST_LATENCY = ["--repeats", "1", "--warmup", "0", "--batch-sizes", "1"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """A user's own network: a stem, two branches joined by a concat, global pooling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.a, self.b = _Block(3, 16), _Block(16, 24), _Block(16, 24)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


def small_cnn(num_classes: int = 10) -> nn.Module:
    return SmallCNN(num_classes)


def _build(key: str) -> nn.Module:
    ref, kw = MODELS[key]
    torch.manual_seed(0)
    return randomize_bn(get_model(ref, num_classes=10, **kw)).eval()


@pytest.fixture(scope="module", params=list(MODELS))
def pruned_run(request, tmp_path_factory):
    """A saved baseline (random weights, BN statistics made non-trivial) and a prune run of it at half the MACs."""
    key = request.param
    ref = MODELS[key][0]
    root = tmp_path_factory.mktemp(key)
    base = _build(key)
    base_path = checkpoint.save(root / "base" / "baseline.pt", base)
    (root / "r.yaml").write_text("target: {macs: 0.5}\n")
    run = root / "run"
    with one_thread():
        code = main(["prune", "--model", ref, "--checkpoint", str(base_path), "--rates", str(root / "r.yaml"),
                     "--criterion", "l1", "--n-images", "16", "--data", "digits", "--eval-n", "32",
                     "--batch-size", "32", "--out", str(run), *COMMON])
    assert code == 0
    return {"key": key, "ref": ref, "root": root, "base": base, "base_path": base_path, "run": run}


def test_report_over_run_folder_and_baseline(pruned_run, capsys):
    r = pruned_run
    out = r["root"] / "report"
    allow = ["--model", USER] if r["ref"] == USER else []
    with one_thread():
        code = main(["report", str(r["run"]), str(r["base_path"]), "--out", str(out), "--data", "digits",
                     "--batch-size", "128", *allow, *FAST_LATENCY, *COMMON])
    assert code == 0, capsys.readouterr().err
    rows = {row["name"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert set(rows) == {"base/baseline", "run/pruned"}
    base, pruned = rows["base/baseline"], rows["run/pruned"]
    assert (base["role"], base["baseline"], base["model"]) == ("baseline", "(itself)", r["ref"])
    assert (pruned["role"], pruned["baseline"], pruned["criterion"]) == ("pruned", "base/baseline", "l1")
    # sizes are the loaded files' own counts
    for row in (base, pruned):
        net, _ = checkpoint.load(row["path"], model=r["ref"] if r["ref"] == USER else None)
        size = counting.count(net)
        assert (row["params"], row["macs"]) == (size["params"], size["macs"])
    assert base["macs"] == counting.count(r["base"])["macs"]
    assert pruned["macs"] / base["macs"] == pytest.approx(0.5, rel=0.02)  # the budget, as solved by the policy
    assert pruned["macs_reduction_pct"] == pytest.approx(100 * (1 - pruned["macs"] / base["macs"]))
    assert pruned["params_reduction_pct"] == pytest.approx(100 * (1 - pruned["params"] / base["params"]))
    assert pruned["data"] == base["data"] == "digits"
    assert pruned["top1_delta"] == pytest.approx(pruned["top1"] - base["top1"]) and base["top1_delta"] == 0.0
    assert pruned["speedup_cpu_b1"] == pytest.approx(base["lat_cpu_b1_ms"] / pruned["lat_cpu_b1_ms"])
    # plots: the tradeoff pair, the widths of the pruned model and its score boxes, all real PNGs
    names = {p.name for p in out.glob("*.png")}
    assert names == {"acc_vs_macs.png", "acc_vs_params.png", "widths_run_pruned.png", "scores_run_scores.png"}
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] >= 600
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100
    # the widths plotted: the engine's units of the baseline, before from the plan, after off the pruned model
    net, ck = checkpoint.load(r["run"] / "pruned.pt", model=r["ref"] if r["ref"] == USER else None)
    units, before, after = kept_widths(net, ck)
    assert units == [u.name for u in graph.units(r["base"])]
    assert before == [u.width for u in graph.units(r["base"])]
    assert after == [net.get_submodule(u).out_channels for u in units] and after != before


def test_report_rebuilds_the_missing_baseline(pruned_run):
    """Only the run folder: the unpruned model is rebuilt (random weights) at the plan's widths."""
    r = pruned_run
    cfg = report.ReportConfig(evaluate=False, latency=None, plots=False, models=(USER,))
    with one_thread():
        res = report.run_report([str(r["run"] / "pruned.pt")], r["root"] / "rep_alone", cfg)
    (row,) = res["rows"]
    meta = json.loads((r["root"] / "rep_alone" / "report.json").read_text())["meta"]
    (name, counts), = meta["synthetic_baselines"].items()
    assert "rebuilt from plan widths" in row["baseline"] and name in row["baseline"] and "top1" not in row
    assert counts == counting.count(r["base"])  # the rebuilt model counts exactly as the real baseline
    assert row["macs_reduction_pct"] == pytest.approx(100 * (1 - row["macs"] / counts["macs"]))


@pytest.mark.parametrize("key", ["resnet20", "tv_resnet18"])
def test_sensitivity_curves_are_the_engine_units(key, tmp_path, capsys):
    ref = MODELS[key][0]
    base = _build(key)
    ck = checkpoint.save(tmp_path / "base.pt", base)
    out = tmp_path / "sens"
    with one_thread():
        code = main(["sensitivity", "--checkpoint", str(ck), "--rates", "0.5", "--n-eval", "32", "--n-images", "16",
                     "--data", "digits", "--target", "macs=0.6", "--out", str(out), *COMMON])
    assert code == 0, capsys.readouterr().err
    names = [u.name for u in graph.units(base)]
    rows = (out / "sensitivity.csv").read_text().splitlines()[1:]
    assert list(dict.fromkeys(line.split(",")[0] for line in rows)) == names  # one curve per unit, in order
    doc = json.loads((out / "sensitivity.json").read_text())
    assert doc["model"] == ref and abs(doc["suggestion"]["achieved"]["macs"] / 0.6 - 1) <= 0.01
    spec = load_rates(out / "suggested_rates.yaml", names, model_name=ref)
    widths = {u.name: u.width for u in graph.units(base)}
    got = sens.size_counter(base).fractions(spec.keep_counts(widths))
    assert got["macs"] == pytest.approx(doc["suggestion"]["achieved"]["macs"])
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
