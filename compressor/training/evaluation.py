"""Evaluation and BatchNorm re-estimation."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear user error."""
    from compressor.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device auto or cpu)",
                        field="device")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N", field="device")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
             progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy loss."""
    was_training = model.training
    model.eval()
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            out = model(x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        n += y.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                   max_images: int = 512) -> int:
    """Re-estimate BN running statistics after surgery (no labels, no gradient).

    Aggressive pruning leaves the statistics stale, so "accuracy right after pruning" sits
    near chance for every criterion; one pass over a few hundred training images fixes that.
    A batch of one image (a trailing remainder, e.g. 129 images at batch 128, or the cut at
    ``max_images``) cannot be normalized in training mode (BatchNorm1d, or 1x1 maps): it is
    merged into its neighbour batch. Returns the number of images used (0 if the model has no
    BatchNorm, or only one image came).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
        m.train()
    seen = 0
    held: torch.Tensor | None = None  # one batch held back, so a 1-image batch can join it
    try:
        for x in _capped(loader, max_images):
            if held is None or x.shape[0] < 2 or held.shape[0] < 2:
                held = x if held is None else torch.cat([held, x])
                continue
            model(held.to(device))
            seen += held.shape[0]
            held = x
        if held is not None and held.shape[0] >= 2:
            model(held.to(device))
            seen += held.shape[0]
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
        model.train(was_training)
    return seen


def _capped(loader: Iterable, max_images: int) -> Iterator[torch.Tensor]:
    """The input tensors of ``loader``'s batches, cut so that at most ``max_images`` come out."""
    taken = 0
    for batch in loader:
        if taken >= max_images:
            return
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        x = x[: max_images - taken]
        if x.shape[0]:
            taken += x.shape[0]
            yield x
