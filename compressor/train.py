"""The one training loop: baselines, fine-tuning after pruning, the demo's short runs.

Readable on purpose (nanoGPT style). Selection uses the validation split only; the test
split is never looked at here.

* GPU: AMP (bf16 where supported, else fp16 with a GradScaler), channels_last, pinned
  non-blocking copies, optional ``torch.compile``; host syncs only every few steps.
  CPU: the same loop in fp32.
* Resumable: with ``out_dir`` every epoch writes ``last.pt`` (and ``best.pt`` at the best
  validation accuracy) atomically, with optimizer, scheduler, scaler, RNG and sampler state
  in the checkpoint's ``extra["train_state"]`` as plain data. The shuffle order and every
  random stream of an epoch are functions of (seed, epoch, rank), so a resumed run repeats
  an uninterrupted one exactly on CPU (also with DataLoader workers, which are seeded the same way).
* Multi-process (``torchrun``): DDP, a ``DistributedSampler`` per rank, metrics summed over
  ranks, files written by rank 0 only (see ``compressor.distributed``).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from compressor import distributed as dist_mod
from compressor.data import DataBundle, loader
from compressor.errors import UserError
from compressor.evaluate import evaluate

SCHEDULES = ("cosine", "multistep", "onecycle", "constant")


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN/inf: the run stops; the last good checkpoint stays as it was."""

    exit_code = 3


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    workers: int = 0
    amp: bool = True
    channels_last: bool = True
    extra: dict = field(default_factory=dict)
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5  # weight of the distillation term when a teacher is given
    compile: bool = False
    deterministic: bool = False  # GPU: no cuDNN autotuning, no TF32
    val_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs >= 0, batch_size >= 1 and lr > 0 are required")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not 0.0 <= self.kd_alpha <= 1.0 or self.kd_temperature <= 0:
            raise ValueError("kd_alpha must be in [0, 1] and kd_temperature > 0")
        if not 0.0 <= self.label_smoothing < 1.0 or self.warmup_epochs < 0:
            raise ValueError("label_smoothing must be in [0, 1) and warmup_epochs >= 0")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if cfg.no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "multistep":
            epoch = step // max(1, steps_per_epoch)
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        t = (step - warm) / max(1, total - warm)
        if cfg.schedule == "onecycle":  # linear up over 30%, cosine down
            return t / 0.3 if t < 0.3 else 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def loss_fn(out: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, t_out: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (with label smoothing), plus Hinton KD when teacher logits are given."""
    ce = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
    if t_out is None or cfg.kd_alpha == 0:
        return ce
    t = cfg.kd_temperature
    kd = F.kl_div(F.log_softmax(out.float() / t, 1), F.log_softmax(t_out.float() / t, 1),
                  reduction="batchmean", log_target=True) * (t * t)
    return (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * kd


# --- random state -----------------------------------------------------------------------

def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint32)[0])


def seed_all(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def rng_state(gen: torch.Generator | None = None) -> dict[str, Any]:
    """torch/CUDA/numpy/python/loader RNG states as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": torch.tensor(pstate, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if gen is not None:
        state["loader_generator"] = gen.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if gen is not None and "loader_generator" in state:
        gen.set_state(state["loader_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints ------------------------------------------------------------------------

def _read_train_state(resume: str | Path | Mapping[str, Any],
                      source: str | None = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    from compressor import checkpoint

    src = source or (str(resume) if not isinstance(resume, Mapping) else "<resume>")
    obj = dict(resume) if isinstance(resume, Mapping) else checkpoint.read(resume)
    ts = (obj.get("extra") or {}).get("train_state")
    if not isinstance(ts, dict) or "optimizer" not in ts:
        raise UserError("has no training state to resume from (use a last.pt written by train/finetune)", source=src)
    return obj, ts, src


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig, src: str) -> None:
    now = config_dict(cfg)
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
               if k not in ("epochs", "workers", "extra") and k in saved and saved[k] != now[k]]
    if changed:
        warnings.warn(f"{src}: resuming with changed settings ({', '.join(changed)}); the run will not repeat "
                      "an uninterrupted one", stacklevel=3)


def _save(out_dir: Path, names: list[str], model: nn.Module, row: dict, state: dict, meta: Mapping[str, Any]) -> None:
    """Serialize the checkpoint once to ``names[0]``; the other names get a byte copy (each write atomic)."""
    import shutil

    from compressor import checkpoint, io

    metrics = {**dict(meta.get("metrics") or {}), **{k: v for k, v in row.items()}}
    first = checkpoint.save(out_dir / names[0], model, rates=meta.get("rates"), plan=meta.get("plan"),
                            metrics=metrics, prov=meta.get("prov"), extra={"train_state": state})
    for name in names[1:]:
        with open(first, "rb") as src:
            io.atomic_write(out_dir / name, lambda fh: shutil.copyfileobj(src, fh, 1 << 20))


# --- the loop ---------------------------------------------------------------------------

def _val_acc(model: nn.Module, val_loader, device: torch.device, ctx: dist_mod.DistContext) -> float:
    correct = n = 0
    if val_loader is not None and len(val_loader.dataset):
        r = evaluate(model, val_loader, device)
        n = int(r["n"])
        correct = round(r["top1"] * n / 100.0)
    tot = dist_mod.all_reduce_sum(torch.tensor([correct, n], dtype=torch.float64, device=device), ctx)
    return 100.0 * tot[0].item() / max(1.0, tot[1].item())


def fit(model: nn.Module, data: DataBundle, cfg: TrainConfig, device: torch.device | str = "cpu",
        progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None, *,
        teacher: nn.Module | None = None, out_dir: str | Path | None = None,
        resume: str | Path | Mapping[str, Any] | None = None, ckpt_meta: Mapping[str, Any] | None = None,
        ctx: dist_mod.DistContext | None = None, resume_source: str | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place; return one metrics row per epoch (lr, train loss/acc, val acc, img/s).

    ``out_dir``: write last.pt / best.pt / metrics.jsonl there (rank 0). ``resume``: a
    last.pt (path or loaded dict; ``resume_source`` names a dict in messages) to continue from.
    ``teacher``: distil from its logits.
    ``ckpt_meta``: ``rates``/``plan``/``prov``/``metrics`` to store in the checkpoints.
    The model ends with the last epoch's weights (best.pt holds the selected ones).
    """
    device = torch.device(device)
    ctx = ctx or dist_mod.current(device)
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)
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

    sampler = DistributedSampler(data.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=ctx.enabled)
    # Workers are re-created every epoch (not persistent) and seeded from the loader's generator,
    # which is re-seeded per (seed, epoch, rank): augmentation repeats exactly after a resume.
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                              generator=torch.Generator().manual_seed(cfg.seed), pin_memory=on_gpu,
                              drop_last=len(sampler) > cfg.batch_size)
    has_val = len(data.val) > 0  # the same on every rank: they all join the val reduction
    val_part = dist_mod.shard_strided(data.val, ctx)
    val_loader = loader(val_part, cfg.val_batch_size, workers=cfg.workers, device=device) if len(val_part) else None
    if len(train_loader) == 0:
        raise UserError(f"the training split of {data.name} is empty", field="data")

    net: nn.Module = model
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    if cfg.compile:
        net = torch.compile(net)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, len(train_loader)))

    history: list[dict[str, Any]] = []
    start, best = 0, -math.inf
    if resume is not None:
        obj, ts, src = _read_train_state(resume, resume_source)
        try:
            model.load_state_dict(obj["state_dict"])
        except RuntimeError as exc:
            raise UserError(f"weights do not fit this model: {str(exc).splitlines()[-1][:160]}", source=src) from exc
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        if ts.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ts["scaler"])
        set_rng_state(ts["rng"], train_loader.generator)
        start, best, history = int(ts["epoch"]), float(ts["best_val_acc"]), list(ts["history"])
        _check_resume_config(ts.get("config", {}), cfg, src)
        if ts.get("steps_per_epoch", len(train_loader)) != len(train_loader):
            warnings.warn(f"{src}: steps per epoch changed ({ts['steps_per_epoch']} -> {len(train_loader)})",
                          stacklevel=2)
    out = Path(out_dir) if out_dir is not None and ctx.is_main else None
    meta = dict(ckpt_meta or {})
    check_every = 1 if not on_gpu else 32  # host syncs: every step on CPU (free), rarely on GPU

    for epoch in range(start, cfg.epochs):
        s = epoch_seed(cfg.seed, epoch, ctx.rank)  # per-rank streams; the shuffle is (seed, epoch)
        seed_all(s)
        train_loader.generator.manual_seed(s)
        sampler.set_epoch(epoch)
        net.train()
        lr0 = opt.param_groups[0]["lr"]
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
        bad = torch.zeros((), dtype=torch.bool, device=device)
        t0 = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (progress and ctx.is_main))
        last = len(train_loader) - 1
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
        if on_gpu:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        tot = dist_mod.all_reduce_sum(stats, ctx).tolist()
        seen = max(1.0, tot[2])
        elapsed = dist_mod.all_reduce_max(torch.tensor(elapsed, device=device), ctx).item()
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr0, "train_loss": tot[0] / seen,
                               "train_acc": 100.0 * tot[1] / seen, "img_per_s": tot[2] / max(elapsed, 1e-9)}
        if has_val:
            if ctx.enabled:  # BN statistics as saved by rank 0
                for b in model.buffers():
                    torch.distributed.broadcast(b, src=0)
            row["val_acc"] = _val_acc(model, val_loader, device, ctx)
        improved = "val_acc" in row and row["val_acc"] > best
        if improved:
            best = row["val_acc"]
        history.append(row)
        if out is not None:
            state = {"epoch": epoch + 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                     "rng": rng_state(train_loader.generator),
                     "sampler": {"seed": cfg.seed, "epoch": epoch + 1, "world_size": ctx.world_size},
                     "best_val_acc": best,
                     "history": [dict(r) for r in history], "config": config_dict(cfg),
                     "steps_per_epoch": len(train_loader)}
            _save(out, ["last.pt", "best.pt"] if improved else ["last.pt"], model, row, state, meta)
            write_metrics(out / "metrics.jsonl", history)
        if log and ctx.is_main:
            log(row)
    if cl:
        model.to(memory_format=torch.contiguous_format)
    return history


def _raise_nonfinite(epoch: int, step: int, out_dir: str | Path | None, history: list) -> None:
    kept = (f"last good checkpoint {Path(out_dir) / 'last.pt'} (epoch {history[-1]['epoch']}) kept"
            if out_dir is not None and history else "no checkpoint was written")
    raise NonFiniteLossError(f"training stopped: the loss became NaN/inf in epoch {epoch + 1} (by step {step + 1}); "
                             f"{kept}. Try a lower --lr, more --warmup-epochs or --no-amp", field="loss")


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    from compressor import io

    io.write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["milestones"] = list(cfg.milestones)
    return d
