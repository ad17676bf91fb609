"""Recovery curves (issue #11): val evaluated at fractions of an epoch, metrics.jsonl rows, the PNG,
and ``report --curves`` overlaying several runs. Tiny VGG16-BN on at most 64 digits images."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from compressor import data
from compressor.reporting import report
from compressor.cli import main
from compressor.errors import UserError
from compressor.training.evaluation import evaluate
from compressor.training.train import TrainConfig, eval_steps, fit
from tests.test_train import epoch_rows, same_weights, tiny_bundle, tiny_model


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and os.path.getsize(path) > 5_000
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size == (700, 450)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not a blank canvas


def test_eval_every_half_logs_the_curve_and_writes_the_png(tmp_path):
    """64 images at batch 16: 4 steps per epoch, val at steps 0, 2, 4, 6, 8 of 2 epochs."""
    bundle = tiny_bundle(n_train=64, n_val=32)
    model = tiny_model()
    start = copy.deepcopy(model)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, eval_every=0.5)
    hist = fit(model, bundle, cfg, progress=False, out_dir=tmp_path / "run")
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch_frac"] for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    for r in rows:
        assert {"epoch_frac", "step", "val_acc", "val_loss", "lr"} <= set(r)
        assert 0.0 <= r["val_acc"] <= 100.0 and r["val_loss"] > 0
    # the epoch ends are the epoch rows (train stats too), and the only ones fit returns
    assert [r.get("epoch") for r in rows] == [None, None, 1, None, 2]
    assert epoch_rows(tmp_path / "run" / "metrics.jsonl") == json.loads(json.dumps(hist))
    assert rows[0]["lr"] == rows[2]["lr"] == 0.05  # the first step's rate; cosine lowers it mid-epoch
    assert rows[1]["lr"] < 0.05
    # the start is the untrained model's val accuracy/loss, as an independent evaluate() gives it
    ref = evaluate(start, data.loader(bundle.val, 256), "cpu")
    assert rows[0]["val_acc"] == ref["top1"] and rows[0]["val_loss"] == pytest.approx(ref["loss"], rel=1e-6)
    _assert_png(tmp_path / "run" / "recovery_curve.png")
    ts = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["extra"]["train_state"]
    assert len(ts["history"]) == 2 and [r["epoch_frac"] for r in ts["curve"]] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_evaluations_do_not_change_training():
    """eval_every only adds measurements: the weights equal those of a run evaluated at epoch ends."""
    bundle = tiny_bundle(n_train=48, n_val=16, augment=True)
    a, b = tiny_model(), tiny_model()
    fit(a, bundle, TrainConfig(epochs=1, batch_size=16, eval_every=0.25), progress=False)
    fit(b, bundle, TrainConfig(epochs=1, batch_size=16), progress=False)
    assert same_weights(a, b)


def test_resume_keeps_the_curve(tmp_path):
    bundle = tiny_bundle(n_train=32, n_val=16)
    cfg = TrainConfig(epochs=2, batch_size=16, eval_every=0.5)
    fit(tiny_model(), bundle, cfg, progress=False, out_dir=tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop(row):
        raise Stop

    with pytest.raises(Stop):
        fit(tiny_model(), bundle, cfg, progress=False, out_dir=tmp_path / "cut", log=stop)
    assert [r["epoch_frac"] for r in _rows(tmp_path / "cut" / "metrics.jsonl")] == [0.0, 0.5, 1.0]
    fit(tiny_model(seed=5), bundle, cfg, progress=False, out_dir=tmp_path / "cut", resume=tmp_path / "cut" / "last.pt")
    strip = [[{k: v for k, v in r.items() if k != "img_per_s"} for r in _rows(d / "metrics.jsonl")]
             for d in (tmp_path / "whole", tmp_path / "cut")]
    assert strip[0] == strip[1] and [r["epoch_frac"] for r in strip[1]] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_eval_every_is_validated_and_marks_are_steps():
    for bad in (0, 0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="eval_every"):
            TrainConfig(eval_every=bad)
    assert TrainConfig(eval_every=1).eval_every == 1
    assert eval_steps(4, 1.0) == [4] and eval_steps(4, 0.5) == [2, 4]
    assert eval_steps(10, 0.25) == [2, 5, 8, 10] and eval_steps(3, 0.1) == [1, 2, 3]
    assert eval_steps(10, 0.1) == list(range(1, 11))  # 0.1 * 10 is not quite 1: no extra point


# --- report --curves ----------------------------------------------------------------------

def _run_dir(root: Path, name: str, vals: list[tuple[float, float]]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    lines = []
    for i, (x, v) in enumerate(vals):
        row = {"epoch_frac": x, "step": int(x * 4), "val_acc": v, "val_loss": 1.0, "lr": 0.01}
        if float(x).is_integer() and x > 0:
            row = {"epoch": int(x), "train_loss": 1.0, **row}
        lines.append(json.dumps(row))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_report_curves_overlays_runs(tmp_path, capsys):
    a = _run_dir(tmp_path, "ft_lr0.01", [(0.0, 40.0), (0.5, 70.5), (1.0, 80.25), (1.5, 82.0), (2.0, 81.0)])
    b = _run_dir(tmp_path, "ft_kd", [(0.0, 40.0), (0.5, 60.0), (1.0, 66.75)])
    out = tmp_path / "rep" / "curves.png"
    assert main(["report", "--curves", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| run | start val | best val | final val | epochs |"
    assert "| ft_lr0.01 | 40.00 | 82.00 | 81.00 | 2 |" in lines
    assert "| ft_kd | 40.00 | 60.00 | 66.75 | 1 |" not in lines  # best is the max
    assert "| ft_kd | 40.00 | 66.75 | 66.75 | 1 |" in lines
    assert f"written to {out}" in text
    _assert_png(out)
    # a folder as --out gets recovery_curves.png; the function returns the same numbers
    res = report.curves([str(a), str(b)], tmp_path / "rep2")
    assert res["png"] == str(tmp_path / "rep2" / "recovery_curves.png") and Path(res["png"]).is_file()
    assert [(r["run"], r["start_val"], r["best_val"], r["final_val"], r["epochs"]) for r in res["rows"]] == [
        ("ft_lr0.01", 40.0, 82.0, 81.0, 2.0), ("ft_kd", 40.0, 66.75, 66.75, 1.0)]


def test_report_curves_reads_old_per_epoch_files_and_real_runs(tmp_path, capsys):
    """A metrics.jsonl from before the curve (epoch rows only: no start) and one that fit wrote."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"epoch": 1, "lr": 0.1, "val_acc": 50.0}\n'
                                       '{"epoch": 2, "lr": 0.1, "val_acc": 55.5}\n')
    fit(tiny_model(), tiny_bundle(n_train=32, n_val=16), TrainConfig(epochs=1, batch_size=16, eval_every=0.5),
        progress=False, out_dir=tmp_path / "new")
    assert main(["report", "--curves", str(old), str(tmp_path / "new"), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| old | – | 55.50 | 55.50 | 2 |" in out
    new = next(ln for ln in out.splitlines() if ln.startswith("| new |"))
    assert new.endswith("| 1 |")


@pytest.mark.parametrize("content,match", [
    (None, "metrics.jsonl: no such file"),
    ('{"epoch_frac": 0, "val_acc": 10.0}\n{"epoch_frac": 0.5, "val_acc": \n', "line 2 is not valid JSON"),
    ('[1, 2]\n', "line 1 is not a JSON object"),
    ('{"epoch_frac": 0, "val_acc": "high"}\n', "line 1: val_acc must be a finite number"),
    ('{"epoch": 1, "train_loss": 2.0}\n', "has no validation rows"),
])
def test_report_curves_bad_input_is_one_line_exit_2(tmp_path, capsys, content, match):
    good = _run_dir(tmp_path, "good", [(0.0, 10.0), (1.0, 20.0)])
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "metrics.jsonl").write_text(content)
    out = tmp_path / "c.png"
    assert main(["report", "--curves", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and str(bad / "metrics.jsonl") in err[0]
    assert not out.exists()
    with pytest.raises(UserError, match=match):
        report.curves([str(bad)], out)


def test_report_needs_inputs_or_curves_not_both(tmp_path, capsys):
    run = _run_dir(tmp_path, "r", [(0.0, 10.0)])
    assert main(["report", "--out", str(tmp_path / "o")]) == 2
    assert "--curves" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "x.pt"), "--curves", str(run), "--out", str(tmp_path / "o.png")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
