"""Measured inference latency, and a per-layer latency table for latency budgets.

**Timing** (``compare``/``measure``): median and interquartile range (IQR) of repeated runs after
warm-up. Models compared with each other are timed *interleaved* (one run of each, then the next
round: ABAB…), so drift on a shared machine hits every model alike. Each figure records the thread
count, the memory format and the ``torch.backends`` settings that change CPU speed (mkldnn on/off),
because CPU latency depends on them more than on anything else. On CUDA each run is timed with CUDA
events after a synchronize, not with the host clock around asynchronous launches. Two medians whose
IQRs overlap are not a measured difference: ``overlaps`` says so and the report flags it.

**Latency table** (``LatencyTable``): a latency budget (``target: {latency: 0.5}``) needs the latency
of the model at widths it has never been built at. Each conv (with its BN and activation, as the model
runs them) is timed alone at a grid of input × output widths and interpolated bilinearly; conv time is
close to ``c_in · c_out``, which bilinear interpolation reproduces exactly, while the measured grid points
capture what MACs miss (vector widths, memory-bound small layers). Linear layers are timed the same way.
Interpolation smooths the steps of CPU kernels that work on blocks of 8 or 16 channels; the solver's
closed loop (``policy._refine_latency``) times the candidate models themselves. The model's latency is predicted as
the sum over convs plus a measured constant for everything else (pooling, linear, adds). Timings are
cached on disk (``$COMPRESSOR_CACHE`` or ``~/.cache/compressor``, then ``latency/``), keyed by device,
thread count, torch version, batch size, memory format, the timer, and the layer's shape and input size.
The timer is injectable, so tests use a stub with known costs; ``verify`` times the real pruned model
against the baseline and reports predicted vs measured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger("compressor")

GRID = (0.125, 0.25, 0.5, 0.75, 1.0)  # fractions of a conv's full width timed for the table
TIMER_VERSION = "torch-block-v1"


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


# ============================================================================ the latency table
@dataclass(frozen=True)
class ConvShape:
    """One conv as the model runs it: enough to rebuild and time it alone (with its BN/activation)."""

    c_in: int
    c_out: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    hw: tuple[int, int]  # input height, width (a Linear: rows per sample, 1)
    bias: bool = False
    bn: bool = False
    act: str | None = None  # class name of the activation that follows, if any
    linear: bool = False  # an nn.Linear (c_in → c_out features; kernel, stride, padding are 1/1/0)

    def __post_init__(self) -> None:
        if self.c_in < 1 or self.c_out < 1 or self.groups < 1 or self.c_in % self.groups or self.c_out % self.groups:
            raise ValueError(f"bad conv shape {self}")

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.c_in == self.c_out

    def at(self, c_in: int, c_out: int) -> ConvShape:
        """The same conv at other widths (a depthwise conv keeps groups = channels)."""
        groups = c_in if self.depthwise else self.groups
        return replace(self, c_in=c_in, c_out=c_out, groups=groups)

    def key(self) -> str:
        k, s, p, d = (f"{a}x{b}" for a, b in (self.kernel, self.stride, self.padding, self.dilation))
        head = "fc" if self.linear else ""
        return (f"{head}c{self.c_in}-{self.c_out}g{self.groups}k{k}s{s}p{p}d{d}hw{self.hw[0]}x{self.hw[1]}"
                f"{'b' if self.bias else ''}{'+bn' if self.bn else ''}{'+' + self.act if self.act else ''}")


def _hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    return (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))


def input_for(model: nn.Module, input_size: int | Sequence[int], batch: int = 1, device: Any = None) -> torch.Tensor:
    """A random input of ``batch`` images for ``model`` (its ``in_channels``, default 3; int or (H, W) size)."""
    h, w = _hw(input_size)
    return torch.randn(batch, int(getattr(model, "in_channels", 3)), h, w, device=device)


def conv_shapes(model: nn.Module, input_size: int | Sequence[int] | None = None) -> dict[str, ConvShape]:
    """Every Conv2d's shape in one forward pass of the model as built (works on the ``meta`` device).

    The BN and activation that run right after a conv (in call order) are recorded with it. The walk
    is ``pruning.size.layer_calls``, the one ``SizeModel`` reads; for shapes at other widths without
    building the model, use ``SizeModel.conv_shapes``.
    """
    from compressor.pruning.size import conv_shape, layer_calls

    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    size = input_size if input_size is not None else getattr(model, "input_size")
    h, w = _hw(size)
    x = torch.zeros(1, int(getattr(model, "in_channels", 3)), h, w, device=dev)
    calls = layer_calls(model, x)
    out: dict[str, ConvShape] = {}
    for i, c in enumerate(calls):
        if isinstance(c.module, nn.Conv2d) and c.name not in out and len(c.in_shape) == 4:
            out[c.name] = conv_shape(c, calls, i)
    return out


@dataclass(frozen=True)
class MeasureSettings:
    """Where and how the table's timings are taken (part of the cache key)."""

    batch_size: int = 1
    threads: int = 1
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 7
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.threads < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"bad measure settings {self}")

    def env_key(self, timer_id: str) -> str:
        fmt = "cl" if self.channels_last else "contig"
        return f"{self.device}_{self.threads}t_torch{torch.__version__}_b{self.batch_size}_{fmt}_{timer_id}"


Timer = Callable[[ConvShape, MeasureSettings], float]


def block_for(shape: ConvShape) -> nn.Module:
    """The conv (+BN, +activation) a shape describes, with random weights (a Linear alone)."""
    if shape.linear:
        return nn.Sequential(nn.Linear(shape.c_in, shape.c_out, bias=shape.bias)).eval()
    layers: list[nn.Module] = [nn.Conv2d(shape.c_in, shape.c_out, shape.kernel, shape.stride, shape.padding,
                                         shape.dilation, shape.groups, bias=shape.bias)]
    if shape.bn:
        layers.append(nn.BatchNorm2d(shape.c_out))
    if shape.act:
        layers.append(getattr(nn, shape.act)())
    return nn.Sequential(*layers).eval()


@torch.inference_mode()
def torch_timer(shape: ConvShape, s: MeasureSettings) -> float:
    """Median milliseconds of the block at the settings' batch size (threads set by the caller)."""
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    if shape.linear:
        block = block_for(shape).to(s.device)
        rows = (s.batch_size,) if shape.hw[0] <= 1 else (s.batch_size, shape.hw[0])
        x = torch.randn(*rows, shape.c_in, device=s.device)
    else:
        block = block_for(shape).to(s.device).to(memory_format=fmt)
        x = torch.randn(s.batch_size, shape.c_in, *shape.hw, device=s.device).contiguous(memory_format=fmt)
    for _ in range(s.warmup):
        block(x)
    _sync(s.device)
    return statistics.median(_time_once(lambda: block(x), s.device) for _ in range(s.repeats))


def cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "compressor") / "latency"


class TimingCache:
    """Measured milliseconds per layer shape, one JSON file per measurement environment."""

    def __init__(self, settings: MeasureSettings, timer_id: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = cache_dir() / (re.sub(r"[^A-Za-z0-9._+-]+", "_", settings.env_key(timer_id)) + ".json")
        self.data: dict[str, float] = {}
        self.hits = self.misses = 0
        if enabled and self.path.is_file():
            try:
                doc = json.loads(self.path.read_text())
                self.data = {k: float(v) for k, v in doc.get("ms", {}).items()}
            except (OSError, ValueError, TypeError, AttributeError):
                log.warning("latency cache %s is unreadable; it is measured again", self.path)

    def get(self, shape: ConvShape, timer: Timer, settings: MeasureSettings) -> float:
        k = shape.key()
        if k in self.data:
            self.hits += 1
            return self.data[k]
        self.misses += 1
        self.data[k] = float(timer(shape, settings))
        return self.data[k]

    def save(self) -> None:
        if not self.enabled or not self.misses:
            return
        from compressor.storage import io

        try:
            io.write_json(self.path, {"env": self.path.stem, "ms": self.data})
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs time
            log.warning("latency cache not written (%s)", exc)


def _segment(xs: Sequence[int], x: float) -> tuple[int, float]:
    """Index i and weight t with x = (1−t)·xs[i] + t·xs[i+1]; linear extrapolation outside."""
    if len(xs) == 1:
        return 0, 0.0
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass
class _Grid:
    shape: ConvShape  # at full width
    ins: list[int]
    outs: list[int]
    ms: np.ndarray  # [len(ins), len(outs)], made monotone non-decreasing along both axes

    def __call__(self, c_in: int, c_out: int) -> float:
        if self.shape.depthwise:  # one axis: channels
            i, t = _segment(self.outs, c_out)
            row = self.ms[0]
            return max(0.0, float(row[i] * (1 - t) + (row[i + 1] * t if len(self.outs) > 1 else 0.0)))
        i, ti = _segment(self.ins, c_in)
        j, tj = _segment(self.outs, c_out)
        m = self.ms

        def at(a: int, b: int) -> float:
            return float(m[min(a, m.shape[0] - 1), min(b, m.shape[1] - 1)])

        v = ((1 - ti) * (1 - tj) * at(i, j) + ti * (1 - tj) * at(i + 1, j) + (1 - ti) * tj * at(i, j + 1)
             + ti * tj * at(i + 1, j + 1))
        return max(0.0, v)


def _axis(full: int, varies: bool, step: int, grid: Sequence[float]) -> list[int]:
    if not varies:
        return [full]
    vals = {min(full, max(step, step * round(f * full / step))) for f in grid}
    return sorted(vals | {full})


class LatencyTable:
    """Predicted latency of a model at any unit widths, from per-conv timings (see the module doc).

    ``shapes_at(keep)`` gives every conv's shape with units at ``keep`` widths (``keep`` lists every
    unit). ``timer`` measures one shape (default ``torch_timer``); ``overhead_ms`` is the constant part
    of the model (pooling, linear, adds), measured by the caller (``fit_overhead``), 0 by default.
    """

    def __init__(self, shapes_at: Callable[[Mapping[str, int]], Mapping[str, ConvShape]], widths: Mapping[str, int],
                 settings: MeasureSettings, *, timer: Timer | None = None, timer_id: str | None = None,
                 cache: bool = True, grid: Sequence[float] = GRID, overhead_ms: float = 0.0) -> None:
        self.widths = dict(widths)
        self.settings = settings
        self.shapes_at = shapes_at
        self.timer = timer or torch_timer
        tid = timer_id or (TIMER_VERSION if timer is None else getattr(timer, "__qualname__", "custom"))
        self.cache = TimingCache(settings, tid, enabled=cache)
        self.overhead_ms = overhead_ms
        full = dict(shapes_at(self.widths))
        probe = dict(shapes_at({u: max(1, w // 2) for u, w in self.widths.items()}))
        self.grids: dict[str, _Grid] = {}
        t0 = time.perf_counter()
        with threads_set(settings.threads):
            for name, sh in full.items():
                ph = probe.get(name, sh)
                if sh.depthwise:
                    outs = _axis(sh.c_out, ph.c_out != sh.c_out, 1, grid)
                    ms = np.array([[self.cache.get(sh.at(c, c), self.timer, settings) for c in outs]])
                    self.grids[name] = _Grid(sh, outs, outs, np.maximum.accumulate(ms, axis=1))
                    continue
                ins = _axis(sh.c_in, ph.c_in != sh.c_in, sh.groups, grid)
                outs = _axis(sh.c_out, ph.c_out != sh.c_out, sh.groups, grid)
                ms = np.array([[self.cache.get(sh.at(a, b), self.timer, settings) for b in outs] for a in ins])
                ms = np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)
                self.grids[name] = _Grid(sh, ins, outs, ms)
        self.cache.save()
        self.build_s = time.perf_counter() - t0
        self.full_ms = self.predict(self.widths)

    def layer_ms(self, keep: Mapping[str, int]) -> dict[str, float]:
        shapes = self.shapes_at({**self.widths, **keep})
        out = {}
        for name, sh in shapes.items():
            g = self.grids.get(name)
            if g is None:  # a conv the full model did not have: time it directly
                out[name] = self.cache.get(sh, self.timer, self.settings)
            else:
                out[name] = g(sh.c_in, sh.c_out)
        return out

    def predict(self, keep: Mapping[str, int]) -> float:
        """Predicted milliseconds per forward pass at ``keep`` widths."""
        return self.overhead_ms + sum(self.layer_ms(keep).values())

    def fraction(self, keep: Mapping[str, int]) -> float:
        return self.predict(keep) / self.full_ms if self.full_ms > 0 else 1.0

    def fit_overhead(self, model_ms: float) -> None:
        """Set the constant part from the whole model's measured time (never negative)."""
        convs = sum(self.layer_ms(self.widths).values())
        self.overhead_ms = max(0.0, model_ms - convs)
        self.full_ms = self.predict(self.widths)

    def info(self) -> dict[str, Any]:
        return {**asdict(self.settings), "torch": torch.__version__, "overhead_ms": self.overhead_ms,
                "predicted_full_ms": self.full_ms, "convs": len(self.grids), "cache": str(self.cache.path),
                "cache_hits": self.cache.hits, "cache_misses": self.cache.misses, "build_s": self.build_s}


# ============================================================================ verification
def verify(base: nn.Module, pruned: nn.Module, predicted_fraction: float, settings: MeasureSettings,
           input_size: int | Sequence[int] | None = None, repeats: int = 15, warmup: int = 3) -> dict[str, Any]:
    """Time the pruned model against its baseline (interleaved) and compare with the prediction.

    Call it after surgery; ``predicted_fraction`` is ``spec.extra["resolved"]["achieved"]["latency"]``
    (``verify_spec`` reads it for you: the table's fraction, or with the real timer the solver's fit to
    the candidates it timed). Returns the figures and a one-line ``line`` to print. Copies
    are timed, so the caller's models stay where they are (device, mode, memory format).
    """
    import copy

    size = input_size or getattr(base, "input_size")
    base, pruned = copy.deepcopy(base), copy.deepcopy(pruned)
    cfg = LatencyConfig(batch_sizes=(settings.batch_size,), warmup=warmup, repeats=repeats, threads=settings.threads,
                        cuda=False, channels_last=settings.channels_last)
    res = compare({"base": base, "pruned": pruned}, size, cfg, settings.device)
    tb, tp = res["base"][settings.batch_size], res["pruned"][settings.batch_size]
    measured = paired_fraction(tp, tb)
    out = {"predicted_fraction": predicted_fraction, "measured_fraction": measured,
           "median_ratio": tp.median_ms / tb.median_ms,
           "relative_error": measured / predicted_fraction - 1.0 if predicted_fraction > 0 else math.nan,
           "base": tb.to_dict(), "pruned": tp.to_dict(), "iqr_overlap": overlaps(tb, tp), **asdict(settings)}
    out["line"] = (f"latency ({settings.device}, batch {settings.batch_size}, {tb.threads} thread(s)): predicted "
                   f"{predicted_fraction:.3f} of the baseline, measured {measured:.3f} "
                   f"(median per-round ratio; medians {tb.median_ms:.2f} → {tp.median_ms:.2f} ms, "
                   f"±IQR/2 {tb.iqr_ms / 2:.2f}/{tp.iqr_ms / 2:.2f} ms; error {out['relative_error']:+.1%})"
                   + (" — IQRs overlap" if out["iqr_overlap"] else ""))
    return out


def verify_spec(base: nn.Module, pruned: nn.Module, spec: Any, **kw: Any) -> dict[str, Any] | None:
    """``verify`` for a resolved spec with a latency budget; None when it has none."""
    r = (getattr(spec, "extra", None) or {}).get("resolved") or {}
    lat = r.get("latency")
    if not lat:
        return None
    s = MeasureSettings(batch_size=lat["batch_size"], threads=lat["threads"], device=lat["device"],
                        channels_last=bool(lat.get("channels_last", False)))
    ach = r["achieved"]
    out = verify(base, pruned, ach["latency"], s, **kw)  # what the solver promised (table, or its timed fit)
    if "latency_predicted" in ach:
        out["table_fraction"] = ach["latency_predicted"]
        out["solver_measured_fraction"] = lat["measured_fraction"]
        out["line"] += (f"; the prediction is the solver's fit to timed copies, the per-conv table alone said "
                        f"{ach['latency_predicted']:.3f}")
    return out
