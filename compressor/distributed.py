"""Multi-process runs under ``torchrun``: process group, sharding, reductions.

``torchrun --nproc_per_node=N -m compressor finetune ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; :func:`init` reads them and joins the group (NCCL
on GPU, gloo on CPU). Without those variables everything here is a no-op for one process,
so the library has one code path. Only rank 0 writes files (``ctx.is_main``).

Ranking shards the calibration images by whole batches (batch ``i`` goes to rank
``i % N``), so every process sees exactly the batches a single process would; the
accumulators' per-process sums are then all-reduced, and N processes give the same scores
as one (up to float64 summation order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_name: str = "auto", timeout_s: float = 1800) -> DistContext:
    """Join the torchrun process group if there is one; pick this process's device.

    ``auto``/``cuda`` under torchrun means ``cuda:LOCAL_RANK``. Calling it twice is harmless.
    """
    from compressor.evaluate import resolve_device

    world = env_world_size()
    device = resolve_device(device_name)
    if world <= 1:
        return DistContext(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def current(device: torch.device | str = "cpu") -> DistContext:
    """The context of an already-initialized group (or a single process)."""
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device)
    return DistContext(device=device)


def shutdown() -> None:
    """Leave the group together: a rank that tears down while a peer is still working can make
    gloo abort that peer (seen as SIGABRT in a loaded 2-process CPU run)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _all_reduce(t: torch.Tensor, op: "dist.ReduceOp", ctx: DistContext | None) -> torch.Tensor:
    ctx = ctx or current(t.device)
    if not ctx.enabled:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(t: torch.Tensor, ctx: DistContext | None = None) -> torch.Tensor:
    """Sum over processes (returns a new tensor; identity for one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM, ctx)


def all_reduce_max(t: torch.Tensor, ctx: DistContext | None = None) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX, ctx)


def shard_strided(ds: Dataset, ctx: DistContext) -> Dataset:
    """Items ``rank, rank+N, ...``: a partition without the padding DistributedSampler adds."""
    if not ctx.enabled:
        return ds
    return Subset(ds, list(range(ctx.rank, len(ds), ctx.world_size)))


def shard_batches(ds: Dataset, batch_size: int, ctx: DistContext) -> Dataset:
    """Whole batches ``rank, rank+N, ...`` of ``ds`` in order (see module docstring)."""
    if not ctx.enabled:
        return ds
    n = len(ds)
    idx = [i for b in range(ctx.rank, -(-n // batch_size), ctx.world_size)
           for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
    return Subset(ds, idx)


def compute_scores(model: torch.nn.Module, calib: Dataset, criterion_names: Sequence[str], *, batch_size: int = 128,
                   seed: int = 0, compat: bool = False, device: torch.device | str = "cpu",
                   options: Mapping[str, Any] | None = None, progress: bool = True,
                   extra_meta: Mapping[str, Any] | None = None, ctx: DistContext | None = None):
    """``scores.compute`` over ``calib``, sharded across processes, with the sums all-reduced."""
    from compressor import scores
    from compressor.data import loader

    device = torch.device(device)
    ctx = ctx or current(device)
    part = shard_batches(calib, batch_size, ctx)
    return scores.compute(
        model, loader(part, batch_size, device=device), criterion_names, n_images=len(calib), seed=seed,
        compat=compat, device=device, options=options, progress=progress and ctx.is_main,
        extra_meta={**dict(extra_meta or {}), "processes": ctx.world_size},
        reduce=(lambda t: all_reduce_sum(t, ctx)) if ctx.enabled else None,
    )
