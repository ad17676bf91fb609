"""Pruned module shapes as plain data: how a checkpoint rebuilds any pruned model without pickle.

A pruned model is its unpruned architecture with some modules narrowed. ``changed_shapes``
lists those modules' shapes (conv in/out/groups, norm features, Linear in/out, LayerNorm
shape, registered channel ops' own state); ``shrink`` narrows a freshly built architecture
to them, after which ``load_state_dict(strict=True)`` fills the weights. Shapes may only
narrow a module, never widen it, so a hostile shape list cannot allocate more than the
architecture itself.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from compressor.errors import UserError
from compressor.pruning.graph import channel_ops

_BN = nn.modules.batchnorm._BatchNorm


def _type_name(mod: nn.Module) -> str | None:
    if type(mod) in channel_ops():
        return type(mod).__name__
    for kind, name in ((nn.Conv2d, "Conv2d"), (_BN, "BatchNorm"), (nn.Linear, "Linear"), (nn.LayerNorm, "LayerNorm"),
                       (nn.GroupNorm, "GroupNorm")):
        if isinstance(mod, kind):
            return name
    return None


def describe(mod: nn.Module) -> dict[str, Any] | None:
    """The plain-data shape of one module, or None for modules without channel dims."""
    ops = channel_ops()
    if type(mod) in ops:
        return {"type": type(mod).__name__, **ops[type(mod)].describe(mod)}
    if isinstance(mod, nn.Conv2d):
        return {"type": "Conv2d", "in": mod.in_channels, "out": mod.out_channels, "groups": mod.groups}
    if isinstance(mod, _BN):
        return {"type": "BatchNorm", "features": mod.num_features}
    if isinstance(mod, nn.Linear):
        return {"type": "Linear", "in": mod.in_features, "out": mod.out_features}
    if isinstance(mod, nn.LayerNorm):
        return {"type": "LayerNorm", "shape": [int(s) for s in mod.normalized_shape]}
    if isinstance(mod, nn.GroupNorm):
        return {"type": "GroupNorm", "groups": mod.num_groups, "channels": mod.num_channels}
    return None


def module_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {n: d for n, m in model.named_modules() if n and (d := describe(m)) is not None}


def changed_shapes(reference: nn.Module, pruned: nn.Module) -> dict[str, dict[str, Any]]:
    """The shapes of ``pruned`` that differ from the unpruned ``reference`` architecture."""
    ref = module_shapes(reference)
    return {n: d for n, d in module_shapes(pruned).items() if ref.get(n) != d}


def _int(spec: Mapping[str, Any], key: str, hi: int, name: str, src: str | None) -> int:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise UserError(f"{name}.{key} must be an integer in [1, {hi}] (the architecture's width), "
                        f"got {str(v)[:40]}", source=src, field="shapes")
    return v


def _param(t: torch.Tensor | None, *shape: int) -> nn.Parameter | None:
    if t is None:
        return None
    return nn.Parameter(torch.empty(*shape, device=t.device, dtype=t.dtype), requires_grad=t.requires_grad)


def _buffer(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else torch.empty(n, device=t.device, dtype=t.dtype)


def shrink(model: nn.Module, shapes: Mapping[str, Any], source: str | None = None) -> None:
    """Narrow the named modules of a freshly built ``model`` to ``shapes`` (values are then
    uninitialised: load a state_dict next)."""
    if not isinstance(shapes, Mapping):
        raise UserError(f"must be a mapping of module name to shape, got {type(shapes).__name__}",
                        source=source, field="shapes")
    mods = dict(model.named_modules())
    ops = channel_ops()
    for name, spec in shapes.items():
        if not isinstance(name, str) or name not in mods:
            raise UserError(f"names module {str(name)[:80]!r}, which the architecture does not have",
                            source=source, field="shapes")
        mod = mods[name]
        have = _type_name(mod)
        if not isinstance(spec, Mapping) or have is None or spec.get("type") != have:
            raise UserError(f"{name}: shape {str(spec)[:80]} does not fit a {type(mod).__name__}",
                            source=source, field="shapes")
        if type(mod) in ops:
            ops[type(mod)].restore(mod, spec)
        elif isinstance(mod, nn.Conv2d):
            _shrink_conv(mod, spec, name, source)
        elif isinstance(mod, _BN):
            n = _int(spec, "features", mod.num_features, name, source)
            mod.num_features = n
            mod.weight, mod.bias = _param(mod.weight, n), _param(mod.bias, n)
            mod.running_mean, mod.running_var = _buffer(mod.running_mean, n), _buffer(mod.running_var, n)
        elif isinstance(mod, nn.Linear):
            i = _int(spec, "in", mod.in_features, name, source)
            o = _int(spec, "out", mod.out_features, name, source)
            mod.in_features, mod.out_features = i, o
            mod.weight, mod.bias = _param(mod.weight, o, i), _param(mod.bias, o)
        elif isinstance(mod, nn.LayerNorm):
            shape = spec.get("shape")
            if (not isinstance(shape, list) or len(shape) != len(mod.normalized_shape)
                    or not all(isinstance(s, int) and 1 <= s <= h for s, h in zip(shape, mod.normalized_shape))):
                raise UserError(f"{name}.shape must narrow {list(mod.normalized_shape)}", source=source, field="shapes")
            mod.normalized_shape = tuple(shape)
            mod.weight, mod.bias = _param(mod.weight, *shape), _param(mod.bias, *shape)
        elif isinstance(mod, nn.GroupNorm):
            c = _int(spec, "channels", mod.num_channels, name, source)
            g = _int(spec, "groups", mod.num_groups, name, source)
            if c % g:
                raise UserError(f"{name}: {c} channels do not split into {g} groups", source=source, field="shapes")
            mod.num_channels, mod.num_groups = c, g
            mod.weight, mod.bias = _param(mod.weight, c), _param(mod.bias, c)


def _shrink_conv(mod: nn.Conv2d, spec: Mapping[str, Any], name: str, source: str | None) -> None:
    i = _int(spec, "in", mod.in_channels, name, source)
    o = _int(spec, "out", mod.out_channels, name, source)
    g = _int(spec, "groups", mod.groups, name, source)
    depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
    if (depthwise and not g == i == o) or (not depthwise and (g != mod.groups or i % g or o % g)):
        raise UserError(f"{name}: groups {g} do not fit in {i} / out {o} channels", source=source, field="shapes")
    mod.in_channels, mod.out_channels, mod.groups = i, o, g
    mod.weight = _param(mod.weight, o, i // g, *mod.kernel_size)
    if mod.bias is not None:
        mod.bias = _param(mod.bias, o)


def shapes_from_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Shapes read off a plain state_dict's weights (for foreign files of pruned models)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        w = sd.get(f"{name}.weight")
        if w is None or not torch.is_tensor(w) or not name:
            continue
        if isinstance(mod, nn.Conv2d) and w.ndim == 4:
            o = int(w.shape[0])
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            g = o if depthwise else mod.groups
            spec = {"type": "Conv2d", "in": int(w.shape[1]) * g, "out": o, "groups": g}
        elif isinstance(mod, _BN) and w.ndim == 1:
            spec = {"type": "BatchNorm", "features": int(w.shape[0])}
        elif isinstance(mod, nn.Linear) and w.ndim == 2:
            spec = {"type": "Linear", "in": int(w.shape[1]), "out": int(w.shape[0])}
        else:
            continue
        if spec != describe(mod):
            out[name] = spec
    return out
