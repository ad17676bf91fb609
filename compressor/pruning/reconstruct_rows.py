"""The rows of the reconstruction's regressions: calibration images, prefix passes, sampled positions.

Shared by ``compressor.pruning.reconstruct`` (the layer-wise refit) and
``compressor.pruning.select_obs`` (selection by the refit's error):

* ``iter_images``: the images of calibration batches (tensors or ``(x, y, ...)``), capped, on a device;
* ``call_order``/``capture``: the Conv2d/Linear layers in first-call order, and one layer's input or
  output on a batch from a *prefix* pass (a hook raises ``Stop`` once it is seen);
* ``draw_positions``/``conv_patches``/``conv_targets``/``linear_targets``: seeded output positions per image,
  the im2col rows of a conv's input there (the columns ``F.unfold`` gives, without all of them), and
  the target rows (the original layer's outputs at the same positions); ``layer_seed`` gives each
  layer its own stream.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Stop(Exception):
    """Raised from a hook to end a forward pass early (only the prefix is needed)."""


def images_of(batch: Any) -> torch.Tensor:
    """The images of a batch: the tensor itself, or the first item of ``(x, y, ...)``."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def iter_images(batches: Iterable, max_images: int | None, device: torch.device,
                dtype: torch.dtype) -> Iterator[torch.Tensor]:
    seen = 0
    for batch in batches:
        x = images_of(batch)
        if max_images is not None:
            x = x[: max_images - seen]
        if x.shape[0] == 0:
            break
        seen += x.shape[0]
        yield x.to(device, dtype=dtype) if x.is_floating_point() else x.to(device)
        if max_images is not None and seen >= max_images:
            break


def check_device(device: torch.device, **models: nn.Module) -> None:
    """Every named model's parameters must be on ``device`` (the refits run where the models are; they
    do not move them): a ValueError naming the model otherwise."""
    for name, model in models.items():
        p = next(model.parameters(), None)
        if p is not None and p.device != device and not (p.device.type == device.type and device.index is None):
            raise ValueError(f"{name} is on {p.device}, not on device {device}: move the models there first")


def layer_seed(seed: int, index: int) -> int:
    """Seed of the position draws for the ``index``-th refit layer: independent streams per layer."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


# --- hooks and prefix passes ----------------------------------------------------------------

def call_order(model: nn.Module, x: torch.Tensor) -> tuple[list[str], set[str], dict[str, tuple[int, ...]]]:
    """Conv/Linear names in first-call order, those called more than once, and output shapes."""
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    twice: set[str] = set()
    handles = []
    for name, m in linear_layers(model).items():
        def hook(mod, inp, out, name=name):
            if name in shapes:
                twice.add(name)
            else:
                order.append(name)
                shapes[name] = tuple(out.shape[1:])
        handles.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order, twice, shapes


def capture(model: nn.Module, module: nn.Module, x: torch.Tensor, want: str) -> torch.Tensor:
    """The input (``want="input"``) or output of ``module`` on ``x``; the forward stops right there."""
    box: list[torch.Tensor] = []

    def pre(mod, inp):
        box.append(inp[0].detach())
        raise Stop

    def post(mod, inp, out):
        box.append(out.detach())
        raise Stop

    h = module.register_forward_pre_hook(pre) if want == "input" else module.register_forward_hook(post)
    try:
        model(x)
    except Stop:
        pass
    finally:
        h.remove()
    if not box:
        raise RuntimeError("the layer was not called in the forward pass")
    return box[0]


# --- rows of the regression -----------------------------------------------------------------

def draw_positions(gen: torch.Generator, batch: int, hw: int, per_image: int) -> torch.Tensor:
    """[B, P] flat output positions per image, drawn without replacement (all when the map is small)."""
    if per_image >= hw:
        return torch.arange(hw).expand(batch, hw).clone()
    return torch.rand(batch, hw, generator=gen).argsort(dim=1)[:, :per_image]


def conv_patches(x: torch.Tensor, conv: nn.Conv2d, pos: torch.Tensor, out_w: int) -> torch.Tensor:
    """im2col rows at output positions ``pos`` ([B, P] flat): [B·P, groups, C_in/groups·kh·kw].

    Each row equals the matching column of ``F.unfold(x, kernel, dilation, padding, stride)``.
    """
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ph, pw = (0, 0) if conv.padding == "valid" else conv.padding
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # B, Hp, Wp, C
    pos = pos.to(x.device)
    oh, ow = pos // out_w, pos % out_w
    hi = oh[..., None] * sh + torch.arange(kh, device=x.device) * dh  # B, P, kh
    wi = ow[..., None] * sw + torch.arange(kw, device=x.device) * dw  # B, P, kw
    b = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    patches = xp[b, hi[..., :, None], wi[..., None, :]]  # B, P, kh, kw, C
    patches = patches.permute(0, 1, 4, 2, 3)  # B, P, C, kh, kw (the weight's layout)
    g = conv.groups
    return patches.reshape(-1, g, (x.shape[1] // g) * kh * kw)


def conv_targets(y: torch.Tensor, kept: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B·P, kept] original outputs at the sampled positions."""
    y = y[:, kept.to(y.device)].flatten(2)  # B, K, HW
    idx = pos.to(y.device)[:, None, :].expand(-1, y.shape[1], -1)
    return y.gather(2, idx).permute(0, 2, 1).reshape(-1, y.shape[1])


def linear_targets(y: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1, y.shape[-1])[:, kept.to(y.device)]




def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Conv2d and Linear layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
