"""Models that are not registered here: ``torchvision:<name>`` and a user's ``module:builder``.

A reference is plain data (a string plus builder kwargs), so a checkpoint can name the
architecture without pickling it. Importing user code is never triggered by a file alone:
``checkpoint.load`` builds a ``module:builder`` model only when the caller names the same
reference (``--model``), so a hostile checkpoint cannot make us import anything.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from torch import nn

from compressor.errors import UserError

TORCHVISION = "torchvision:"
_USER_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_external(name: str) -> bool:
    return ":" in name


TIMM = "timm:"


def is_user_code(name: str) -> bool:
    return is_external(name) and not name.startswith((TORCHVISION, TIMM))


def _input_size(value: Any) -> int | tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and 8 <= value <= 4096:
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 4096 for v in value)):
        return int(value[0]), int(value[1])
    raise UserError(f"input_size must be an int or (H, W) in [8, 4096], got {value!r}"[:160], field="input_size")


def build(name: str, num_classes: int | None = None, cfg: list | None = None, input_size: Any = None,
          **kwargs: Any) -> nn.Module:
    """Build an external model and give it what the pipeline reads (arch, num_classes, input_size)."""
    if cfg is not None:
        raise UserError(f"{name} has no cfg: pruned widths travel as module shapes", field="cfg")
    if name.startswith(TIMM):  # timm's models (an optional extra): built without weights, its data config read
        from compressor.models import timm_source

        return timm_source.build(name, num_classes, input_size, **kwargs)
    if name.startswith(TORCHVISION):
        import torchvision

        tv = name[len(TORCHVISION):]
        if tv not in torchvision.models.list_models(module=torchvision.models):
            from compressor.errors import suggest

            raise UserError(f"unknown torchvision classification model {tv!r}"
                            f"{suggest(tv, torchvision.models.list_models(module=torchvision.models))}", field="model")
        model = torchvision.models.get_model(tv, weights=None, num_classes=num_classes or 1000, **kwargs)
        default_size: Any = 224
    else:
        if not _USER_REF.match(name):
            raise UserError(f"a model reference is 'torchvision:<name>' or 'package.module:builder', got {name!r}",
                            field="model")
        mod_name, fn_name = name.split(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"cannot import {name} ({type(exc).__name__}: {exc})", field="model") from exc
        call = dict(kwargs)
        if num_classes is not None:
            call["num_classes"] = num_classes
        model = fn(**call)
        if not isinstance(model, nn.Module):
            raise UserError(f"{name} returned a {type(model).__name__}, not an nn.Module", field="model")
        default_size = getattr(model, "input_size", 224)
    model.arch = name
    model.input_size = _input_size(input_size if input_size is not None else default_size)
    model.builder_kwargs = {**kwargs, "input_size": model.input_size}
    if not hasattr(model, "num_classes") or num_classes is not None:
        model.num_classes = _classes(model, num_classes)
    return model


def _classes(model: nn.Module, asked: int | None) -> int:
    if asked is not None:
        return asked
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return int(last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels) if last else 0


def pretrained_state_dict(name: str) -> dict:
    """torchvision's published weights for ``torchvision:<name>`` (downloads: needs the network)."""
    if not name.startswith(TORCHVISION):
        raise UserError("--pretrained is for torchvision: models; use --weights FILE otherwise", field="pretrained")
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name[len(TORCHVISION):]).DEFAULT
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - offline, hub errors, no published weights
        raise UserError(f"cannot fetch torchvision's weights for {name} ({type(exc).__name__}; offline?): "
                        "save them once with torch.save(model.state_dict(), F) and pass --weights F",
                        field="pretrained") from exc
