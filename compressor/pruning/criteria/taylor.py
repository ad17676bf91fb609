"""First-order Taylor importance (Molchanov et al., ICLR 2017): |activation × gradient|.

For one image, the loss change from zeroing channel c of a rank point's output ``a`` is,
to first order, ``|mean_{h,w}(a · ∂L/∂a)|``; the score is that value averaged over the
calibration images (summed over a unit's rank points). It needs labels and one backward
pass per batch, so it is a ``"gradient"`` criterion: it cannot join the no-grad capture
pass; :meth:`Taylor.gradient_pass` runs its own pass and returns an accumulator (which a
sharded run all-reduces like the others) that :meth:`Taylor.score` turns into scores.

The model runs in eval mode (BN uses its running statistics, so images do not interact)
and the loss is the *summed* cross-entropy, so each image's gradient is its own and the
scores do not depend on the batch size. Parameter gradients are never touched.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compressor.pruning.capture import Accumulator, channel_maps, channels_last_points
from compressor.pruning.criteria.base import AccumulatorCriterion, register_criterion
from compressor.errors import UserError
from compressor.models._spec import PrunableUnit


class TaylorAccumulator(Accumulator):
    """Per-unit sums of ``|mean_hw(a·g)|`` over images, filled by :func:`taylor_pass`."""

    name = "taylor"


def taylor_pass(model: nn.Module, loader_with_labels: Iterable, units: Sequence[PrunableUnit], n_images: int,
                device: torch.device | str = "cpu", progress: bool = False) -> TaylorAccumulator:
    """One forward+backward pass over at most ``n_images`` labelled images; sums stay on ``device``.

    Returns an accumulator, so a sharded (multi-process) pass can ``all_reduce`` it before
    ``result()``, exactly like the capture pass's accumulators.
    """
    points = {p: u.name for u in units for p in u.rank_points}
    last = {p: f for u in units for p, f in zip(u.rank_points, channels_last_points(model, u))}  # a Linear's point
    acc = TaylorAccumulator()
    captured: list[tuple[str, bool, torch.Tensor]] = []

    def make_hook(unit: str, channels_last: bool):
        def hook(_m: nn.Module, _inp, out: torch.Tensor) -> None:
            captured.append((unit, channels_last, out))
        return hook

    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    handles = [modules[p].register_forward_hook(make_hook(u, last[p])) for p, u in points.items()]
    bar = tqdm(total=n_images, desc="taylor pass", unit="img", disable=not progress, leave=False)
    try:
        with torch.enable_grad(), torch.autocast(device_type=torch.device(device).type, enabled=False):
            for batch in loader_with_labels:
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise UserError("criterion taylor needs labelled batches (images, labels)", field="criterion")
                x, y = batch[0], batch[1]
                x, y = x[: n_images - acc.count].to(device), y[: n_images - acc.count].to(device)
                if x.shape[0] == 0:
                    break
                captured.clear()
                x = x.float().requires_grad_(True)  # a graph exists even if the weights are frozen
                loss = F.cross_entropy(model(x).float(), y, reduction="sum")
                grads = torch.autograd.grad(loss, [t for _, _, t in captured])
                for (unit, channels_last, a), g in zip(captured, grads):
                    s = channel_maps(a.detach().float() * g.float(), channels_last)  # [N, C, H, W]
                    s = s.mean(dim=(2, 3)) if s.ndim == 4 else s
                    s = s.abs().sum(0).double()
                    acc.sums[unit] = acc.sums[unit] + s if unit in acc.sums else s
                acc.end_batch(x.shape[0])
                bar.update(x.shape[0])
                if acc.count >= n_images:
                    break
    finally:
        for h in handles:
            h.remove()
        captured.clear()
        bar.close()
        model.train(was_training)
    return acc


def taylor_scores(model: nn.Module, loader_with_labels: Iterable, units: Sequence[PrunableUnit], n_images: int,
                  device: torch.device | str = "cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean over ``n_images`` of ``|Σ_hw a·g| / HW`` per channel of each unit."""
    acc = taylor_pass(model, loader_with_labels, units, n_images, device, progress)
    if acc.count < n_images:
        raise UserError(f"asked for {n_images} calibration images, the data has only {acc.count}", field="n_images")
    return acc.result()


@register_criterion
class Taylor(AccumulatorCriterion):
    name = "taylor"
    kind = "gradient"

    def settings(self) -> dict:
        return {"score": "|mean_hw(a*dL/da)| per image, averaged", "loss": "cross-entropy, summed", "mode": "eval"}

    def gradient_pass(self, model: nn.Module, loader_with_labels: Iterable, units: Sequence[PrunableUnit], *,
                      n_images: int, device: torch.device | str = "cpu", progress: bool = False) -> Accumulator:
        """Its own labelled forward+backward pass; the returned accumulator goes to :meth:`score`."""
        return taylor_pass(model, loader_with_labels, units, n_images, device, progress)

