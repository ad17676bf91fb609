"""Datasets: the embedded digits set, CIFAR-10/100 and ImageFolder trees.

Every bundle has train (augmented), train_eval (same images, no augmentation: calibration
and BN re-estimation), val (held out from train: the only split used for selection) and
test (only ever evaluated). Small 32×32 image sets are decoded once and cached as uint8
arrays, so a CPU epoch is not dominated by JPEG decoding.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from compressor.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_CACHE = Path.home() / ".cache" / "compressor"


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
        if self.size and x.shape[-1] != self.size:
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


def _split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _bundle(name: str, tr_x, tr_y, te_x, te_y, classes, mean, std, input_size, val_size, seed, augment) -> DataBundle:
    if not 0 <= val_size < len(tr_y):
        raise UserError(f"val_size must be in [0, {len(tr_y)}), got {val_size}", field="val_size")
    tr_idx, va_idx = _split(len(tr_y), val_size, seed)
    size = input_size if tr_x.shape[1] != input_size else None
    full_train = ArrayDataset(tr_x, tr_y, mean, std, augment=augment, size=size)
    full_eval = ArrayDataset(tr_x, tr_y, mean, std, augment=False, size=size)
    return DataBundle(
        name=name, train=Subset(full_train, tr_idx.tolist()), train_eval=Subset(full_eval, tr_idx.tolist()),
        val=Subset(full_eval, va_idx.tolist()), test=ArrayDataset(te_x, te_y, mean, std, size=size),
        num_classes=len(classes), input_size=input_size, classes=list(classes),
        notes={"val_size": val_size, "split_seed": seed, "train_size": len(tr_idx), "test_size": len(te_y)},
    )


def digits(input_size: int = 32, val_size: int | None = None, seed: int = 0) -> DataBundle:
    """scikit-learn's bundled 8×8 digits (1,797 real images), upsampled, 3 channels.

    Deterministic split: a fixed 20% test set (seed 0, stratified), then ``val_size`` of the
    rest (default 10%) held out for validation.
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
                   (0.5,) * 3, (0.5,) * 3, input_size, vs, seed, augment=False)


def _read_imagefolder_arrays(root: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode an ImageFolder of small images once into a cached uint8 .npz."""
    from PIL import Image
    from tqdm.auto import tqdm

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UserError("no class folders found", source=str(root))
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.is_file()]
    if not files:
        raise UserError("class folders are empty", source=str(root))
    key = hashlib.sha256("|".join(f"{f}:{f.stat().st_size}" for f, _ in files).encode()).hexdigest()[:12]
    npz = cache / f"{root.parent.name}_{root.name}_{key}.npz"
    if npz.exists():
        z = np.load(npz, allow_pickle=False)
        return z["x"], z["y"], classes
    imgs, labels = [], []
    for f, ci in tqdm(files, desc=f"decode {root.name}", unit="img", leave=False):
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))
        except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
            raise UserError(f"not a readable image ({type(exc).__name__})", source=str(f)) from exc
        imgs.append(a)
        labels.append(ci)
    shapes = {a.shape for a in imgs}
    if len(shapes) != 1:
        raise UserError(f"images have different sizes {sorted(shapes)[:3]}; use an ImageNet-style folder", source=str(root))
    x, y = np.stack(imgs), np.asarray(labels, dtype=np.int64)
    from compressor import io

    io.atomic_write(npz, lambda fh: np.savez(fh, x=x, y=y))
    return x, y, classes


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _locate(root: Path, cache: Path) -> Path:
    """A folder with train/ and test/, possibly inside a .tar.gz we unpack into the cache."""
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        st = root.stat()
        key = hashlib.sha256(f"{root.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        dest = cache / f"{root.name.split('.')[0]}_{key}"  # a changed or other archive never reuses a cache
        if not dest.is_dir():
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
        root = dest
    if not root.exists():
        raise UserError("data folder not found", source=str(root))
    if not root.is_dir():
        raise UserError("expected a folder (ImageFolder layout) or a .tar.gz of one", source=str(root))
    for cand in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    raise UserError("expected train/ and test/ class folders (ImageFolder layout)", source=str(root))


def cifar(name: str, root: str | Path, input_size: int = 32, val_size: int | None = None, seed: int = 0,
          cache: Path = DEFAULT_CACHE, download: bool = False) -> DataBundle:
    """CIFAR-10/100 from torchvision's layout, an ImageFolder tree or a .tar.gz of one."""
    rootp = Path(root)
    tv_dir = rootp / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if tv_dir.is_dir() or download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        tr, te = cls(str(rootp), train=True, download=download), cls(str(rootp), train=False, download=download)
        tr_x, tr_y, te_x, te_y, classes = tr.data, np.asarray(tr.targets), te.data, np.asarray(te.targets), tr.classes
    else:
        folder = _locate(rootp, cache)
        tr_x, tr_y, classes = _read_imagefolder_arrays(folder / "train", cache)
        te_x, te_y, te_classes = _read_imagefolder_arrays(folder / "test", cache)
        if te_classes != classes:
            raise UserError("train/ and test/ have different class folders", source=str(folder))
    want = 10 if name == "cifar10" else 100
    if len(classes) != want:
        raise UserError(f"{name} needs {want} classes, found {len(classes)}", source=str(rootp))
    if val_size is None:  # 5000 for the real CIFAR; a tenth of a smaller copy
        val_size = min(5000, len(tr_y) // 10)
    return _bundle(name, tr_x, tr_y, te_x, te_y, classes, CIFAR_MEAN, CIFAR_STD, input_size, val_size, seed, augment=True)


def _load_rgb(path: str):
    """torchvision's PIL loader, with an unreadable file named in a UserError (decoding is lazy)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise UserError(f"not a readable image ({type(exc).__name__})", source=str(path)) from exc


def imagefolder(root: str | Path, input_size: int = 224, val_size: int = 10000, seed: int = 0) -> DataBundle:
    """ImageNet-style train/ and val|test/ trees, standard transforms, decoded lazily."""
    import torchvision
    from torchvision import transforms as T

    rootp = Path(root)
    if not (rootp / "train").is_dir():
        raise UserError("expected a train/ folder (ImageFolder layout)", source=str(rootp))
    test_dir = rootp / "val" if (rootp / "val").is_dir() else rootp / "test"
    if not test_dir.is_dir():
        raise UserError("expected a val/ or test/ folder next to train/", source=str(rootp))
    for sub_dir in (rootp / "train", test_dir):
        if not any(p.is_dir() and any(f.is_file() for f in p.iterdir()) for p in sub_dir.iterdir()):
            raise UserError("no class folder with images found", source=str(sub_dir))
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(int(input_size * 256 / 224)), T.CenterCrop(input_size), T.ToTensor(), norm])
    try:
        tr_aug = torchvision.datasets.ImageFolder(str(rootp / "train"), train_tf, loader=_load_rgb)
        tr_eval = torchvision.datasets.ImageFolder(str(rootp / "train"), eval_tf, loader=_load_rgb)
        test = torchvision.datasets.ImageFolder(str(test_dir), eval_tf, loader=_load_rgb)
    except FileNotFoundError as exc:  # a class folder without any image file
        raise UserError(str(exc).splitlines()[0][:200], source=str(rootp)) from exc
    n = len(tr_aug)
    vs = min(val_size, n // 10)
    tr_idx, va_idx = _split(n, vs, seed)
    return DataBundle("imagefolder", Subset(tr_aug, tr_idx.tolist()), Subset(tr_eval, tr_idx.tolist()),
                      Subset(tr_eval, va_idx.tolist()), test, len(tr_aug.classes), input_size, tr_aug.classes,
                      {"val_size": vs, "split_seed": seed})


def load(name: str, root: str | Path | None = None, *, input_size: int = 32, val_size: int | None = None,
         seed: int = 0, download: bool = False,
         stats: tuple[Sequence[float], Sequence[float]] | None = None) -> DataBundle:
    """Dispatch by dataset name; ``root`` is needed for everything but digits.

    ``stats``: the (mean, std) a model was trained with (e.g. akamaster's ResNets use ImageNet's),
    replacing the dataset's own for the in-memory sets.
    """
    bundle = _load(name, root, input_size=input_size, val_size=val_size, seed=seed, download=download)
    if stats is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in stats)
        for ds in (bundle.train, bundle.train_eval, bundle.val, bundle.test):
            base = ds.dataset if isinstance(ds, Subset) else ds
            if isinstance(base, ArrayDataset):
                base.mean, base.std = mean, std
        bundle.notes["normalisation"] = {"mean": list(stats[0]), "std": list(stats[1])}
    return bundle


def _load(name: str, root: str | Path | None, *, input_size: int, val_size: int | None, seed: int,
          download: bool) -> DataBundle:
    if name == "digits":
        return digits(input_size, val_size, seed)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}", field="data")
    if root is None:
        raise UserError(f"--data {name} needs --data-root", field="data-root")
    if name in ("cifar10", "cifar100"):
        return cifar(name, root, input_size, val_size, seed, download=download)
    return imagefolder(root, input_size, 10000 if val_size is None else val_size, seed)


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
