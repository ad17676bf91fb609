"""``timm:<name>``: a timm model as a model source (timm is an optional extra: ``compressor[timm]``).

The model is built without weights (``pretrained=False``: nothing is downloaded here; weights come
from ``--weights FILE``). Its ``pretrained_cfg`` gives the default input size, the normalisation,
the crop and interpolation (``data_config``) and the classifier, which is protected from pruning
(its input columns still follow the unit that feeds it).

Hook for the registry (``models/external.py``, ``build``)::

    if name.startswith(timm_source.PREFIX): return timm_source.build(name, num_classes, input_size, **kwargs)

and ``is_user_code`` must treat ``timm:`` like ``torchvision:`` (not user code).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compressor.errors import UserError, suggest

PREFIX = "timm:"


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise UserError("timm: models need the timm package (pip install 'compressor[timm]')", field="model") from exc
    return timm


def _size(value: Any) -> int | tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and 8 <= value <= 4096:
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 4096 for v in value)):
        return (int(value[0]), int(value[1])) if value[0] != value[1] else int(value[0])
    raise UserError(f"input_size must be an int or (H, W) in [8, 4096], got {value!r}"[:160], field="input_size")


def build(name: str, num_classes: int | None = None, input_size: Any = None, **kwargs: Any) -> nn.Module:
    """Build ``timm:<name>`` without weights and give it what the pipeline reads."""
    timm = _timm()
    arch = name[len(PREFIX):] if name.startswith(PREFIX) else name
    known = timm.list_models()
    if arch not in known:
        raise UserError(f"unknown timm model {arch!r}{suggest(arch, known)}", field="model")
    call = dict(kwargs)
    if num_classes is not None:
        call["num_classes"] = num_classes
    try:
        model = timm.create_model(arch, pretrained=False, **call)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"timm cannot build {arch} ({type(exc).__name__}: {str(exc)[:120]})", field="model") from exc
    cfg = data_config(model)
    model.arch = PREFIX + arch
    model.num_classes = int(getattr(model, "num_classes", num_classes or 0) or 0)
    model.input_size = _size(input_size if input_size is not None else list(cfg["input_size"][1:]))
    model.in_channels = int(cfg["input_size"][0])
    model.builder_kwargs = {**kwargs, "input_size": model.input_size}
    classifier = classifier_name(model)
    if classifier:
        model._compressor_ignored = (classifier,)
    return model


def data_config(model: nn.Module) -> dict[str, Any]:
    """Input size (C, H, W), mean, std, crop_pct and interpolation from the model's ``pretrained_cfg``."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return {
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "mean": tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "interpolation": str(cfg.get("interpolation", "bilinear")),
    }


def classifier_name(model: nn.Module) -> str | None:
    """The classifier module named by ``pretrained_cfg['classifier']`` (first of a tuple), if it is a layer."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if not isinstance(name, str):
        return None
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    return name if isinstance(mod, (nn.Linear, nn.Conv2d)) else None
