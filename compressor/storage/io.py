"""Atomic file writes: a temporary file in the target folder, fsync, then ``os.replace``.

Every file the library writes goes through here, so an interrupted run never leaves a
half-written checkpoint, scores file, plan or report behind. A failed write (a full disk,
also when torch's serializer reports it as a ``RuntimeError``) is a one-line ``UserError``
and removes its temporary file.

Temporary files are named ``.<name>.<pid>-<host>.<random>.tmp``. Only a hard kill (SIGKILL,
power loss) leaves one behind; the next write into the same folder removes such stale
temporaries of ours: those whose writer (the pid, on this host) is no longer running, and
any of ours, from any host, not modified for an hour (``STALE_AFTER_S``). A live writer's
file is never touched: it is either a running process here or being written to. Only a name
with the writer's pid and host tag is ours: a user's ``.notes.ABCDEFGH.tmp`` (no pid, no tag)
is never removed, however old.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, IO

from compressor.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


STALE_AFTER_S = 3600.0
# .<name>.<pid>-<host tag>.<mkstemp's random part>.tmp: the pid and tag are what prove a temporary is ours
_TMP = re.compile(r"^\..+?\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[a-z0-9_]{8}\.tmp$")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove our stale ``.*.tmp`` files in ``folder`` (see the module docstring); returns them."""
    now = time.time() if now is None else now
    host, removed = _host_tag(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TMP.match(e.name)
        if not m or not e.is_file(follow_symlinks=False):
            continue
        try:
            old = now - e.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
        except OSError:
            continue
        dead = m["pid"] is not None and m["host"] == host and int(m["pid"]) != os.getpid() \
            and not _pid_alive(int(m["pid"]))
        if old or dead:
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a temp file next to ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(target.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-{_host_tag()}.", suffix=".tmp",
                                   dir=target.parent)
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


class _WriteRecorder:
    """A file wrapper that remembers the ``OSError`` of a failed write: torch's serializer turns it
    into a ``RuntimeError`` ("unexpected pos ..."), and the real cause (a full disk) would be lost."""

    def __init__(self, fh: IO) -> None:
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    def write(fh: IO) -> None:
        rec = _WriteRecorder(fh)
        try:
            torch.save(obj, rec)
        except RuntimeError as exc:
            if rec.error is not None:
                raise rec.error from exc  # an OSError: atomic_open makes it a one-line UserError
            raise

    return atomic_write(path, write)
