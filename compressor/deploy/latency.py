"""Measured inference latency: models timed side by side.

**Timing** (``compare``/``measure``): median and interquartile range (IQR) of repeated runs after
warm-up. Models compared with each other are timed *interleaved* (one run of each, then the next
round: ABAB…), so drift on a shared machine hits every model alike. Each figure records the thread
count, the memory format and the ``torch.backends`` settings that change CPU speed (mkldnn on/off),
because CPU latency depends on them more than on anything else. On CUDA each run is timed with CUDA
events after a synchronize, not with the host clock around asynchronous launches. Two medians whose
IQRs overlap are not a measured difference: ``overlaps`` says so and the report flags it.

The per-layer table that latency budgets are solved with, and the check of a pruned model against
its prediction, are ``latency_table``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger("compressor")



@dataclass(frozen=True)
class LatencyConfig:
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None  # None: torch's current setting
    cuda: bool = True  # also time on CUDA when a GPU is present
    channels_last: bool = False  # time models and inputs in channels_last memory format

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
    q1_ms: float = math.nan
    q3_ms: float = math.nan
    channels_last: bool = False
    backends: dict[str, Any] = field(default_factory=dict)
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)  # in timing order (not saved)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        out = {**asdict(self), "iqr_ms": self.iqr_ms}
        out.pop("samples_ms")
        return out


def paired_fraction(num: Timing, den: Timing) -> float:
    """Median over rounds of ``num``'s time ÷ ``den``'s in the same round (models timed interleaved).

    Two runs timed back to back share the machine's load, so on a shared machine the per-round ratio
    is steadier than the ratio of two medians (which it equals on a quiet one). Without samples: the
    ratio of the medians.
    """
    if num.samples_ms and len(num.samples_ms) == len(den.samples_ms):
        return statistics.median(a / b for a, b in zip(num.samples_ms, den.samples_ms) if b > 0)
    return num.median_ms / den.median_ms


def overlaps(a: Timing, b: Timing) -> bool:
    """Whether the interquartile ranges of two timings overlap (their difference is not established)."""
    return a.q1_ms <= b.q3_ms and b.q1_ms <= a.q3_ms


def backend_settings() -> dict[str, Any]:
    """The global switches that change how fast the same model runs."""
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "mkldnn_available": bool(torch.backends.mkldnn.is_available()),
    }
    if torch.cuda.is_available():
        out.update(cudnn_enabled=bool(torch.backends.cudnn.enabled),
                   cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                   tf32_conv=bool(torch.backends.cudnn.allow_tf32), cuda_device=torch.cuda.get_device_name(0))
    return out


def devices(cfg: LatencyConfig) -> list[str]:
    return ["cpu"] + (["cuda"] if cfg.cuda and torch.cuda.is_available() else [])


def quartiles(ts: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); with one sample all three are that sample."""
    if len(ts) < 2:
        return ts[0], ts[0], ts[0]
    q1, q2, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return q1, q2, q3


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call: CUDA events on a GPU, the host clock on the CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def threads_set(n: int | None) -> Iterator[int]:
    """Run with ``n`` intra-op threads (None: as is); restore afterwards."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def compare(models: Mapping[str, nn.Module], input_size: int | Sequence[int] | Mapping[str, Any],
            cfg: LatencyConfig = LatencyConfig(), device: str = "cpu") -> dict[str, dict[int, Timing]]:
    """Time every model at every batch size on one device, interleaved; ``{name: {batch: Timing}}``.

    The caller's models themselves are used, not copies: each is moved to ``device`` in eval mode
    (and channels_last if asked) for the timing, and afterwards is on the CPU again, contiguous, in
    its own train/eval mode (a model that came on a GPU comes back on the CPU).
    """
    sizes = {n: (input_size[n] if isinstance(input_size, Mapping) else input_size) for n in models}
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    out: dict[str, dict[int, Timing]] = {n: {} for n in models}
    placed: dict[str, tuple[nn.Module, bool]] = {}
    with threads_set(cfg.threads) as threads:
        backends = backend_settings()
        try:
            for n, m in models.items():
                placed[n] = (m, m.training)
                m.eval().to(device).to(memory_format=fmt)
            for batch in cfg.batch_sizes:
                xs = {n: input_for(models[n], sizes[n], batch, device).contiguous(memory_format=fmt)
                      for n in models}
                for n, (m, _) in placed.items():
                    for _ in range(cfg.warmup):
                        m(xs[n])
                    _sync(device)
                times: dict[str, list[float]] = {n: [] for n in models}
                for _ in range(cfg.repeats):
                    for n, (m, _) in placed.items():
                        times[n].append(_time_once(lambda m=m, x=xs[n]: m(x), device))
                for n, ts in times.items():
                    q1, med, q3 = quartiles(ts)
                    out[n][batch] = Timing(device=device, batch=batch, median_ms=med, min_ms=min(ts), max_ms=max(ts),
                                           repeats=cfg.repeats, warmup=cfg.warmup, threads=threads, q1_ms=q1,
                                           q3_ms=q3, channels_last=cfg.channels_last, backends=backends,
                                           samples_ms=tuple(ts))
        finally:
            for m, was in placed.values():
                m.to("cpu").to(memory_format=torch.contiguous_format).train(was)
    return out


def measure(model: nn.Module, input_size: int | Sequence[int], cfg: LatencyConfig = LatencyConfig(),
            device: str = "cpu") -> dict[int, Timing]:
    """One model alone: ``{batch: Timing}``."""
    return compare({"m": model}, input_size, cfg, device)["m"]

def _hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    return (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))


def input_for(model: nn.Module, input_size: int | Sequence[int], batch: int = 1, device: Any = None) -> torch.Tensor:
    """A random input of ``batch`` images for ``model`` (its ``in_channels``, default 3; int or (H, W) size)."""
    h, w = _hw(input_size)
    return torch.randn(batch, int(getattr(model, "in_channels", 3)), h, w, device=device)
