"""Faults: a process killed mid-save, a full disk, an unwritable folder, and ranking memory.

The contract (compressor/storage/io.py): every output is written to ``.<name>.<random>.tmp`` in the
target folder, fsynced, then ``os.replace``d. So a killed or failing write leaves the previous
file intact and loadable; an ``OSError`` becomes a one-line ``UserError``; only a SIGKILL can
leave a temp file behind, and its name (leading dot, ``.tmp`` suffix) never passes for a
checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from compressor.storage import checkpoint
from compressor.storage import io
from compressor.cli import main
from compressor.errors import UserError
from compressor.models import get_model
from tests.conftest import TINY_VGG, randomize_bn, seed_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return randomize_bn(get_model("vgg16_bn", cfg=list(TINY_VGG))).eval()


def _strays(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------- SIGKILL mid-save
_SAVER = textwrap.dedent("""
    import io as _io, sys, time, torch
    from compressor.storage import checkpoint
    from compressor.models import get_model
    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = sys.argv[1]
    m = get_model("vgg16_bn", cfg=[32, 32, "M", 64, 64, "M", 128, 128, 128, "M", 256, 256, 256, "M",
                                   256, 256, 256, 256])                      # ~2.6M params, ~10 MB file
    checkpoint.save(path, m, metrics={"generation": 0})
    print("saved 0", flush=True)
    real_save = torch.save
    def slow_save(obj, fh):                                            # a slow disk: 64 KiB every 20 ms
        buf = _io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        print("writing", len(data), flush=True)
        for i in range(0, len(data), 1 << 16):
            fh.write(data[i:i + (1 << 16)]); fh.flush(); time.sleep(0.02)
    torch.save = slow_save
    gen = 1
    while True:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
        checkpoint.save(path, m, metrics={"generation": gen})
        print("saved", gen, flush=True)
        gen += 1
""")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "saved 0", proc.stderr.read()
        good = path.read_bytes()
        line = proc.stdout.readline()
        assert line.startswith("writing"), line + proc.stderr.read()
        size = int(line.split()[1])
        deadline = time.monotonic() + 30
        tmps: list[Path] = []
        while time.monotonic() < deadline:  # kill once the temp file holds part of the new checkpoint
            tmps = list(tmp_path.glob(".model.pt.*.tmp"))
            if tmps and 0 < tmps[0].stat().st_size < size // 2:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tmps, "the writer never started the second save"

    # The previous checkpoint is byte-identical and loads.
    assert path.read_bytes() == good
    net, meta = checkpoint.load(path, model="vgg16_bn")
    assert meta["metrics"] == {"generation": 0}
    torch.manual_seed(0)
    ref = get_model("vgg16_bn", cfg=net.cfg)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())

    # SIGKILL leaves the half-written temp file (nothing can clean up after SIGKILL), but its name
    # cannot pass for a checkpoint: a leading dot, a .tmp suffix, and it is not loadable.
    left = _strays(tmp_path, {"model.pt"})
    assert left and all(n.startswith(".model.pt.") and n.endswith(".tmp") for n in left), left
    assert [p.name for p in tmp_path.glob("*.pt")] == ["model.pt"]
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / left[0])


# --------------------------------------------------------------------------- disk full / unwritable
@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_is_a_user_error_and_keeps_the_old_file(tmp_path, tiny, monkeypatch, where):
    path = checkpoint.save(tmp_path / "p.pt", tiny)
    good = path.read_bytes()
    if where == "write":
        def partial_then_full(obj, fh):
            fh.write(b"partial bytes")
            _enospc()
        monkeypatch.setattr(torch, "save", partial_then_full)
    else:
        monkeypatch.setattr(os, where, _enospc)
    with pytest.raises(UserError, match="No space left on device") as ei:
        checkpoint.save(path, tiny)
    assert str(path) in str(ei.value) and "untouched" in str(ei.value) and "\n" not in str(ei.value)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert _strays(tmp_path, {"p.pt"}) == []


def test_text_and_json_writes_are_atomic_too(tmp_path, monkeypatch):
    io.write_json(tmp_path / "s.json", {"a": 1})
    io.write_text(tmp_path / "t.md", "old\n")
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(UserError, match="s.json: write failed"):
        io.write_json(tmp_path / "s.json", {"a": 2})
    with pytest.raises(UserError, match="t.md: write failed"):
        io.write_text(tmp_path / "t.md", "new\n")
    monkeypatch.undo()
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1} and (tmp_path / "t.md").read_text() == "old\n"
    assert _strays(tmp_path, {"s.json", "t.md"}) == []


def test_interrupt_during_save_leaves_no_temp_file(tmp_path, tiny, monkeypatch):
    path = checkpoint.save(tmp_path / "p.pt", tiny)
    good = path.read_bytes()

    def interrupted(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, tiny)
    assert path.read_bytes() == good and _strays(tmp_path, {"p.pt"}) == []


def test_unwritable_folder_is_a_user_error(tmp_path, tiny, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write here") as ei:  # tests run as root: use a file as a "folder"
        checkpoint.save(blocker / "sub" / "out.pt", tiny)
    assert str(blocker / "sub" / "out.pt") in str(ei.value)
    assert blocker.read_text() == "x"

    def denied(*_a, **_k):  # what a read-only folder gives a non-root user
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.mkstemp", denied)
    with pytest.raises(UserError, match=r"cannot write here \(Permission denied\)"):
        checkpoint.save(tmp_path / "ro" / "out.pt", tiny)


@pytest.fixture
def tiny_ckpt(tmp_path, tiny):
    return checkpoint.save(tmp_path / "tiny.pt", tiny)


def _old_outputs(folder: Path) -> dict[str, bytes]:
    return seed_files(folder, {"pruned.pt": b"previous checkpoint", "plan.json": b'{"previous": true}\n',
                               "summary.json": b"{}\n", "last.pt": b"previous last",
                               "resolved_config.yaml": b"previous: true\n"})


def _disk_full_after_write(monkeypatch):
    """Every atomic write fails at fsync, after its data went to the temp file."""
    monkeypatch.setattr(os, "fsync", _enospc)


def test_cli_prune_on_a_full_disk_leaves_previous_outputs(tmp_path, tiny_ckpt, capsys, monkeypatch):
    out = tmp_path / "run"
    old = _old_outputs(out)
    rates = tmp_path / "r.yaml"
    rates.write_text('rates: "[0.5]*13"\n')
    _disk_full_after_write(monkeypatch)
    code = main(["prune", "--model", "vgg16_bn", "--rates", str(rates), "--checkpoint", str(tiny_ckpt),
                 "--n-images", "16", "--out", str(out), "--device", "cpu", "--no-progress", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # untouched, and no temp files


def test_cli_finetune_disk_fills_mid_run_leaves_previous_checkpoints(tmp_path, tiny_ckpt, capsys, monkeypatch):
    out = tmp_path / "ft"
    old = _old_outputs(out)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fill_up_after_first_write(fd):  # manifest.json and resolved_config.yaml are written, then the disk is full
        calls["n"] += 1
        if calls["n"] > 2:
            _enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fill_up_after_first_write)
    code = main(["finetune", "--checkpoint", str(tiny_ckpt), "--epochs", "2", "--batch-size", "64",
                 "--out", str(out), "--device", "cpu", "--no-progress", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and "last.pt" in err[0], err
    assert calls["n"] >= 3
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    old.pop("resolved_config.yaml")  # rewritten by the failed run, so taken away with its other outputs
    assert now == old  # previous last.pt and the rest untouched; no manifest, lock or temp files


def test_cli_prune_unwritable_out_fails_before_any_work(tmp_path, tiny_ckpt, capsys, monkeypatch):
    from compressor.pruning import scores

    def no_ranking(*_a, **_k):
        raise AssertionError("ranked before checking that --out is writable")

    monkeypatch.setattr(scores, "compute", no_ranking)
    (tmp_path / "a_file").write_text("x")
    rates = tmp_path / "r.yaml"
    rates.write_text('rates: "[0.5]*13"\n')
    code = main(["prune", "--model", "vgg16_bn", "--rates", str(rates), "--checkpoint", str(tiny_ckpt),
                 "--n-images", "16", "--out", str(tmp_path / "a_file" / "run"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write here" in err[0]


def test_outputs_get_the_usual_file_mode(tmp_path, tiny):
    """mkstemp makes 0600 files; outputs must be as readable as open() would make them."""
    mask = os.umask(0o022)
    try:
        checkpoint.save(tmp_path / "p.pt", tiny)
        io.write_json(tmp_path / "s.json", {})
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(mask)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o644
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("p.pt", "s.json")} == {want}


# --------------------------------------------------------------------------- memory (fast version)
_RANK_TWICE = textwrap.dedent("""
    import json, sys
    from benchmarks.bench_memory import child_rank
    small = child_rank(64, "vgg16_bn", 8, 32, ["hrank"])
    large = child_rank(256, "vgg16_bn", 8, 32, ["hrank"])
    print(json.dumps({"small": small, "large": large}))
""")


def test_rank_memory_does_not_grow_with_images():
    """In one fresh process: ranking 4x the images must not raise the peak RSS by more than 10%.

    A per-image store of the rank-point maps would add ``unstreamed_mb`` (~17 MB for 256 images
    at these widths, versus a ~650 MB process), so the check can tell the two apart.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RANK_TWICE], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = r["small"], r["large"]
    grew = large["peak_after_mb"] - small["peak_after_mb"]
    assert grew <= 0.10 * small["peak_after_mb"], r
    assert grew < large["unstreamed_mb"] / 2, r  # far less than keeping every map would cost
