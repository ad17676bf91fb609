"""Datasets: the embedded digits set, CIFAR-10/100 and ImageFolder trees.

Every bundle has train (augmented), train_eval (same images, no augmentation: calibration
and BN re-estimation), val (the only split used for selection: an ImageFolder's val/ when it
also has test/, else held out from train) and test (only ever evaluated: test/, or val/ when
there is no test/; ``notes["test_split"]``/``["val_split"]`` name the folders). Small image
sets (CIFAR copies, and any ImageFolder whose images share one size of at most 96 px a side)
are decoded once and cached as uint8 arrays, so a CPU epoch is not dominated by JPEG decoding; larger ImageFolder trees are decoded lazily. Trees are
scanned and every image header is checked before any work (``_scan_tree``, ``_check_headers``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from compressor.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_CACHE = Path.home() / ".cache" / "compressor"
PROGRESS = True  # bars while checking and decoding image folders (the CLI's --no-progress turns them off)


class ArrayDataset(Dataset):
    """uint8 NHWC images in memory; optional pad-crop + flip; normalized float CHW out."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: Sequence[float], std: Sequence[float],
                 augment: bool = False, size: int | None = None) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # N,C,H,W uint8
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255.0)
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        if self.augment:
            h, w = x.shape[-2:]
            x = F.pad(x, (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            x = x[:, dy:dy + h, dx:dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.labels[i])


@dataclass
class DataBundle:
    name: str
    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_size: int
    classes: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


Stats = tuple[Sequence[float], Sequence[float]]


def _split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _norm_note(mean: Sequence[float], std: Sequence[float], source: str) -> dict:
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "source": source}


def _estimate_stats(x: np.ndarray, idx: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the uint8 NHWC images ``x[idx]``, in [0, 1] units.

    At the source resolution, in float64, a few million values at a time. A channel that does
    not vary gets std 1/255 (one grey level), so normalising never divides by zero.
    """
    c = x.shape[-1]
    total, squares, n = np.zeros(c), np.zeros(c), 0
    step = max(1, (1 << 22) // max(1, int(np.prod(x.shape[1:]))))
    for i in range(0, len(idx), step):
        a = x[idx[i:i + step]].reshape(-1, c).astype(np.float64)
        total += a.sum(0)
        squares += (a * a).sum(0)
        n += a.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return (mean / 255.0).tolist(), np.maximum(std / 255.0, 1 / 255.0).tolist()


def _resize_note(hw: Sequence[int], input_size: int, announce: bool) -> dict:
    """The in-memory sets' eval resize (bilinear, to a square), printed once per load when there is one."""
    src, dst = [int(hw[0]), int(hw[1])], [input_size, input_size]
    if src == dst:
        return {"policy": "none"}
    if announce:
        print(f"resizing {src[0]}×{src[1]} → {dst[0]}×{dst[1]}", file=sys.stderr)
    return {"policy": "bilinear", "from": src, "to": dst}


def _bundle(name: str, tr_x, tr_y, te_x, te_y, classes, stats: Stats | None, input_size: int, val_size: int,
            seed: int, augment: bool, *, stats_source: str = "given", announce: bool = True,
            va: tuple[np.ndarray, np.ndarray] | None = None) -> DataBundle:
    """In-memory splits; ``stats`` None: mean/std estimated from the training split (val hold-out excluded).

    ``va``: a separate validation set (a val/ folder's arrays); then nothing is held out of train
    and ``val_size`` is ignored."""
    if va is not None:
        tr_idx, va_idx, val_size = np.arange(len(tr_y)), np.arange(0), len(va[1])
    else:
        if not 0 <= val_size < len(tr_y):
            raise UserError(f"val_size must be in [0, {len(tr_y)}), got {val_size}", field="val_size")
        tr_idx, va_idx = _split(len(tr_y), val_size, seed)
    if stats is None:
        stats, stats_source = _estimate_stats(tr_x, tr_idx), "estimated from train"
    mean, std = stats
    full_train = ArrayDataset(tr_x, tr_y, mean, std, augment=augment, size=input_size)
    full_eval = ArrayDataset(tr_x, tr_y, mean, std, augment=False, size=input_size)
    notes = {"val_size": val_size, "split_seed": seed, "train_size": len(tr_idx), "test_size": len(te_y),
             "normalisation": _norm_note(mean, std, stats_source),
             "resize": _resize_note(tr_x.shape[1:3], input_size, announce), "channels": int(tr_x.shape[-1]),
             "image_size": [int(tr_x.shape[1]), int(tr_x.shape[2])], "storage": "memory"}
    return DataBundle(
        name=name, train=Subset(full_train, tr_idx.tolist()), train_eval=Subset(full_eval, tr_idx.tolist()),
        val=(ArrayDataset(va[0], va[1], mean, std, size=input_size) if va is not None
             else Subset(full_eval, va_idx.tolist())),
        test=ArrayDataset(te_x, te_y, mean, std, size=input_size),
        num_classes=len(classes), input_size=input_size, classes=list(classes), notes=notes,
    )


def digits(input_size: int = 32, val_size: int | None = None, seed: int = 0, *,
           stats: Stats | None = None) -> DataBundle:
    """scikit-learn's bundled 8×8 digits (1,797 real images), upsampled, 3 channels.

    Deterministic split: a fixed 20% test set (seed 0, stratified), then ``val_size`` of the
    rest (default 10%) held out for validation. Normalised with mean = std = 0.5 unless ``stats``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0, 1)
    imgs = (x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    vs = val_size if val_size is not None else len(tr) // 10
    return _bundle("digits", imgs[tr], d.target[tr], imgs[te], d.target[te], [str(i) for i in range(10)],
                   stats or ((0.5,) * 3, (0.5,) * 3), input_size, vs, seed, augment=False,
                   stats_source="given" if stats else "digits default", announce=False)


# --------------------------------------------------------------------------- ImageFolder trees
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SMALL_SIDE = 96  # an ImageFolder whose images all have one size, at most this on a side, is held in memory
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bound, used when PIL.Image.MAX_IMAGE_PIXELS is None
_CACHE_VERSION = "2"  # bump when decoding changes, so no cache made by an older rule is reused
_PIL_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr", "HSV"})
_INT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_CONVERTIBLE = _PIL_MODES | _INT16_MODES | {"I", "F"}


@dataclass
class _Split:
    """One split folder (train/, test/, val/): class names in label order and (file, label) pairs."""

    folder: Path
    classes: list[str]
    files: list[tuple[Path, int]]
    skipped: int = 0  # non-image files, and symlinks not followed (hidden entries are not counted)

    @cached_property
    def key(self) -> str:
        """A content hash: class list, and each file's relative name, label, size and mtime_ns."""
        h = hashlib.sha256(f"v{_CACHE_VERSION}|{json.dumps(self.classes)}".encode())
        for f, ci in self.files:
            st = f.stat()
            h.update(f"\n{f.relative_to(self.folder)}\0{ci}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def cache_name(self, suffix: str) -> str:
        return f"{self.folder.parent.name}_{self.folder.name}_{self.key}{suffix}"


def _entries(folder: Path) -> list[os.DirEntry]:
    """Non-hidden entries (a name starting with '.' is hidden), sorted by name.

    ``os.scandir``: a DirEntry knows from the listing whether it is a symlink, folder or file,
    so a tree of a million images is not a few million ``stat`` calls.
    """
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"cannot list this folder ({exc.strerror or type(exc).__name__})", source=str(folder)) from exc


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(r) for r in roots)


class _Walk:
    """One split's walk with the symlink rule of ``_scan_tree``."""

    def __init__(self, split_real: Path, roots: Sequence[Path]) -> None:
        self.split_real, self.roots, self.seen, self.skipped = split_real, roots, {split_real}, 0

    def enter(self, e: os.DirEntry) -> bool:
        """Whether to walk the folder ``e`` (a folder, or a symlink to one)."""
        real = Path(e.path).resolve()
        if real in self.seen:
            return False
        if e.is_symlink() and (not _inside(real, self.roots) or real.is_relative_to(self.split_real)
                               or self.split_real.is_relative_to(real)):
            return False
        self.seen.add(real)
        return True

    def keep(self, e: os.DirEntry) -> bool:
        """Whether the file ``e`` (a file, or a symlink to one) is one of the split's images."""
        if e.is_symlink() and not _inside(Path(e.path).resolve(), self.roots):
            return False
        return os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS

    def files(self, folder: Path) -> list[Path]:
        out: list[Path] = []
        for e in _entries(folder):
            if e.is_symlink() and not os.path.exists(e.path):
                raise UserError("broken symbolic link", source=e.path)
            if e.is_dir() and self.enter(e):
                out += self.files(Path(e.path))
            elif e.is_file() and self.keep(e):
                out.append(Path(e.path))
            else:
                self.skipped += 1
        return out


def _scan(folder: Path, roots: Sequence[Path]) -> _Split:
    walk = _Walk(folder.resolve(), roots)
    classes: list[str] = []
    files: list[tuple[Path, int]] = []
    for e in _entries(folder):
        if e.is_dir() and walk.enter(e):
            files += [(f, len(classes)) for f in walk.files(Path(e.path))]
            classes.append(e.name)
        else:
            walk.skipped += 1
    return _Split(folder, classes, files, walk.skipped)


def _quoted(names: Sequence[str], most: int = 5) -> str:
    more = f" (and {len(names) - most} more)" if len(names) > most else ""
    return ", ".join(repr(n) for n in names[:most]) + more


def _class_diff(name: str, want: Sequence[str], have: Sequence[str]) -> str | None:
    want_set, have_set = set(want), set(have)
    lacks, extra = [c for c in want if c not in have_set], [c for c in have if c not in want_set]
    parts = []
    if lacks:
        parts.append(f"lacks class{'es' if len(lacks) > 1 else ''} {_quoted(lacks)}")
    if extra:
        parts.append(f"has extra {_quoted(extra)}")
    return f"{name}/ " + "; ".join(parts) if parts else None


def _check_nonempty(split: _Split) -> None:
    if not split.classes:
        raise UserError("no class folders found", source=str(split.folder))
    if not split.files:
        raise UserError("class folders are empty", source=str(split.folder))


def _scan_tree(root: Path, used: Sequence[str]) -> dict[str, _Split]:
    """Scan train/, test/ and val/ (those present) under ``root``: one class set, or one line naming the difference.

    Rules, everywhere below the splits:

    * a name starting with '.' (folder or file) is ignored;
    * a class is a (non-hidden) folder directly in a split; its images are the files below it,
      at any depth, with an image extension (``IMG_EXTENSIONS``, any case); other files are skipped;
    * symlinks: the data root and each split folder (resolved) are the *allowed trees*, so
      ``train -> /disk/train`` works. A symlinked file is used only if it resolves inside an
      allowed tree. A symlinked folder is followed only if it resolves inside an allowed tree,
      not into (or above) the split being walked, and to no folder already walked in that split:
      so nothing outside the data is read, and a link to an ancestor never loops. A dangling
      symlink is an error naming it. A split linked to the file system's root, or to the data
      folder or one of its ancestors (``test -> /``), is refused: its walk would read the host.

    ``used``: the splits whose emptiness is an error; every present split must have train/'s classes.
    """
    present = [n for n in ("train", "val", "test") if (root / n).is_dir()]
    root_real = root.resolve()
    for n in present:  # a split linked to /, to the data folder or above it would walk what is not data
        real = (root / n).resolve()
        if root_real.is_relative_to(real) or real == Path(real.anchor):
            raise UserError(f"a symbolic link to {real}, which holds the data folder itself (or is the file "
                            "system's root); refused: link a split to its own folder", source=str(root / n))
    roots = tuple(dict.fromkeys([root.resolve(), *((root / n).resolve() for n in present)]))
    splits = {n: _scan(root / n, roots) for n in present}
    for n in used:
        _check_nonempty(splits[n])
    diffs = [d for n in present if n != "train" and (d := _class_diff(n, splits["train"].classes, splits[n].classes))]
    if diffs:
        raise UserError("; ".join(diffs), source=str(root))
    counts = np.bincount([ci for _, ci in splits["train"].files], minlength=len(splits["train"].classes))
    if (empty := [c for c, k in zip(splits["train"].classes, counts) if k == 0]):
        raise UserError(f"train/ class folder{'s' if len(empty) > 1 else ''} {_quoted(empty)} without images",
                        source=str(root))
    return splits


# --------------------------------------------------------------------------- decoding
def _max_pixels() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)


@contextmanager
def _bomb_errors() -> Iterator[None]:
    """PIL's DecompressionBombWarning raised as an error (not thread-safe: enter it on one thread)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``Image.open``, with every failure inside (opening or decoding) one UserError naming the file.

    An image over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (default 89,478,485, about 9459×9459) is
    refused as a possible decompression bomb, before its pixels are decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > _max_pixels():
                raise UserError(f"refused as a possible decompression bomb ({w}×{h} = {w * h} pixels, over "
                                f"the limit of {_max_pixels()})", source=str(path))
            yield im
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"refused as a possible decompression bomb ({exc})", source=str(path)) from exc
    except Exception as exc:  # untrusted bytes: PIL raises OSError, but also ValueError, SyntaxError, EOFError...
        raise UserError(f"not a readable image ({type(exc).__name__})", source=str(path)) from exc


def _to_uint8(a: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """A one-channel 16-bit, 32-bit integer or float image as 8 bits, never clipped to white.

    * "I;16*" (16-bit): the high byte, ``v >> 8`` (32768 → 128, 65535 → 255);
    * "I" (32-bit int): values within 0..255 are taken as 8-bit, within 0..65535 as 16-bit (``v >> 8``);
    * "F" (float): values within 0..1 are scaled by 255, within 0..255 taken as they are (rounded);
    * anything else (negative, larger, NaN) cannot be converted faithfully: an error.
    """
    if mode in _INT16_MODES:
        return (a.astype(np.uint16) >> 8).astype(np.uint8)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > (255 if mode == "F" else 65535):
        raise UserError(f"image mode {mode!r} with values in [{lo:g}, {hi:g}] cannot be converted to 8 bits "
                        "faithfully", source=str(path))
    if mode == "F":
        return np.rint(a * 255.0 if hi <= 1.0 else a).astype(np.uint8)
    return (a if hi <= 255 else a >> 8).astype(np.uint8)


def _to_rgb(im: Any, path: Path) -> Any:
    """A PIL image as RGB, faithfully (see ``_to_uint8`` for 16-bit, "I" and "F"), else a UserError."""
    from PIL import Image

    if im.mode in _PIL_MODES:
        return im.convert("RGB")
    if im.mode in _INT16_MODES or im.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), im.mode, path), "L").convert("RGB")
    raise UserError(f"image mode {im.mode!r} cannot be converted to RGB faithfully", source=str(path))


def _decode(path: Path) -> np.ndarray:
    """HWC uint8 RGB pixels of one file."""
    with _opened(path) as im:
        return np.asarray(_to_rgb(im, path))


def _load_rgb(path: str):
    """The lazy sets' loader: an RGB PIL image, converted like the in-memory sets, failures named."""
    from PIL import Image

    with _bomb_errors():
        return Image.fromarray(_decode(Path(path)), "RGB")


def _probe(path: Path) -> tuple[int, int]:
    """(width, height) from the header: a readable format, a pixel count under the bound, a convertible mode."""
    with _opened(path) as im:
        if im.mode not in _CONVERTIBLE:
            raise UserError(f"image mode {im.mode!r} cannot be converted to RGB faithfully", source=str(path))
        return im.size


def _probe_files(files: Sequence[Path], desc: str) -> list[tuple[int, int]]:
    """``_probe`` every file, on a few threads (it is I/O bound), stopping at the first bad one."""
    from PIL import Image
    from tqdm.auto import tqdm

    Image.init()  # plugins registered once, before the threads
    out: list[tuple[int, int]] = []
    with _bomb_errors(), tqdm(total=len(files), desc=desc, unit="img", leave=False,
                              disable=len(files) < 1000 or not PROGRESS) as bar:
        if len(files) < 256:
            return [_probe(f) for f in files]
        pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
        try:
            for i in range(0, len(files), 4096):
                out += pool.map(_probe, files[i:i + 4096])
                bar.update(len(files[i:i + 4096]))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def _check_headers(split: _Split, cache: Path) -> set[tuple[int, int]]:
    """The split's distinct (height, width): a cheap pass over every file's header before any work.

    Bounded: ``Image.open`` reads the header only, never the pixel data; a file whose pixels turn
    out corrupt later is still one UserError naming it when it is decoded. The result is kept in
    the cache, keyed by the split's content and the pixel bound, so an unchanged tree is not re-read.
    """
    marker = cache / split.cache_name(f"_{_max_pixels()}.sizes.json")
    try:
        return {(int(h), int(w)) for h, w in json.loads(marker.read_text())["sizes"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sizes = {(h, w) for w, h in _probe_files([f for f, _ in split.files], f"check {split.folder.name}")}
    from compressor.storage import io

    with suppress(UserError):  # the marker only saves time
        io.write_json(marker, {"sizes": sorted([h, w] for h, w in sizes)})
    return sizes


def _uniform_size(sizes: set[tuple[int, int]], root: Path) -> tuple[int, int]:
    if len(sizes) != 1:
        shown = ", ".join(f"{h}×{w}" for h, w in sorted(sizes)[:3])
        raise UserError(f"images have different sizes ({shown}, ...); use --data imagefolder (ImageNet-style, "
                        "resized on the fly)", source=str(root))
    return next(iter(sizes))


def _read_imagefolder_arrays(split: _Split, cache: Path, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split of ``hw``-sized images once into a cached uint8 NHWC .npz, keyed by the split's content."""
    from tqdm.auto import tqdm

    npz = cache / split.cache_name(".npz")
    if npz.exists():
        with suppress(OSError, ValueError, KeyError):
            with np.load(npz, allow_pickle=False) as z:
                return z["x"], z["y"]
    x = np.empty((len(split.files), hw[0], hw[1], 3), dtype=np.uint8)
    with _bomb_errors():
        for i, (f, _) in enumerate(tqdm(split.files, desc=f"decode {split.folder.name}", unit="img", leave=False,
                                         disable=not PROGRESS)):
            a = _decode(f)
            if a.shape[:2] != hw:  # a header that lied about the size
                raise UserError(f"decodes to {a.shape[0]}×{a.shape[1]}, its header says {hw[0]}×{hw[1]}",
                                source=str(f))
            x[i] = a
    y = np.asarray([ci for _, ci in split.files], dtype=np.int64)
    from compressor.storage import io

    io.atomic_write(npz, lambda fh: np.savez(fh, x=x, y=y))
    return x, y


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


ARCHIVE_RATIO = 100  # an archive may unpack to at most this many times its own size ...
ARCHIVE_FLOOR = 64 << 20  # ... or to this many bytes, whichever is more
ARCHIVE_MEMBERS = 2_000_000  # and hold at most this many members (ImageNet's train split is 1.28 M)


def _check_archive_size(path: Path, size: int) -> None:
    """Refuse a tar bomb before unpacking: count the members and sum the sizes their headers declare
    (reading the headers writes nothing; what is unpacked is what the headers say)."""
    limit = max(ARCHIVE_FLOOR, ARCHIVE_RATIO * size)
    total = count = 0
    try:
        with tarfile.open(path, "r|*") as tar:  # a stream: headers are read, and not all kept in memory
            for m in tar:
                count += 1
                total += max(int(m.size), 0) if m.isreg() else 0
                if total > limit:
                    raise UserError(f"members declare more than {limit:,} bytes ({ARCHIVE_RATIO}x the archive's "
                                    f"{size:,}); refused as a decompression bomb, nothing unpacked",
                                    source=str(path), field=m.name[:80])
                if count > ARCHIVE_MEMBERS:
                    raise UserError(f"more than {ARCHIVE_MEMBERS:,} members; refused, nothing unpacked",
                                    source=str(path))
                tar.members = []  # a stream need not keep what it has read
    except (tarfile.TarError, EOFError, OSError) as exc:
        why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise UserError(f"not a readable tar archive ({why})", source=str(path)) from exc


def _locate(root: Path, cache: Path) -> Path:
    """A folder with train/ and test/, possibly inside a .tar.gz we unpack into the cache."""
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        st = root.stat()
        key = hashlib.sha256(f"{root.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        dest = cache / f"{root.name.split('.')[0]}_{key}"  # a changed or other archive never reuses a cache
        unpacked_before = dest.is_dir()
        if not unpacked_before:
            _check_archive_size(root, st.st_size)  # before anything is written into the cache
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=_mkdir(cache)))
            try:
                with tarfile.open(root) as tar:
                    tar.extractall(tmp, filter="data")
                os.replace(tmp, dest)  # a half-extracted folder is never taken for a complete one
            except (tarfile.TarError, EOFError, OSError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if dest.is_dir():  # another process finished first
                    return _locate(dest, cache)
                why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
                raise UserError(f"not a readable tar archive ({why})", source=str(root)) from exc
        try:
            return _locate(dest, cache)
        except UserError:
            if not unpacked_before:  # what we just unpacked is not a data folder: nothing is left in the cache
                shutil.rmtree(dest, ignore_errors=True)
            raise
    if not root.exists():
        raise UserError("data folder not found", source=str(root))
    if not root.is_dir():
        raise UserError("expected a folder (ImageFolder layout) or a .tar.gz of one", source=str(root))
    for cand in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    raise UserError("expected train/ and test/ class folders (ImageFolder layout)", source=str(root))


def _read_small(folder: Path, test_name: str, cache: Path, *, want_classes: int | None = None,
                name: str = "imagefolder"):
    """Scan, check and decode an ImageFolder of equal-size small images: (tr_x, tr_y, te_x, te_y, classes, skipped)."""
    splits = _scan_tree(folder, ("train", test_name))
    train, test = splits["train"], splits[test_name]
    if want_classes is not None and len(train.classes) != want_classes:
        raise UserError(f"{name} needs {want_classes} classes, found {len(train.classes)}", source=str(folder))
    hw = _uniform_size(_check_headers(train, cache) | _check_headers(test, cache), folder)
    tr_x, tr_y = _read_imagefolder_arrays(train, cache, hw)
    te_x, te_y = _read_imagefolder_arrays(test, cache, hw)
    return tr_x, tr_y, te_x, te_y, train.classes, train.skipped + test.skipped


def cifar(name: str, root: str | Path, input_size: int = 32, val_size: int | None = None, seed: int = 0,
          cache: Path = DEFAULT_CACHE, download: bool = False, *, stats: Stats | None = None) -> DataBundle:
    """CIFAR-10/100 from torchvision's layout, an ImageFolder tree or a .tar.gz of one.

    Normalised with CIFAR's mean/std unless ``stats``. A tree follows ``_scan_tree``'s rules (same
    class set in train/, test/ and val/ if present; hidden entries ignored; symlinks kept inside).
    """
    rootp = Path(root)
    tv_dir = rootp / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    want = 10 if name == "cifar10" else 100
    skipped = 0
    if tv_dir.is_dir() or download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        tr, te = cls(str(rootp), train=True, download=download), cls(str(rootp), train=False, download=download)
        tr_x, tr_y, te_x, te_y, classes = tr.data, np.asarray(tr.targets), te.data, np.asarray(te.targets), tr.classes
    else:
        tr_x, tr_y, te_x, te_y, classes, skipped = _read_small(_locate(rootp, cache), "test", cache,
                                                               want_classes=want, name=name)
    if len(classes) != want:
        raise UserError(f"{name} needs {want} classes, found {len(classes)}", source=str(rootp))
    if val_size is None:  # 5000 for the real CIFAR; a tenth of a smaller copy
        val_size = min(5000, len(tr_y) // 10)
    b = _bundle(name, tr_x, tr_y, te_x, te_y, classes, stats or (CIFAR_MEAN, CIFAR_STD), input_size, val_size, seed,
                augment=True, stats_source="given" if stats else "cifar default")
    b.notes["skipped"] = skipped
    return b


class FileDataset(Dataset):
    """(path, label) samples decoded on access by ``_load_rgb`` (picklable, for DataLoader workers)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Any) -> None:
        self.samples, self.classes, self.transform = samples, classes, transform
        self.targets = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, y = self.samples[i]
        return self.transform(_load_rgb(path)), y


def imagefolder(root: str | Path, input_size: int = 224, val_size: int | None = None, seed: int = 0, *,
                cache: Path | None = None, stats: Stats | None = None) -> DataBundle:
    """train/ with test/ and/or val/ class-folder trees.

    Which folder is which split: test/ is always the test split (only ever evaluated); val/, when
    test/ is there too, is the validation (selection) split and nothing is held out of train/
    (``val_size`` is ignored). With train/ and test/ only, val is ``val_size`` images held out of
    train/. With train/ and val/ only (ImageNet's layout), val/ is the test split and val is
    held out of train/. ``bundle.notes["test_split"]`` and ``["val_split"]`` say which folder each
    came from ("val (held out of train)" for a hold-out).

    The tree is scanned by ``_scan_tree``'s rules (one class set in every split present, hidden
    entries ignored, symlinks kept inside the data) and every image header is checked first.
    Images that all have one size, at most ``SMALL_SIDE`` (96) on a side, are decoded once into
    memory (cached) like a CIFAR copy: pad-crop + flip augmentation, a bilinear resize to
    ``input_size`` only if they differ, and mean/std from ``stats`` or else estimated from the
    training split (without the val hold-out). Anything else is ImageNet-style, decoded lazily:
    RandomResizedCrop + flip for training; resize to ``input_size * 256/224``, centre crop for
    eval; ImageNet mean/std unless ``stats``. ``val_size``: the training images held out for
    validation when there is no separate val/ (default: a tenth of train/, at most 10,000).
    """
    rootp = Path(root)
    cache = DEFAULT_CACHE if cache is None else Path(cache)
    if not (rootp / "train").is_dir():
        raise UserError("expected a train/ folder (ImageFolder layout)", source=str(rootp))
    has_test, has_val = (rootp / "test").is_dir(), (rootp / "val").is_dir()
    if not (has_test or has_val):
        raise UserError("expected a val/ or test/ folder next to train/", source=str(rootp))
    test_name = "test" if has_test else "val"
    val_name = "val" if has_test and has_val else None
    splits = _scan_tree(rootp, ("train", test_name) + ((val_name,) if val_name else ()))
    train, test = splits["train"], splits[test_name]
    val = splits[val_name] if val_name else None
    sizes = _check_headers(train, cache) | _check_headers(test, cache) | (_check_headers(val, cache) if val else set())
    if val is not None:
        vs = len(val.files)
    else:
        vs = min(10000, len(train.files) // 10) if val_size is None else val_size
        if not 0 <= vs < len(train.files):
            raise UserError(f"val_size must be in [0, {len(train.files)}), got {vs}", field="val_size")
    if len(sizes) == 1 and max(next(iter(sizes))) <= SMALL_SIDE:
        hw = next(iter(sizes))
        tr_x, tr_y = _read_imagefolder_arrays(train, cache, hw)
        te_x, te_y = _read_imagefolder_arrays(test, cache, hw)
        va = _read_imagefolder_arrays(val, cache, hw) if val is not None else None
        b = _bundle("imagefolder", tr_x, tr_y, te_x, te_y, train.classes, stats, input_size, vs, seed, augment=True,
                    va=va)
    else:
        b = _lazy_bundle(train, test, sizes, input_size, vs, seed, stats, val=val)
    b.notes.update({"skipped": train.skipped + test.skipped + (val.skipped if val else 0), "test_split": test_name,
                    "val_split": f"{val_name}/" if val_name else "held out of train/"})
    return b


def _lazy_bundle(train: _Split, test: _Split, sizes: set[tuple[int, int]], input_size: int, vs: int, seed: int,
                 stats: Stats | None, *, val: _Split | None = None) -> DataBundle:
    from torchvision import transforms as T

    mean, std = stats or (IMAGENET_MEAN, IMAGENET_STD)
    resize = int(input_size * 256 / 224)
    norm = T.Normalize(mean, std)
    train_tf = T.Compose([T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(input_size), T.ToTensor(), norm])
    print(f"resizing shorter side → {resize}, centre crop {input_size}×{input_size}", file=sys.stderr)
    samples = [(str(f), ci) for f, ci in train.files]
    tr_aug, tr_eval = FileDataset(samples, train.classes, train_tf), FileDataset(samples, train.classes, eval_tf)
    te = FileDataset([(str(f), ci) for f, ci in test.files], train.classes, eval_tf)
    if val is not None:
        tr_idx = np.arange(len(samples))
        va_ds: Dataset = FileDataset([(str(f), ci) for f, ci in val.files], train.classes, eval_tf)
    else:
        tr_idx, va_idx = _split(len(samples), vs, seed)
        va_ds = Subset(tr_eval, va_idx.tolist())
    hw = next(iter(sizes)) if len(sizes) == 1 else None
    notes = {"val_size": vs, "split_seed": seed, "train_size": len(tr_idx), "test_size": len(te),
             "normalisation": _norm_note(mean, std, "given" if stats else "imagenet default"),
             "resize": {"policy": "resize_center_crop", "resize": resize, "crop": input_size}, "channels": 3,
             "image_size": list(hw) if hw else None, "storage": "lazy"}
    return DataBundle("imagefolder", Subset(tr_aug, tr_idx.tolist()), Subset(tr_eval, tr_idx.tolist()),
                      va_ds, te, len(train.classes), input_size, list(train.classes), notes)


def _check_stats(stats: Stats | None) -> Stats | None:
    if stats is None:
        return None
    mean, std = (tuple(float(v) for v in s) for s in stats)
    if len(mean) != len(std) or len(mean) not in (1, 3) or not all(np.isfinite([*mean, *std])) or min(std) <= 0:
        raise UserError(f"normalisation needs 1 or 3 finite means and stds (std > 0), got {mean} / {std}", field="std")
    return mean, std


def load(name: str, root: str | Path | None = None, *, input_size: int = 32, val_size: int | None = None,
         seed: int = 0, download: bool = False, stats: Stats | None = None,
         cache: str | Path | None = None) -> DataBundle:
    """Dispatch by dataset name; ``root`` is needed for everything but digits.

    ``stats``: the (mean, std) a model was trained with (e.g. akamaster's ResNets use ImageNet's),
    replacing the dataset's own (or the estimate from a small ImageFolder's training split).
    ``cache``: where decoded arrays and header checks are kept (default ``DEFAULT_CACHE``).
    ``bundle.notes``: "normalisation" {mean, std, source}, "resize" (the eval policy), "channels",
    "image_size" ([H, W] of the source images, None if they vary), "storage" ("memory" | "lazy").
    """
    stats = _check_stats(stats)
    if name == "digits":
        return digits(input_size, val_size, seed, stats=stats)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}", field="data")
    if root is None:
        raise UserError(f"--data {name} needs --data-root", field="data-root")
    if name in ("cifar10", "cifar100"):
        extra = {} if cache is None else {"cache": Path(cache)}
        return cifar(name, root, input_size, val_size, seed, download=download, stats=stats, **extra)
    return imagefolder(root, input_size, val_size, seed, stats=stats,
                       cache=None if cache is None else Path(cache))


def loader(ds: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, workers: int = 0,
           device: torch.device | str = "cpu", drop_last: bool = False, sampler=None) -> DataLoader:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}", field="batch-size")
    g = torch.Generator().manual_seed(seed)
    on_gpu = torch.device(device).type == "cuda"
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=g, num_workers=workers, pin_memory=on_gpu, drop_last=drop_last,
                      persistent_workers=workers > 0)


def calibration_subset(ds: Dataset, n: int, seed: int) -> Dataset:
    """``n`` images drawn by a seeded permutation (no augmentation: pass ``train_eval``)."""
    if n < 1:
        raise UserError(f"the number of calibration images must be >= 1, got {n}", field="n-images")
    if n > len(ds):
        raise UserError(f"asked for {n} calibration images, the training split has {len(ds)}", field="n-images")
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    return Subset(ds, sorted(idx.tolist()))


def check_classes(bundle: DataBundle, num_classes: int, *, what: str = "model", source: str | None = None,
                  field: str = "num_classes") -> None:
    """The data and the model must agree on the class count: one line naming both if not."""
    if bundle.num_classes != num_classes:
        raise UserError(f"the data has {bundle.num_classes} classes, the {what} {num_classes}", source=source,
                        field=field)


def model_stats(model: object) -> tuple[Sequence[float], Sequence[float]] | None:
    """The normalisation a model declares it was trained with (``model.mean``/``model.std``), if any."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    return (tuple(mean), tuple(std)) if mean is not None and std is not None else None
