"""Run folders: one run per --out, no mixing with foreign files, failed runs leave nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compressor.storage import io
from compressor.storage import runfolder
from compressor.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_fresh_folder_done_with_files(tmp_path):
    out = tmp_path / "a" / "run"
    with runfolder.claim(out, command="prune") as run:
        assert (out / ".compressor.lock").is_file()
        m = manifest(out)
        assert m["format"] == "compressor.run" and m["status"] == "running" and m["command"] == "prune"
        assert m["pid"] == os.getpid() and m["files"] == [] and m["argv"] == sys.argv
        io.write_text(run.record(out / "plan.txt"), "plan\n")
        assert manifest(out)["files"] == ["plan.txt"]  # known before the end, for a killed run
        io.write_json(out / "sub" / "summary.json", {"ok": 1})  # written, not recorded: found anyway
    m = manifest(out)
    assert m["status"] == "done" and "finished" in m
    assert m["files"] == ["plan.txt", "sub/summary.json"]
    assert not (out / ".compressor.lock").exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "plan.txt", "sub"]


def test_foreign_folder_refused_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.pt", "b.txt", "c", "d", "e", "f", "g"):
        (out / name).write_text("mine")
    (out / ".x.1-deadbeef.abcdefgh.tmp").write_text("")  # an io temporary: not content
    with pytest.raises(UserError) as ei:
        runfolder.claim(out, command="train")
    msg = str(ei.value)
    assert msg.startswith(f"{out}: not empty and not written by this run (found: a.pt, b.txt, c, d, e and 2 more)")
    assert "--overwrite" in msg and "\n" not in msg and ei.value.exit_code == 2
    assert not (out / ".compressor.lock").exists() and not (out / "manifest.json").exists()


def test_refusal_through_the_cli_is_exit_2(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.pt").write_text("x")
    code = textwrap.dedent(f"""
        import sys
        from compressor.storage import runfolder
        from compressor.errors import UserError
        try:
            runfolder.claim({str(out)!r}, command="prune")
        except UserError as exc:
            print(f"error: {{exc}}", file=sys.stderr); sys.exit(exc.exit_code)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "a.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_empty_folder_and_earlier_run_named(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with runfolder.claim(out, command="prune") as run:  # an existing, empty folder is fine
        io.write_text(run.record(out / "pruned.pt"), "x")
    with pytest.raises(UserError, match=r"an earlier prune run, done; found: pruned.pt\)"):
        runfolder.claim(out, command="prune")


def test_overwrite_removes_recorded_outputs_not_foreign(tmp_path):
    out = tmp_path / "out"
    with runfolder.claim(out, command="prune") as run:
        io.write_text(run.record(out / "old.pt"), "old")
        io.write_text(run.record(out / "pts" / "p1.pt"), "old")
    (out / "notes.txt").write_text("user's")
    with pytest.warns(runfolder.RunFolderWarning, match="notes.txt") as rec:
        with runfolder.claim(out, command="prune", overwrite=True) as run:
            assert not (out / "old.pt").exists() and not (out / "pts").exists()
            assert (out / "notes.txt").read_text() == "user's"
            assert manifest(out)["mode"] == "overwrite" and manifest(out)["status"] == "running"
            io.write_text(run.record(out / "new.pt"), "new")
    assert [str(w.message) for w in rec] == [f"{out}: --overwrite leaves files no compressor run recorded here: "
                                             "notes.txt"]
    assert manifest(out)["files"] == ["new.pt"]
    assert (out / "notes.txt").read_text() == "user's"


def test_manifest_outside_paths_never_removed(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("keep me")
    with runfolder.claim(out, command="prune") as run:
        io.write_text(run.record(out / "x.pt"), "x")
    m = manifest(out)
    m["files"] += ["../victim.txt", str(victim)]
    (out / "manifest.json").write_text(json.dumps(m))
    with runfolder.claim(out, command="prune", overwrite=True):
        pass
    assert victim.read_text() == "keep me"


def test_foreign_manifest_json_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"mine": true}')
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(UserError, match="manifest.json"):
            runfolder.claim(out, command="prune", **kw)
    assert (out / "manifest.json").read_text() == '{"mine": true}'


HOLD = """
import sys
from compressor.storage import runfolder
with runfolder.claim(sys.argv[1], command="sweep"):
    print("held", flush=True)
    sys.stdin.readline()
"""

CLAIM = """
import sys
from compressor.storage import runfolder
from compressor.errors import UserError
try:
    runfolder.claim(sys.argv[1], command="prune", overwrite=True)
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr); sys.exit(exc.exit_code)
print("claimed")
"""


def test_concurrent_claim_refused_by_another_process(tmp_path):
    out = tmp_path / "out"
    with runfolder.claim(out, command="train"):
        r = subprocess.run([sys.executable, "-c", CLAIM, str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"error: {out}: another compressor run (pid {os.getpid()}, command train) "
                                    "holds this folder")
        with pytest.raises(UserError, match="another compressor run"):  # in this process, too
            runfolder.claim(out, command="prune", resume=True)
    assert manifest(out)["status"] == "done"  # the refused claims changed nothing


def test_claim_refused_while_another_process_holds_it(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another compressor run \(pid {p.pid}, command sweep\)"):
            runfolder.claim(out, command="sweep", resume=True)
    finally:
        p.communicate("\n", timeout=60)
    assert p.returncode == 0
    with runfolder.claim(out, command="sweep", resume=True):  # released when it left
        pass


def test_lock_released_after_exit(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with runfolder.claim(out, command="prune") as run:
            io.write_text(run.record(out / "last.pt", keep=True), "x")
            raise RuntimeError
    with runfolder.claim(out, command="prune", overwrite=True):
        pass
    with runfolder.claim(out, command="prune", overwrite=True):
        pass
    assert not (out / ".compressor.lock").exists()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_nothing(tmp_path, exc):
    out = tmp_path / "new" / "run"
    with pytest.raises(type(exc)):
        with runfolder.claim(out, command="train") as run:
            io.write_text(out / "resolved_config.yaml", "lr: 0.1\n")  # not recorded: still removed
            io.save_torch(run.record(out / "best.pt"), {"a": 1})
            (out / "logs").mkdir()
            (out / "logs" / "metrics.jsonl").write_text("{}\n")
            raise exc
    assert not (tmp_path / "new").exists()  # the folders the claim made, too


def test_failure_keeps_preexisting_user_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.csv").write_text("user")
    (out / "rewritten.txt").write_text("user")
    with pytest.warns(UserWarning, match="data.csv"):
        with pytest.raises(ValueError):
            with runfolder.claim(out, command="report", overwrite=True) as run:
                io.write_text(run.record(out / "report.md"), "# r")
                io.write_text(out / "rewritten.txt", "half a report")  # its old content is gone: goes too
                run.record(out / "data.csv")  # recorded but never written: untouched, kept
                raise ValueError("bad")
    assert sorted(p.name for p in out.iterdir()) == ["data.csv"]
    assert (out / "data.csv").read_text() == "user"


def test_failure_keeps_resume_points(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with runfolder.claim(out, command="train") as run:
            io.write_text(run.record(out / "last.pt", keep=True), "epoch 3")
            io.write_text(run.record(out / "best.pt"), "epoch 2")
            raise KeyboardInterrupt
    m = manifest(out)
    assert m["status"] == "interrupted" and m["files"] == ["last.pt"] and m["error"] == "KeyboardInterrupt: "
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "manifest.json"]
    with pytest.raises(UserError, match="an earlier train run, interrupted"):
        runfolder.claim(out, command="train")
    with runfolder.claim(out, command="train", resume=True) as run:
        io.write_text(run.record(out / "last.pt", keep=True), "epoch 9")
        io.write_text(run.record(out / "best.pt"), "epoch 8")
    m = manifest(out)
    assert m["status"] == "done" and m["mode"] == "resume" and m["files"] == ["last.pt", "best.pt"]


def test_resume_on_done_folder(tmp_path):
    out = tmp_path / "sweep"
    with runfolder.claim(out, command="sweep") as run:
        io.write_json(run.record(out / "sweep.json"), {"points": 1})
        io.write_text(out / "p1" / "pruned.pt", "1")
    with runfolder.claim(out, command="sweep", resume=True) as run:
        io.write_text(out / "p2" / "pruned.pt", "2")
    assert manifest(out)["files"] == ["sweep.json", "p1/pruned.pt", "p2/pruned.pt"]
    # a failed resume takes back only what it added, and the folder stays a run folder
    with pytest.raises(RuntimeError):
        with runfolder.claim(out, command="sweep", resume=True) as run:
            io.write_json(out / "sweep.json", {"points": 3})
            io.write_text(out / "p3" / "pruned.pt", "3")
            raise RuntimeError("point 3 failed")
    assert not (out / "p3").exists() and (out / "p2" / "pruned.pt").is_file()
    m = manifest(out)
    assert m["status"] == "failed" and m["error"] == "RuntimeError: point 3 failed"
    assert m["files"] == ["sweep.json", "p1/pruned.pt", "p2/pruned.pt"]
    with pytest.raises(UserError, match="holds a sweep run, not a prune run"):
        runfolder.claim(out, command="prune", resume=True)


def test_resume_on_folder_without_manifest(tmp_path):
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "last.pt").write_text("old run")
    with pytest.raises(RuntimeError):
        with runfolder.claim(out, command="train", resume=True):
            io.write_text(out / "last.pt", "epoch 5")
            io.write_text(out / "summary.json", "{}")
            raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # as it was, no manifest of ours left


def test_record_outside_folder_is_a_bug(tmp_path):
    with runfolder.claim(tmp_path / "out", command="prune") as run:
        with pytest.raises(ValueError):
            run.record(tmp_path / "elsewhere.pt")


def test_not_a_folder(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        runfolder.claim(f, command="prune")


def test_fallback_lock_without_fcntl(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "fcntl", None)
    out = tmp_path / "out"
    with runfolder.claim(out, command="prune"):
        with pytest.raises(UserError, match=r"another compressor run \(pid \d+, command prune\) holds this "
                                            r"folder; if it is no longer running, delete"):
            runfolder.claim(out, command="prune", overwrite=True)
    assert not (out / ".compressor.lock").exists()
    # a lock left by a hard-killed run (its pid gone) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".compressor.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                      "command": "prune"}))
    with runfolder.claim(out, command="prune", overwrite=True):
        pass


def test_kept_folder_and_clean_sys_exit(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        with runfolder.claim(out, command="sweep") as run:
            run.record(out / "points", keep=True)
            io.write_text(out / "points" / "p1" / "pruned.pt", "1")
            io.write_text(out / "scores.pt", "s")
            sys.exit(3)
    assert manifest(out)["files"] == ["points/p1/pruned.pt"] and not (out / "scores.pt").exists()
    with pytest.raises(SystemExit):
        with runfolder.claim(out, command="sweep", resume=True):
            sys.exit(0)  # a clean exit is a success
    assert manifest(out)["status"] == "done"


# --------------------------------------------------------------------------- issue 23: a run killed from outside
def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                       check=True)
    return int(p.stdout)


def _killed_train(out, pid: int) -> None:
    """What a SIGKILLed ``train`` leaves: its lock file, a "running" manifest (nothing recorded yet)
    and the files it wrote before recording them."""
    out.mkdir(parents=True)
    host = socket.gethostname()
    (out / ".compressor.lock").write_text(json.dumps({"pid": pid, "host": host, "command": "train"}))
    (out / "manifest.json").write_text(json.dumps({
        "format": "compressor.run", "command": "train", "argv": ["compressor", "train"], "pid": pid, "host": host,
        "started": runfolder._now(), "mode": "fresh", "status": "running", "files": []}))
    for name in ("resolved_config.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        (out / name).write_text(name)


@pytest.mark.parametrize("no_fcntl", [False, True])
def test_a_dead_owners_lock_and_manifest_do_not_block(tmp_path, monkeypatch, no_fcntl):
    if no_fcntl:
        monkeypatch.setattr(runfolder, "fcntl", None)
    out = tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    (out / ".compressor.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "train"}))
    (out / "manifest.json").write_text(json.dumps({"format": "compressor.run", "command": "train", "pid": pid,
                                                   "host": socket.gethostname(), "started": runfolder._now(),
                                                   "status": "running", "files": []}))
    with runfolder.claim(out, command="train") as run:  # killed before it wrote anything: the claim proceeds
        assert manifest(out)["pid"] == os.getpid()
        io.write_text(run.record(out / "last.pt"), "x")
    assert manifest(out)["status"] == "done" and not (out / ".compressor.lock").exists()


def test_a_reused_pid_is_not_the_owner(tmp_path, monkeypatch):
    """A lock whose pid is alive but started at another time than recorded is stale (pid reuse)."""
    monkeypatch.setattr(runfolder, "fcntl", None)
    out = tmp_path / "out"
    out.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as p:
        try:
            start = runfolder._proc_start(p.pid)
            if start is None:
                pytest.skip("no /proc here: process start times are unknown")
            holder = {"pid": p.pid, "host": socket.gethostname(), "command": "train"}
            (out / ".compressor.lock").write_text(json.dumps({**holder, "pid_start": start}))
            with pytest.raises(UserError, match=rf"another compressor run \(pid {p.pid}, command train\)"):
                runfolder.claim(out, command="train")  # alive, same start: its owner
            (out / ".compressor.lock").write_text(json.dumps({**holder, "pid_start": start - 1}))
            with runfolder.claim(out, command="train"):  # alive, another start: a reused pid
                pass
        finally:
            p.kill()


def test_a_killed_train_run_is_named_killed_and_overwritten_cleanly(tmp_path):
    out = tmp_path / "out"
    _killed_train(out, _dead_pid())
    with pytest.raises(UserError) as info:
        runfolder.claim(out, command="train")
    msg = str(info.value)
    assert "an earlier train run, killed (pid" in msg and "running" not in msg and "\n" not in msg
    assert f"--resume {out / 'last.pt'}" in msg and "--overwrite" in msg
    (out / "notes.txt").write_text("user's")
    with pytest.warns(runfolder.RunFolderWarning) as rec:
        with runfolder.claim(out, command="train", overwrite=True):
            # the killed run's own files are gone; only the user's file is left, and named
            assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["manifest.json",
                                                                                          "notes.txt"]
    assert [str(w.message) for w in rec] == [f"{out}: --overwrite leaves files no compressor run recorded here: "
                                             "notes.txt"]


def test_overwrite_keeps_own_named_files_older_than_the_killed_run(tmp_path):
    """``resolved_config.yaml`` from before the killed run started is not provably its: kept, named."""
    out = tmp_path / "out"
    _killed_train(out, _dead_pid())
    old = out / "resolved_config.yaml"
    os.utime(old, (old.stat().st_mtime - 3600, old.stat().st_mtime - 3600))
    with pytest.warns(runfolder.RunFolderWarning, match="resolved_config.yaml"):
        with runfolder.claim(out, command="train", overwrite=True):
            assert old.exists() and not (out / "last.pt").exists()


def test_overwrite_over_a_killed_train_through_the_cli(tmp_path):
    """The CLI: ``train --overwrite`` over a SIGKILLed train's folder: no Python warning, nothing called foreign."""
    out = tmp_path / "out"
    _killed_train(out, _dead_pid())
    (out / "notes.txt").write_text("user's")
    r = subprocess.run([sys.executable, "-m", "compressor", "train", "--model", "squeezenet1_1", "--data", "digits",
                        "--epochs", "0", "--out", str(out), "--overwrite", "--no-progress", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr
    warned = [ln for ln in r.stderr.splitlines() if "no compressor run recorded" in ln]
    assert warned == [f"warning: {out}: --overwrite leaves files no compressor run recorded here: notes.txt"]
    assert "resolved_config.yaml" not in r.stderr and "foreign" not in r.stderr
    assert manifest(out)["status"] == "done" and "resolved_config.yaml" in manifest(out)["files"]
