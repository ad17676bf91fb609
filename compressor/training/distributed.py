"""Multi-process runs under ``torchrun``: process group, sharding, reductions.

``torchrun --nproc_per_node=N -m compressor finetune ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; :func:`init` reads them and joins the group (NCCL
on GPU, gloo on CPU). Without those variables everything here is a no-op for one process,
so the library has one code path. Only rank 0 writes files (``ctx.is_main``).

Failing together: rank-0-only work (a save, a report) goes through :func:`run_on_main`, which
ends with one collective that tells every rank whether rank 0 failed; the others then raise
:class:`PeerFailed` with rank 0's message (and exit code) instead of running on into the next
collective and waiting there for the group timeout. A process unwinding from an error leaves
the group with ``shutdown(barrier=False)``: its peers failed at the same point, or are gone.

Ranking shards the calibration images by whole batches (batch ``i`` goes to rank
``i % N``), so every process sees exactly the batches a single process would; the
accumulators' per-process sums are then all-reduced, and N processes give the same scores
as one (up to float64 summation order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from compressor.errors import UserError

T = TypeVar("T")


class PeerFailed(UserError):
    """Another process of the group failed; this one stops too, with that process's message and exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    from compressor.training.evaluation import resolve_device

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


def shutdown(barrier: bool = True) -> None:
    """Leave the group together: a rank that tears down while a peer is still working can make
    gloo abort that peer (seen as SIGABRT in a loaded 2-process CPU run).

    ``barrier=False`` when unwinding from an error: the peers either failed at the same point
    (:func:`run_on_main`, the NaN-loss check) or will never reach a barrier; waiting for them
    would hang until the group timeout.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier and dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            elif barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _describe(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, UserError):
        return str(exc), int(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__, 1


def raise_together(err: BaseException | None, ctx: DistContext | None = None) -> None:
    """Called by every rank at the same point with its own error (or None): all raise if any failed.

    A failed rank re-raises its own error; the others raise :class:`PeerFailed` naming the
    first failed rank and its message. Costs one small all-reduce when nothing failed.
    """
    ctx = ctx or current()
    if ctx.enabled:
        dev = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
        flag = torch.tensor(0 if err is None else 1, dtype=torch.int32, device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            mine = None if err is None else (ctx.rank, *_describe(err))
            everyone: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(everyone, mine)
            if err is None:
                rank, msg, code = next(e for e in everyone if e is not None)
                raise PeerFailed(f"process {rank} failed: {msg}", exit_code=code)
    if err is not None:
        raise err


def run_on_main(fn: Callable[[], T], ctx: DistContext | None = None) -> T | None:
    """``fn()`` on rank 0 only (file writes, reports); then every rank learns whether it failed.

    Rank 0 gets ``fn``'s result (or its error, re-raised); the other ranks get ``None`` (or
    :class:`PeerFailed`). Every rank of the group must call it, at the same point.
    """
    ctx = ctx or current()
    result: T | None = None
    err: BaseException | None = None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to raise_together, re-raised there
            err = exc
    try:
        raise_together(err, ctx)
    finally:
        err = None  # no reference cycle through the traceback
    return result


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
    from compressor.pruning import scores
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
