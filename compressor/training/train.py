"""The one training loop: baselines, fine-tuning after pruning, the demo's short runs.

Readable on purpose (nanoGPT style). Selection uses the validation split only; the test
split is never looked at here.

* GPU: AMP (bf16 where supported, else fp16 with a GradScaler), channels_last, pinned
  non-blocking copies, optional ``torch.compile``; host syncs only every few steps.
  CPU: the same loop in fp32.
* Resumable: with ``out_dir`` every epoch writes ``last.pt`` atomically, with optimizer,
  scheduler and scaler state, the epoch and the sampler's (seed, epoch, processes) in the
  checkpoint's ``extra["train_state"]`` as plain data; ``best.pt`` (at the best validation
  accuracy) is weights only: the same model, metrics and plain record (epoch, history, curve,
  config), without optimizer/scheduler/scaler state, so it is about the model's size and is not
  a resume point. No RNG state is saved, because none is carried across epochs: each epoch re-seeds
  torch/numpy/python and the loader's generator from (seed, epoch, rank) and the shuffle is
  (seed, epoch), so a resumed run repeats an uninterrupted one exactly on CPU (also with
  DataLoader workers, which are seeded from that generator).
* Never writes a broken model: the loss is checked every step (every 32 on GPU) and the
  weights and BN statistics before every checkpoint (``check_finite``); NaN/inf stops the
  run (exit code 3) and keeps the previous files.
* Multi-process (``torchrun``): DDP, a ``DistributedSampler`` per rank, metrics summed over
  ranks, files written by rank 0 only (see ``compressor.training.distributed``).
* Recovery curve: the validation split is evaluated before the first step (``epoch_frac`` 0:
  the accuracy the run starts from, e.g. right after pruning), every ``eval_every`` of an epoch
  and at every epoch end. Each evaluation is one row of ``metrics.jsonl``; the epoch-end row is
  the epoch's row (train loss/accuracy, img/s) with the same curve keys. ``recovery_curve.png``
  plots them. Evaluations never touch the training RNG streams (``torch.random.fork_rng``), so
  ``eval_every`` changes what is logged, never the weights. best.pt is selected at epoch ends
  only: that epoch's last.pt without its optimizer, scheduler and scaler state.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from compressor.training import distributed as dist_mod
from compressor.data import DataBundle, loader
from compressor.errors import UserError
from compressor.training.evaluation import evaluate
# the loop's settings and its NaN/inf checks, importable from here as the loop's own names
from compressor.training.config import TrainConfig, config_dict, loss_fn, lr_lambda, make_optimizer
from compressor.training.finite import NonFiniteLossError, NonFiniteWeightsError, nonfinite_tensors

__all__ = ["HEARTBEAT_S", "NonFiniteLossError", "NonFiniteWeightsError", "TrainConfig", "config_dict", "curve_points",
           "eval_steps", "fit", "heartbeat_line", "loss_fn", "lr_lambda", "make_optimizer", "write_metrics"]

HEARTBEAT_S = 60.0  # without a progress bar, a line at least this often (seconds) while an epoch runs


# --- random state -----------------------------------------------------------------------

def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint32)[0])


def seed_all(s: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python: called at the start of every epoch."""
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


# --- checkpoints ------------------------------------------------------------------------

def _read_train_state(resume: str | Path | Mapping[str, Any],
                      source: str | None = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    from compressor.storage import checkpoint

    src = source or (str(resume) if not isinstance(resume, Mapping) else "<resume>")
    obj = dict(resume) if isinstance(resume, Mapping) else checkpoint.read(resume)
    ts = (obj.get("extra") or {}).get("train_state")
    if not isinstance(ts, dict) or "optimizer" not in ts:
        raise UserError("has no training state to resume from (use a last.pt written by train/finetune)", source=src)
    return obj, ts, src


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig, src: str) -> None:
    now = config_dict(cfg)
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
               if k not in ("epochs", "workers", "extra", "eval_every") and k in saved and saved[k] != now[k]]
    if changed:
        warnings.warn(f"{src}: resuming with changed settings ({', '.join(changed)}); the run will not repeat "
                      "an uninterrupted one", stacklevel=3)


def _check_sampler(saved: Mapping[str, Any] | None, ctx: dist_mod.DistContext, src: str) -> None:
    """The shuffle and the per-rank streams depend on the number of processes: say so when it changed."""
    world = (saved or {}).get("world_size")
    if world is not None and int(world) != ctx.world_size:
        warnings.warn(f"{src}: the run was made with {world} process(es), this one has {ctx.world_size}; "
                      "the data order differs, so it will not repeat an uninterrupted run", stacklevel=3)


RESUME_ONLY = ("optimizer", "scheduler", "scaler")  # train_state that only last.pt carries


def _save(out_dir: Path, names: list[str], model: nn.Module, row: dict, state: dict, meta: Mapping[str, Any]) -> None:
    """``names[0]`` (last.pt) gets the model and the whole training state (what ``--resume`` needs);
    the other names (best.pt) are weights only: the model and its metadata, with the training
    state's plain record (epoch, history, curve, config) but no optimizer, scheduler or scaler
    state (which would double the file). Each write is atomic."""
    from compressor.storage import checkpoint

    metrics = {**dict(meta.get("metrics") or {}), **{k: v for k, v in row.items()}}
    light = {k: v for k, v in state.items() if k not in RESUME_ONLY}
    for i, name in enumerate(names):
        checkpoint.save(out_dir / name, model, rates=meta.get("rates"), plan=meta.get("plan"), metrics=metrics,
                        prov=meta.get("prov"), extra={"train_state": state if i == 0 else light})


# --- the loop ---------------------------------------------------------------------------

def _val_metrics(model: nn.Module, val_loader, device: torch.device, ctx: dist_mod.DistContext) -> tuple[float, float]:
    """(top-1 %, mean cross-entropy) on the validation split, summed over ranks; every rank must call it.

    Leaves the model's mode and every RNG stream (torch CPU and this CUDA device) as they were.
    """
    if ctx.enabled:  # BN statistics as saved by rank 0
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        r = evaluate(model, val_loader, device) if val_loader is not None and len(val_loader.dataset) else None
    if not ctx.enabled and r is not None:
        return float(r["top1"]), float(r["loss"])
    n = int(r["n"]) if r else 0
    correct, loss_sum = (round(r["top1"] * n / 100.0), r["loss"] * n) if r else (0, 0.0)
    tot = dist_mod.all_reduce_sum(torch.tensor([correct, n, loss_sum], dtype=torch.float64, device=device), ctx)
    seen = max(1.0, tot[1].item())
    return 100.0 * tot[0].item() / seen, tot[2].item() / seen


def eval_steps(steps_per_epoch: int, eval_every: float) -> list[int]:
    """Steps within an epoch (1-based counts of steps done) after which val is evaluated.

    Every ``eval_every`` of the epoch, rounded to a whole step, and always the last step; e.g.
    10 steps at 0.25: ``[2, 5, 8, 10]`` (2.5 and 7.5 round to even).
    """
    n = math.ceil(1.0 / eval_every - 1e-9)
    marks = {min(steps_per_epoch, max(1, round(steps_per_epoch * k * eval_every))) for k in range(1, n)}
    return sorted(marks | {steps_per_epoch})


def curve_row(step: int, steps_per_epoch: int, epoch: int, steps_in_epoch: int, val: tuple[float, float],
              lr: float) -> dict[str, Any]:
    """One evaluation of the recovery curve: ``epoch_frac`` = epochs done (fractional), ``step`` = optimizer steps."""
    return {"epoch_frac": round(epoch + steps_in_epoch / max(1, steps_per_epoch), 6), "step": int(step),
            "val_acc": val[0], "val_loss": val[1], "lr": lr}


def fit(model: nn.Module, data: DataBundle, cfg: TrainConfig, device: torch.device | str = "cpu",
        progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None, *,
        teacher: nn.Module | None = None, out_dir: str | Path | None = None,
        resume: str | Path | Mapping[str, Any] | None = None, ckpt_meta: Mapping[str, Any] | None = None,
        ctx: dist_mod.DistContext | None = None, resume_source: str | None = None,
        heartbeat_s: float = HEARTBEAT_S) -> list[dict[str, Any]]:
    """Train ``model`` in place; return one metrics row per epoch (lr, train loss/acc, val acc/loss, img/s).

    ``out_dir``: write last.pt / best.pt / metrics.jsonl / recovery_curve.png there (rank 0).
    metrics.jsonl holds every validation evaluation in order: the start (``epoch_frac`` 0),
    every ``cfg.eval_every`` of an epoch (``epoch_frac``, ``step``, ``val_acc``, ``val_loss``,
    ``lr`` = the rate of the next step) and the epoch rows (also ``epoch``, ``train_loss``,
    ``train_acc``, ``img_per_s``; their ``lr`` is the epoch's first step's). ``resume``: a
    last.pt (path or loaded dict; ``resume_source`` names a dict in messages) to continue from.
    ``teacher``: distil from its logits.
    ``ckpt_meta``: ``rates``/``plan``/``prov``/``metrics`` to store in the checkpoints.
    ``heartbeat_s``: without a progress bar (``progress`` False), print ``epoch e/E, batch b/n, loss,
    img/s, eta`` whenever this many seconds have passed since the epoch began or the last such line
    (0: after every batch). With a bar, the bar is the heartbeat.
    The model ends with the last epoch's weights (best.pt holds the selected ones).
    """
    device = torch.device(device)
    ctx = ctx or dist_mod.current(device)
    torch.manual_seed(cfg.seed)
    cl, amp_dtype, use_amp, scaler = _setup_precision(model, teacher, cfg, device)

    sampler, train_loader, val_loader = _loaders(data, cfg, ctx, device)
    has_val = len(data.val) > 0  # the same on every rank: they all join the val reduction
    net = _wrapped(model, cfg, ctx, device)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, len(train_loader)))

    stepper = _Stepper(net, teacher, opt, sched, scaler, cfg, device, amp_dtype, use_amp, cl, ctx, heartbeat_s)
    steps = len(train_loader)
    # history: the epoch rows; curve: every evaluation, in order (what metrics.jsonl holds)
    start, best, history, curve = _begin(model, opt, sched, scaler, resume, resume_source, cfg, ctx, steps,
                                         val_loader, has_val, device)
    out = Path(out_dir) if out_dir is not None and ctx.is_main else None
    meta = dict(ckpt_meta or {})
    marks = eval_steps(steps, cfg.eval_every)[:-1] if has_val else []  # the last step: the epoch row

    eval_s = [0.0]  # this epoch's mid-epoch evaluation time (not training throughput)

    def mid_epoch_eval(epoch: int, done: int) -> None:  # every rank, at the same step
        t = time.perf_counter()
        curve.append(curve_row(sched.last_epoch, steps, epoch, done, _val_metrics(model, val_loader, device, ctx),
                               opt.param_groups[0]["lr"]))
        eval_s[0] += time.perf_counter() - t

    for epoch in range(start, cfg.epochs):
        _seed_epoch(cfg, epoch, ctx, train_loader, sampler)
        lr0 = opt.param_groups[0]["lr"]
        eval_s[0] = 0.0
        t0 = time.perf_counter()
        stats = _train_epoch(stepper, train_loader, epoch, out_dir, history, progress,
                             evals=(marks, lambda done, e=epoch: mid_epoch_eval(e, done)))
        _check_weights(model, epoch, steps - 1, out_dir, history, ctx, device)
        row = _epoch_row(stats, time.perf_counter() - t0 - eval_s[0], epoch, lr0, ctx, device)
        if has_val:
            val = _val_metrics(model, val_loader, device, ctx)
            row["val_acc"], row["val_loss"] = val
            row.update(curve_row(sched.last_epoch, steps, epoch, steps, val, lr0))
        improved = "val_acc" in row and row["val_acc"] > best
        if improved:
            best = row["val_acc"]
        history.append(row)
        curve.append(row)

        def epoch_end() -> None:  # rank 0 only; every rank learns whether it failed (run_on_main)
            if out is not None:
                state = _train_state(epoch, opt, sched, scaler, cfg, ctx, best, history, curve, steps)
                _save(out, ["last.pt", "best.pt"] if improved else ["last.pt"], model, row, state, meta)
                write_metrics(out / "metrics.jsonl", curve)
            if log:
                log(row)

        dist_mod.run_on_main(epoch_end, ctx)

    dist_mod.run_on_main(lambda: _write_curve(out, curve), ctx)
    if cl:
        model.to(memory_format=torch.contiguous_format)
    return history


def _begin(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: Any, resume: Any,
           resume_source: str | None, cfg: TrainConfig, ctx: dist_mod.DistContext, steps: int,
           val_loader: DataLoader | None, has_val: bool, device: torch.device) -> tuple[int, float, list, list]:
    """(first epoch, best val, history, curve): a resumed run's own, or a fresh start whose curve
    begins with the accuracy before any step (e.g. right after pruning); every rank joins that evaluation."""
    if resume is not None:
        return _restore(model, opt, sched, scaler, resume, resume_source, cfg, ctx, steps)
    if not has_val:
        return 0, -math.inf, [], []
    return 0, -math.inf, [], [curve_row(0, steps, 0, 0, _val_metrics(model, val_loader, device, ctx),
                                        opt.param_groups[0]["lr"])]


def _seed_epoch(cfg: TrainConfig, epoch: int, ctx: dist_mod.DistContext, train_loader: DataLoader,
                sampler: DistributedSampler) -> None:
    """Per-rank random streams for the epoch; the shuffle is a function of (seed, epoch)."""
    s = epoch_seed(cfg.seed, epoch, ctx.rank)
    seed_all(s)
    train_loader.generator.manual_seed(s)
    sampler.set_epoch(epoch)


def _check_weights(model: nn.Module, epoch: int, last_step: int, out_dir: str | Path | None,
                   history: list[dict[str, Any]], ctx: dist_mod.DistContext, device: torch.device) -> None:
    """The last step can break the weights after a finite loss: every rank stops together if any is broken."""
    bad_w = nonfinite_tensors(model)
    if dist_mod.all_reduce_max(torch.tensor(int(bool(bad_w)), device=device), ctx).item():
        _raise_nonfinite(epoch, last_step, out_dir, history, weights=bad_w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loaders(data: DataBundle, cfg: TrainConfig, ctx: dist_mod.DistContext,
             device: torch.device) -> tuple[DistributedSampler, DataLoader, DataLoader | None]:
    """The training sampler and loader (this rank's shard) and this rank's validation loader."""
    sampler = DistributedSampler(data.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=ctx.enabled)
    # Workers are re-created every epoch (not persistent) and seeded from the loader's generator,
    # which is re-seeded per (seed, epoch, rank): augmentation repeats exactly after a resume.
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                              generator=torch.Generator().manual_seed(cfg.seed), pin_memory=device.type == "cuda",
                              drop_last=len(sampler) > cfg.batch_size)
    val_part = dist_mod.shard_strided(data.val, ctx)
    val_loader = loader(val_part, cfg.val_batch_size, workers=cfg.workers, device=device) if len(val_part) else None
    if len(train_loader) == 0:
        raise UserError(f"the training split of {data.name} is empty", field="data")
    return sampler, train_loader, val_loader


def _wrapped(model: nn.Module, cfg: TrainConfig, ctx: dist_mod.DistContext, device: torch.device) -> nn.Module:
    """What the steps run: DDP across processes, ``torch.compile`` when asked; ``model`` keeps the weights."""
    net: nn.Module = model
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    return net


def _epoch_row(stats: torch.Tensor, elapsed: float, epoch: int, lr0: float, ctx: dist_mod.DistContext,
               device: torch.device) -> dict[str, Any]:
    """An epoch's training metrics, reduced over ranks (loss and accuracy per image; the slowest rank's time)."""
    tot = dist_mod.all_reduce_sum(stats, ctx).tolist()
    seen = max(1.0, tot[2])
    elapsed = dist_mod.all_reduce_max(torch.tensor(elapsed, device=device), ctx).item()
    return {"epoch": epoch + 1, "lr": lr0, "train_loss": tot[0] / seen, "train_acc": 100.0 * tot[1] / seen,
            "img_per_s": tot[2] / max(elapsed, 1e-9)}


def _train_state(epoch: int, opt: torch.optim.Optimizer, sched: Any, scaler: Any, cfg: TrainConfig,
                 ctx: dist_mod.DistContext, best: float, history: list, curve: list, steps: int) -> dict[str, Any]:
    """What last.pt needs for ``--resume`` to repeat an uninterrupted run (plain data)."""
    return {"epoch": epoch + 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "sampler": {"seed": cfg.seed, "epoch": epoch + 1, "world_size": ctx.world_size},
            "best_val_acc": best, "history": [dict(r) for r in history], "curve": [dict(r) for r in curve],
            "config": config_dict(cfg), "steps_per_epoch": steps}


def _write_curve(out: Path | None, curve: list[dict[str, Any]]) -> None:
    """metrics.jsonl (also a run of 0 epochs: its start) and recovery_curve.png (rank 0)."""
    if out is None or not curve:
        return
    write_metrics(out / "metrics.jsonl", curve)
    from compressor.reporting import plots

    plots.recovery_curves({out.name or "run": curve_points(curve)}, out / "recovery_curve.png",
                          title=f"{out.name}: validation top-1 during training")




def _setup_precision(model: nn.Module, teacher: nn.Module | None, cfg: TrainConfig,
                     device: torch.device) -> tuple[bool, torch.dtype, bool, Any]:
    """Device, memory format and AMP for student and teacher: (channels_last, amp dtype, amp on, scaler)."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not cfg.deterministic
    model.to(device)
    cl = on_gpu and cfg.channels_last
    if cl:
        model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = on_gpu and cfg.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    if teacher is not None:
        if getattr(teacher, "num_classes", None) not in (None, getattr(model, "num_classes", None)):
            raise UserError(f"the teacher has {teacher.num_classes} classes, the student {model.num_classes}",
                            field="teacher")
        teacher.to(device).eval().requires_grad_(False)
        if cl:
            teacher.to(memory_format=torch.channels_last)
    return cl, amp_dtype, use_amp, scaler

def _restore(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: Any,
             resume: str | Path | Mapping[str, Any], resume_source: str | None, cfg: TrainConfig,
             ctx: dist_mod.DistContext, steps: int) -> tuple[int, float, list[dict[str, Any]], list[dict[str, Any]]]:
    """Load a last.pt's weights and training state; return (start epoch, best val acc, history, curve).

    A last.pt written before the curve was kept has only the epoch rows: they are its curve.
    """
    obj, ts, src = _read_train_state(resume, resume_source)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"weights do not fit this model: {str(exc).splitlines()[-1][:160]}", source=src) from exc
    opt.load_state_dict(ts["optimizer"])
    sched.load_state_dict(ts["scheduler"])
    if ts.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ts["scaler"])
    _check_sampler(ts.get("sampler"), ctx, src)
    _check_resume_config(ts.get("config", {}), cfg, src)
    if ts.get("steps_per_epoch", steps) != steps:
        warnings.warn(f"{src}: steps per epoch changed ({ts['steps_per_epoch']} -> {steps})", stacklevel=3)
    history = list(ts["history"])
    curve = list(ts["curve"]) if isinstance(ts.get("curve"), list) else list(history)
    return int(ts["epoch"]), float(ts["best_val_acc"]), history, curve


@dataclass
class _Stepper:
    """What one optimisation step needs: the (wrapped) network, its teacher, the optimiser,
    schedule and scaler, and the precision and process settings of the run."""

    net: nn.Module
    teacher: nn.Module | None
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    cfg: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype
    use_amp: bool
    channels_last: bool
    ctx: dist_mod.DistContext
    heartbeat_s: float = HEARTBEAT_S


def _duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def heartbeat_line(epoch: int, epochs: int, done: int, steps: int, loss: float, images: float,
                   elapsed: float) -> str:
    """``epoch 1/5, batch 40/391, loss 2.103, 128 img/s, eta 3m12s for the epoch, 17m40s for the run``.

    ``done`` batches of ``steps`` in epoch ``epoch`` (0-based) took ``elapsed`` seconds for ``images``
    images; the eta assumes the rest of the run goes at this epoch's rate so far."""
    per_step = elapsed / max(1, done)
    left_epoch = (steps - done) * per_step
    left_run = left_epoch + (epochs - epoch - 1) * steps * per_step
    return (f"epoch {epoch + 1}/{epochs}, batch {done}/{steps}, loss {loss:.4g}, "
            f"{images / max(elapsed, 1e-9):.0f} img/s, eta {_duration(left_epoch)} for the epoch, "
            f"{_duration(left_run)} for the run")


def _train_epoch(st: _Stepper, train_loader: DataLoader, epoch: int, out_dir: str | Path | None, history: list,
                 progress: bool, evals: tuple[Sequence[int], Callable[[int], None]] = ((), lambda done: None),
                 ) -> torch.Tensor:
    """One pass over the training loader; returns this rank's (loss sum, correct, images).

    A NaN/inf loss on any rank stops every rank (checked every step on CPU, every 32 on a GPU).
    ``evals``: (step counts, callback): ``callback(steps done)`` after each of those steps
    (the mid-epoch validation of the recovery curve).
    """
    net, teacher, opt, sched, scaler, cfg, device = st.net, st.teacher, st.opt, st.sched, st.scaler, st.cfg, st.device
    amp_dtype, use_amp, cl, ctx = st.amp_dtype, st.use_amp, st.channels_last, st.ctx
    marks, on_eval = set(evals[0]), evals[1]
    check_every = 1 if device.type != "cuda" else 32  # host syncs: every step on CPU (free), rarely on GPU
    net.train()
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (progress and ctx.is_main))
    last = len(train_loader) - 1
    beat = ctx.is_main and not progress  # with a bar, the bar is the heartbeat
    t_start = t_beat = time.perf_counter()
    for step, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            out_logits = net(x)
            t_out = None
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
            loss = loss_fn(out_logits, y, cfg, t_out)
        bad |= ~torch.isfinite(loss.detach())
        if step % check_every == 0 or step == last:
            if dist_mod.all_reduce_max(bad.to(torch.int32), ctx).item():
                _raise_nonfinite(epoch, step, out_dir, history)
            if progress and ctx.is_main:
                bar.set_postfix(loss=f"{stats[0].item() / max(1.0, stats[2].item()):.3f}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        stats[0] += loss.detach() * y.numel()
        stats[1] += (out_logits.detach().argmax(1) == y).sum()
        stats[2] += y.numel()
        if beat and time.perf_counter() - t_beat >= st.heartbeat_s:
            t_beat = time.perf_counter()
            seen = max(1.0, stats[2].item())
            print(heartbeat_line(epoch, cfg.epochs, step + 1, last + 1, stats[0].item() / seen, seen,
                                 t_beat - t_start), flush=True)
        if step + 1 in marks:
            on_eval(step + 1)
    return stats


def _raise_nonfinite(epoch: int, step: int, out_dir: str | Path | None, history: list,
                     weights: list[str] | None = None) -> None:
    kept = (f"last good checkpoint {Path(out_dir) / 'last.pt'} (epoch {history[-1]['epoch']}) kept"
            if out_dir is not None and history else "no checkpoint was written")
    hint = "Try a lower --lr, more --warmup-epochs or --no-amp"
    if weights is not None:  # another rank's weights, when this one's are fine: DDP keeps them equal
        names = ", ".join(weights[:3]) + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")
        raise NonFiniteWeightsError(f"training stopped: the weights became NaN/inf in epoch {epoch + 1}"
                                    f"{f' ({names})' if names else ''}; {kept}. {hint}", field="weights")
    raise NonFiniteLossError(f"training stopped: the loss became NaN/inf in epoch {epoch + 1} (by step {step + 1}); "
                             f"{kept}. {hint}", field="loss")


def curve_points(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """``(epochs done, val top-1)`` of metrics rows that have a validation accuracy.

    ``epoch_frac`` where the row has it, else ``epoch`` (a metrics.jsonl written before the curve
    was kept: one row per epoch, no start point).
    """
    pts = []
    for r in rows:
        x = r.get("epoch_frac", r.get("epoch"))
        if x is not None and r.get("val_acc") is not None:
            pts.append((float(x), float(r["val_acc"])))
    return pts


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    from compressor.storage import io

    io.write_text(path, "".join(json.dumps(r) + "\n" for r in history))
