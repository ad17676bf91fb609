"""``sweep --int8`` (issue 21): each point also gets a calibrated int8 export and its own report row, timed with
the float rows; a point whose int8 drop exceeds ``--max-drop`` is marked refused (no file) and the sweep goes on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from compressor.cli import main  # noqa: E402
from compressor.data import contract  # noqa: E402
from compressor.deploy import onnx_int8  # noqa: E402
from compressor.deploy.latency import LatencyConfig  # noqa: E402
from compressor.jobs import sweep  # noqa: E402
from compressor.models import get_model  # noqa: E402
from compressor.reporting.report import ReportConfig  # noqa: E402
from compressor.storage import checkpoint  # noqa: E402
from compressor.training.train import TrainConfig  # noqa: E402
from tests.conftest import TINY_VGG  # noqa: E402

LIMIT = 1.0


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A tiny VGG16-BN trained a few epochs on digits, so float and int8 accuracies are far from chance."""
    d = tmp_path_factory.mktemp("sweep_int8")
    torch.manual_seed(0)
    net = get_model("vgg16_bn", cfg=list(TINY_VGG))
    bundle, c = contract.load_data(net, "digits")
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(bundle.train_eval, batch_size=64, shuffle=True, generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(4):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    contract.attach(net.eval(), c)
    return checkpoint.save(d / "base.pt", net)


def _job(base, out, **kw) -> sweep.SweepJob:
    args = dict(checkpoint=str(base), out=str(out), budgets=(("macs", 0.6),), criterion="l1", n_images=32,
                device="cpu", progress=False, tolerance=0.1, finetune=TrainConfig(epochs=0, lr=0.01, batch_size=64),
                int8=True, int8_max_drop=LIMIT, int8_calib_n=32,
                report=ReportConfig(device="cpu", plots=False,
                                    latency=LatencyConfig(batch_sizes=(1,), warmup=0, repeats=1)))
    args.update(kw)
    return sweep.SweepJob(**args)


def test_each_point_gets_an_int8_row_within_the_limit(baseline, tmp_path):
    res = sweep.run_sweep(_job(baseline, tmp_path / "sw", budgets=(("macs", 0.8),)))
    pt, = res["state"]["points"]
    q = pt["int8"]
    path = tmp_path / "sw" / pt["name"] / sweep.INT8_FILE
    assert q["status"] == "done" and q["path"] == str(path) and path.is_file()
    assert q["bytes"] == path.stat().st_size and q["drop"] <= LIMIT
    rows = {r["path"]: r for r in res["report"]["rows"]}
    fp32, int8 = rows[str(tmp_path / "sw" / pt["name"] / "pruned.pt")], rows[str(path)]
    assert int8["precision"] == "int8" and int8["source"] == fp32["name"]
    assert fp32["top1"] > 30  # trained: far from chance (10 classes; pruned, not fine-tuned)
    assert fp32["top1"] - int8["top1"] <= LIMIT  # the report's own evaluation of both files, same test split
    assert int8["top1"] == pytest.approx(q["top1_int8"], abs=1e-6)  # the export's check measured the same file
    assert (int8["params"], int8["macs"]) == (fp32["params"], fp32["macs"])
    assert int8["lat_cpu_b1_ms"] > 0 and "int8_speedup_cpu_b1" in int8  # timed in the float rows' group
    assert json.loads(int8["quantization"])["calibration_images"] == 32
    md = (tmp_path / "sw" / "report" / "report.md").read_text()
    assert f"{pt['name']}/{sweep.INT8_FILE}" in md
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert saved["points"][0]["int8"]["status"] == "done"


def test_drop_over_limit_marks_the_point_refused_and_the_sweep_goes_on(baseline, tmp_path, capsys, monkeypatch):
    real = onnx_int8.quantize
    calls: list[int] = []

    def broken(blob, calib, method=onnx_int8.DEFAULT_METHOD, **kw):  # calibrated on a constant: activations saturate
        calls.append(len(calib))
        return real(blob, np.full_like(calib, 1e-3), method, **kw)

    monkeypatch.setattr(onnx_int8, "quantize", broken)
    out = tmp_path / "sw"
    argv = ["sweep", "--checkpoint", str(baseline), "--macs", "0.6,0.4", "--epochs", "0", "--criterion", "l1",
            "--n-images", "32", "--tolerance", "0.1", "--int8", "--max-drop", str(LIMIT), "--calib-n", "16",
            "--out", str(out), "--no-progress", "--device", "cpu", "--no-plots", "--batch-sizes", "1",
            "--repeats", "1", "--warmup", "0"]
    capsys.readouterr()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("REFUSED") >= 2  # both points' CLI lines (and their report rows)
    state = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == ["done", "done"] and calls == [16, 16]
    ft = state["settings"]["finetune"]  # the CLI's fine-tune takes the model's lr and warm-up (models.yaml)
    assert (ft["lr"], ft["warmup_epochs"]) == (0.01, 0.1)
    for p in state["points"]:
        q = p["int8"]
        assert q["status"] == "refused" and q["drop"] > LIMIT and "nothing written" in q["reason"]
        assert (out / p["name"] / "pruned.pt").is_file() and not (out / p["name"] / sweep.INT8_FILE).exists()
    rows = json.loads((out / "report" / "report.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    for p in state["points"]:
        refused = next(r for r in rows if r["name"] == f"{p['name']}/{sweep.INT8_FILE} (refused)")
        assert refused["refused"] and refused["top1"] is None and refused["file_bytes"] == 0
        assert refused["int8_check_drop"] == pytest.approx(p["int8"]["drop"])
        assert names.index(refused["name"]) == names.index(refused["source"]) + 1  # right after its point
    assert not any(r.get("precision") == "int8" and not r.get("refused") for r in rows)

    # Resumed with the same settings: the refusals stand, nothing is quantized again.
    assert main(argv + ["--no-report"]) == 0 and calls == [16, 16]
    # A higher limit is another setting: each point is tried again, and now written.
    assert main(argv[:argv.index("--max-drop") + 1] + ["100"] + argv[argv.index("--max-drop") + 2:]
                + ["--no-report"]) == 0
    state = json.loads((out / "sweep.json").read_text())
    assert calls == [16, 16, 16, 16]
    assert all(p["int8"]["status"] == "done" and (out / p["name"] / sweep.INT8_FILE).is_file() for p in state["points"])
