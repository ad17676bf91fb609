"""Issue 22: nothing lost, nothing escaped. One regression test per case: one line naming the file
and field, exit 2 (3 for a refused result), nothing half-written, nothing of the user's deleted."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from tests.test_bad_input import _private_data_cache, files, run  # noqa: F401 - fixtures


def _error_line(err: list[str]) -> str:
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "".join(err), err
    return errors[0]


# --------------------------------------------------------------------------- eval --save
def test_eval_save_refuses_a_nan_model_and_writes_nothing(tmp_path, files, capsys):  # noqa: F811
    dest = tmp_path / "imported" / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, err, out = run(capsys, ["eval", "--checkpoint", files["nan"], "--save", dest, "--no-progress"])
    assert code == 3, err
    line = _error_line(err)
    assert str(files["nan"]) in line and "weights" in line and "NaN/inf" in line, line
    assert not dest.exists() and not dest.parent.exists()


# --------------------------------------------------------------------------- a tar bomb
def _tarball(path: Path, members: dict[str, int]) -> Path:
    import io as _io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, size in members.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, _io.BytesIO(bytes(size)))
    return path


def _cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def test_a_tar_bomb_is_refused_before_unpacking_and_leaves_nothing(tmp_path, files, capsys, monkeypatch):  # noqa: F811
    from compressor.data import archives

    monkeypatch.setattr(archives, "ARCHIVE_FLOOR", 1 << 20)  # the same rule, at a test's scale: 16 MiB of zeros
    bomb = _tarball(tmp_path / "cifar.tar.gz", {"cifar/train/a/x.png": 16 << 20, "cifar/test/a/x.png": 1})
    assert bomb.stat().st_size < 100_000
    code, err, _ = run(capsys, ["eval", "--checkpoint", files["tiny"], "--data", "cifar10", "--data-root", bomb,
                                "--no-progress"])
    assert code == 2, err
    line = _error_line(err)
    assert str(bomb) in line and "cifar/train/a/x.png" in line and "decompression bomb" in line, line
    assert not [f for f in _cache_files(tmp_path / "cache") if "cifar" in f], _cache_files(tmp_path / "cache")


def test_an_archive_that_is_not_a_data_folder_leaves_nothing_in_the_cache(tmp_path, files, capsys):  # noqa: F811
    tarball = _tarball(tmp_path / "notdata.tar.gz", {"readme.txt": 100})
    code, err, _ = run(capsys, ["eval", "--checkpoint", files["tiny"], "--data", "cifar10", "--data-root", tarball,
                                "--no-progress"])
    assert code == 2, err
    assert "train/ and test/" in _error_line(err)
    assert not [f for f in _cache_files(tmp_path / "cache") if "notdata" in f], _cache_files(tmp_path / "cache")


# --------------------------------------------------------------------------- --overwrite: nothing lost
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from compressor.storage import io
from compressor.storage import runfolder
from compressor.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but our lock and the manifest's volatile fields."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(".compressor"):
            out[rel] = p.read_bytes()
    return out


def _earlier_run(out: Path) -> dict[str, bytes]:
    with runfolder.claim(out, command="prune") as run:
        io.write_text(run.record(out / "pruned.pt"), "earlier pruned")
        io.write_text(run.record(out / "finetune" / "best.pt"), "earlier best")
        io.write_text(out / "summary.json", "{}\n")  # written, not recorded: found at the end
    (out / "notes.txt").write_text("user's")
    return _tree_bytes(out)


def test_a_failed_overwrite_puts_the_earlier_run_back(tmp_path):
    out = tmp_path / "out"
    before = _earlier_run(out)
    with pytest.warns(runfolder.RunFolderWarning, match="notes.txt"):
        with pytest.raises(UserError, match="teacher"):
            with runfolder.claim(out, command="prune", overwrite=True) as run:
                assert not (out / "pruned.pt").exists() and not (out / "finetune").exists()  # a clean start
                io.write_text(run.record(out / "pruned.pt"), "new pruned")
                io.write_text(out / "finetune" / "last.pt", "new last")
                raise UserError("not found", source="/nonexistent.pt", field="teacher")
    assert _tree_bytes(out) == before
    assert not (out / runfolder.REPLACED).exists()


def test_a_finished_overwrite_replaces_the_earlier_run(tmp_path):
    out = tmp_path / "out"
    _earlier_run(out)
    with pytest.warns(runfolder.RunFolderWarning, match="notes.txt"):
        with runfolder.claim(out, command="prune", overwrite=True) as run:
            io.write_text(run.record(out / "pruned.pt"), "new pruned")
    assert sorted(_tree_bytes(out)) == ["manifest.json", "notes.txt", "pruned.pt"]
    assert json.loads((out / "manifest.json").read_text())["files"] == ["pruned.pt"]
    assert not (out / runfolder.REPLACED).exists()


_KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from compressor.storage import io
from compressor.storage import runfolder
out = Path(sys.argv[1])
run = runfolder.claim(out, command="prune", overwrite=sys.argv[2] == "overwrite")
io.write_text(run.record(out / "pruned.pt"), "killed run's pruned")
io.write_text(out / "finetune" / "epoch_1.pt", "killed run's, never recorded")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed(out: Path, how: str) -> None:
    r = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(out), how], cwd=ROOT, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr


def test_a_hard_killed_overwrite_is_taken_back_at_the_next_claim(tmp_path):
    out = tmp_path / "out"
    before = _earlier_run(out)
    _killed(out, "overwrite")
    assert (out / runfolder.REPLACED).is_dir()  # the earlier run waits there
    with pytest.warns(runfolder.RunFolderWarning, match="taken back"):
        with pytest.raises(UserError, match="an earlier prune run, done"):
            runfolder.claim(out, command="prune")  # a fresh claim: the earlier run is back, and refused
    assert _tree_bytes(out) == before and not (out / runfolder.REPLACED).exists()


def test_a_killed_runs_unrecorded_files_are_replaced_too(tmp_path):
    """A run SIGKILLed during its fine-tune recorded nothing of finetune/: its listing at claim shows them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("user's")
    _killed(out, "overwrite")  # its manifest: "running", files [pruned.pt]; finetune/epoch_1.pt unrecorded
    assert json.loads((out / "manifest.json").read_text())["files"] == ["pruned.pt"]
    with pytest.warns(runfolder.RunFolderWarning, match="notes.txt") as rec:
        with runfolder.claim(out, command="prune", overwrite=True) as run:
            io.write_text(run.record(out / "pruned.pt"), "new")
    assert not [w for w in rec if "epoch_1" in str(w.message)]
    assert sorted(_tree_bytes(out)) == ["manifest.json", "notes.txt", "pruned.pt"]
    assert (out / "pruned.pt").read_text() == "new"


def test_an_input_of_the_new_run_stays_in_place_and_comes_back(tmp_path, monkeypatch):
    out = tmp_path / "F"
    with runfolder.claim(out, command="finetune") as run:
        io.write_text(run.record(out / "best.pt"), "earlier best")
        io.write_text(run.record(out / "last.pt"), "earlier last")
    before = _tree_bytes(out)
    monkeypatch.setattr(sys, "argv", ["compressor", "finetune", "--checkpoint", str(out / "best.pt")])
    with pytest.raises(RuntimeError):
        with runfolder.claim(out, command="finetune", overwrite=True) as run:
            assert (out / "best.pt").read_text() == "earlier best" and not (out / "last.pt").exists()
            io.write_text(run.record(out / "best.pt"), "diverged")
            raise RuntimeError("NaN")
    assert _tree_bytes(out) == before
    with runfolder.claim(out, command="finetune", overwrite=True) as run:  # success, the input not rewritten: kept
        io.write_text(run.record(out / "last.pt"), "new last")
    assert (out / "best.pt").read_text() == "earlier best" and (out / "last.pt").read_text() == "new last"


def test_a_kill_while_setting_aside_leaves_the_earlier_run_in_charge(tmp_path):
    out = tmp_path / "out"
    before = _earlier_run(out)
    bk = out / runfolder.REPLACED
    (bk / "finetune").mkdir(parents=True)
    os.replace(out / "finetune" / "best.pt", bk / "finetune" / "best.pt")  # moved, the manifest not yet
    with pytest.raises(UserError, match="an earlier prune run, done"):
        runfolder.claim(out, command="prune")
    assert _tree_bytes(out) == before and not bk.exists()


def test_finetune_over_its_own_folder_that_diverges_keeps_its_input(tmp_path, files, capsys):  # noqa: F811
    """``finetune --checkpoint F/best.pt --out F --overwrite --lr 1e30``: exit 3, F as it was (best.pt too)."""
    out = tmp_path / "F"
    common = ["--data", "digits", "--epochs", "1", "--batch-size", "64", "--no-progress", "--device", "cpu"]
    code, err, _ = run(capsys, ["finetune", "--checkpoint", files["tiny"], "--out", out, *common])
    assert code == 0, err
    before = _tree_bytes(out)
    assert "best.pt" in before
    code, err, _ = run(capsys, ["finetune", "--checkpoint", out / "best.pt", "--out", out, "--overwrite",
                                "--lr", "1e30", *common])
    assert code == 3, err
    assert "NaN/inf" in _error_line(err)
    assert _tree_bytes(out) == before and not (out / runfolder.REPLACED).exists()


def test_sweep_refuses_a_folder_of_the_users_files(tmp_path, files, capsys):  # noqa: F811
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("user's")
    code, err, _ = run(capsys, ["sweep", "--checkpoint", files["tiny"], "--data", "digits", "--macs", "0.5",
                                "--out", out, "--no-progress", "--device", "cpu"])
    assert code == 2, err
    line = _error_line(err)
    assert str(out) in line and "thesis.tex" in line and "not a sweep's folder" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_prune_overwrite_with_a_missing_teacher_is_refused_before_any_work(tmp_path, files, capsys):  # noqa: F811
    out, rates = tmp_path / "D", tmp_path / "r.yaml"
    rates.write_text('rates: "[0.5]*13"\n')
    argv = ["prune", "--model", "vgg16_bn", "--checkpoint", files["tiny"], "--data", "digits", "--rates", rates, "--criterion", "l1",
            "--n-images", "16", "--out", out, "--device", "cpu", "--no-progress"]
    before = _earlier_run(out)  # an earlier prune run's folder
    code, err, _ = run(capsys, argv + ["--overwrite", "--finetune-epochs", "1", "--teacher", "/nonexistent.pt"])
    assert code == 2, err
    line = _error_line(err)
    assert "/nonexistent.pt: teacher: teacher checkpoint not found" in line, line
    assert _tree_bytes(out) == before


# --------------------------------------------------------------------------- path escapes
@pytest.mark.parametrize("target", ["/", ".", ".."])
def test_a_split_linked_to_the_host_or_above_the_data_is_refused(tmp_path, files, capsys, target):  # noqa: F811
    from tests.test_bad_input import _tree

    root = _tree(tmp_path / "data", splits=("train",))
    (root / "test").symlink_to(target if target == "/" else Path(target), target_is_directory=True)
    code, err, _ = run(capsys, ["eval", "--checkpoint", files["tiny"], "--data", "cifar10", "--data-root", root,
                                "--no-progress"])
    assert code == 2, err
    line = _error_line(err)
    assert f"{root / 'test'}: a symbolic link to" in line and "refused" in line, line


def _sweep_folder(tmp_path: Path, baseline: str, name: str, files) -> Path:  # noqa: F811
    import shutil

    folder = tmp_path / "sweep"
    (folder / "p1").mkdir(parents=True)
    shutil.copy(files["tiny"], folder / "p1" / "pruned.pt")
    (folder / "sweep.json").write_text(json.dumps({"baseline": baseline, "points": [{"name": name}]}))
    return folder


def test_report_does_not_follow_a_sweeps_baseline_out_to_the_host(tmp_path, files, monkeypatch):  # noqa: F811
    from compressor.reporting import report

    read: list[Path] = []
    real = report._is_checkpoint
    monkeypatch.setattr(report, "_is_checkpoint", lambda p: read.append(Path(p)) or real(p))
    folder = _sweep_folder(tmp_path, "/etc/passwd", "p1", files)
    entries = report.collect([str(folder)])
    assert [e.path for e in entries] == [folder / "p1" / "pruned.pt"]
    assert entries[0].baseline_hint is None and Path("/etc/passwd") not in read
    folder2 = _sweep_folder(tmp_path / "b", str(files["tiny"]), "p1", files)  # a real baseline outside: followed
    assert [e.path for e in report.collect([str(folder2)])][0] == files["tiny"]


@pytest.mark.parametrize("name", ["../../etc", "/etc", "a/../../x", 7])
def test_report_refuses_a_sweep_point_name_that_leaves_the_folder(tmp_path, files, capsys, name):  # noqa: F811
    folder = _sweep_folder(tmp_path, str(files["tiny"]), name, files)
    code, err, _ = run(capsys, ["report", folder, "--out", tmp_path / "r.md", "--no-latency"])
    assert code == 2, err
    line = _error_line(err)
    assert f"{folder / 'sweep.json'}: points[0].name:" in line, line
    assert not (tmp_path / "r.md").exists()


def test_report_refuses_a_sweep_point_linked_out_of_the_folder(tmp_path, files, capsys):  # noqa: F811
    folder = _sweep_folder(tmp_path, str(files["tiny"]), "p2", files)
    (folder / "p2").symlink_to(tmp_path, target_is_directory=True)
    code, err, _ = run(capsys, ["report", folder, "--out", tmp_path / "r.md", "--no-latency"])
    assert code == 2 and "leads out of" in _error_line(err), err


# --------------------------------------------------------------------------- hostile checkpoints
def _hostile(tmp_path: Path, files, name: str, change) -> Path:  # noqa: F811
    import torch

    doc = torch.load(files["tiny"], weights_only=True)
    change(doc)
    torch.save(doc, tmp_path / name)
    return tmp_path / name


def _dag(levels: int) -> list:
    node: list = [0]
    for _ in range(levels):
        node = [node, node, node, node]
    return node


HOSTILE = {
    "dag_metrics": (lambda d: d.__setitem__("metrics", {"x": _dag(40)}), "metrics", "more than"),
    "dag_extra_key": (lambda d: d.__setitem__("mine", _dag(40)), "mine", "more than"),
    "deep": (lambda d: d.__setitem__("extra", {"x": _nest(200)}), "extra", "nested more than"),
    "expanded": (lambda d: d["state_dict"].__setitem__("features.conv0.weight", __import__("torch").zeros(1).expand(
        10**6, 10**6)), "state_dict", "expanded view"),
    "huge_classes": (lambda d: d.__setitem__("num_classes", 10**12), "num_classes", "must be in"),
    "huge_width": (lambda d: d.__setitem__("cfg", [2**80] + list(d["cfg"])[1:]), "cfg[0]", "a width must be"),
    "unknown_kwarg": (lambda d: d.__setitem__("builder_kwargs", {"nope": 1}), "builder_kwargs", "does not take"),
}


def _nest(n: int) -> list:
    x: list = []
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_checkpoint_is_one_line_naming_the_field(tmp_path, files, capsys, case):  # noqa: F811
    change, field, words = HOSTILE[case]
    path = _hostile(tmp_path, files, f"{case}.pt", change)
    for argv in (["eval", "--checkpoint", path, "--no-progress"],
                 ["report", path, "--out", tmp_path / "r.md", "--no-latency"]):
        code, err, _ = run(capsys, argv)
        assert code == 2, (argv, err)
        line = _error_line(err)
        assert f"{path}: {field}: " in line and words in line, line
    assert not (tmp_path / "r.md").exists()


def test_a_deflate_bomb_checkpoint_is_refused_before_inflating(tmp_path, files, capsys, monkeypatch):  # noqa: F811
    import zipfile

    import torch

    from compressor.storage import checkpoint

    monkeypatch.setattr(checkpoint, "ZIP_FLOOR", 1 << 20)  # the rule at a test's scale
    plain = tmp_path / "plain.pt"
    doc = torch.load(files["tiny"], weights_only=True)
    torch.save({**doc, "extra": {"pad": torch.zeros(4_000_000)}}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert bomb.stat().st_size < 1_000_000
    code, err, _ = run(capsys, ["eval", "--checkpoint", bomb, "--no-progress"])
    assert code == 2, err
    line = _error_line(err)
    assert f"{bomb}: " in line and "decompression bomb" in line, line
