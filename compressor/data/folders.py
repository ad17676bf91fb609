"""ImageFolder trees: each split folder scanned once (classes, files, symlinks kept inside the tree, no loops).

The scan reads names only; ``images`` checks and decodes the files it finds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from compressor.errors import UserError


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_VERSION = "2"  # bump when decoding changes, so no cache made by an older rule is reused
SMALL_SIDE = 96  # an ImageFolder whose images all have one size, at most this on a side, is held in memory


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


