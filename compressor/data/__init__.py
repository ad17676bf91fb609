"""Datasets: the embedded digits set, CIFAR-10/100 and ImageFolder trees.

Every bundle has train (augmented), train_eval (same images, no augmentation: calibration
and BN re-estimation), val (the only split used for selection: an ImageFolder's val/ when it
also has test/, else held out from train) and test (only ever evaluated: test/, or val/ when
there is no test/; ``notes["test_split"]``/``["val_split"]`` name the folders). Small image
sets (CIFAR copies, and any ImageFolder whose images share one size of at most 96 px a side)
are decoded once and cached as uint8 arrays, so a CPU epoch is not dominated by JPEG decoding; larger ImageFolder trees are decoded lazily. Trees are
scanned and every image header is checked before any work (``folders``, ``images``; archives: ``archives``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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

from compressor.data.archives import _locate  # noqa: E402
from compressor.data.folders import SMALL_SIDE, _scan_tree, _Split  # noqa: E402
from compressor.data.images import (_check_headers, _load_rgb, _read_imagefolder_arrays,  # noqa: E402
                                    _uniform_size)


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
