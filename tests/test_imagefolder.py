"""ImageFolder done right (issue #12): class sets, hidden entries, symlinks, image validation,
faithful 16-bit conversion, small-image sets in memory with their own statistics, content-keyed caches.

Every tree is a few 16×16 images made with PIL in ``tmp_path``; every cache is in ``tmp_path``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor import data
from compressor.data import images
from compressor.errors import UserError


def _img(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def _tree(root: Path, classes=("a", "b"), n: int = 3, size: int = 16, splits=("train", "test"), seed: int = 0,
          ext: str = "png") -> dict[str, list[np.ndarray]]:
    """``n`` random RGB images per class and split; returns each split's arrays in file (label) order."""
    rng = np.random.default_rng(seed)
    made: dict[str, list[np.ndarray]] = {}
    for s in splits:
        made[s] = []
        for c in classes:
            for i in range(n):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                _img(root / s / c / f"{i}.{ext}", a)
                made[s].append(a)
    return made


def _load(root: Path, tmp_path: Path, **kw) -> data.DataBundle:
    kw.setdefault("input_size", 16)
    return data.load("imagefolder", root, cache=tmp_path / "cache", **kw)


def _raises(fn, *needles: str) -> UserError:
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert "\n" not in msg
    return info.value


# --------------------------------------------------------------------------- class sets
def test_train_test_class_mismatch_names_both_classes(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=("cat", "dog"), splits=("train",))
    _tree(root, classes=("dog", "kitten"), splits=("test",))
    err = _raises(lambda: _load(root, tmp_path), "test/ lacks class 'cat'; has extra 'kitten'")
    assert err.source == str(root) and err.exit_code == 2
    assert not (tmp_path / "cache").exists()  # nothing decoded, nothing checked: the scan came first


def test_val_mismatch_is_an_error_even_when_test_matches(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=("a", "b", "c"), splits=("train", "test"))
    _tree(root, classes=("a", "b"), splits=("val",))
    _raises(lambda: _load(root, tmp_path), f"{root}: val/ lacks class 'c'")


def test_cifar_copy_class_mismatch_comes_before_the_class_count(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=("a", "b"), splits=("train",))
    _tree(root, classes=("a", "c"), splits=("test",))
    _raises(lambda: data.cifar("cifar10", root, val_size=1, cache=tmp_path / "c"),
            "test/ lacks class 'b'; has extra 'c'")


def test_empty_train_class_is_named(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=("a", "b"))
    (root / "train" / "c").mkdir()
    (root / "test" / "c").mkdir()
    _raises(lambda: _load(root, tmp_path), "train/ class folder 'c' without images")


# --------------------------------------------------------------------------- hidden entries, symlinks
def test_hidden_entries_are_ignored(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=("a", "b"), n=2)
    junk = np.zeros((16, 16, 3), np.uint8)
    _img(root / "train" / ".ipynb_checkpoints" / "x.png", junk)  # would sort first: class 0
    _img(root / "train" / "a" / ".hidden.png", junk)
    _img(root / "train" / "a" / ".cache" / "y.png", junk)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    b = _load(root, tmp_path, val_size=0)
    assert b.classes == ["a", "b"] and b.num_classes == 2
    assert b.notes["train_size"] == 4 and b.notes["skipped"] == 1  # notes.txt; hidden ones are not even counted
    assert sorted(b.train.dataset.labels.tolist()) == [0, 0, 1, 1]


def test_symlinks_out_of_the_tree_are_not_followed(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=("a", "b"), n=2)
    outside = tmp_path / "outside"
    _tree(outside, classes=("evil",), n=2, splits=("x",))
    (root / "train" / "a" / "out.png").symlink_to(outside / "x" / "evil" / "0.png")
    (root / "train" / "b" / "outdir").symlink_to(outside / "x" / "evil", target_is_directory=True)
    for s in ("train", "test"):
        (root / s / "evil").symlink_to(outside / "x" / "evil", target_is_directory=True)
    inside = root / "extra"
    _tree(inside, classes=("a",), n=1, splits=("more",), seed=5)
    (root / "train" / "a" / "in.png").symlink_to(inside / "more" / "a" / "0.png")  # inside the data root: used
    b = _load(root, tmp_path, val_size=0)
    assert b.classes == ["a", "b"]
    assert b.notes["train_size"] == 5  # 2 + 2 + the in-tree link; out.png, outdir/ and evil/ are skipped
    assert b.notes["skipped"] == 4  # out.png, outdir, train/evil and test/evil
    assert np.bincount(b.train.dataset.labels.numpy()).tolist() == [3, 2]


def test_a_split_that_is_a_symlink_elsewhere_is_read(tmp_path):
    """``train -> /big/disk/train`` is a common layout: the split folder itself is an allowed tree."""
    real = tmp_path / "disk"
    _tree(real, classes=("a", "b"), n=2, splits=("train",))
    root = tmp_path / "d"
    _tree(root, classes=("a", "b"), n=1, splits=("test",))
    (root / "train").symlink_to(real / "train", target_is_directory=True)
    assert _load(root, tmp_path, val_size=0).notes["train_size"] == 4


def test_symlink_loops_do_not_hang(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=("a", "b"), n=2)
    (root / "train" / "a" / "loop").symlink_to(root / "train", target_is_directory=True)
    (root / "train" / "a" / "self").symlink_to(root / "train" / "a", target_is_directory=True)
    (root / "train" / "b" / "up").symlink_to(root, target_is_directory=True)
    (root / "train" / "b" / "dup").symlink_to(root / "train" / "a", target_is_directory=True)
    (root / "test" / "a" / "x").mkdir()
    (root / "test" / "a" / "x" / "back").symlink_to(root / "test" / "a" / "x", target_is_directory=True)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(b=_load(root, tmp_path, val_size=0)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the scan loops"
    assert out["b"].notes["train_size"] == 4 and out["b"].notes["test_size"] == 4


def test_a_dangling_symlink_is_named(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    (root / "train" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _raises(lambda: _load(root, tmp_path), f"{root / 'train' / 'a' / 'gone.png'}: broken symbolic link")


# --------------------------------------------------------------------------- validation
def test_a_corrupt_image_is_named_before_any_decoding(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    bad = root / "test" / "b" / "broken.png"
    bad.write_bytes(b"not an image at all")
    _raises(lambda: _load(root, tmp_path), f"{bad}: not a readable image (UnidentifiedImageError)")
    assert not list((tmp_path / "cache").glob("*.npz"))  # train/ was not decoded first


def test_truncated_pixels_are_named(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    f = root / "train" / "a" / "1.png"
    f.write_bytes(f.read_bytes()[:200])  # the header is fine, the pixel data is cut
    _raises(lambda: _load(root, tmp_path), f"{f}: not a readable image")


def test_a_corrupt_image_in_a_lazy_tree_is_named_up_front(tmp_path):
    root = tmp_path / "d"
    _tree(root, size=100, n=1, splits=("train", "val"))  # > 96 px: ImageNet-style, decoded lazily
    bad = root / "val" / "a" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8 garbage")
    _raises(lambda: _load(root, tmp_path, input_size=32), f"{bad}: not a readable image")


@pytest.mark.parametrize("bound", [100, 200])  # 256 px > 2×100: PIL's error; 256 > 200: its warning, made an error
def test_a_decompression_bomb_is_named(tmp_path, monkeypatch, bound):
    root = tmp_path / "d"
    _tree(root, n=1)
    big = _img(root / "train" / "b" / "big.png", np.zeros((16, 16, 3), np.uint8))
    for f in root.rglob("*.png"):
        if f != big:
            _img(f, np.zeros((8, 8, 3), np.uint8))  # 64 px: under the bound
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", bound)
    _raises(lambda: _load(root, tmp_path), f"{big}: refused as a possible decompression bomb")
    with pytest.raises(UserError, match="decompression bomb"):
        images._load_rgb(str(big))


def test_a_mode_without_a_faithful_rgb_conversion_is_named(tmp_path):
    with pytest.raises(UserError, match=r"x.png: image mode 'LAB' cannot be converted to RGB faithfully"):
        images._to_rgb(Image.new("LAB", (2, 2)), tmp_path / "x.png")
    for mode, values in (("F", [-1.0, 0.5]), ("F", [0.0, 300.0]), ("I", [0, 70000]), ("F", [np.nan, 0.0])):
        with pytest.raises(UserError, match=f"image mode '{mode}' with values"):
            images._to_uint8(np.array(values, np.float32 if mode == "F" else np.int32), mode, tmp_path / "x.png")


# --------------------------------------------------------------------------- 16-bit and other high-depth modes
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "d"
    _tree(root, n=1)
    f = root / "train" / "a" / "0.png"
    a16 = np.full((16, 16), 32768, np.uint16)
    a16[0, :4] = [0, 255, 65535, 4660]
    Image.fromarray(a16).save(f)
    with Image.open(f) as im:
        assert im.mode == "I;16" and np.asarray(im.convert("L"))[1, 1] == 255  # what plain PIL gives: white
    b = _load(root, tmp_path, val_size=0)
    img = b.train_eval.dataset.images[0]  # C,H,W uint8; class a, file 0 is the first
    assert img.shape == (3, 16, 16) and (img[:, 1:] == 128).all()
    assert img[0, 0, :4].tolist() == [0, 0, 255, 0x12]
    lazy = np.asarray(images._load_rgb(str(f)))  # the lazy path's loader agrees
    assert lazy.shape == (16, 16, 3) and (lazy[1:] == 128).all() and lazy[0, :4, 1].tolist() == [0, 0, 255, 0x12]


def test_32_bit_int_and_float_rules():
    assert images._to_uint8(np.array([0, 128, 255], np.int32), "I", Path("x")).tolist() == [0, 128, 255]
    assert images._to_uint8(np.array([0, 32768, 65535], np.int32), "I", Path("x")).tolist() == [0, 128, 255]
    assert images._to_uint8(np.array([0.0, 0.5, 1.0], np.float32), "F", Path("x")).tolist() == [0, 128, 255]
    assert images._to_uint8(np.array([0.0, 2.0, 254.6], np.float32), "F", Path("x")).tolist() == [0, 2, 255]
    assert images._to_uint8(np.array([0, 256, 65535], np.uint16), "I;16B", Path("x")).tolist() == [0, 1, 255]


# --------------------------------------------------------------------------- small sets in memory
def test_small_imagefolder_is_in_memory_with_stats_estimated_from_train(tmp_path):
    root = tmp_path / "d"
    made = _tree(root, n=5)
    for i, a in enumerate(made["test"]):  # a very different test set: it must not leak into the estimate
        made["test"][i] = np.full_like(a, 255)
    for f in sorted((root / "test").rglob("*.png")):
        _img(f, np.full((16, 16, 3), 255, np.uint8))
    b = _load(root, tmp_path, val_size=2, seed=3)
    assert b.notes["storage"] == "memory" and b.notes["val_size"] == 2 and len(b.val) == 2
    idx = np.asarray(b.train.indices)
    assert len(idx) == 8 and set(idx) | set(b.val.indices) == set(range(10))
    px = np.stack(made["train"])[idx].reshape(-1, 3) / 255.0  # file order is label order
    norm = b.notes["normalisation"]
    assert norm["source"] == "estimated from train"
    np.testing.assert_allclose(norm["mean"], px.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(norm["std"], px.std(0), rtol=0, atol=1e-9)
    assert b.notes["resize"] == {"policy": "none"} and b.notes["channels"] == 3 and b.notes["image_size"] == [16, 16]
    x, y = b.test[0]  # no ImageNet resize/crop/mean: this image, normalised by the estimate
    want = (torch.ones(3, 16, 16) - torch.tensor(norm["mean"]).view(3, 1, 1)) / torch.tensor(norm["std"]).view(3, 1, 1)
    assert x.shape == (3, 16, 16) and y == 0
    torch.testing.assert_close(x, want.float())
    assert b.train.dataset.augment and not b.train_eval.dataset.augment  # CIFAR-style pad-crop + flip


def test_given_stats_are_used_and_recorded(tmp_path):
    root = tmp_path / "d"
    made = _tree(root, n=2)
    b = _load(root, tmp_path, stats=((0.5, 0.25, 0.0), (0.5, 0.5, 1.0)))
    assert b.notes["normalisation"] == {"mean": [0.5, 0.25, 0.0], "std": [0.5, 0.5, 1.0], "source": "given"}
    x, _ = b.test[0]
    a = torch.from_numpy(made["test"][0]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1), torch.tensor([0.5, 0.5, 1.0]).view(3, 1, 1)
    torch.testing.assert_close(x, (a - mean) / std)
    with pytest.raises(UserError, match="std"):
        _load(root, tmp_path, stats=((0.5,) * 3, (0.0, 1.0, 1.0)))


def test_a_resize_is_printed_once_and_recorded(tmp_path, capsys):
    root = tmp_path / "d"
    _tree(root, n=2)
    b = _load(root, tmp_path, input_size=32)
    for i in range(len(b.test)):
        assert b.test[i][0].shape == (3, 32, 32)
    b.train[0]
    err = capsys.readouterr().err
    assert err.count("resizing") == 1 and "resizing 16×16 → 32×32" in err
    assert b.notes["resize"] == {"policy": "bilinear", "from": [16, 16], "to": [32, 32]}
    _load(root, tmp_path, input_size=16)
    assert "resizing" not in capsys.readouterr().err


def test_cifar_copies_keep_cifar_stats_unless_given(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=[f"c{i}" for i in range(10)], n=1)
    b = data.cifar("cifar10", root, val_size=1, cache=tmp_path / "c")
    assert b.notes["normalisation"] == {"mean": list(data.CIFAR_MEAN), "std": list(data.CIFAR_STD),
                                        "source": "cifar default"}
    assert b.notes["resize"] == {"policy": "bilinear", "from": [16, 16], "to": [32, 32]}


def test_large_or_mixed_images_stay_imagenet_style(tmp_path, capsys):
    root = tmp_path / "d"
    _tree(root, n=1, size=100, splits=("train", "val"))
    b = _load(root, tmp_path, input_size=32)
    assert b.notes["storage"] == "lazy" and b.notes["test_split"] == "val" and b.notes["image_size"] == [100, 100]
    assert b.notes["resize"] == {"policy": "resize_center_crop", "resize": 36, "crop": 32}
    assert b.notes["normalisation"]["source"] == "imagenet default"
    assert "resizing shorter side → 36, centre crop 32×32" in capsys.readouterr().err
    assert b.test[0][0].shape == (3, 32, 32) and b.classes == ["a", "b"]
    _img(root / "train" / "a" / "small.png", np.zeros((20, 30, 3), np.uint8))  # mixed sizes: lazy, size None
    b = _load(root, tmp_path, input_size=32)
    assert b.notes["storage"] == "lazy" and b.notes["image_size"] is None


# --------------------------------------------------------------------------- the decode cache
def test_cache_key_is_the_content_not_the_path_and_size(tmp_path):
    root = tmp_path / "d"
    _tree(root, n=2, ext="ppm")  # PPM: a fixed size for any pixels
    cache = tmp_path / "cache"
    b0 = _load(root, tmp_path, val_size=0)
    first = set(cache.glob("*.npz"))
    assert len(first) == 2
    _load(root, tmp_path, val_size=0)
    assert set(cache.glob("*.npz")) == first  # unchanged: reused
    f = root / "train" / "a" / "0.ppm"
    size, mtime = f.stat().st_size, f.stat().st_mtime_ns
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(f)
    os.utime(f, ns=(mtime + 10**9, mtime + 10**9))
    assert f.stat().st_size == size
    b1 = _load(root, tmp_path, val_size=0)
    assert len(set(cache.glob("*.npz")) - first) == 1  # a new entry for train/ only
    assert (b1.train_eval.dataset.images[0] == 7).all() and not (b0.train_eval.dataset.images[0] == 7).all()
    os.utime(f, ns=(mtime + 2 * 10**9, mtime + 2 * 10**9))  # touched, same bytes: a new key too
    _load(root, tmp_path, val_size=0)
    assert len(set(cache.glob("*.npz")) - first) == 2


# --------------------------------------------------------------------------- which folder is which split (issue 23)
def _three_splits(root: Path, size: int = 16) -> dict[str, list[np.ndarray]]:
    """train/ 5, val/ 2, test/ 3 images per class (different images, distinguishable counts)."""
    made = {}
    for split, n, seed in (("train", 5, 1), ("val", 2, 2), ("test", 3, 3)):
        made.update(_tree(root, n=n, size=size, splits=(split,), seed=seed))
    return made


def test_test_folder_is_the_test_split_and_val_folder_the_val_split(tmp_path):
    root = tmp_path / "d"
    made = _three_splits(root)
    b = _load(root, tmp_path, val_size=3)  # val/ is there: nothing is held out of train/, val_size is moot
    assert len(b.train) == len(b.train_eval) == 10 and len(b.val) == 4 and len(b.test) == 6
    assert b.notes["test_split"] == "test" and b.notes["val_split"] == "val/"
    assert b.notes["train_size"] == 10 and b.notes["val_size"] == 4 and b.notes["test_size"] == 6
    hwc = lambda ds, i: ds.images[i].permute(1, 2, 0).numpy()  # noqa: E731 - the stored uint8 image
    assert all((hwc(b.test, i) == made["test"][i]).all() for i in range(6))
    assert all((hwc(b.val, i) == made["val"][i]).all() for i in range(4))
    assert [b.val[i][1] for i in range(4)] == [0, 0, 1, 1] and [b.test[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    # without val/: val is held out of train/, the test split is still test/
    import shutil

    shutil.rmtree(root / "val")
    b = _load(root, tmp_path, val_size=2)
    assert len(b.train) == 8 and len(b.val) == 2 and len(b.test) == 6
    assert b.notes["test_split"] == "test" and b.notes["val_split"] == "held out of train/"
    assert all((hwc(b.test, i) == made["test"][i]).all() for i in range(6))


def test_three_splits_lazy(tmp_path):
    root = tmp_path / "d"
    _three_splits(root, size=100)
    b = _load(root, tmp_path, input_size=32)
    assert b.notes["storage"] == "lazy" and b.notes["test_split"] == "test" and b.notes["val_split"] == "val/"
    assert len(b.train) == 10 and len(b.val) == 4 and len(b.test) == 6
    assert all("/test/" in p for p, _ in b.test.samples) and all("/val/" in p for p, _ in b.val.samples)


def test_train_and_eval_name_the_test_folder_they_measured(tmp_path, monkeypatch, capsys):
    """The CLI: train/ val/ test/: the test line is test/'s images, val/ is the selection split."""
    import json

    from compressor.cli import main

    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")
    root = tmp_path / "d"
    _three_splits(root)
    out = tmp_path / "run"
    assert main(["train", "--model", "squeezenet1_1", "--data", "imagefolder", "--data-root", str(root), "--epochs",
                 "1", "--batch-size", "16", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "test top-1 [test/, 6 images]:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_split"] == "test/" and summary["val_split"] == "val/" and summary["last"]["test"]["n"] == 6
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert " test [test/] (6 images): top-1" in line, line
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 6 and res["test_split"] == "test/"
