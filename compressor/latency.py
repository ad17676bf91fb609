"""Measured inference latency: median of repeated timed runs after warm-up.

Models compared with each other are timed *interleaved* (round-robin: one run of each model,
then the next round), so drift on a shared machine (other jobs, clock changes) hits every
model alike instead of whichever happened to be timed last. The thread count is recorded
with every figure, because CPU latency depends on it more than on anything else.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyConfig:
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None  # None: torch's current setting
    cuda: bool = True  # also time on CUDA when a GPU is present

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or any(b < 1 for b in self.batch_sizes):
            raise ValueError("warmup >= 0, repeats >= 1 and batch sizes >= 1 are required")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")


@dataclass(frozen=True)
class Timing:
    device: str
    batch: int
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def devices(cfg: LatencyConfig) -> list[str]:
    return ["cpu"] + (["cuda"] if cfg.cuda and torch.cuda.is_available() else [])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def compare(models: Mapping[str, nn.Module], input_size: int | Mapping[str, int], cfg: LatencyConfig = LatencyConfig(),
            device: str = "cpu") -> dict[str, dict[int, Timing]]:
    """Time every model at every batch size on one device, interleaved; ``{name: {batch: Timing}}``.

    The caller's models themselves are used, not copies: each is moved to ``device`` in eval mode
    for the timing, and afterwards is on the CPU again in its own train/eval mode (a model that
    came on a GPU comes back on the CPU).
    """
    sizes = {n: (input_size[n] if isinstance(input_size, Mapping) else input_size) for n in models}
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    out: dict[str, dict[int, Timing]] = {n: {} for n in models}
    placed: dict[str, tuple[nn.Module, bool]] = {}
    try:
        for n, m in models.items():
            was = m.training
            placed[n] = (m, was)
            m.eval().to(device)
        for batch in cfg.batch_sizes:
            xs = {n: torch.randn(batch, 3, sizes[n], sizes[n], device=device) for n in models}
            for n, (m, _) in placed.items():
                for _ in range(cfg.warmup):
                    m(xs[n])
                _sync(device)
            times: dict[str, list[float]] = {n: [] for n in models}
            for _ in range(cfg.repeats):
                for n, (m, _) in placed.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    m(xs[n])
                    _sync(device)
                    times[n].append((time.perf_counter() - t0) * 1e3)
            for n, ts in times.items():
                out[n][batch] = Timing(device=device, batch=batch, median_ms=statistics.median(ts), min_ms=min(ts),
                                       max_ms=max(ts), repeats=cfg.repeats, warmup=cfg.warmup, threads=threads)
    finally:
        for m, was in placed.values():
            m.to("cpu").train(was)
        torch.set_num_threads(old_threads)
    return out


def measure(model: nn.Module, input_size: int, cfg: LatencyConfig = LatencyConfig(),
            device: str = "cpu") -> dict[int, Timing]:
    """One model alone: ``{batch: Timing}``."""
    return compare({"m": model}, input_size, cfg, device)["m"]
