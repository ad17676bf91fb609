"""One forward pass over calibration images, with hooks on every rank point at once.

Activation statistics are *accumulators*: per-unit running sums on the model's device,
streamed batch by batch, so memory does not grow with the number of images. Several
accumulators share the same pass. Hooks are always removed (``finally``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.models._spec import PrunableUnit


class Accumulator:
    """Per-unit sums of a per-channel statistic; ``result()`` is the mean over images."""

    name = "accumulator"

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def batch_stat(self, act: torch.Tensor) -> torch.Tensor:
        """Return the per-image, per-channel statistic [B, C] of one activation [B, C, H, W]."""
        raise NotImplementedError

    def update(self, unit: str, act: torch.Tensor) -> None:
        stat = self.batch_stat(act).sum(0).double()
        if unit in self.sums:
            self.sums[unit] += stat
        else:
            self.sums[unit] = stat

    def end_batch(self, batch_size: int) -> None:
        self.count += batch_size

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Combine per-process sums (``reduce`` sums a tensor over processes)."""
        for unit in sorted(self.sums):
            self.sums[unit] = reduce(self.sums[unit])
        self.count = int(reduce(torch.tensor([self.count], dtype=torch.float64,
                                             device=next(iter(self.sums.values())).device)).item())

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise RuntimeError("no calibration images were seen")
        return {u: (s / self.count).float().cpu() for u, s in self.sums.items()}


class MeanActivation(Accumulator):
    """Mean activation per channel: the tie-break for rank ties."""

    name = "mean_activation"

    def batch_stat(self, act: torch.Tensor) -> torch.Tensor:
        return act.float().mean(dim=(2, 3)) if act.ndim == 4 else act.float()


def channel_maps(out: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A rank point's output as per-channel maps ``[N, C, H, W]``, the layout every accumulator reads.

    A conv's output already is. A Linear-rooted unit (``channels_last``) has its channels on the last
    dim: ``[N, H, W, C]`` in a channels-last block (ConvNeXt's MLP) becomes ``[N, C, H, W]``, tokens
    ``[N, L, C]`` become ``[N, C, L, 1]``, and a plain MLP head's ``[N, C]`` becomes ``[N, C, 1, 1]``
    (one 1x1 map per channel: HRank's rank is then 1 where the channel is non-zero, 0 where it is zero).
    """
    if not channels_last:
        return out
    if out.ndim == 2:
        return out[:, :, None, None]
    if out.ndim == 3:
        return out.movedim(-1, 1)[..., None]
    return out.movedim(-1, 1)


def channels_last_points(model: nn.Module, unit: PrunableUnit) -> tuple[bool, ...]:
    """Per rank point of ``unit``: whether its output holds the channels on the last dim (its layer is a
    Linear; a residual unit may mix convs and Linears)."""
    heads = unit.convs if len(unit.convs) == len(unit.rank_points) else (unit.name,) * len(unit.rank_points)
    return tuple(isinstance(model.get_submodule(h), nn.Linear) for h in heads)


def record(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    units: Sequence[PrunableUnit],
    accumulators: Sequence[Accumulator],
    *,
    compat: bool = False,
    device: torch.device | str = "cpu",
    total: int | None = None,
    progress: bool = True,
) -> None:
    """Feed every rank point's output of every batch to every accumulator (eval, no grad).

    A rank point with an activation (``unit.rank_acts``) is ranked on ``act(output)``. Each
    rank point must fire exactly once per forward: a module called twice (a reused ReLU)
    would mix two different activations, so that is an error, not a silent average.
    """
    from compressor.pruning.graph import activation_fn

    points: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for u in units:
        use_compat = compat and u.compat_rank_points
        pts = u.compat_rank_points if use_compat else u.rank_points
        acts = ("",) * len(pts) if use_compat or not u.rank_acts else u.rank_acts
        lasts = (False,) * len(pts) if use_compat else channels_last_points(model, u)
        for p, act, last in zip(pts, acts, lasts):
            fn = activation_fn(act)
            points[p] = (u.name, (lambda t, fn=fn: channel_maps(fn(t), True)) if last else fn)
    if compat:
        # HRank never ranks units without a compat point (conv 13 of VGG16).
        points = {p: v for p, v in points.items() if any(u.name == v[0] and u.compat_rank_points for u in units)}
    handles = []
    calls: dict[str, int] = {}

    def make_hook(point: str, unit: str, act: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def hook(_mod: nn.Module, _inp, out: torch.Tensor) -> None:
            calls[point] = calls.get(point, 0) + 1
            a = act(out.detach())
            for acc in accumulators:
                acc.update(unit, a)
        return hook

    was_training = model.training
    model.eval()
    try:
        modules = dict(model.named_modules())
        for p, (unit, act) in points.items():
            handles.append(modules[p].register_forward_hook(make_hook(p, unit, act)))
        bar = tqdm(total=total, desc="rank pass", unit="img", disable=not progress, leave=False)
        with torch.no_grad():
            for x in batches:
                x = x.to(device, non_blocking=True)
                calls.clear()
                model(x)
                twice = sorted(p for p in points if calls.get(p, 0) != 1)
                if twice:
                    raise RuntimeError(f"rank point {twice[0]} fired {calls.get(twice[0], 0)} times in one forward, "
                                       "not once (a module reused, or never called): its captures would be wrong")
                for acc in accumulators:
                    acc.end_batch(x.shape[0])
                bar.update(x.shape[0])
        bar.close()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def limit_images(loader: Iterable, n: int) -> Iterable[torch.Tensor]:
    """Yield input batches (labels dropped) until exactly ``n`` images were produced."""
    seen = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if seen + x.shape[0] > n:
            x = x[: n - seen]
        if x.shape[0] == 0:
            break
        yield x
        seen += x.shape[0]
        if seen >= n:
            break

