"""Checkpoints: plain data only, written atomically, read with ``weights_only=True``.

Format (``format_version`` 1)::

    {"format": "compressor.checkpoint", "format_version": 1,
     "model": "vgg16_bn", "num_classes": 10, "cfg": [...],   # enough to rebuild the model
     "state_dict": {...},
     "rates": {...} | None, "plan": {...} | None,            # how it was pruned (plan JSON)
     "metrics": {...}, "provenance": {command, seed, versions, time, ...},
     "extra": {...}}                                           # e.g. training state

HRank/HRankPlus checkpoints (a plain state_dict, or ``{'state_dict': ...}``, keys optionally
prefixed ``module.``) load too: the cfg is inferred from the conv weight shapes.
"""

from __future__ import annotations

import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from compressor import io
from compressor.errors import UserError
from compressor.models import get_model, list_models
from compressor.models._spec import cfg_with_widths, set_cp_rates

CKPT_FORMAT = "compressor.checkpoint"
CKPT_VERSION = 1


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
            "torch_pruning": str(getattr(torch_pruning, "__version__", "?")),
            "numpy": str(numpy.__version__),
            "python": platform.python_version(),
        },
        **extra,
    }


def to_dict(model: nn.Module, *, rates: Mapping | None = None, plan: Mapping | None = None,
            metrics: Mapping | None = None, prov: Mapping | None = None,
            extra: Mapping | None = None) -> dict[str, Any]:
    return {
        "format": CKPT_FORMAT,
        "format_version": CKPT_VERSION,
        "model": model.arch,
        "num_classes": int(model.num_classes),
        "cfg": list(model.cfg),
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


def read(path: str | Path) -> dict[str, Any]:
    """Read a file with ``weights_only=True``; any failure is a one-line UserError."""
    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise UserError("checkpoint not found", source=src)
    if p.stat().st_size == 0:
        raise UserError("checkpoint is empty", source=src)
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
        raise UserError(f"not a readable checkpoint (truncated or another format: {msg[:120]})", source=src) from exc
    if not isinstance(obj, dict):
        raise UserError(f"not a checkpoint (top level is {type(obj).__name__}, expected a dict)", source=src)
    return obj


def _check_types(arch: Any, ncls: Any, cfg: Any, sd: Any, src: str) -> None:
    """A hand-edited or foreign dict must fail with a line, not an AttributeError."""
    expected = (("model", arch, str), ("num_classes", ncls, int), ("cfg", cfg, list), ("state_dict", sd, dict))
    for key, value, kind in expected:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"must be a {kind.__name__}, got {type(value).__name__}", source=src, field=key)
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
    for layer in base.ignored_layers():
        w = sd.get(f"{names[layer]}.weight")
        if w is not None:
            return int(w.shape[0])
    return int(base.num_classes)


def _infer_cfg(model_name: str, num_classes: int, sd: Mapping[str, torch.Tensor], src: str) -> list:
    """Read widths off the weights: the model's own ``cfg_from_state_dict`` or the units' convs."""
    with torch.device("meta"):  # structure only: no weights are allocated
        base = get_model(model_name, num_classes=num_classes)
    try:
        if hasattr(base, "cfg_from_state_dict"):
            return base.cfg_from_state_dict(sd)
        return cfg_with_widths(base, {u.name: sd[f"{u.convs[0]}.weight"].shape[0] for u in base.prunable_units()})
    except KeyError as exc:
        raise UserError(f"has no {exc.args[0]!r}: not a {model_name} state_dict", source=src, field="state_dict") from exc


def load(path: str | Path, *, model: str | None = None, num_classes: int | None = None,
         cfg: list | None = None, strict_finite: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint (its cfg) and load its weights.

    ``model``/``num_classes``/``cfg``, when given, must match the file: a checkpoint of another
    architecture is refused with a clear error rather than a size-mismatch traceback.
    """
    src = str(path)
    if model is not None and model not in list_models():
        get_model(model)  # raises the registry's "unknown model … (did you mean …); valid: …"
    obj = read(path)
    if obj.get("format") == CKPT_FORMAT:
        if obj.get("format_version") != CKPT_VERSION:
            raise UserError(f"unsupported format_version {obj.get('format_version')!r} (this library reads {CKPT_VERSION})",
                            source=src, field="format_version")
        for key in ("model", "num_classes", "cfg", "state_dict"):
            if key not in obj:
                raise UserError(f"checkpoint lacks {key!r}", source=src, field=key)
        arch, ncls, ccfg, sd = obj["model"], obj["num_classes"], obj["cfg"], obj["state_dict"]
        _check_types(arch, ncls, ccfg, sd, src)
        if model is not None and model != arch:
            raise UserError(f"checkpoint is a {arch!r}, not a {model!r}", source=src, field="model")
    else:  # HRank-style: a plain state_dict or {'state_dict': ...}
        sd = obj.get("state_dict", obj)
        if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
            raise UserError("not a compressor checkpoint nor a state_dict", source=src)
        if model is None:
            raise UserError("a plain state_dict needs --model to say which architecture it is", source=src)
        sd = _strip_prefix(sd)
        arch = model
        ncls = num_classes if num_classes is not None else _classes_in(arch, sd)
        ccfg = _infer_cfg(arch, ncls, sd, src)
        obj = {"format": "hrank", "model": arch, "num_classes": ncls, "cfg": ccfg, "state_dict": sd,
               "rates": None, "plan": None, "metrics": {k: obj[k] for k in ("test_acc", "best_prec1") if k in obj},
               "provenance": {"imported_from": src}, "extra": {}}
    if num_classes is not None and num_classes != ncls:
        raise UserError(f"checkpoint has {ncls} classes, {num_classes} were asked for", source=src, field="num_classes")
    if cfg is not None and list(cfg) != list(ccfg):
        raise UserError(f"checkpoint cfg {ccfg} differs from the expected {cfg}", source=src, field="cfg")
    _check_finite(sd, src, strict_finite)
    try:
        with torch.device("meta"):  # shapes only, no memory: a hostile cfg of huge widths allocates nothing
            shell = get_model(arch, num_classes=ncls, cfg=ccfg)
    except UserError as exc:
        raise UserError(str(exc), source=src) from exc
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}
    if want != have:
        bad = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        k = bad[0]
        raise UserError(f"weights do not fit {arch} with cfg {ccfg}: {k} is {have.get(k, 'missing')} in the file, "
                        f"{want.get(k, 'not expected')} in the model", source=src, field="state_dict")
    net = get_model(arch, num_classes=ncls, cfg=ccfg)
    try:
        net.load_state_dict(sd)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise UserError(f"weights do not fit {arch} with cfg {ccfg}: {first[:200]}", source=src, field="state_dict") from exc
    _restore_cp_rates(net, obj.get("plan"))
    return net, obj


def _restore_cp_rates(net: nn.Module, plan: Mapping | None) -> None:
    units = (plan or {}).get("units", {})
    set_cp_rates(net, {u: 1.0 - len(v["keep"]) / v["width"] for u, v in units.items()})
