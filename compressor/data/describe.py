"""The one line a command prints about its data: what it reads, how it is split, how it is normalised.

``train``, ``eval`` and ``prune`` print it (stdout; prune logs it) right after loading, so a user sees the
dataset and its root, the split sizes, which folder (or hold-out) is the test split and which
the selection (validation) split, the input size, and the mean/std with where they came from.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

# bundle.notes["normalisation"]["source"] -> the words of the line
NORM_SOURCES = {
    "flag": "from --mean/--std",
    "contract": "from the checkpoint's data contract",
    "model": "declared by the model",
    "given": "given by the caller",
    "estimated from train": "estimated from the training split",
    "digits default": "the digits default",
    "cifar default": "CIFAR's published values",
    "imagenet default": "ImageNet's published values",
}


def _vals(vals: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in vals) + ")"


def _where(bundle: Any, contract: Any) -> str:
    if bundle.name == "digits":
        return "digits (scikit-learn's 1,797 8×8 digits, built in)"
    root = (bundle.notes or {}).get("root") or getattr(contract, "root", None)
    return f"{bundle.name} at {root}" if root else bundle.name


def _test_part(bundle: Any, notes: Mapping[str, Any]) -> str:
    n = notes.get("test_size", len(bundle.test))
    if notes.get("test_split"):
        return f"test {n} ({notes['test_split']}/)"
    if bundle.name == "digits":
        return f"test {n} (20% of the digits, stratified, seed 0)"
    return f"test {n} (the dataset's test set)"


def _selection_part(bundle: Any, notes: Mapping[str, Any]) -> str:
    n = notes.get("val_size", len(bundle.val))
    folder = notes.get("val_split")
    if folder and not folder.startswith("held out"):
        return f"selection {n} ({folder})"
    if n == 0:
        return "selection none (nothing held out of train)"
    pool = n + notes.get("train_size", len(bundle.train))
    return f"selection {n} ({100.0 * n / pool:.0f}% of train held out, seed {notes.get('split_seed', 0)})"


def _input_part(bundle: Any, notes: Mapping[str, Any]) -> str:
    px = f"input {bundle.input_size}×{bundle.input_size}"
    rs = notes.get("resize") or {}
    if rs.get("policy") == "bilinear" and rs.get("from"):
        return f"{px} (from {rs['from'][0]}×{rs['from'][1]}, bilinear)"
    if rs.get("policy") == "resize_center_crop":
        return f"{px} (shorter side to {rs.get('resize')}, centre crop)"
    return px


def data_line(bundle: Any, contract: Any = None, norm_source: str | None = None) -> str:
    """``data: <dataset and root>; train N, test N (<folder>), selection N (<folder or hold-out>); input HxW;
    mean (...) std (...) (<where they came from>)``.

    ``bundle``: a ``DataBundle``; ``contract``: the ``DataContract`` it satisfies (its root, and the
    mean/std the data applies); ``norm_source``: where the mean/std came from (a key of
    ``NORM_SOURCES``), default the one recorded in ``bundle.notes["normalisation"]``.
    """
    notes = bundle.notes or {}
    norm = notes.get("normalisation") or {}
    mean = getattr(contract, "mean", None) or norm.get("mean") or ()
    std = getattr(contract, "std", None) or norm.get("std") or ()
    source = norm_source or norm.get("source") or "unrecorded"
    splits = (f"train {notes.get('train_size', len(bundle.train))}"
              f"{' (train/)' if notes.get('test_split') else ''}, {_test_part(bundle, notes)}, "
              f"{_selection_part(bundle, notes)}")
    return (f"data: {_where(bundle, contract)}; {splits}; {_input_part(bundle, notes)}; "
            f"mean {_vals(mean)} std {_vals(std)} ({NORM_SOURCES.get(source, source)})")
