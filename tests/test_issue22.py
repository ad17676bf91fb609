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
