"""The CLI end to end on small inputs, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.storage import checkpoint
from compressor.cli import main
from tests.conftest import TINY_VGG, randomize_bn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_ckpt(tmp_path):
    from compressor.models import get_model

    torch.manual_seed(0)
    m = randomize_bn(get_model("vgg16_bn", cfg=list(TINY_VGG)))
    return checkpoint.save(tmp_path / "tiny.pt", m)


def rates_file(tmp_path, text='model: vgg16_bn\nrates: "[0.5]*7+[0.75]*5"\n'):
    p = tmp_path / "rates.yaml"
    p.write_text(text)
    return p


def test_prune_end_to_end_writes_reloadable_outputs(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "vgg16_bn", "--rates", str(rates_file(tmp_path)), "--checkpoint", str(tiny_ckpt),
                 "--n-images", "64", "--finetune-epochs", "1", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "| features.conv0 | 8 → 4 |" in text and "| features.conv16 | 16 → 16 |" in text
    assert f"outputs in {out}" in text
    net, ck = checkpoint.load(out / "pruned.pt", model="vgg16_bn")
    assert net.cfg[:2] == [4, 4] and ck["rates"]["rates"]["features.conv10"] == 0.75
    assert ck["plan"]["units"]["features.conv0"]["keep"] == json.loads((out / "plan.json").read_text())["units"][
        "features.conv0"]["keep"]
    from PIL import Image

    with Image.open(out / "widths.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    summary = json.loads((out / "summary.json").read_text())
    assert {"baseline_test", "pruned_test_no_finetune", "pruned_test_bn_recalibrated", "finetuned_test"} <= set(summary)
    assert summary["size_after"]["macs"] < summary["size_before"]["macs"]
    assert ck["provenance"]["seed"] == 0 and ck["provenance"]["bn_recalibrated"] is True


def test_prune_reuses_scores_and_rank_command(tmp_path, tiny_ckpt, capsys):
    scores = tmp_path / "s.pt"
    assert main(["rank", "--model", "vgg16_bn", "--checkpoint", str(tiny_ckpt), "--n-images", "32",
                 "--criterion", "hrank,l1", "--out", str(scores), "--export-hrank", str(tmp_path / "npy"),
                 "--no-progress"]) == 0
    assert len(list((tmp_path / "npy").glob("rank_conv*.npy"))) == 13
    rates = rates_file(tmp_path)
    sc = torch.load(scores, weights_only=True)
    for i, extra in enumerate([["--scores", str(scores)], ["--import-hrank", str(tmp_path / "npy")]]):
        out = tmp_path / f"r{i}"
        assert main(["prune", "--model", "vgg16_bn", "--rates", str(rates), "--checkpoint", str(tiny_ckpt),
                     "--out", str(out), "--no-progress", *extra]) == 0
        units = json.loads((out / "plan.json").read_text())["units"]
        for name, u in units.items():  # every kept channel ranks at least as high as every dropped one
            s = sc["scores"]["hrank"][name]
            dropped = sorted(set(range(u["width"])) - set(u["keep"]))
            if dropped:
                assert s[u["keep"]].min() >= s[dropped].max()
    assert not (tmp_path / "r0" / "scores.pt").exists()  # reused, not recomputed


@pytest.mark.parametrize("rates_text,match", [
    ('rates: "[0.5]*"\n', "malformed rate string"),
    ('rates: "__import__(\'os\')"\n', "malformed rate string"),
    ("rates: [0.1, 0.2]\n", "has 2 rates"),
    ("rates: {features.conv99: 0.1}\n", "unknown layer"),
    ("rates: {features.conv0: 1.5}\n", "rates.features.conv0"),
    ("foo: 1\n", "unknown key 'foo'"),
])
def test_bad_rates_exit_2_one_line_no_output(tmp_path, tiny_ckpt, rates_text, match, capsys):
    """In process (the exit code and stderr main() gives the shell); the first case also as a real process."""
    out = tmp_path / "never"
    argv = ["prune", "--model", "vgg16_bn", "--rates", str(rates_file(tmp_path, rates_text)), "--checkpoint",
            str(tiny_ckpt), "--out", str(out)]
    if rates_text.startswith('rates: "[0.5]*"'):
        proc = subprocess.run([sys.executable, "-m", "compressor", *argv], capture_output=True, text=True, cwd=ROOT)
        code, stderr = proc.returncode, proc.stderr
    else:
        code, stderr = main(argv), capsys.readouterr().err
    assert code == 2
    err = stderr.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "rates.yaml" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("args,match", [
    (["--model", "vgg17"], "unknown model 'vgg17'"),
    (["--criterion", "hrnak"], "unknown criterion 'hrnak' (did you mean: hrank"),
    (["--checkpoint", "/nonexistent.pt"], "checkpoint not found"),
    (["--data", "cifar10", "--data-root", "/nonexistent"], "data folder not found"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_bad_arguments_exit_2(tmp_path, tiny_ckpt, capsys, args, match):
    base = {"--model": "vgg16_bn", "--checkpoint": str(tiny_ckpt)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["prune", "--rates", str(rates_file(tmp_path)), "--out", str(tmp_path / "o")]
    for k, v in base.items():
        argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_other_model_exit_2(tmp_path, tiny_ckpt, capsys):
    assert main(["eval", "--checkpoint", str(tiny_ckpt), "--model", "vgg16_bn_imagenet"]) == 2
    assert "is a 'vgg16_bn', not a 'vgg16_bn_imagenet'" in capsys.readouterr().err


def test_eval_and_list_layers(tmp_path, tiny_ckpt, capsys):
    assert main(["eval", "--checkpoint", str(tiny_ckpt), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 360 and 0 <= res["top1"] <= 100 and res["params"] > 0
    assert main(["list-layers", "--model", "vgg16_bn"]) == 0
    out = capsys.readouterr().out
    assert "| 12 | features.conv16 | 512 | plain | 9.70M | 2623.0k | features.norm16+relu |" in out  # conv16 at 2x2, linear1


def test_every_command_help_has_examples(capsys):
    """In process (a subprocess per command cost a minute); the entry point itself is run once."""
    from compressor.cli import command_modules

    for name in command_modules():
        with pytest.raises(SystemExit) as exc:
            main([name.replace("_", "-"), "--help"])
        out = capsys.readouterr().out
        assert exc.value.code == 0 and "examples:" in out and f"compressor {name.replace('_', '-')}" in out, name
    proc = subprocess.run([sys.executable, "-m", "compressor", "prune", "--help"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and "examples:" in proc.stdout


def test_prune_with_budget_target_hits_it(tmp_path, tiny_ckpt):
    from compressor.pruning import counting
    from compressor.models import get_model

    out = tmp_path / "budget"
    rates = rates_file(tmp_path, "model: vgg16_bn\npolicy: global\ntarget: {macs: 0.5}\n")
    assert main(["prune", "--model", "vgg16_bn", "--rates", str(rates), "--checkpoint", str(tiny_ckpt),
                 "--criterion", "l1", "--out", str(out), "--no-progress"]) == 0
    net, _ = checkpoint.load(out / "pruned.pt")
    full = counting.count(get_model("vgg16_bn", cfg=list(TINY_VGG)))["macs"]
    assert abs(counting.count(net)["macs"] / full - 0.5) <= 0.01 * 0.5


def test_scores_of_another_criterion_or_checkpoint_are_refused(tmp_path, tiny_ckpt, capsys):
    from compressor.models import get_model

    scores = tmp_path / "s.pt"
    assert main(["rank", "--model", "vgg16_bn", "--checkpoint", str(tiny_ckpt), "--n-images", "16",
                 "--criterion", "l1", "--out", str(scores), "--no-progress"]) == 0
    rates = rates_file(tmp_path)
    assert main(["prune", "--model", "vgg16_bn", "--rates", str(rates), "--checkpoint", str(tiny_ckpt),
                 "--criterion", "chip", "--scores", str(scores), "--out", str(tmp_path / "o1")]) == 2
    assert "no 'chip' scores" in capsys.readouterr().err
    torch.manual_seed(1)
    other = checkpoint.save(tmp_path / "other.pt", get_model("vgg16_bn", cfg=list(TINY_VGG)))
    assert main(["prune", "--model", "vgg16_bn", "--rates", str(rates), "--checkpoint", str(other),
                 "--criterion", "l1", "--scores", str(scores), "--out", str(tmp_path / "o2")]) == 2
    assert "computed on other weights" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_prune_follows_or_notes_the_data_a_legacy_checkpoint_records(tmp_path, capsys):
    """A file with no data contract but a provenance naming its data: that data is the default
    (an error naming the missing root here), and an explicit --data says what it overrides."""
    from compressor.models import get_model

    torch.manual_seed(0)
    ck = checkpoint.save(tmp_path / "c.pt", get_model("vgg16_bn", cfg=list(TINY_VGG)),
                         prov=checkpoint.provenance(data="cifar10"))
    args = ["prune", "--model", "vgg16_bn", "--rates", str(rates_file(tmp_path)), "--checkpoint", str(ck),
            "--criterion", "l1", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {ck}: data-root: was made on cifar10 but records no data root; pass --data-root (or --data)"]
    assert not (tmp_path / "o1").exists()
    assert main(args + ["--data", "digits", "--out", str(tmp_path / "o2")]) == 0
    assert "note: --data digits overrides the checkpoint's data (cifar10)" in capsys.readouterr().err


def test_a_closed_pipe_gives_no_traceback(monkeypatch, tmp_path):
    """`... | head`: once the reader has gone, writes fail with EPIPE; the command ends quietly."""
    import os
    import sys

    from compressor.cli import main

    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    out = open(w, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["list-layers", "mobilenet_v2"]) == 141
    finally:
        monkeypatch.undo()
        out.close()


def test_prune_reads_the_model_from_the_checkpoint(tmp_path, tiny_ckpt, capsys):
    code = main(["prune", "--rates", str(rates_file(tmp_path)), "--checkpoint", str(tiny_ckpt), "--n-images", "64",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 0 and (tmp_path / "o" / "pruned.pt").is_file()
    code = main(["prune", "--rates", str(rates_file(tmp_path)), "--out", str(tmp_path / "o2"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: model: --model is required unless --checkpoint names a compressor checkpoint"]
