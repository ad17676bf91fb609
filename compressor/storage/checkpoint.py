"""Checkpoints: plain data only, written atomically, read with ``weights_only=True``.

Format (``format_version`` 2; version 1 files, without ``builder_kwargs``/``shapes``/``data``, still load)::

    {"format": "compressor.storage.checkpoint", "format_version": 1,
     "model": "vgg16_bn", "num_classes": 10, "cfg": [...],   # enough to rebuild the model
     "data": {classes, input_size, channels, mean, std, resize, dataset, root} | None,  # compressor.data.contract
     "state_dict": {...},
     "rates": {...} | None, "plan": {...} | None,            # how it was pruned (plan JSON)
     "metrics": {...}, "provenance": {command, seed, versions, time, ...},
     "extra": {...}}                                           # e.g. training state

HRank/HRankPlus checkpoints (a plain state_dict, or ``{'state_dict': ...}``, keys optionally
prefixed ``module.``) load too: the cfg is inferred from the conv weight shapes.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from compressor.data import contract
from compressor.storage import io
from compressor.errors import UserError
from compressor.models import get_model, list_models
from compressor.models import external
from compressor.models import hrank
from compressor.pruning import shapes as shapes_mod

CKPT_FORMAT = "compressor.storage.checkpoint"
CKPT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def _dist_version(dist: str, fallback: str) -> str:
    """The installed distribution's version (torch-pruning 1.6.1 reports "1.6.0" in ``__version__``)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return str(fallback)


def provenance(command: str | None = None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    import numpy
    import torch_pruning

    import compressor

    return {
        "command": command if command is not None else " ".join(sys.argv),
        "seed": seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "compressor": str(compressor.__version__),
            "torch": str(torch.__version__),
            "torch_pruning": _dist_version("torch-pruning", getattr(torch_pruning, "__version__", "?")),
            "numpy": str(numpy.__version__),
            "python": platform.python_version(),
        },
        **extra,
    }


def _plain_kwargs(model: nn.Module) -> dict[str, Any]:
    kw = dict(getattr(model, "builder_kwargs", {}) or {})
    if isinstance(kw.get("input_size"), tuple):
        kw["input_size"] = list(kw["input_size"])
    return kw


def reference_of(model: nn.Module) -> nn.Module:
    """The unpruned architecture of ``model`` (on the CPU: channel ops keep index buffers)."""
    kw = _checked_kwargs(_plain_kwargs(model), "<model>")
    return get_model(model.arch, num_classes=int(model.num_classes), **kw)


def _shapes(model: nn.Module) -> dict[str, Any]:
    """The narrowed modules' shapes; every module's shape when the architecture has no
    reference this library can build (a notebook class: ``load_into`` narrows the user's own)."""
    try:
        return shapes_mod.changed_shapes(reference_of(model), model)
    except UserError:
        return shapes_mod.module_shapes(model)


def to_dict(model: nn.Module, *, rates: Mapping | None = None, plan: Mapping | None = None,
            metrics: Mapping | None = None, prov: Mapping | None = None,
            extra: Mapping | None = None) -> dict[str, Any]:
    cfg = getattr(model, "cfg", None)
    return {
        "format": CKPT_FORMAT,
        "format_version": CKPT_VERSION,
        "model": model.arch,
        "num_classes": int(model.num_classes),
        "cfg": list(cfg) if cfg is not None else None,
        "builder_kwargs": _plain_kwargs(model),
        "shapes": _shapes(model) if cfg is None else {},
        "data": c.to_dict() if (c := contract.of(model)) is not None else None,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "rates": dict(rates) if rates is not None else None,
        "plan": dict(plan) if plan is not None else None,
        "metrics": dict(metrics or {}),
        "provenance": dict(prov or provenance()),
        "extra": dict(extra or {}),
    }


def save(path: str | Path, model: nn.Module, **kwargs: Any) -> Path:
    """Write a checkpoint atomically (temp file, fsync, ``os.replace``)."""
    return io.save_torch(path, to_dict(model, **kwargs))


def read_torch_file(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A torch file read with ``weights_only=True`` after its size checks (not found, empty, a deflate
    bomb), whose top level is a dict of bounded structure; any failure is a one-line UserError."""
    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found", source=src)
    if p.stat().st_size == 0:
        raise UserError(f"{what} is empty", source=src)
    _check_zip_size(p, src)
    try:
        with warnings.catch_warnings():  # torch warns about bare pickles before refusing them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable input, whatever the cause
        text = str(exc)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if "unsupported global" in text.lower():  # "Unsupported global: GLOBAL eval", "unsupported GLOBAL posix.system"
            raise UserError("refused: the file holds pickled objects/code that weights_only loading does not allow "
                            "(nothing in it was run)", source=src) from exc
        msg = lines[0] if lines else type(exc).__name__
        if "weights only load failed" in text.lower():  # keep what was unsupported, drop torch's "retry unsafely"
            msg = next((ln for ln in lines if ln.lower().startswith("unsupported")), "unsupported content")
        raise UserError(f"not a readable {what} (truncated or another format: {msg[:120]})", source=src) from exc
    if not isinstance(obj, dict):
        raise UserError(f"not a {what} (top level is {type(obj).__name__}, expected a dict)", source=src)
    _check_structure(obj, src)
    return obj


def read(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any failure is a one-line UserError."""
    return read_torch_file(path, "checkpoint")


ZIP_RATIO = 4  # a torch file stores its records uncompressed: declared sizes near the file's own
ZIP_FLOOR = 16 << 20


def _check_zip_size(p: Path, src: str) -> None:
    """A torch (zip) file whose records declare far more bytes than the file holds (a deflate bomb:
    a few MB standing for GBs) is refused before torch inflates it."""
    import zipfile

    try:
        if not zipfile.is_zipfile(p):
            return
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch's own reader reports it
    size = p.stat().st_size
    limit = max(ZIP_FLOOR, ZIP_RATIO * size)
    total = 0
    for info in infos:
        total += info.file_size
        if total > limit:
            raise UserError(f"records declare more than {limit:,} bytes from a {size:,}-byte file (a decompression "
                            "bomb); refused", source=src, field=info.filename[-80:])


MAX_NODES = 1_000_000  # containers and values a checkpoint may hold (a ResNet-110 state_dict: about 700)
MAX_DEPTH = 64
MAX_CLASSES = 1_000_000
MAX_WIDTH = 1 << 20  # one layer's channels


def _check_structure(obj: dict, src: str) -> None:
    """Count and size what a file declares before anything is built from it: at most ``MAX_NODES``
    values counted as a reader walks them (a shared reference counts each time: a reference DAG of a
    few KB that stands for 4**40 leaves is refused after a million), ``MAX_DEPTH`` levels (a cycle
    too), and no tensor that declares more elements than it stores (a stride-0 ``expand``). A
    failure is one line naming the top-level key."""
    count = 0
    for key, value in obj.items():
        field = str(key)[:40]
        stack = [(value, 0)]
        while stack:
            v, depth = stack.pop()
            count += 1
            if count > MAX_NODES:
                raise UserError(f"holds more than {MAX_NODES:,} values; refused", source=src, field=field)
            if torch.is_tensor(v):
                try:
                    stored = v.untyped_storage().nbytes()
                except (RuntimeError, NotImplementedError):
                    stored = 0
                if v.numel() and v.numel() * v.element_size() > stored:
                    raise UserError(f"a tensor of shape {tuple(v.shape)} stores only {stored:,} bytes (an expanded "
                                    "view); refused", source=src, field=field)
                continue
            if isinstance(v, (dict, list, tuple, set)):
                if depth >= MAX_DEPTH:
                    raise UserError(f"nested more than {MAX_DEPTH} levels deep; refused", source=src, field=field)
                items = [*v.keys(), *v.values()] if isinstance(v, dict) else list(v)
                stack.extend((x, depth + 1) for x in items)


def _check_types(arch: Any, ncls: Any, cfg: Any, sd: Any, src: str) -> None:
    """A hand-edited or foreign dict must fail with a line, not an AttributeError."""
    expected = (("model", arch, str), ("num_classes", ncls, int), ("cfg", [] if cfg is None else cfg, list),
                ("state_dict", sd, dict))
    for key, value, kind in expected:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"must be a {kind.__name__}, got {type(value).__name__}", source=src, field=key)
    if not 1 <= ncls <= MAX_CLASSES:
        raise UserError(f"must be in [1, {MAX_CLASSES:,}], got {ncls}", source=src, field="num_classes")
    for i, w in enumerate(cfg or []):
        if isinstance(w, int) and not isinstance(w, bool) and not 0 <= w <= MAX_WIDTH:
            raise UserError(f"a width must be in [0, {MAX_WIDTH:,}], got {w}", source=src, field=f"cfg[{i}]")
    bad = next((k for k, v in sd.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise UserError(f"{bad!r} is a {type(sd[bad]).__name__}, not a tensor", source=src, field="state_dict")


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def _check_finite(sd: Mapping[str, torch.Tensor], src: str, strict: bool) -> None:
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        msg = f"{len(bad)} tensor(s) contain NaN/inf, e.g. {bad[0]}"
        if strict:
            raise UserError(msg, source=src, field="state_dict")
        warnings.warn(f"{src}: {msg}", stacklevel=3)


def _classes_in(model_name: str, sd: Mapping[str, torch.Tensor]) -> int:
    """Class count of a plain state_dict: rows of the model's classifier (its protected layer)."""
    with torch.device("meta"):  # structure only: no weights are allocated
        base = get_model(model_name)
    names = {mod: name for name, mod in base.named_modules()}
    layers = base.ignored_layers() if hasattr(base, "ignored_layers") else [
        m for m in base.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
    for layer in layers:
        w = sd.get(f"{names[layer]}.weight")
        if w is not None:
            return int(w.shape[0])
    return int(base.num_classes)


def _infer_cfg(model_name: str, num_classes: int, sd: Mapping[str, torch.Tensor], src: str) -> list:
    """Read an HRank family's cfg widths off the weights (``models.hrank``)."""
    with torch.device("meta"):  # structure only: no weights are allocated
        base = get_model(model_name, num_classes=num_classes)
    try:
        return hrank.cfg_from_state_dict(base, sd)
    except KeyError as exc:
        raise UserError(f"has no {exc.args[0]!r}: not a {model_name} state_dict", source=src, field="state_dict") from exc


@dataclass
class _Parsed:
    """What a checkpoint declares, checked field by field, before anything is built from it."""

    obj: dict[str, Any]
    arch: str
    ncls: int
    cfg: list | None
    sd: dict[str, torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)
    shapes: Any = field(default_factory=dict)

    @property
    def what(self) -> str:
        return f"cfg {self.cfg}" if self.cfg is not None else f"{len(self.shapes)} pruned module shapes"


def _parse_native(obj: dict[str, Any], model: str | None, src: str) -> _Parsed:
    """A compressor checkpoint: version, required keys and types, the architecture asked for."""
    if obj.get("format_version") not in READABLE_VERSIONS:
        fv = obj.get("format_version")
        raise UserError(f"unsupported format_version {fv if isinstance(fv, int) else repr(str(fv)[:20])} "
                        f"(this library reads {', '.join(map(str, READABLE_VERSIONS))})",
                        source=src, field="format_version")
    for key in ("model", "num_classes", "cfg", "state_dict"):
        if key not in obj:
            raise UserError(f"checkpoint lacks {key!r}", source=src, field=key)
    arch, ncls, ccfg, sd = obj["model"], obj["num_classes"], obj["cfg"], obj["state_dict"]
    _check_types(arch, ncls, ccfg, sd, src)
    if model is not None and model != arch:
        raise UserError(f"checkpoint is a {arch[:80]!r}, not a {model!r}", source=src, field="model")
    if external.is_user_code(arch) and model != arch:
        raise UserError(f"this checkpoint was built by user code {arch[:80]!r}; pass --model {arch[:80]} "
                        "(model= in Python) to allow importing it", source=src, field="model")
    return _Parsed(obj, arch, ncls, ccfg, sd, _checked_kwargs(obj.get("builder_kwargs") or {}, src),
                   obj.get("shapes") or {})


def _parse_imported(obj: dict[str, Any], model: str | None, num_classes: int | None, src: str) -> _Parsed:
    """HRank-style: a plain state_dict or ``{'state_dict': ...}``; the widths are read off its tensors."""
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError("not a compressor checkpoint nor a state_dict", source=src)
    if model is None:
        raise UserError("a plain state_dict needs --model to say which architecture it is", source=src)
    sd = _strip_prefix(sd)
    ncls = num_classes if num_classes is not None else _classes_in(model, sd)
    ccfg, shapes = _infer_widths(model, ncls, sd, src)
    as_native = {"format": "hrank", "model": model, "num_classes": ncls, "cfg": ccfg, "state_dict": sd,
                 "rates": None, "plan": None, "metrics": {k: obj[k] for k in ("test_acc", "best_prec1") if k in obj},
                 "provenance": {"imported_from": src}, "extra": {}}
    return _Parsed(as_native, model, ncls, ccfg, sd, {}, shapes)


def _check_fits(p: _Parsed, src: str) -> None:
    """Build the architecture on ``meta`` (no memory) and compare every tensor's shape with the file's."""
    try:
        shell = _shell(p.arch, p.ncls, p.cfg, p.kwargs)
        shapes_mod.shrink(shell, p.shapes, src)
    except UserError as exc:
        raise UserError(str(exc).removeprefix(f"{src}: "), source=src) from exc
    except TypeError as exc:  # a builder argument the architecture does not take
        raise UserError(f"{p.arch[:80]} does not take these arguments ({str(exc).splitlines()[0][:120]})",
                        source=src, field="builder_kwargs") from exc
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    if p.obj.get("format") == "hrank":  # files from torch < 0.4.1 (akamaster's) have no BN step counters
        p.sd.update({k: torch.tensor(0) for k in want if k.endswith("num_batches_tracked") and k not in p.sd})
    have = {k: tuple(v.shape) for k, v in p.sd.items() if torch.is_tensor(v)}
    if want != have:
        bad = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        k = bad[0]
        raise UserError(f"weights do not fit {p.arch} with {p.what}: {k} is {have.get(k, 'missing')} in the file, "
                        f"{want.get(k, 'not expected')} in the model", source=src, field="state_dict")


def _build(p: _Parsed, src: str) -> nn.Module:
    net = get_model(p.arch, num_classes=p.ncls, cfg=p.cfg, **p.kwargs)  # kwargs passed the shell: known to the builder
    shapes_mod.shrink(net, p.shapes, src)
    try:
        net.load_state_dict(p.sd)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise UserError(f"weights do not fit {p.arch} with {p.what}: {first[:200]}", source=src,
                        field="state_dict") from exc
    _restore_cp_rates(net, p.obj.get("plan"))
    contract.attach(net, contract.from_checkpoint(p.obj, src))
    return net


def load(path: str | Path, *, model: str | None = None, num_classes: int | None = None,
         cfg: list | None = None, strict_finite: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint and load its weights.

    Format 2 names the architecture (a registered name, ``torchvision:<name>`` or a user's
    ``module:builder``) and lists the shapes of the modules pruning narrowed; registered
    families with a cfg are rebuilt from it. Format 1 (cfg only) still loads.
    ``model``/``num_classes``/``cfg``, when given, must match the file: a checkpoint of another
    architecture is refused with a clear error rather than a size-mismatch traceback. A file
    made from user code is built only when ``model`` names that same code.
    """
    src = str(path)
    if model is not None and not external.is_external(model) and model not in list_models():
        get_model(model)  # raises the registry's "unknown model … (did you mean …); valid: …"
    obj = read(path)
    p = _parse_native(obj, model, src) if obj.get("format") == CKPT_FORMAT else \
        _parse_imported(obj, model, num_classes, src)
    if num_classes is not None and num_classes != p.ncls:
        raise UserError(f"checkpoint has {p.ncls} classes, {num_classes} were asked for", source=src,
                        field="num_classes")
    if cfg is not None and list(cfg) != list(p.cfg or []):
        raise UserError(f"checkpoint cfg {p.cfg} differs from the expected {cfg}", source=src, field="cfg")
    _check_finite(p.sd, src, strict_finite)
    _check_fits(p, src)
    return _build(p, src), p.obj


def _shell(arch: str, ncls: int, cfg: list | None, kwargs: Mapping[str, Any]) -> nn.Module:
    """The architecture for a shape check: on ``meta`` (no memory: a hostile cfg of huge widths
    allocates nothing); a builder that computes with tensors at init (RegNet) is built on the CPU,
    at the architecture's own size, since shapes can only narrow it."""
    try:
        with torch.device("meta"):
            return get_model(arch, num_classes=ncls, cfg=cfg, **kwargs)
    except (NotImplementedError, RuntimeError):
        if cfg is not None:
            raise
        with torch.random.fork_rng(devices=[]):
            return get_model(arch, num_classes=ncls, cfg=None, **kwargs)


def _checked_kwargs(kw: Any, src: str) -> dict[str, Any]:
    """Builder kwargs from a file: a small mapping of plain scalars (or short int lists) only."""
    ok = isinstance(kw, dict) and len(kw) <= 16 and all(
        isinstance(k, str) and (isinstance(v, (int, float, str, bool)) or v is None
                                or (isinstance(v, list) and len(v) <= 4 and all(isinstance(x, int) for x in v)))
        for k, v in kw.items())
    if not ok:
        raise UserError("must be a small mapping of plain values", source=src, field="builder_kwargs")
    if isinstance(kw.get("input_size"), list):
        kw = {**kw, "input_size": tuple(kw["input_size"])}
    return dict(kw)


def _infer_widths(arch: str, ncls: int, sd: Mapping[str, torch.Tensor], src: str) -> tuple[list | None, dict]:
    """A foreign state_dict's widths: the family's cfg where it has one, else module shapes."""
    with torch.device("meta"):
        base = get_model(arch, num_classes=ncls)
    if getattr(base, "cfg", None) is not None:
        return _infer_cfg(arch, ncls, sd, src), {}
    return None, shapes_mod.shapes_from_state_dict(base, sd)


def _restore_cp_rates(net: nn.Module, plan: Mapping | None) -> None:
    hrank.set_cp_rates(net, hrank.rates_of_plan(plan or {}))


def load_into(path: str | Path, module: nn.Module, *, strict_finite: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint into a copy of ``module``, the user's own unpruned architecture.

    For models defined in a notebook, which no reference string can rebuild: the file's
    shapes narrow a copy of ``module`` (never widen it), then its weights load strictly.
    """
    import copy

    src = str(path)
    obj = read(path)
    if obj.get("format") != CKPT_FORMAT or obj.get("format_version") not in READABLE_VERSIONS:
        raise UserError("not a compressor checkpoint (format 2 needed to load into a module)", source=src)
    sd = obj.get("state_dict")
    _check_types(obj.get("model"), obj.get("num_classes"), obj.get("cfg"), sd, src)
    _check_finite(sd, src, strict_finite)
    net = copy.deepcopy(module)
    shapes_mod.shrink(net, obj.get("shapes") or {}, src)
    try:
        net.load_state_dict(sd)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise UserError(f"weights do not fit the given module: {first[:200]}", source=src, field="state_dict") from exc
    for attr in ("arch", "num_classes", "input_size"):
        if hasattr(module, attr) or attr in obj:
            setattr(net, attr, obj.get("model") if attr == "arch" else getattr(module, attr, obj.get(attr)))
    contract.attach(net, contract.from_checkpoint(obj, src))
    return net, obj


def check_teacher(path: str | os.PathLike | None, *, field: str = "teacher") -> None:
    """Validate a ``--teacher`` checkpoint before any work (``None`` and ``"self"`` need nothing):
    a missing or unreadable file is a one-line ``UserError`` naming it and the field, not a
    failure after ranking and surgery."""
    if path is None or str(path) in ("", "self"):
        return
    p = Path(path)
    if not p.is_file():
        raise UserError("teacher checkpoint not found" if not p.exists() else "not a file", source=str(p), field=field)
    try:
        load(p)
    except UserError as exc:
        if exc.field is None:
            raise UserError(str(exc).removeprefix(f"{p}: "), source=str(p), field=field) from exc
        raise
