"""A per-layer latency table for latency budgets, and the check of a pruned model against it.

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
against the baseline (``latency.compare``) and reports predicted vs measured.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compressor.deploy.latency import (LatencyConfig, _hw, _sync, _time_once, compare, overlaps,
                                        paired_fraction, threads_set)

log = logging.getLogger("compressor")

GRID = (0.125, 0.25, 0.5, 0.75, 1.0)  # fractions of a conv's full width timed for the table
TIMER_VERSION = "torch-block-v1"


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
