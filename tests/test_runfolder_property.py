"""Issue 22's property: random sequences of run, kill -9, resume and overwrite on one folder. After
every step the folder holds one run's outputs, never two runs' mixed; a run that finished holds its
complete outputs; an overwrite that fails, or is killed (seen at the next claim), leaves the earlier
run's outputs exactly as they were; a refused claim changes nothing; the user's file is never touched.

Each run is a forked child (the library is imported once) that writes like ``train``: some files
recorded, some not (``finetune/*.pt``), a resume point kept; it finishes, raises, or SIGKILLs itself
after a random number of writes."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from compressor.storage import io
from compressor.storage import runfolder
from compressor.errors import UserError

COMPLETE = ["best.pt", "finetune/e1.pt", "finetune/e2.pt", "last.pt", "resolved_config.yaml", "summary.json"]
USER = "notes.txt"


def _child(out: Path, mode: str, run_id: str, stop: int, how: str) -> None:
    """One run. ``stop``: the write after which it dies (``how``: kill or fail), or never."""
    import warnings

    warnings.simplefilter("ignore")
    try:
        run = runfolder.claim(out, command="train", overwrite=mode == "overwrite", resume=mode == "resume")
    except UserError:
        os._exit(2)
    if mode == "resume" and (out / "last.pt").is_file():
        run_id = (out / "last.pt").read_text()  # it continues that run
    writes = [("resolved_config.yaml", None), ("last.pt", "keep"), ("finetune/e1.pt", None),
              ("finetune/e2.pt", None), ("best.pt", "record"), ("summary.json", None)]
    try:
        with run:
            for k, (name, rec) in enumerate(writes):
                path = out / name
                if rec:
                    run.record(path, keep=rec == "keep")
                io.write_text(path, run_id)
                if k + 1 == stop:
                    if how == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError("the run failed")
    except RuntimeError:
        os._exit(3)
    os._exit(0)


def _step(out: Path, mode: str, run_id: str, stop: int, how: str) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _child(out, mode, run_id, stop, how)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _visible(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): p.read_text() for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)
            and p.name not in ("manifest.json", USER)}


def _status(out: Path) -> str | None:
    try:
        return json.loads((out / "manifest.json").read_text()).get("status")
    except OSError:
        return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks its runs")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_folder_always_holds_one_runs_outputs(tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    out.mkdir()
    (out / USER).write_text("the user's")
    done: dict[str, str] | None = None  # the last finished run's outputs
    for i in range(14):
        mode = rng.choice(["fresh", "overwrite", "overwrite", "resume"])
        how = rng.choice(["finish", "kill", "kill", "fail"])
        stop = rng.randint(1, len(COMPLETE)) if how != "finish" else 0
        before, status_before = _visible(out), _status(out)
        rc = _step(out, mode, f"run{i}", stop, how)
        now = _visible(out)
        where = f"seed {seed}, step {i}: {mode} {how}@{stop} -> {rc}; before {before}; now {now}"
        assert (out / USER).read_text() == "the user's", where
        assert len(set(now.values())) <= 1, "two runs' outputs mixed: " + where
        if rc == 2:  # refused: nothing changed (a taken-back overwrite was restored by the claim itself)
            assert now == before or now == done, where
            continue
        if rc == 0:
            assert sorted(now) == COMPLETE and _status(out) == "done", where
            done = now
        elif rc == 3 and mode == "overwrite" and status_before == "done":
            assert now == before, "a failed overwrite lost the earlier run: " + where
        elif rc == -signal.SIGKILL and mode == "overwrite" and status_before == "done":
            # the next claim of the folder takes the killed replacement back
            with pytest.warns(runfolder.RunFolderWarning):
                with pytest.raises(UserError):
                    runfolder.claim(out, command="train")
            assert _visible(out) == before, "a killed overwrite lost the earlier run: " + where
        if _status(out) == "done":
            assert sorted(_visible(out)) == COMPLETE, where
    assert not list(tmp_path.glob("**/.*.tmp"))
