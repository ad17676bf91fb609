"""Atomic file writes: a temporary file in the target folder, fsync, then ``os.replace``.

Every file the library writes goes through here, so an interrupted run never leaves a
half-written checkpoint, scores file, plan or report behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, IO

from compressor.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a temp file next to ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise UserError(f"cannot write here ({exc.strerror})", source=str(target)) from exc
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual permissions
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"write failed ({exc.strerror}); existing file left untouched", source=str(target)) from exc
        raise


def check_writable(folder: str | os.PathLike) -> Path:
    """Fail before the work, not after it, when ``folder`` cannot be created or written."""
    p = Path(folder)
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"cannot write here ({anc} is not a folder)", source=str(p))
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError("cannot write here (Permission denied)", source=str(p))
    return p


def atomic_write(path: str | os.PathLike, writer: Callable[[IO], Any], binary: bool = True) -> Path:
    with atomic_open(path, "wb" if binary else "w") as fh:
        writer(fh)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))
