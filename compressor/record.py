"""What the library needs to know about a model, kept beside it: the model record.

The engine reads a few facts about a model: its architecture reference, input size and
channels, class count, the layers it must never cut, and whether residual groups are pruned.
Registered models carry them as attributes. A user's own ``nn.Module`` does not, and the API
never writes them onto it: ``view`` gives the engine a shallow stand-in that shares every
submodule, parameter and buffer with the caller's model but has its own top-level attributes.
The caller's object (its ``vars()`` and its state_dict) is left exactly as it was.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from compressor.errors import UserError

# the engine's attribute for each record field
_ATTRS = {"arch": "arch", "input_size": "input_size", "in_channels": "in_channels", "num_classes": "num_classes",
          "ignored_layers": "_compressor_ignored", "residual": "prune_residual"}
# per-instance dicts a shallow copy would otherwise share with the original
_OWN_DICTS = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
              "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


@dataclass(frozen=True)
class ModelRecord:
    """What the engine knows of a model (like timm's ``pretrained_cfg``), never set on the caller's module.

    ``input_size`` is (H, W) of one input; ``ignored_layers`` are module names whose outputs are
    never cut (None: the model's own choice, else the classifier); ``residual`` None leaves the
    model's default.
    """

    arch: str
    input_size: tuple[int, int] | None
    in_channels: int
    num_classes: int
    ignored_layers: tuple[str, ...] | None = None
    residual: bool | None = None


def _classifier_width(model: nn.Module) -> int:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UserError("the model has no Conv2d or Linear layer", field="model")
    out = layers[-1]
    return int(out.out_features if isinstance(out, nn.Linear) else out.out_channels)


def _size_of(model: nn.Module) -> tuple[int, int] | None:
    size = getattr(model, "input_size", None)
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def record_of(model: nn.Module, example_inputs: torch.Tensor | None = None,
              ignored_layers: Sequence[nn.Module | str] | None = None, residual: bool | None = None) -> ModelRecord:
    """The record for ``model``: what it says of itself, with the caller's arguments on top."""
    if not isinstance(model, nn.Module):
        raise UserError(f"expected an nn.Module, got {type(model).__name__}", field="model")
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        raise UserError("the model's weights are on the meta device (not materialised): load or initialise them first, "
                        "e.g. model.to_empty(device='cpu') and a state_dict", field="model")
    size, chans = _size_of(model), int(getattr(model, "in_channels", 3))
    if example_inputs is not None:
        if not torch.is_tensor(example_inputs) or example_inputs.ndim != 4:
            raise UserError("example inputs must be one [N, C, H, W] tensor", field="example_inputs")
        size = (int(example_inputs.shape[2]), int(example_inputs.shape[3]))
        chans = int(example_inputs.shape[1])
    if size is None:
        raise UserError("pass example inputs: the model records no input size (e.g. torch.randn(1, 3, 32, 32))",
                        field="example_inputs")
    ignored = None
    if ignored_layers:
        names = {m: n for n, m in model.named_modules()}
        known = set(names.values())
        chosen = []
        for layer in ignored_layers:
            name = layer if isinstance(layer, str) else names.get(layer)
            if name is None or name not in known:
                shown = layer if isinstance(layer, str) else type(layer).__name__
                raise UserError(f"{shown!r} is not a module of this model", field="ignored_layers")
            chosen.append(name)
        from compressor.pruning import graph

        base = [names[m] for m in graph.protected_layers(_bare_view(model, size, chans))]
        ignored = tuple(dict.fromkeys(base + chosen))
    arch = getattr(model, "arch", None) or type(model).__name__
    ncls = getattr(model, "num_classes", None)
    return ModelRecord(arch=str(arch), input_size=size, in_channels=chans,
                       num_classes=int(ncls) if isinstance(ncls, int) else _classifier_width(model),
                       ignored_layers=ignored, residual=residual)


def _shallow(model: nn.Module) -> nn.Module:
    v = copy.copy(model)
    for name in _OWN_DICTS:
        d = model.__dict__.get(name)
        if d is not None:
            v.__dict__[name] = copy.copy(d)
    return v


def _bare_view(model: nn.Module, size: tuple[int, int], chans: int) -> nn.Module:
    v = _shallow(model)
    v.__dict__["input_size"] = size if size[0] != size[1] else size[0]
    v.__dict__["in_channels"] = chans
    return v


_VIEWS: "weakref.WeakKeyDictionary[nn.Module, tuple[ModelRecord, tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def _top_level(model: nn.Module) -> tuple:
    """What a shallow view copies: the model's own submodules, parameters and buffers (by identity), and the
    engine's attributes set on it (``prune_residual`` set after a view was made gives a new view)."""
    own = tuple((name, k, id(v)) for name in ("_modules", "_parameters", "_buffers")
                for k, v in model.__dict__.get(name, {}).items())
    return own + tuple(repr(model.__dict__.get(a)) for a in _ATTRS.values())  # and the engine's attributes on it


def view(model: nn.Module, record: ModelRecord) -> nn.Module:
    """A stand-in for ``model`` carrying ``record`` as the engine's attributes.

    It shares every submodule and tensor with ``model`` (so scores, plans and surgery apply to
    the caller's weights) while its own attributes are separate. Views are cached per model and
    record, so the graph the engine discovers once is reused across ``rank`` and ``prune``.
    """
    hit = _VIEWS.get(model)
    if hit is not None and hit[0] == record and hit[1] == _top_level(model):  # a replaced layer: a new view
        return hit[2]
    v = _shallow(model)
    size = record.input_size
    values = {"arch": record.arch, "input_size": None if size is None else (size[0] if size[0] == size[1] else size),
              "in_channels": record.in_channels, "num_classes": record.num_classes}
    if record.ignored_layers is not None:
        values["ignored_layers"] = record.ignored_layers
    if record.residual is not None:
        values["residual"] = record.residual
    for key, value in values.items():
        v.__dict__[_ATTRS[key]] = value
    _VIEWS[model] = (record, _top_level(model), v)
    return v
