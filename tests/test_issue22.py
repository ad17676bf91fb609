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
    from compressor import data

    monkeypatch.setattr(data, "ARCHIVE_FLOOR", 1 << 20)  # the same rule, at a test's scale: 16 MiB of zeros
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
