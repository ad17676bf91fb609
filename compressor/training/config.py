"""The training loop's settings (``TrainConfig``), and what they build: optimizer, lr schedule, loss."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn



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
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5  # weight of the distillation term when a teacher is given
    compile: bool = False
    deterministic: bool = False  # GPU: no cuDNN autotuning, no TF32
    val_batch_size: int = 256
    eval_every: float = 1.0  # evaluate val every this fraction of an epoch, in (0, 1] (also at every epoch end)

    def __post_init__(self) -> None:
        """Every number finite and in range (a ``ValueError`` naming the field; callers add the file)."""
        ints = {"epochs": 0, "batch_size": 1, "seed": 0, "workers": 0, "val_batch_size": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: must be an integer >= {lo}, got {v!r}")
        if self.seed > 2**32 - 1:
            raise ValueError(f"seed: must be an integer in [0, 4294967295], got {self.seed!r}")
        floats = {  # name: (low, low included, high, high included)
            "lr": (0.0, False, math.inf, False), "momentum": (0.0, True, 1.0, False),
            "weight_decay": (0.0, True, math.inf, False), "gamma": (0.0, False, math.inf, False),
            "warmup_epochs": (0.0, True, math.inf, False), "label_smoothing": (0.0, True, 1.0, False),
            "kd_temperature": (0.0, False, math.inf, False), "kd_alpha": (0.0, True, 1.0, True),
            "eval_every": (0.0, False, 1.0, True)}
        for name, (lo, lo_in, hi, hi_in) in floats.items():
            v = getattr(self, name)
            ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                  and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi))
            if not ok:
                rng = (f"> {lo:g}" if hi == math.inf and not lo_in else f">= {lo:g}" if hi == math.inf
                       else f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}")
                raise ValueError(f"{name}: must be a finite number {rng}, got {v!r}")
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in self.milestones):
            raise ValueError(f"milestones: must be integers >= 0, got {list(self.milestones)!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")


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


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["milestones"] = list(cfg.milestones)
    return d
