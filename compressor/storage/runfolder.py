"""Run folders that can't mix: one run at a time per ``--out``, and a failed run leaves nothing.

Every command that writes into an ``--out`` folder claims it first::

    with runfolder.claim(out, command="prune", overwrite=args.overwrite) as run:
        io.save_torch(run.record(out / "pruned.pt"), ck)

What a claim does, and the rules it keeps:

* **One run per folder.** ``claim`` creates ``out`` if needed and takes an exclusive,
  non-blocking lock: ``fcntl.flock`` on ``out/.compressor.lock``, held open for the whole run
  and released (the file removed) on exit, however the run ends; the kernel drops it if the
  process dies. A second run on the same folder fails at once with a one-line ``UserError``
  ("another compressor run (pid N, command X) holds this folder"). Where ``fcntl`` is missing
  (Windows) the lock file is created with ``O_CREAT | O_EXCL`` and holds the owner's pid; a
  hard-killed run leaves it behind, and on POSIX one whose owner is gone is taken over (its pid
  not alive on this host, or alive with another start time than recorded: a reused pid),
  elsewhere the message says to delete it.
* **A killed run is not a running one.** A manifest left ``"running"`` by a process that is gone
  (same test as the lock's) is a *killed* run: a refusal says so ("an earlier train run, killed
  (pid N is gone)"), and ``overwrite`` removes its outputs too, including the files a command
  writes before it records them (``OWN_FILES``: train/finetune's ``resolved_config.yaml``,
  ``metrics.jsonl``, ``last.pt``, ...) when they are no older than the run's start.
* **Messages are one line.** A warning is a ``RunFolderWarning`` printed as one line,
  ``warning: <folder>: ...``, without Python's category and source line.
* **No mixing with other files.** A folder with content is refused unless ``overwrite`` or
  ``resume`` is given, naming what is in it. Our own bookkeeping does not count as content:
  the lock, ``manifest.json`` (when it is one of ours) and ``compressor.storage.io``'s ``.*.tmp``
  temporaries.
* **Overwrite replaces only what a run wrote, and only once the new run has succeeded.** With
  ``overwrite=True`` the old run's files (those its ``manifest.json`` lists; for a run that did
  not finish, also the files that appeared in the folder after its claim, from the listing its
  manifest keeps in ``before``) and the manifest are moved aside at claim time into
  ``out/.compressor.replaced/``, so the new run starts in a folder without them. On success that
  folder is deleted; on failure (or, after a hard kill, at the next claim of the folder) the new
  run's files go and the old run's files and manifest are moved back. A file of the old run
  that this run takes as input (named on the command line, or in ``inputs``) stays in place and
  is backed up by a hard link; it is never deleted. Anything else (files of the user's, or of a
  run from before manifests) is left where it is and named in one warning: a run never deletes a
  file it cannot prove it wrote. A ``manifest.json`` that is not a compressor run's is refused
  whatever the flags (it would be replaced).
* **Resume continues a run.** ``resume=True`` accepts a non-empty folder: one whose manifest
  names the same command (any status: done, failed, or a run killed while "running"), or one
  with no manifest (a folder from before manifests; the command checks its own state, as
  ``train --resume`` and ``sweep`` do). A manifest of another command is refused. ``resume``
  wins over ``overwrite``: nothing is deleted.
* **The manifest.** ``out/manifest.json`` (written atomically) says which run owns the folder:
  ``{"format": "compressor.run", "command", "argv", "pid", "host", "started", "mode",
  "status": "running", "files": [], "before": {...}}`` (``before``: the files in the folder at
  claim, with their size and mtime, so a killed run's unrecorded files are known too). ``run.record(path)`` registers an output (the manifest is
  rewritten when the list grows, so even a SIGKILLed run's outputs are known to ``overwrite``).
  On success it becomes ``status: "done"`` with ``finished`` and ``files``: everything the run
  recorded or wrote (files created or rewritten in the folder, found by comparing a listing
  taken at claim), plus, on resume, the files of the run it continued.
* **A failed run leaves nothing.** An exception in the ``with`` block (``KeyboardInterrupt``
  too; ``SystemExit(0)`` is a success) removes every file created during the run and, unless
  resuming, every existing file it rewrote (its old content is gone already); files it did not
  touch survive. Then the manifest goes, folders the run created that are left empty, and the
  folder itself if the claim created it. Files recorded with ``keep=True`` (a resume point such
  as ``last.pt``) survive a failure: the manifest then stays, with ``status: "failed"`` (or
  ``"interrupted"``), ``error`` and the kept ``files``, so ``resume`` can pick the run up. On
  resume a failure only takes back what the resumed run added. The exception then propagates.

Claim only in the process that writes (rank 0 under ``torchrun``): a second rank's claim is a
second run and is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import warnings
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from compressor.storage import io
from compressor.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: an O_EXCL lock file (see the module docstring)
    fcntl = None  # type: ignore[assignment]

RUN_FORMAT = "compressor.run"
MANIFEST = "manifest.json"
LOCK = ".compressor.lock"
REPLACED = ".compressor.replaced"  # the replaced run's files, until the run replacing them has finished
SHOW = 5  # names listed in a refusal or a warning
# Files a command writes into its folder before (or without) recording them: a killed run's are its own.
_TRAIN_FILES = ("resolved_config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "recovery_curve.png")
OWN_FILES: dict[str, tuple[str, ...]] = {"train": _TRAIN_FILES, "finetune": _TRAIN_FILES}

_Stat = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class RunFolderWarning(UserWarning):
    """A run folder's warning: shown as one line, ``warning: <folder>: ...`` (no category, no source line)."""


def _one_line(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' signature
    return f"warning: {message}\n"


def _warn(msg: str) -> None:
    """``msg`` as a ``RunFolderWarning`` (so callers and tests can filter or catch it), printed as
    one line: Python's own format (``file:line: UserWarning: ...`` and the source line) is swapped
    out for this one warning only."""
    saved = warnings.formatwarning
    warnings.formatwarning = _one_line
    try:
        warnings.warn(msg, RunFolderWarning, stacklevel=3)
    finally:
        warnings.formatwarning = saved


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, counted after "pid (comm)"
    except (OSError, ValueError, IndexError):
        return None


def _owner_gone(doc: dict[str, Any]) -> bool:
    """Whether the process a lock or manifest names is gone: on this host (POSIX), its pid is not
    alive, or is alive with another start time than the one recorded (the pid was reused)."""
    pid = doc.get("pid")
    if os.name != "posix" or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if doc.get("host") != socket.gethostname() or pid == os.getpid():
        return False
    if not io._pid_alive(pid):  # noqa: SLF001
        return True
    start, now = doc.get("pid_start"), _proc_start(pid)
    return isinstance(start, int) and now is not None and now != start


def _names(names: list[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - SHOW} more" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def _read_manifest(out: Path) -> dict[str, Any] | None:
    """Our manifest in ``out``, or None (none there, unreadable, or someone else's manifest.json)."""
    try:
        doc = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == RUN_FORMAT else None


def _ours(name: str) -> bool:
    return name in (LOCK, REPLACED) or io._TMP.match(name) is not None  # noqa: SLF001 - io's own temp pattern


def _listing(out: Path) -> tuple[dict[str, _Stat], set[str]]:
    """Files (``rel path -> stat``) and folders under ``out``, without our lock files and temporaries
    and the top-level manifest. Symlinks are files here: never followed."""
    files: dict[str, _Stat] = {}
    dirs: set[str] = set()
    for root, dnames, fnames in os.walk(out):
        rel = Path(root).relative_to(out)
        for d in list(dnames):
            if d == REPLACED:
                dnames.remove(d)
            elif os.path.islink(os.path.join(root, d)):
                dnames.remove(d)
                fnames.append(d)
            else:
                dirs.add((rel / d).as_posix())
        for f in fnames:
            r = (rel / f).as_posix()
            if _ours(f) or r == MANIFEST:
                continue
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, f))
                files[r] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    return files, dirs


def _inside(out: Path, rel: str) -> Path | None:
    """``out / rel`` when it stays inside ``out`` (a manifest is data, not to be trusted blindly)."""
    p = out / rel
    try:
        p.parent.resolve().relative_to(out.resolve())
    except (OSError, ValueError):
        return None
    return p if p.name not in ("", ".", "..") else None


def _prune_dirs(out: Path, rels: set[str]) -> None:
    """Remove the folders ``rels`` under ``out`` that are empty, deepest first."""
    for rel in sorted(rels, key=lambda r: r.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            (out / rel).rmdir()


# --- the lock ---------------------------------------------------------------------------------

class _Held(Exception):
    def __init__(self, holder: dict[str, Any]) -> None:
        self.holder = holder


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _lock_flock(path: Path, info: bytes) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _Held(_read_holder(path)) from exc
            raise
        # The holder removes the file as it leaves: if we locked a removed file, try again.
        try:
            a, b = os.fstat(fd), os.stat(path)
            same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        except OSError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, info)
            return fd
        os.close(fd)


def _lock_excl(path: Path, info: bytes) -> int:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if not _owner_gone(holder):
                raise _Held({**holder, "stale_hint": True}) from None
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        os.write(fd, info)
        return fd
    raise _Held(_read_holder(path))


# --- the run ----------------------------------------------------------------------------------

class RunFolder:
    """A claimed ``--out`` folder; made by :func:`claim`, used as a context manager."""

    def __init__(self, out: Path, command: str, mode: str, created: list[Path], fd: int | None,
                 old: dict[str, Any] | None) -> None:
        self.out, self.command, self.mode = out, command, mode
        self._created = created  # folders this claim made, out first
        self._fd = fd
        self._pid = os.getpid()
        self._old_files = [f for f in (old or {}).get("files", []) if isinstance(f, str)] if mode == "resume" else []
        self._had_manifest = old is not None and mode == "resume"
        self._files, self._dirs = _listing(out)
        self._inputs: set[str] = set()  # the replaced run's files kept in place as this run's inputs
        self._recorded: list[str] = []
        self._keep: set[str] = set()
        self._closed = False
        self.manifest: dict[str, Any] = {
            "format": RUN_FORMAT, "command": command, "argv": list(sys.argv), "pid": self._pid,
            "pid_start": _proc_start(self._pid), "host": socket.gethostname(), "started": _now(), "mode": mode,
            "status": "running", "files": list(self._old_files),
            "before": (old or {}).get("before") if mode == "resume" and isinstance((old or {}).get("before"), dict)
            else {f: [st[3], st[2]] for f, st in self._files.items()}}
        self._write()

    # -- use

    def record(self, path: str | os.PathLike, *, keep: bool = False) -> Path:
        """Register an output of this run (a file, or a folder of them) and return ``path``.

        Call it before or after writing the file. ``keep=True`` marks a resume point that
        survives a failed run (see the module docstring).
        """
        p = Path(path)
        try:
            rel = (p if p.is_absolute() else Path.cwd() / p).resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"{p} is not inside the run folder {self.out}") from None
        if keep:
            self._keep.add(rel)
        if rel not in self._recorded:
            self._recorded.append(rel)
            if rel not in self.manifest["files"]:
                self.manifest["files"].append(rel)
                self._write()
        return p

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if et is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.finish()
        else:
            self.abort(exc)

    # -- the end

    def finish(self) -> None:
        """Success: the manifest says ``done`` and lists the run's files; the lock is released."""
        if not self._begin_close():
            return
        try:
            now, _ = _listing(self.out)
            files = self._old_files + self._recorded + [f for f, st in now.items() if self._files.get(f) != st]
            self._finalize("done", self._existing(files))
            shutil.rmtree(self.out / REPLACED, ignore_errors=True)  # the replaced run's files: replaced now
        finally:
            self._release()

    def abort(self, exc: BaseException | None = None) -> None:
        """Failure: remove what the run wrote (not its ``keep`` files); the lock is released."""
        if not self._begin_close():
            return
        try:
            now, dirs = _listing(self.out)
            for f, st in now.items():
                new = f not in self._files
                if (new or (self.mode != "resume" and self._files[f] != st)) and not self._kept(f):
                    with contextlib.suppress(OSError):
                        (self.out / f).unlink()
            _prune_dirs(self.out, dirs - self._dirs)
            kept = self._existing([f for f in now if self._kept(f)])
            if self.mode != "resume" and (self.out / REPLACED).is_dir():  # put the replaced run back
                for f in kept:
                    with contextlib.suppress(OSError):
                        (self.out / f).unlink()
                _prune_dirs(self.out, dirs - self._dirs)
                with contextlib.suppress(OSError):
                    (self.out / MANIFEST).unlink()
                _restore(self.out)
            elif kept or self._had_manifest:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                self.manifest["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0] if exc else status
                with contextlib.suppress(UserError):
                    self._finalize(status, self._existing(self._old_files + kept))
            else:
                with contextlib.suppress(OSError):
                    (self.out / MANIFEST).unlink()
        finally:
            self._release()
            for d in self._created:  # out first, then the parents the claim made
                try:
                    d.rmdir()
                except OSError:
                    break

    # -- helpers

    def _begin_close(self) -> bool:
        if self._closed or os.getpid() != self._pid:  # closed already, or a forked child unwinding
            return False
        self._closed = True
        return True

    def _kept(self, rel: str) -> bool:
        return any(rel == k or rel.startswith(k + "/") for k in self._keep)

    def _existing(self, rels: list[str]) -> list[str]:
        """``rels`` that exist, folders expanded to their files, in order, without repeats."""
        out: dict[str, None] = {}
        for rel in rels:
            p = self.out / rel
            if p.is_dir() and not p.is_symlink():
                for f in sorted(_listing(p)[0]):
                    out[f"{rel}/{f}"] = None
            elif p.is_file() or p.is_symlink():
                out[rel] = None
        return list(out)

    def _finalize(self, status: str, files: list[str]) -> None:
        self.manifest.update(status=status, finished=_now(), files=files)
        self._write()

    def _write(self) -> None:
        io.write_json(self.out / MANIFEST, self.manifest)

    def _release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.out / LOCK).unlink()  # while still holding it: see _lock_flock's inode check
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None


def claim(out: str | os.PathLike, *, command: str, overwrite: bool = False, resume: bool = False,
          inputs: tuple[str | os.PathLike, ...] | list[str | os.PathLike] = ()) -> RunFolder:
    """Claim ``out`` for one run of ``command`` (see the module docstring); a ``UserError`` if it can't be.

    ``inputs``: files this run reads (besides those named on the command line): if ``overwrite``
    replaces an earlier run that wrote one of them, it stays in place and is never deleted.
    """
    out = io.check_writable(Path(out))
    if out.exists() and not out.is_dir():
        raise UserError("not a folder", source=str(out))
    created: list[Path] = []
    anc = out
    while not anc.exists() and anc != anc.parent:
        created.append(anc)
        anc = anc.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write here ({exc.strerror})", source=str(out)) from exc

    info = json.dumps({"pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "host": socket.gethostname(),
                       "command": command}).encode()
    fd: int | None = None
    set_aside = False
    try:
        fd = (_lock_flock if fcntl is not None else _lock_excl)(out / LOCK, info)
    except _Held as held:
        h = held.holder
        who = ", ".join(f"{k} {h[k]}" for k in ("pid", "command") if h.get(k) is not None)
        host = f" on {h['host']}" if h.get("host") not in (None, socket.gethostname()) else ""
        hint = f"; if it is no longer running, delete {out / LOCK}" if h.get("stale_hint") else ""
        raise UserError(f"another compressor run{f' ({who}{host})' if who else ''} holds this folder{hint}",
                        source=str(out)) from None
    except OSError as exc:  # a file system without locks: carry on, unprotected
        _warn(f"{out}: cannot lock this folder ({exc.strerror}); concurrent runs into it are not prevented")

    try:
        mode = "resume" if resume else "overwrite" if overwrite else "fresh"
        _recover(out, command, mode)  # a replacement that did not finish: the earlier run comes back
        old = _read_manifest(out)
        content = [e.name for e in os.scandir(out) if not _ours(e.name) and not (e.name == MANIFEST and old)]
        killed = old is not None and old.get("status") == "running" and _owner_gone(old)
        status = f"killed (pid {old.get('pid')} is gone)" if killed else old.get("status") if old else None
        earlier = f"an earlier {old.get('command')} run, {status}; " if old else ""
        if old is None and (out / MANIFEST).exists() and mode != "fresh":  # never replace someone else's file
            raise UserError(f"holds a {MANIFEST} that is not a compressor run's; choose another --out",
                            source=str(out))
        if mode == "resume":
            if old and old.get("command") != command:
                raise UserError(f"holds a {old.get('command')} run, not a {command} run; choose another --out",
                                source=str(out))
        elif content and mode == "fresh":
            how = (f"pass --resume {out / 'last.pt'} to continue it, "
                   if old and old.get("status") != "done" and old.get("command") in OWN_FILES
                   and (out / "last.pt").is_file() else "pass ")
            raise UserError(f"not empty and not written by this run ({earlier}found: {_names(content)}); "
                            f"{how}--overwrite to replace it or choose another --out", source=str(out))
        kept_inputs: set[str] = set()
        if mode == "overwrite":
            set_aside = True
            kept_inputs = _set_aside(out, old, _input_rels(out, inputs))
            left = [e.name for e in os.scandir(out) if not _ours(e.name) and e.name not in kept_inputs]
            if left:
                _warn(f"{out}: --overwrite leaves files no compressor run recorded here: {_names(left)}")
        run = RunFolder(out, command, mode, created, fd, old)
        run._inputs = kept_inputs  # noqa: SLF001
        return run
    except BaseException:
        if set_aside:  # the new run never started: the earlier one comes back (its manifest too)
            _restore(out)
        if fd is not None:
            with contextlib.suppress(OSError):
                (out / LOCK).unlink()
            os.close(fd)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _input_rels(out: Path, inputs: Any) -> set[str]:
    """The files inside ``out`` that this run reads: ``inputs``, and any command-line word naming one."""
    rels: set[str] = set()
    root = out.resolve()
    for word in [*map(str, inputs), *sys.argv[1:]]:
        for cand in {word, word.split("=", 1)[-1]}:
            if not cand or cand.startswith("-"):
                continue
            with contextlib.suppress(OSError, ValueError):
                p = Path(cand).resolve()
                if p.is_file():
                    rels.add(p.relative_to(root).as_posix())
    return rels


def _run_files(out: Path, old: dict[str, Any] | None) -> list[str]:
    """The files (relative, inside ``out``, plain files or symlinks) an earlier run's manifest shows
    to be that run's: those it lists, and for a run that did not finish, those that appeared (or
    changed) after its claim according to its ``before`` listing, or (a manifest without one) its
    command's ``OWN_FILES`` no older than its start."""
    if old is None:
        return []
    rels: dict[str, None] = {}
    for rel in old.get("files") or []:
        p = _inside(out, rel) if isinstance(rel, str) else None
        if p is not None and (p.is_symlink() or p.is_file()):
            rels[Path(rel).as_posix()] = None
    if old.get("status") != "done":
        try:
            started = datetime.fromisoformat(str(old.get("started"))).timestamp() - 1.0  # ISO seconds: round down
        except ValueError:
            started = None
        before = old.get("before")
        if isinstance(before, dict) and started is not None:
            for rel, st in _listing(out)[0].items():
                was = before.get(rel)
                if (was != [st[3], st[2]]) and st[2] / 1e9 >= started:
                    rels[rel] = None
        elif started is not None:
            for name in OWN_FILES.get(str(old.get("command")), ()):
                p = out / name
                with contextlib.suppress(OSError):
                    st = os.lstat(p)
                    if p.is_file() and not p.is_symlink() and st.st_mtime >= started:
                        rels[name] = None
    return list(rels)


def _parents(rel: str) -> set[str]:
    """The folders above a relative path (``a/b/c.pt`` -> ``{"a", "a/b"}``), to be pruned when empty."""
    return {q.as_posix() for q in Path(rel).parents if q.as_posix() not in (".", "")}


def _set_aside(out: Path, old: dict[str, Any] | None, inputs: set[str]) -> set[str]:
    """Move an earlier run's files and manifest into ``out/.compressor.replaced`` (its inputs, by a
    hard link: they stay in place). The manifest goes last: until then ``_recover`` sees the
    earlier run as the folder's owner and moves back what was set aside. Returns the inputs kept."""
    if old is None:
        return set()
    bk = out / REPLACED
    kept: set[str] = set()
    dirs: set[str] = set()
    for rel in _run_files(out, old):
        src, dst = out / rel, bk / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel in inputs:
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError:
                    shutil.copy2(src, dst, follow_symlinks=False)
                kept.add(rel.split("/")[0])
            else:
                os.replace(src, dst)
        except OSError as exc:
            _restore(out)
            raise UserError(f"cannot set the earlier run's {rel} aside ({exc.strerror}); nothing was changed",
                            source=str(out)) from exc
        dirs |= _parents(rel)
    _prune_dirs(out, dirs)
    with contextlib.suppress(FileNotFoundError):
        bk.mkdir(exist_ok=True)
        os.replace(out / MANIFEST, bk / MANIFEST)
    return kept


def _restore(out: Path) -> None:
    """Move the files in ``out/.compressor.replaced`` back (where nothing is in their place) and drop the folder."""
    bk = out / REPLACED
    if not bk.is_dir():
        return
    for root, _, fnames in os.walk(bk):
        for f in fnames:
            src = Path(root) / f
            dst = out / src.relative_to(bk)
            with contextlib.suppress(OSError):
                if not (dst.exists() or dst.is_symlink()):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
    shutil.rmtree(bk, ignore_errors=True)


def _recover(out: Path, command: str, mode: str) -> None:
    """A ``.compressor.replaced`` folder at claim time (the lock is ours: no run is working here)
    means a replacement that was hard-killed. If it finished (its manifest says done), the replaced
    files go; if this claim resumes it, they wait for its end; otherwise its files go (those its
    manifest shows) and the earlier run's come back."""
    bk = out / REPLACED
    if not bk.is_dir():
        return
    cur = _read_manifest(out)
    if not (bk / MANIFEST).exists():  # killed while setting the earlier run aside: it is still the owner
        _restore(out)
        return
    if cur is not None and cur.get("status") == "done":
        shutil.rmtree(bk, ignore_errors=True)
        return
    if mode == "resume" and cur is not None and cur.get("command") == command:
        return
    if cur is not None:
        dirs: set[str] = set()
        for rel in _run_files(out, cur):
            with contextlib.suppress(OSError):
                (out / rel).unlink()
            dirs |= _parents(rel)
        _prune_dirs(out, dirs)
        with contextlib.suppress(OSError):
            (out / MANIFEST).unlink()
    _restore(out)
    _warn(f"{out}: an unfinished --overwrite run was taken back; the run it replaced is restored")
