"""Model registry: a decorator plus a dict, as in torchvision's ``_api.py``."""

from __future__ import annotations

from typing import Callable

from torch import nn

from compressor.errors import UserError, suggest

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None) -> Callable:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is already registered")
        _MODELS[key] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model(name: str, num_classes: int | None = None, cfg: list | None = None, **kwargs) -> nn.Module:
    """Build a registered model; ``cfg`` is a (possibly reduced) width list.

    ``num_classes=None`` takes the builder's default (10 for CIFAR variants, 1000 for ImageNet ones).
    ``name`` may also be ``torchvision:<name>`` or a user's ``package.module:builder``
    (``compressor.models.external``); those take ``input_size`` and builder kwargs.
    """
    from compressor.models import external

    if isinstance(name, str) and external.is_external(name):
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise UserError(f"num_classes must be a positive integer, got {num_classes!r}", field="num_classes")
        return external.build(name, num_classes=num_classes, cfg=cfg, **kwargs)
    if name not in _MODELS:
        raise UserError(
            f"unknown model {name!r}{suggest(name, _MODELS)}; valid: {', '.join(list_models())}",
            field="model",
        )
    input_size = kwargs.pop("input_size", None)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"num_classes must be a positive integer, got {num_classes!r}", field="num_classes")
        kwargs["num_classes"] = num_classes
    model = _MODELS[name](cfg=cfg, **kwargs)
    model.arch = name
    if input_size is not None and input_size != model.input_size:
        probe = _meta_twin(name, cfg, kwargs, model)
        _resize_input(probe, name, input_size)  # on the meta device: a 4096-px check allocates nothing
        if probe is not model:
            model.input_size, model.builder_kwargs = probe.input_size, probe.builder_kwargs
    return model


def _meta_twin(name: str, cfg: list | None, kwargs: dict, model: nn.Module) -> nn.Module:
    """The same architecture on the meta device (``model`` itself if it is there already, or where
    the builder cannot build there)."""
    import torch

    p = next(model.parameters(), None)
    if p is None or p.is_meta:
        return model
    try:
        with torch.device("meta"):
            twin = _MODELS[name](cfg=cfg, **kwargs)
    except (NotImplementedError, RuntimeError):
        return model
    twin.arch = name
    twin.builder_kwargs = getattr(model, "builder_kwargs", None)
    return twin


def _resize_input(model: nn.Module, name: str, size: object) -> None:
    """Another input size, for an architecture whose classifier does not depend on it (global pooling).

    Checked by one forward at that size (free on the meta device); a model that cannot take it
    (HRank's VGG flattens a fixed 1x1 map) is a one-line error.
    """
    import torch

    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise UserError(f"input size must be an integer in [8, 4096], got {size!r}", field="input-size")
    p = next(model.parameters())
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        ok = tuple(out.shape) == (1, int(model.num_classes))
    except RuntimeError:
        ok = False
    finally:
        model.train(was)
    if not ok:
        raise UserError(f"{name} is built for {model.input_size}-px inputs and cannot take {size} px "
                        "(its classifier needs a fixed feature-map size)", field="input-size")
    model.input_size = size
    model.builder_kwargs = {**(getattr(model, "builder_kwargs", None) or {}), "input_size": size}


def finetune_lr(name: str) -> float:
    """The learning rate a short fine-tune after pruning starts from (``recipes/models.yaml``)."""
    from compressor.training.recipe import model_recipe

    return float(model_recipe(name)["finetune_lr"])
