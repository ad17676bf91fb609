"""Bad input through the CLI: one line ``error: <file>: <field>: message``, exit 2, no output.

Every command is driven through ``compressor.cli.main`` (in-process, fast) with files that are
wrong in one way each: rates files, model and criterion names, checkpoint files (missing, empty,
truncated, not a checkpoint, another model, a pickle that would run code), data folders and
devices. A failed command must not create its output folder, nor touch files already there.
``--debug`` (one subprocess) shows the traceback instead.

``BAD_DATA`` and ``BAD_OPTIONS`` keep, per case, what escaped as a traceback before it was fixed.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import data
from compressor.storage import checkpoint
from compressor.cli import main
from compressor.pruning.criteria import list_criteria
from compressor.models import get_model, list_models
from tests.conftest import TINY_VGG, randomize_bn, seed_files

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(autouse=True)
def _private_data_cache(tmp_path, monkeypatch):
    """CIFAR-from-ImageFolder decodes into a cache: keep it in tmp, not ~/.cache."""
    d = list(data.cifar.__defaults__)
    d[3] = tmp_path / "cache"  # (input_size, val_size, seed, cache, download)
    monkeypatch.setattr(data.cifar, "__defaults__", tuple(d))
    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")


class _RunsCode:
    """Unpickling this calls ``os.system`` (blocked module) or ``open`` (builtin): proof-of-run markers."""

    def __init__(self, marker: Path, builtin: bool = False) -> None:
        self.marker, self.builtin = str(marker), builtin

    def __reduce__(self):
        if self.builtin:
            return (open, (self.marker, "w"))
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    tiny = randomize_bn(get_model("vgg16_bn", cfg=list(TINY_VGG)))
    f = {"tiny": checkpoint.save(d / "tiny.pt", tiny),
         "tiny100": checkpoint.save(d / "tiny100.pt", get_model("vgg16_bn", cfg=list(TINY_VGG), num_classes=100)),
         "missing": d / "missing.pt", "marker": d / "PWNED"}
    good = f["tiny"].read_bytes()
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "text.pt").write_text("this is not a checkpoint\n")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"epoch": 3, "notes": "no tensors"}, d / "dict.pt")
    doc = torch.load(f["tiny"], weights_only=True)
    torch.save({**doc, "format_version": 99}, d / "future.pt")
    torch.save({k: v for k, v in doc.items() if k != "state_dict"}, d / "no_state.pt")
    torch.save({"state_dict": _RunsCode(f["marker"])}, d / "evil_os.pt")  # torch zip format
    torch.save({"state_dict": _RunsCode(f["marker"], builtin=True)}, d / "evil_open.pt")
    with open(d / "evil_raw.pkl", "wb") as fh:  # a bare pickle (protocol 4), not torch's format
        pickle.dump({"state_dict": _RunsCode(f["marker"])}, fh, protocol=4)
    nan = randomize_bn(get_model("vgg16_bn", cfg=list(TINY_VGG)))
    with torch.no_grad():
        nan.features.conv0.weight[0, 0, 0, 0] = float("nan")
        nan.classifier.linear2.bias[0] = float("inf")
    f["nan"] = checkpoint.save(d / "nan.pt", nan)
    bad_cfg = dict(doc)
    bad_cfg["cfg"] = [c if c == "M" else 2 * c for c in TINY_VGG]
    torch.save(bad_cfg, d / "bad_cfg.pt")
    for name in ("empty", "truncated", "text", "list", "dict", "future", "no_state", "evil_os", "evil_open",
                 "bad_cfg"):
        f[name] = d / f"{name}.pt"
    f["evil_raw"] = d / "evil_raw.pkl"
    return f


_TQDM = re.compile(r"^[\w ]+:\s+\d+%\|")  # data decoding's progress bar ignores --no-progress (it is erased on a tty)


def run(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, [ln for ln in cap.err.splitlines() if ln.strip() and not _TQDM.match(ln)], cap.out


def one_line_error(code: int, err: list[str], *needles: str) -> str:
    assert code == 2, err
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("error: ") and "Traceback" not in line, line
    for n in needles:
        assert n in line, (n, line)
    return line


def seed_outputs(folder: Path) -> dict[str, bytes]:
    return seed_files(folder, {"pruned.pt": b"earlier checkpoint", "plan.json": b'{"earlier": true}\n',
                               "scores.pt": b"earlier scores", "summary.json": b"{}\n", "size_table.md": b"| earlier |\n"})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --------------------------------------------------------------------------- rates files
UNITS_HINT = "features.conv1"
RATE_CASES = [
    # (file content, field shown after the file name, words in the message)
    (b"\xff\xfe\x00 rates", None, "not a text file"),
    ("rates: [0.1\n", None, "not valid YAML (line"),
    ("rates:\n\t- 0.1\n", None, "not valid YAML"),
    ("", None, "must be a YAML mapping"),
    ("0.5\n", None, "must be a YAML mapping with a 'rates' key, got float"),
    ("- 0.5\n", None, "got list"),
    ("ratez: [0.1]\n", "ratez", "unknown key 'ratez' (did you mean: rates"),
    ("rates: {features.conv1x: 0.1}\n", "rates.features.conv1x", f"did you mean: {UNITS_HINT}"),
    ("rates: {features.conv0: half}\n", "rates.features.conv0", "rate must be a number"),
    ("rates: {features.conv0: -0.1}\n", "rates.features.conv0", "rate must be in [0, 1), got -0.1"),
    ("rates: {features.conv0: 1.0}\n", "rates.features.conv0", "rate must be in [0, 1), got 1.0"),
    ("rates: {features.conv0: .nan}\n", "rates.features.conv0", "rate must be a number"),
    ("rates: {features.conv0: .inf}\n", "rates.features.conv0", "rate must be in [0, 1)"),
    ("rates: [0.1, 0.2, 0.3]\n", "rates", "has 3 rates, the model has 12 or 13"),
    ('rates: "[0.5]*5"\n', "rates", "has 5 rates, the model has 12 or 13"),
    ('rates: "[0.5]*"\n', "rates", "malformed rate string"),
    ('rates: "[0.5]*-1"\n', "rates", "malformed rate string"),
    ("rates: \"__import__('os').system('touch {marker}')\"\n", "rates", "malformed rate string"),
    ("rates: !!python/object/apply:os.system ['touch {marker}']\n", None, "not valid YAML"),
    ("rates: true\n", "rates", "must be a number, string, list or mapping"),
    ("default: 2\n", "default", "rate must be in [0, 1)"),
    ("rounding: nearest\ndefault: 0.5\n", "rounding", "unknown rounding 'nearest'"),
    ("model: mobilenet_v2\ndefault: 0.5\n", "model", "is for model 'mobilenet_v2', not 'vgg16_bn'"),
    ("target: {macs: 0}\n", "target.macs", "budget must be a fraction kept in (0, 1]"),
    ("target: {macs: 1.5}\n", "target.macs", "got 1.5"),
    ("target: {params: -0.2}\n", "target.params", "got -0.2"),
    ("target: {macs: half}\n", "target.macs", "got 'half'"),
    ("target: 0.5\n", "target", "must be a mapping like {macs: 0.5}"),
    ("target: {flops: 0.5}\n", "target.flops", "unknown budget 'flops'"),
]


@pytest.mark.parametrize("content,field,words", RATE_CASES, ids=[f"r{i}" for i in range(len(RATE_CASES))])
def test_bad_rates_file(tmp_path, files, capsys, content, field, words):
    marker = tmp_path / "MARKER"
    rates = tmp_path / "rates.yaml"
    if isinstance(content, bytes):
        rates.write_bytes(content)
    else:
        rates.write_text(content.replace("{marker}", str(marker)))
    out = tmp_path / "run"
    old = seed_outputs(out)
    code, err, _ = run(capsys, ["prune", "--model", "vgg16_bn", "--rates", rates, "--checkpoint", files["tiny"],
                                "--n-images", "16", "--out", out, "--device", "cpu", "--no-progress"])
    prefix = f"error: {rates}: " + (f"{field}: " if field else "")
    one_line_error(code, err, prefix, words)
    assert snapshot(out) == old
    assert not marker.exists()


def test_missing_rates_file(tmp_path, files, capsys):
    code, err, _ = run(capsys, ["prune", "--model", "vgg16_bn", "--rates", tmp_path / "nope.yaml",
                                "--checkpoint", files["tiny"], "--out", tmp_path / "o"])
    one_line_error(code, err, f"{tmp_path / 'nope.yaml'}: rates file not found")
    assert not (tmp_path / "o").exists()


def test_bad_rates_file_in_a_sweep(tmp_path, files, capsys):
    rates = tmp_path / "r.yaml"
    rates.write_text("rates: {features.conv0: 1.5}\n")
    code, err, _ = run(capsys, ["sweep", "--checkpoint", files["tiny"], "--rates", rates, "--out", tmp_path / "sw",
                                "--no-progress"])
    one_line_error(code, err, f"{rates}: rates.features.conv0: rate must be in [0, 1)")
    assert not (tmp_path / "sw").exists()


# --------------------------------------------------------------------------- model and criterion names
def _valid_models() -> str:
    return "valid: " + ", ".join(list_models())


@pytest.mark.parametrize("argv", [
    ["prune", "--model", "vgg17", "--rates", "r.yaml"],
    ["train", "--model", "vgg17"],
    ["list-layers", "--model", "vgg17"],
    ["eval", "--checkpoint", "{plain}", "--model", "vgg17"],
], ids=["prune", "train", "list-layers", "eval-plain-state-dict"])
def test_unknown_model_lists_the_valid_ones(tmp_path, files, capsys, argv):
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(files["tiny"], weights_only=True)["state_dict"], plain)
    argv = [str(plain) if a == "{plain}" else a for a in argv] + ["--out", tmp_path / "o"] * (argv[0] in (
        "prune", "train"))
    code, err, _ = run(capsys, argv)
    one_line_error(code, err, "model: unknown model 'vgg17' (did you mean: vgg16_bn?)", _valid_models())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cmd", ["rank", "sensitivity", "eval", "export"])
def test_unknown_model_with_a_checkpoint_lists_the_valid_ones(tmp_path, files, capsys, cmd):
    code, err, _ = run(capsys, [cmd, "--model", "vgg17", "--checkpoint", files["tiny"], "--out", tmp_path / "o"]
                       if cmd != "eval" else [cmd, "--model", "vgg17", "--checkpoint", files["tiny"]])
    one_line_error(code, err, "unknown model 'vgg17' (did you mean: vgg16_bn?)", _valid_models())


@pytest.mark.parametrize("cmd", [
    "prune", "rank", "sensitivity",
    "sweep",
])
def test_unknown_criterion_lists_the_valid_ones(tmp_path, files, capsys, cmd):
    rates = tmp_path / "r.yaml"
    rates.write_text('rates: "[0.5]*13"\n')
    argv = {"prune": ["prune", "--model", "vgg16_bn", "--rates", rates, "--checkpoint", files["tiny"]],
            "rank": ["rank", "--model", "vgg16_bn", "--checkpoint", files["tiny"]],
            "sensitivity": ["sensitivity", "--model", "vgg16_bn", "--checkpoint", files["tiny"]],
            "sweep": ["sweep", "--checkpoint", files["tiny"], "--macs", "0.5", "--n-images", "16"]}[cmd]
    out = tmp_path / ("o.pt" if cmd == "rank" else "o")
    code, err, _ = run(capsys, argv + ["--criterion", "hrnak", "--out", out, "--no-progress"])
    one_line_error(code, err, "criterion: unknown criterion 'hrnak' (did you mean: hrank",
                   "valid: " + ", ".join(list_criteria()))
    assert not out.exists()


# --------------------------------------------------------------------------- checkpoint files
BAD_CKPT = {  # kind -> words in the message
    "missing": "checkpoint not found",
    "empty": "checkpoint is empty",
    "truncated": "not a readable checkpoint",
    "text": "not a readable checkpoint",
    "list": "not a checkpoint (top level is list",
    "dict": "not a compressor checkpoint nor a state_dict",
    "future": "format_version: unsupported format_version 99",
    "no_state": "state_dict: checkpoint lacks 'state_dict'",
}


def _ckpt_argv(cmd: str, ck: Path, tmp: Path, rates: Path) -> list:
    return {
        "eval": ["eval", "--checkpoint", ck],
        "rank": ["rank", "--model", "vgg16_bn", "--checkpoint", ck, "--out", tmp / "o" / "s.pt"],
        "prune": ["prune", "--model", "vgg16_bn", "--rates", rates, "--checkpoint", ck, "--out", tmp / "o"],
        "finetune": ["finetune", "--checkpoint", ck, "--out", tmp / "o"],
        "finetune-resume": ["finetune", "--resume", ck],
        "train-resume": ["train", "--resume", ck, "--out", tmp / "o"],
        "train-teacher": ["train", "--model", "vgg16_bn", "--teacher", ck, "--epochs", "0", "--out", tmp / "o"],
        "export": ["export", "--checkpoint", ck, "--out", tmp / "o" / "m.onnx"],
        "sensitivity": ["sensitivity", "--model", "vgg16_bn", "--checkpoint", ck, "--out", tmp / "o"],
        "sweep": ["sweep", "--checkpoint", ck, "--macs", "0.5", "--out", tmp / "o"],
        "report": ["report", ck, "--out", tmp / "o"],
    }[cmd]


CKPT_COMMANDS = ["eval", "rank", "prune", "finetune", "finetune-resume", "train-resume", "train-teacher", "export",
                 "sensitivity", "sweep", "report"]


@pytest.mark.parametrize("cmd", CKPT_COMMANDS)
def test_bad_checkpoint_files(tmp_path, files, capsys, monkeypatch, cmd):
    """Every kind of broken checkpoint, through every command that reads one."""
    import compressor.models as models

    real = models.get_model  # train --teacher builds a student first: keep it tiny
    monkeypatch.setattr(models, "get_model", lambda name, num_classes=None, cfg=None, **k: real(
        name, num_classes=num_classes, cfg=cfg or list(TINY_VGG), **k))
    rates = tmp_path / "r.yaml"
    rates.write_text('rates: "[0.5]*13"\n')
    for kind, words in BAD_CKPT.items():
        ck = files[kind]
        if cmd == "report" and kind == "missing":
            words = "no such file or folder"
        code, err, _ = run(capsys, _ckpt_argv(cmd, ck, tmp_path, rates) + ["--no-progress"] * (cmd != "export"))
        one_line_error(code, err, f"error: {ck}: ", words)
        assert not (tmp_path / "o").exists(), (cmd, kind)


@pytest.mark.parametrize("kind", ["evil_os", "evil_open", "evil_raw"])
@pytest.mark.parametrize("cmd", ["eval", "rank", "prune", "finetune", "train-teacher", "export", "report"])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, files, capsys, monkeypatch, cmd, kind):
    import compressor.models as models

    real = models.get_model
    monkeypatch.setattr(models, "get_model", lambda name, num_classes=None, cfg=None, **k: real(
        name, num_classes=num_classes, cfg=cfg or list(TINY_VGG), **k))
    rates = tmp_path / "r.yaml"
    rates.write_text('rates: "[0.5]*13"\n')
    code, err, _ = run(capsys, _ckpt_argv(cmd, files[kind], tmp_path, rates))
    assert code == 2 and any(f"error: {files[kind]}: " in ln for ln in err), err
    assert not files["marker"].exists(), "the pickled payload ran"
    assert not (tmp_path / "o").exists()


def test_os_payload_is_reported_as_refused(files, capsys):
    code, err, _ = run(capsys, ["eval", "--checkpoint", files["evil_os"]])
    line = one_line_error(code, err, f"error: {files['evil_os']}: refused")
    assert "weights_only` set to `False`" not in line


def test_bare_pickle_is_one_plain_line(files, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err, _ = run(capsys, ["eval", "--checkpoint", files["evil_raw"]])
    line = one_line_error(code, err, f"error: {files['evil_raw']}: not a readable checkpoint", "Unsupported operand")
    assert "Weights only load failed" not in line
    assert not [w for w in caught if "pickle protocol" in str(w.message)]  # a 2nd and 3rd stderr line in a shell
    assert not files["marker"].exists()


def test_builtin_payload_is_reported_as_refused(files, capsys):
    code, err, _ = run(capsys, ["eval", "--checkpoint", files["evil_open"]])
    one_line_error(code, err, f"error: {files['evil_open']}: refused")
    assert not files["marker"].exists()


def test_checkpoint_of_another_model_or_class_count(tmp_path, files, capsys):
    rates = tmp_path / "r.yaml"
    rates.write_text("default: 0.5\n")
    cases = [
        (["rank", "--model", "mobilenet_v2", "--checkpoint", files["tiny"], "--out", tmp_path / "o" / "s.pt"],
         f"{files['tiny']}: model: checkpoint is a 'vgg16_bn', not a 'mobilenet_v2'"),
        (["prune", "--model", "vgg16_bn", "--rates", rates, "--checkpoint", files["tiny"], "--num-classes", "100",
          "--out", tmp_path / "o"], f"{files['tiny']}: num_classes: checkpoint has 10 classes, 100 were asked for"),
        (["prune", "--model", "vgg16_bn", "--rates", rates, "--checkpoint", files["tiny100"], "--out", tmp_path / "o"],
         f"{files['tiny100']}: num_classes: the data has 10 classes, the checkpoint 100"),
        (["eval", "--checkpoint", files["tiny100"]],
         f"{files['tiny100']}: num_classes: the data has 10 classes, the checkpoint 100"),
        (["finetune", "--checkpoint", files["tiny100"], "--out", tmp_path / "o"],
         f"{files['tiny100']}: num_classes: the data has 10 classes, the checkpoint 100"),
        (["sensitivity", "--model", "vgg16_bn", "--checkpoint", files["tiny100"], "--out", tmp_path / "o"],
         f"{files['tiny100']}: num_classes: the data has 10 classes, the checkpoint 100"),
        (["eval", "--checkpoint", files["bad_cfg"]], f"{files['bad_cfg']}: state_dict: weights do not fit vgg16_bn"),
    ]
    for argv, words in cases:
        code, err, _ = run(capsys, argv + ["--no-progress"])
        one_line_error(code, err, words)
        assert not (tmp_path / "o").exists(), argv


def test_plain_state_dict_of_another_model(tmp_path, files, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(files["tiny"], weights_only=True)["state_dict"], plain)
    code, err, _ = run(capsys, ["eval", "--checkpoint", plain, "--model", "mobilenet_v2"])
    one_line_error(code, err, f"{plain}: state_dict: has no ", "not a mobilenet_v2 state_dict")
    code, err, _ = run(capsys, ["eval", "--checkpoint", plain])
    one_line_error(code, err, "a plain state_dict needs --model")


def test_cfg_is_checked_against_the_weights_before_building(files, monkeypatch):
    """Build on the meta device first (no memory), compare shapes, then build for real."""
    import compressor.storage.checkpoint as ckmod

    real = ckmod.get_model
    hostile = [c if c == "M" else 2 * c for c in TINY_VGG]  # stands in for [10**6, ...]

    def guarded(name, num_classes=None, cfg=None, **kw):
        if cfg is not None and list(cfg) == hostile and torch.empty(0).device.type != "meta":
            raise AssertionError("built the file's cfg with real tensors before checking it against the weights")
        return real(name, num_classes=num_classes, cfg=cfg, **kw)

    monkeypatch.setattr(ckmod, "get_model", guarded)
    with pytest.raises(ckmod.UserError, match="cfg"):
        checkpoint.load(files["bad_cfg"])


def test_nan_and_inf_weights_warn_naming_the_file(files, capsys):
    """A warning (the CLI prints it on stderr), or an error under ``strict_finite`` (library only)."""
    with pytest.warns(UserWarning, match=rf"{files['nan']}: 2 tensor\(s\) contain NaN/inf"):
        code, err, out = run(capsys, ["eval", "--checkpoint", files["nan"], "--no-progress"])
    assert code == 0 and "top-1" in out and not err
    with pytest.raises(checkpoint.UserError, match=r"nan.pt: state_dict: 2 tensor\(s\) contain NaN/inf"):
        checkpoint.load(files["nan"], strict_finite=True)


# --------------------------------------------------------------------------- data
def _tree(root: Path, classes: int = 10, n: int = 2, mode: str = "RGB", size: int = 32, splits=("train", "test"),
          corrupt: str | None = None, mixed: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in splits:
        for c in range(classes):
            d = root / s / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                sz = size + (i if mixed else 0)
                a = rng.integers(0, 255, (sz, sz, 3 if mode == "RGB" else 1), dtype=np.uint8)
                Image.fromarray(a if mode == "RGB" else a[..., 0], mode).save(d / f"{i}.png")
    if corrupt:
        (root / corrupt / "class0" / "broken.png").write_bytes(b"not an image at all")
    return root


def _empty_classes(root: Path, splits=("train", "test")) -> Path:
    for s in splits:
        for c in range(10):
            (root / s / f"class{c}").mkdir(parents=True)
    return root


DATA_CASES = {  # name -> (--data, how to build the root, words)
    "missing": ("cifar10", lambda p: p / "nope", "data folder not found"),
    "empty": ("cifar10", lambda p: (p / "e").mkdir() or p / "e", "expected train/ and test/ class folders"),
    "no-classes": ("cifar10", lambda p: ((p / "e" / "train").mkdir(parents=True), (p / "e" / "test").mkdir(),
                                         p / "e")[-1], "no class folders found"),
    "empty-classes": ("cifar10", lambda p: _empty_classes(p / "e"), "class folders are empty"),
    "3-classes": ("cifar10", lambda p: _tree(p / "t", classes=3), "cifar10 needs 10 classes, found 3"),
    "mixed-sizes": ("cifar10", lambda p: _tree(p / "t", mixed=True), "images have different sizes"),
    "if-missing": ("imagefolder", lambda p: p / "nope", "expected a train/ folder"),
    "if-no-test": ("imagefolder", lambda p: _tree(p / "t", classes=2, splits=("train",)),
                   "expected a val/ or test/ folder"),
    "unknown-dataset": ("cifar11", lambda p: p, "data: unknown dataset 'cifar11'; valid: digits, cifar10"),
    "no-root": ("cifar10", lambda p: None, "data-root: --data cifar10 needs --data-root"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_folder(tmp_path, files, capsys, case):
    name, build, words = DATA_CASES[case]
    root = build(tmp_path)
    argv = ["eval", "--checkpoint", files["tiny"], "--data", name, "--no-progress"]
    if root is not None:
        argv += ["--data-root", root]
    code, err, _ = run(capsys, argv)
    one_line_error(code, err, words)


BAD_DATA = {
    "corrupt-image": ("cifar10", lambda p: _tree(p / "t", corrupt="train"),
                      "PIL.UnidentifiedImageError escapes data._read_imagefolder_arrays"),
    "not-a-tarball": ("cifar10", lambda p: ((p / "d.tar.gz").write_bytes(b"garbage"), p / "d.tar.gz")[-1],
                      "tarfile.ReadError escapes data._locate (and an empty folder is left in the cache)"),
    "root-is-a-file": ("cifar10", lambda p: ((p / "x.png").write_bytes(b"x"), p / "x.png")[-1],
                       "NotADirectoryError escapes data._locate"),
    "if-empty-train": ("imagefolder", lambda p: ((p / "e" / "train").mkdir(parents=True),
                                                 (p / "e" / "val").mkdir(), p / "e")[-1],
                       "torchvision's FileNotFoundError escapes data.imagefolder"),
    "if-empty-classes": ("imagefolder", lambda p: _empty_classes(p / "e", ("train", "val")),
                         "torchvision's FileNotFoundError escapes data.imagefolder"),
    "if-corrupt-image": ("imagefolder", lambda p: _tree(p / "t", n=1, splits=("train", "val"), corrupt="val"),
                         "ImageFolder decodes lazily: UnidentifiedImageError escapes mid-evaluation"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_folder_regressions(tmp_path, files, capsys, case):
    name, build, _ = BAD_DATA[case]
    code, err, _ = run(capsys, ["eval", "--checkpoint", files["tiny"], "--data", name, "--data-root", build(tmp_path),
                                "--no-progress"])
    one_line_error(code, err, str(tmp_path))


@pytest.mark.parametrize("cmd", ["rank", "finetune", "sensitivity", "train"])
def test_bad_data_folder_other_commands(tmp_path, files, capsys, cmd):
    argv = {"rank": ["rank", "--model", "vgg16_bn", "--checkpoint", files["tiny"], "--out", tmp_path / "o" / "s.pt"],
            "finetune": ["finetune", "--checkpoint", files["tiny"], "--out", tmp_path / "o"],
            "sensitivity": ["sensitivity", "--model", "vgg16_bn", "--checkpoint", files["tiny"],
                            "--out", tmp_path / "o"],
            "train": ["train", "--model", "vgg16_bn", "--out", tmp_path / "o"]}[cmd]
    code, err, _ = run(capsys, argv + ["--data", "cifar10", "--data-root", tmp_path / "nope", "--no-progress"])
    one_line_error(code, err, f"{tmp_path / 'nope'}: data folder not found")
    assert not (tmp_path / "o").exists()


def test_images_are_adapted_to_the_model(tmp_path):
    """Grayscale becomes 3 channels and any size is resized to the model's input size (bilinear).

    So there is no 'wrong size' error: a 64x64 set feeds a 32x32 CIFAR model, and 32x32 digits feed
    a 224x224 ImageNet-layout model (upsampled, which is slow and rarely what one wants).
    """
    gray = data.cifar("cifar10", _tree(tmp_path / "g", mode="L"), val_size=2, cache=tmp_path / "c")
    big = data.cifar("cifar10", _tree(tmp_path / "b", size=64), val_size=2, cache=tmp_path / "c")
    assert gray.test[0][0].shape == big.test[0][0].shape == (3, 32, 32)
    assert data.load("digits", input_size=224).test[0][0].shape == (3, 224, 224)


def test_grayscale_imagefolder_with_a_224_model_through_eval(tmp_path, capsys):
    torch.manual_seed(0)
    tiny224 = get_model("vgg16_bn_imagenet", num_classes=2,
                        cfg=[4, 4, "M", 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M"])
    ck = checkpoint.save(tmp_path / "m224.pt", tiny224)
    root = _tree(tmp_path / "g", classes=2, n=2, mode="L", size=20, splits=("train", "val"))
    code, err, out = run(capsys, ["eval", "--checkpoint", ck, "--data", "imagefolder", "--data-root", root,
                                  "--no-progress", "--json"])
    assert code == 0, err
    assert '"n": 4' in out


def test_small_cifar_folder_evaluates(tmp_path, files, capsys):
    code, err, _ = run(capsys, ["eval", "--checkpoint", files["tiny"], "--data", "cifar10", "--data-root",
                                _tree(tmp_path / "t"), "--no-progress"])
    assert code == 0, err


# --------------------------------------------------------------------------- devices
@NO_GPU
@pytest.mark.parametrize("cmd", ["rank", "eval", "finetune", "train", "sensitivity", "sweep", "report"])
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path, files, capsys, cmd):
    argv = {"rank": ["rank", "--model", "vgg16_bn", "--checkpoint", files["tiny"], "--out", tmp_path / "o" / "s.pt"],
            "eval": ["eval", "--checkpoint", files["tiny"]],
            "finetune": ["finetune", "--checkpoint", files["tiny"], "--out", tmp_path / "o"],
            "train": ["train", "--model", "vgg16_bn", "--out", tmp_path / "o"],
            "sensitivity": ["sensitivity", "--model", "vgg16_bn", "--checkpoint", files["tiny"],
                            "--out", tmp_path / "o"],
            "sweep": ["sweep", "--checkpoint", files["tiny"], "--macs", "0.5", "--out", tmp_path / "o"],
            "report": ["report", files["tiny"], "--out", tmp_path / "o"]}[cmd]
    for dev in ("cuda", "cuda:1"):
        code, err, _ = run(capsys, argv + ["--device", dev, "--no-progress"])
        one_line_error(code, err, "device: --device cuda was asked for, but no CUDA GPU is available")
    code, err, _ = run(capsys, argv + ["--device", "tpu", "--no-progress"])
    one_line_error(code, err, "device: unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- numeric options (regressions)
BAD_OPTIONS = [
    ("rank-n-images-0", ["rank", "--model", "vgg16_bn", "--checkpoint", "{tiny}", "--n-images", "0", "--out", "{out}"],
     "n-images", "RuntimeError 'no calibration images were seen' escapes (data.calibration_subset accepts n < 1)"),
    ("rank-n-images-neg", ["rank", "--model", "vgg16_bn", "--checkpoint", "{tiny}", "--n-images", "-5",
                           "--out", "{out}"], "n-images",
     "n=-5 silently ranks len-5 images (numpy slice [:-5]) and exits 0"),
    ("rank-batch-0", ["rank", "--model", "vgg16_bn", "--checkpoint", "{tiny}", "--n-images", "8", "--batch-size", "0",
                      "--out", "{out}"], "batch", "DataLoader's ValueError escapes (data.loader does not check it)"),
    ("eval-batch-0", ["eval", "--checkpoint", "{tiny}", "--batch-size", "0"], "batch",
     "DataLoader's ValueError escapes (data.loader does not check batch_size)"),
    ("rank-rtol-neg", ["rank", "--model", "vgg16_bn", "--checkpoint", "{tiny}", "--n-images", "8", "--rank-rtol", "-1",
                       "--out", "{out}"], "rtol", "criteria.hrank.HRank raises ValueError, not UserError"),
    ("prune-epochs-neg", ["prune", "--model", "vgg16_bn", "--rates", "{rates}", "--checkpoint", "{tiny}",
                          "--finetune-epochs", "-1", "--out", "{out}"], "epochs",
     "TrainConfig's ValueError escapes commands/prune.py (train.py wraps it, prune does not)"),
    ("prune-lr-neg", ["prune", "--model", "vgg16_bn", "--rates", "{rates}", "--checkpoint", "{tiny}", "--lr", "-1",
                      "--out", "{out}"], "lr", "TrainConfig's ValueError escapes commands/prune.py"),
    ("sweep-epochs-neg", ["sweep", "--checkpoint", "{tiny}", "--macs", "0.5", "--epochs", "-1", "--out", "{out}"],
     "epochs", "TrainConfig's ValueError escapes commands/sweep.py"),
    ("export-opset-1", ["export", "--checkpoint", "{tiny}", "--opset", "1", "--n-real", "0", "--out", "{out}"], "opset",
     "onnx's ValidationError escapes export.to_onnx_bytes"),
    ("export-n-real-neg", ["export", "--checkpoint", "{tiny}", "--n-real", "-1", "--out", "{out}"], "n-real",
     "RuntimeError 'stack expects a non-empty TensorList' escapes export.real_images"),
    ("train-classes-0", ["train", "--model", "vgg16_bn", "--num-classes", "0", "--epochs", "0", "--out", "{out}"],
     "num_classes", "commands/train.py uses `args.num_classes or ...`: 0 is silently replaced, a model is trained"),
    ("debug-after-command", ["list-layers", "--model", "vgg16_bn", "--debug"], None,
     "--debug is only accepted before the command; `... prune ... --debug` is an argparse error"),
]


@pytest.mark.parametrize("argv,field", [pytest.param(a, f, id=i) for i, a, f, _ in BAD_OPTIONS])
def test_bad_numeric_options_regressions(tmp_path, files, capsys, monkeypatch, argv, field):
    import compressor.models as models

    real = models.get_model  # keep `train` tiny if it runs anyway
    monkeypatch.setattr(models, "get_model", lambda name, num_classes=None, cfg=None, **k: real(
        name, num_classes=num_classes, cfg=cfg or list(TINY_VGG), **k))
    rates = tmp_path / "r.yaml"
    rates.write_text('rates: "[0.5]*13"\n')
    out = tmp_path / "out" / ("o.onnx" if argv[0] == "export" else "o.pt" if argv[0] == "rank" else "o")
    subs = {"{tiny}": str(files["tiny"]), "{rates}": str(rates), "{out}": str(out)}
    argv = [subs.get(a, a) for a in argv] + ["--no-progress"] * (argv[0] not in ("export", "list-layers"))
    try:
        code, err, _ = run(capsys, argv)
    except SystemExit as exc:  # argparse
        code, err = exc.code, capsys.readouterr().err.splitlines()
    if field is None:
        assert code == 0, err
        return
    one_line_error(code, err, field)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["data-root", "classes"])
def test_sweep_validates_before_writing(tmp_path, files, capsys, problem):
    argv = ["sweep", "--macs", "0.5", "--n-images", "16", "--out", tmp_path / "sw", "--no-progress", "--no-report"]
    if problem == "data-root":
        argv += ["--checkpoint", files["tiny"], "--data", "cifar10", "--data-root", tmp_path / "nope"]
    else:
        argv += ["--checkpoint", files["tiny100"]]
    code, err, _ = run(capsys, argv)
    one_line_error(code, err)
    assert not (tmp_path / "sw").exists()


# --------------------------------------------------------------------------- --debug
def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    proc = subprocess.run([sys.executable, "-m", "compressor", "--debug", "eval", "--checkpoint", str(missing)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"compressor.errors.UserError: {missing}: checkpoint not found" in proc.stderr
