"""The one training loop: baselines, fine-tuning after pruning, the demo's short runs.

Readable on purpose (nanoGPT style). Selection uses the validation split only; the test
split is never looked at here.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compressor.data import DataBundle, loader
from compressor.evaluate import evaluate

SCHEDULES = ("cosine", "multistep", "onecycle", "constant")


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

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs >= 0, batch_size >= 1 and lr > 0 are required")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")


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


def fit(model: nn.Module, data: DataBundle, cfg: TrainConfig, device: torch.device | str = "cpu",
        progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train in place; return one metrics row per epoch (lr, train loss/acc, val acc, img/s)."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    on_gpu = device.type == "cuda"
    if on_gpu and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = on_gpu and cfg.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    train_loader = loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.workers,
                          device=device, drop_last=len(data.train) > cfg.batch_size)
    val_loader = loader(data.val, 256, workers=cfg.workers, device=device) if len(data.val) else None
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, len(train_loader)))
    history: list[dict[str, Any]] = []
    for epoch in range(cfg.epochs):
        model.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not progress)
        for x, y in bar:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if on_gpu and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                out = model(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            n = y.numel()
            seen += n
            loss_sum += loss.item() * n
            correct += (out.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(1, seen),
               "train_acc": 100.0 * correct / max(1, seen), "img_per_s": seen / max(elapsed, 1e-9)}
        if val_loader is not None:
            row["val_acc"] = evaluate(model, val_loader, device)["top1"]
        history.append(row)
        if log:
            log(row)
    if on_gpu and cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return history


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["milestones"] = list(cfg.milestones)
    return d
