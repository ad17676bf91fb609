"""Data archives: a CIFAR/ImageFolder ``.tar.gz`` unpacked once into the cache, after its declared size
and member count are checked (a tar bomb is refused with nothing written).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path


from compressor.errors import UserError


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


