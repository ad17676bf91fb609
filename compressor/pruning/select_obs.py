"""Reconstruction-aware channel selection (criterion ``obs``): keep what the least-squares refit needs.

A score criterion ranks a unit's channels by themselves (l1, rank, ...); reconstruction then
refits the consumers so their outputs match the unpruned network's. ``obs`` chooses the
channels *by that refit's error*: it removes, one channel group at a time, the channel whose
removal raises the consumers' least-squares error least, updating the solution as it goes
(the optimal-brain-surgeon step on the consumers' normal equations).

How (``select``):

* **Units, in forward order**, on a working copy of the original in which every unit already
  decided is *masked* (below): its removed channels are zero wherever they are written and
  their columns zero in every consumer, and those consumers carry their refit weights. A masked
  network computes exactly what the pruned and refit network computes, so later units are
  chosen on the inputs they will really see. ``original`` is never changed.
* **Consumers** of a unit are every Conv2d/Linear that reads its channel space, found in the
  dependency graph (``compressor.pruning.channel_space``, the same pruning group that surgery
  cuts): a conv reading the unit's output, the Linear after a flatten (``k×k`` columns per
  channel), the conv after a concat (the unit's slice), and for a residual unit every conv or
  Linear that reads the shared space. A channel's *group* is its columns in every consumer.
  Depthwise followers are part of the unit (pruned with it); the layers that read the depthwise
  output are the consumers.
* **Masking.** Once a unit is decided, its removed channels are zeroed at the output of every
  writer of its space (the producing convs, their BNs, a depthwise follower, the CIFAR ResNets'
  ``PadShortcut``), besides their consumers' columns: readers that are not Conv/Linear (a
  zero-pad shortcut carrying a residual channel into the next stage) then see what they will see
  in the pruned network; the later units are chosen and refit on the inputs it leaves.
* **Readers that cannot be refit** (``independent``, the curves of ``policy: obs``). Such a reader
  (``ChannelSpace.other_readers``: a module in the unit's pruning group that is not a Conv2d/Linear,
  e.g. ``PadShortcut``) has no weights to make up for a removed channel: channel ``j``'s removal loses
  its share ``Σx_j² / Σx²`` of the reader's input energy, added to ``j``'s cost as one more consumer's
  relative error, unchanged by the other removals. Without it a residual stream's channels look
  cheaper than they are when units compete for a budget: a copy of another stream channel costs its
  conv readers nothing, yet the shortcut carries it into the next stage. The selection at given
  counts leaves it out, because the next stage's sequential refit restores part of that loss.
  Measured on ResNet-56 on the validation split (experiments/RESULTS.md), pricing the selection
  too was level at CHIP-48's counts, 0.9 points worse at CHIP-74's and 0.1 better at policy obs's.
* **Statistics**, as ``compressor.pruning.reconstruct`` gathers them: per consumer, ``XᵀX`` and ``XᵀY``
  over ``positions`` seeded, sampled output positions per image (im2col rows, plus a ones
  column for the bias), ``X`` from the masked working network and ``Y`` the *original*
  layer's outputs (pre-BN, all output channels). Products in float32 per chunk of rows,
  summed and solved in float64.
* **Removal.** Per consumer, ``H = XᵀX + λ·I`` (``λ = ridge × mean diag``, on the weights, as
  reconstruction uses) and the refit solution ``W = H⁻¹(XᵀY + λ·W_current)``. Removing the
  group ``G`` of a channel raises consumer ``c``'s error by ``tr(W_Gᵀ (H⁻¹_GG)⁻¹ W_G)``,
  exactly, and the remaining weights' optimum is ``W − H⁻¹_{:,G} (H⁻¹_GG)⁻¹ W_G``. The cost of
  a channel is the sum over consumers of that increase divided by the consumer's ``ΣY²``
  (relative errors add, so a residual space's consumers count alike). The ``chunk`` cheapest
  channels are removed together (the joint OBS update, exact for the set), ``H⁻¹`` is
  downdated and the removed rows and columns dropped; repeat until the unit's keep count.
  ``chunk`` defaults to 1/32 of the unit's width (1 channel for widths up to 32, 16 of 512).
* **Refit.** The consumers' weights on the kept columns are solved afresh from the same
  statistics (ridge towards the current weights, as ``reconstruct`` does) and written into
  the working copy.
* **Where a consumer is not linear in the channel.** ``X`` is the consumer's own input, taken
  *after* whatever lies between the unit's producer and the consumer (BN, ReLU, pooling, a
  depthwise conv, the residual add and its ReLU). Every such per-channel operation maps
  channel ``j`` to channel ``j`` alone, so removing ``j`` removes exactly ``j``'s columns of
  ``X`` and leaves the others unchanged: the error is exact, not linearised, whatever the
  nonlinearity (a channel that BN-ReLU makes dead is free to remove even when its weights are
  large; one that BN only rescales relative to another is redundant). What is *not* exact is
  an operation that mixes channels between producer and consumer (GroupNorm/LayerNorm over
  channels, squeeze-excitation, attention): removing ``j`` then changes the other columns too,
  and the cost computed here is the first-order one that ignores it. Models with such layers
  get the selection all the same; the final refit is measured, not assumed.

``select`` returns the plan and what each unit cost; ``prune_obs`` then prunes ``original`` with
that plan (``surgery.apply``) and refits it with ``compressor.pruning.reconstruct.reconstruct`` exactly
as ``--reconstruct`` does, so the final model is made by the ordinary path.

Cost: one pass of the original over the calibration set (the consumers' targets at the
sampled positions are cached: ``rows × outputs`` floats per consumer, ~150 MiB for VGG16-BN at
512 images and 32 positions), one prefix pass of the working network per unit, and per unit
the normal equations of its consumers at full input width (``2·rows·F²`` flops, ``F`` the
consumer's input features) plus the inverse and the removal (``O(F³)``), and one trace of the
dependency graph. Works for any model the engine prunes (no per-family description is used);
a grouped (not depthwise) consumer is refused.

Measured (experiments/RESULTS.md, issue 20): VGG16-BN on the CIFAR-10 JPEG copy, 512 images, no
fine-tune, full test split: obs + reconstruct 86.69% at CHIP-58 and 84.46% at CHIP-79, against
86.51% and 83.45% for l1 + reconstruct at the same keep counts (baseline 87.86%). Selection took
610 s per rate on one thread of a 2-core machine at load 6–9 (l1: none; reconstruct: 85–140 s).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.pruning.channel_space import ChannelSpace, channel_spaces
from compressor.pruning.plan import Plan
from compressor.pruning.reconstruct import reconstruct
from compressor.pruning.reconstruct_kept import keep_from_plan
from compressor.pruning.reconstruct_rows import (
    Stop, call_order, conv_patches, conv_targets, draw_positions, iter_images, layer_seed,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitSelection:
    """One unit: what was kept, and the consumers' relative error along the way."""

    unit: str
    width: int
    kept: int
    consumers: tuple[str, ...]
    error_full: float        # summed relative error of the consumers' refit with every channel
    error_kept: float        # ... with the kept channels only (after the fresh refit)
    removal_costs: tuple[float, ...]  # summed relative (ridge-penalized) error after each removal step
    seconds: float
    removal_kept: tuple[int, ...] = ()  # channels still in after each removal step (same length)
    unrefit_readers: tuple[str, ...] = ()  # readers with no weights, priced by the energy they lose (independent)


@dataclass(frozen=True)
class ObsReport:
    units: tuple[UnitSelection, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = [asdict(u) for u in self.units]
        return d


@dataclass
class _Consumer:
    name: str
    layer: nn.Module          # in the working copy
    orig: nn.Module           # in the original
    cols: torch.Tensor        # [width, span] columns of each of the unit's channels
    alive: torch.Tensor       # bool [F] weight columns not yet removed (earlier units)
    out_hw: tuple[int, ...] = ()


def _consumer_columns(space: ChannelSpace, layers: Mapping[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """``(layer, cols[width, span])``: each reader's weight columns for each of the unit's channels.

    A conv reading input channel ``i`` has columns ``i·k² … i·k²+k²−1`` (the weight's layout); a
    Linear's columns are its input positions (``k×k`` per channel after a flatten)."""
    found = []
    for r in space.readers:
        layer = layers[r.name]
        where = torch.tensor(r.where, dtype=torch.long)  # [width, positions]
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError(f"obs: consumer {r.name} is a grouped conv (groups={layer.groups}): not supported")
            kk = layer.weight[0, 0].numel()
            cols = (where[:, :, None] * kk + torch.arange(kk)).reshape(where.shape[0], -1)
        else:
            cols = where
        if int(cols.max()) >= layer.weight[0].numel():
            raise ValueError(f"obs: {r.name} has {layer.weight[0].numel()} input columns, the graph says it reads "
                             f"column {int(cols.max())}")
        found.append((r.name, cols))
    return found


class _Mask:
    """Zeroes each decided unit's removed channels at every writer of its space, in the working copy.

    With the consumers' columns of those channels also zero, the masked network computes what the
    pruned network computes, including where a reader is neither Conv nor Linear (the CIFAR
    ResNets' ``PadShortcut`` carries a residual channel into the next stage: pruned, it carries
    nothing; masked, it carries the zero)."""

    def __init__(self, work: nn.Module) -> None:
        self.work = work
        self.zero: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def add(self, space: ChannelSpace, removed: Sequence[int]) -> None:
        for w in space.writers:
            new = torch.tensor([i for c in removed for i in w.where[c]], dtype=torch.long)
            if w.name not in self.zero:
                self.zero[w.name] = new
                self.handles.append(self.work.get_submodule(w.name).register_forward_hook(self._hook(w.name)))
            else:
                self.zero[w.name] = torch.cat([self.zero[w.name], new])

    def _hook(self, name: str):  # noqa: ANN202 - a forward hook
        # a Linear (or LayerNorm) writes its channels on the last dim (an MLP head, a channels-last block);
        # a conv and its norm on dim 1
        dim = -1 if isinstance(self.work.get_submodule(name), (nn.Linear, nn.LayerNorm)) else 1

        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> torch.Tensor:
            return out.index_fill(dim, self.zero[name].to(out.device), 0)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _capture_all(model: nn.Module, mods: Sequence[nn.Module], names: Sequence[str], x: torch.Tensor,
                 want: str) -> dict[str, torch.Tensor]:
    """Inputs (``want="input"``) or outputs of ``mods`` on ``x``; the forward stops once all are seen."""
    box: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in zip(names, mods):
        def keep(t: torch.Tensor, name: str = name) -> None:
            box.setdefault(name, t.detach())
            if len(box) == len(names):
                raise Stop
        if want == "input":
            handles.append(m.register_forward_pre_hook(lambda mod, inp, keep=keep: keep(inp[0])))
        else:
            handles.append(m.register_forward_hook(lambda mod, inp, out, keep=keep: keep(out)))
    try:
        model(x)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return box


def _target_rows(c: "_Consumer", y: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    if isinstance(c.layer, nn.Conv2d):
        return conv_targets(y, torch.arange(y.shape[1]), pos)
    return y.reshape(-1, y.shape[-1])


def _accumulate(work: nn.Module, cons: list[_Consumer], xs: Sequence[torch.Tensor],
                pos: Mapping[str, list], targets: Mapping[str, list], chunk_rows: int,
                carriers: Mapping[str, nn.Module] | None = None
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]], dict[str, torch.Tensor]]:
    """Per consumer: ``XᵀX``, ``XᵀY`` (alive columns + a ones column if biased), ``ΣY²``, rows; and per
    ``carriers`` module (a reader with no weights), the energy ``Σx²`` of each channel of its input."""
    acc: dict[str, list] = {}
    carriers = dict(carriers or {})
    energy: dict[str, torch.Tensor] = {}
    names = [c.name for c in cons] + list(carriers)
    for b, x in enumerate(xs):
        grab = _capture_all(work, [c.layer for c in cons] + list(carriers.values()), names, x, "input")
        for n in (n for n in carriers if n in grab):  # a reader the forward never reaches loses nothing
            e = grab[n].double().pow(2).transpose(0, 1).reshape(grab[n].shape[1], -1).sum(1).cpu()
            energy[n] = energy[n] + e if n in energy else e
        for c in cons:
            inp, tgt = grab[c.name], targets[c.name][b]
            if isinstance(c.layer, nn.Conv2d):
                rows = conv_patches(inp, c.layer, pos[c.name][b], c.out_hw[2])[:, 0]
            else:
                rows = inp.reshape(-1, inp.shape[-1])
            rows = rows[:, c.alive.to(rows.device)]
            if c.layer.bias is not None:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            if c.name not in acc:
                f, o = rows.shape[1], tgt.shape[1]
                acc[c.name] = [torch.zeros(f, f, dtype=torch.float64), torch.zeros(f, o, dtype=torch.float64),
                               torch.zeros((), dtype=torch.float64), 0]
            a = acc[c.name]
            for i in range(0, rows.shape[0], chunk_rows):
                r, t = rows[i:i + chunk_rows].float(), tgt[i:i + chunk_rows].float()
                a[0] += (r.T @ r).double().cpu()
                a[1] += (r.T @ t).double().cpu()
                a[2] += t.double().pow(2).sum().cpu()
            a[3] += rows.shape[0]
    return {k: (v[0], v[1], v[2], v[3]) for k, v in acc.items()}, energy


def _carried_cost(energy: Mapping[str, torch.Tensor], width: int, unit: str) -> torch.Tensor:
    """Per unit channel, the relative error its removal costs the readers that cannot be refit: its share
    ``Σx_j² / Σx²`` of each such reader's input energy, summed over them (zeros when there are none).
    A reader whose input does not hold the unit's channels one to one is left out, with a warning."""
    cost = torch.zeros(width, dtype=torch.float64)
    for n, e in energy.items():
        if e.numel() != width:
            log.warning("obs: %s reads %d channels, unit %s has %d: its loss is not priced", n, e.numel(), unit, width)
            continue
        cost += e / max(float(e.sum()), 1e-300)
    return cost


def _original_targets(original: nn.Module, plans: list[tuple[str, list["_Consumer"]]], xs: Sequence[torch.Tensor],
                      seed: int, positions: int) -> tuple[dict, dict]:
    """Sampled positions and the original's outputs there, per (unit, consumer), in one pass of ``original``."""
    pos: dict[str, dict[str, list]] = {}
    gens = {}
    layers: dict[str, nn.Module] = {}
    for ui, (unit, cons) in enumerate(plans):
        pos[unit] = {c.name: [] for c in cons}
        for j, c in enumerate(cons):
            gens[(unit, c.name)] = torch.Generator().manual_seed(layer_seed(seed, 1000 * ui + j))
            layers[c.name] = c.orig
    tg: dict[str, dict[str, list]] = {unit: {c.name: [] for c in cons} for unit, cons in plans}
    names = list(layers)
    for x in xs:
        outs = _capture_all(original, [layers[n] for n in names], names, x, "output")
        for unit, cons in plans:
            for c in cons:
                p = None
                if isinstance(c.layer, nn.Conv2d):
                    p = draw_positions(gens[(unit, c.name)], x.shape[0], int(np.prod(c.out_hw[1:])), positions)
                pos[unit][c.name].append(p)
                tg[unit][c.name].append(_target_rows(c, outs[c.name], p))
    return pos, tg


def _current(layer: nn.Module, alive: torch.Tensor) -> torch.Tensor:
    w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)[:, alive].T.cpu()
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().double().cpu()[None]], dim=0)
    return w  # [F, out]


def _ridge(xx: torch.Tensor, n_w: int, ridge: float) -> torch.Tensor:
    pen = torch.zeros(xx.shape[0], dtype=torch.float64)
    pen[:n_w] = ridge * torch.diagonal(xx)[:n_w].mean()
    return pen


#: systems up to this many features are solved on one thread: at these sizes threads only add
#: synchronisation, and on a loaded machine they cost far more than they save (ResNet-56 at load 12 on 2
#: cores: 30-47 s of removal and refit per 576-feature unit with two threads; the same algebra takes
#: under 1 s on one thread of a quiet core)
ONE_THREAD_FEATURES = 1024


@contextlib.contextmanager
def _threads_for(features: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if features <= ONE_THREAD_FEATURES and old > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _inv_spd(a: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.pinv(a, hermitian=True)


@torch.no_grad()
def _write(layer: nn.Module, alive: torch.Tensor, w: torch.Tensor) -> None:
    """``w`` [F_alive(+1), out] into the layer; columns not alive are zero."""
    full = torch.zeros(layer.weight.shape[0], layer.weight[0].numel(), dtype=torch.float64)
    n_w = int(alive.sum())
    full[:, alive] = w[:n_w].T
    layer.weight.copy_(full.reshape(layer.weight.shape).to(layer.weight))
    if layer.bias is not None:
        layer.bias.copy_(w[n_w].to(layer.bias))


def _remove(stats: list[dict], width: int, keep: int, chunk: int, start: float = 0.0,
            fixed: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """OBS removal of ``width - keep`` channels over the consumers in ``stats``; returns kept, and the cost after
    each step (the step removes ``chunk`` channels, the last one what is left above ``keep``). ``fixed``: a
    per-channel cost that no refit changes (``_carried_cost``), added to each channel's.

    ``H⁻¹`` and ``W`` keep their size: after the downdate the removed rows and columns are
    exactly zero, so nothing is copied per step; the live columns are cut out at the end."""
    alive = list(range(width))  # the unit's channels still in (indices into each stat's "blk")
    trail: list[float] = []
    total = start
    while len(alive) > keep:
        live = torch.tensor(alive)
        cost = fixed[live].clone() if fixed is not None else torch.zeros(len(alive), dtype=torch.float64)
        for s in stats:
            idx = s["blk"][live]  # [n_alive, span] local column indices
            hb = s["hinv"][idx[:, :, None], idx[:, None, :]]  # n, span, span
            wg = s["w"][idx]  # n, span, out
            sol = torch.linalg.solve(hb, wg)
            cost += (wg * sol).sum(dim=(1, 2)) / s["yy"]
        c = min(chunk, len(alive) - keep)
        pick = torch.argsort(cost, stable=True)[:c]
        chans = live[pick]
        if fixed is not None:
            total += float(fixed[chans].sum())
        for s in stats:
            cols = s["blk"][chans].reshape(-1)
            hinv, w = s["hinv"], s["w"]
            hs = hinv[:, cols].clone()  # F, S
            m = torch.linalg.solve(hs[cols], torch.cat([hs.T, w[cols]], dim=1))
            n = hinv.shape[0]
            total += float((w[cols] * m[:, n:]).sum()) / s["yy"]  # the joint removal's exact increase
            hinv.addmm_(hs, m[:, :n], alpha=-1)
            w.addmm_(hs, m[:, n:], alpha=-1)
            s["live"][cols] = False
        gone = set(chans.tolist())
        alive = [ch for ch in alive if ch not in gone]
        trail.append(total)
    for s in stats:
        idx = s["live"].nonzero().squeeze(1)
        for key in ("xx",):
            s[key] = s[key].index_select(0, idx).index_select(1, idx)
        for key in ("xy", "w0", "w"):
            s[key] = s[key].index_select(0, idx)
        s["pen"] = s["pen"][idx]
        s["hinv"] = None
    return alive, trail


def _err(s: dict) -> float:
    """Relative error of the current solution (penalty excluded)."""
    w, xx, xy = s["w"], s["xx"], s["xy"]
    sq = (w * (xx @ w)).sum() - 2 * (w * xy).sum() + s["yy_raw"]
    return max(0.0, float(sq)) / float(s["yy"])


def _solve_fresh(s: dict) -> torch.Tensor:
    a = s["xx"] + torch.diag(s["pen"])
    b = s["xy"] + s["pen"][:, None] * s["w0"]
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b).solution


def _stats_of(c: "_Consumer", acc: tuple, ridge: float, unit: str) -> dict:
    """One consumer's normal equations at its live columns, the refit solution ``W`` and ``H⁻¹``, and where
    the unit's channels sit among its columns (``blk``), as ``_remove`` reads them."""
    xx, xy, yy, _ = acc
    n_w = int(c.alive.sum())
    pen = _ridge(xx, n_w, ridge)
    w0 = _current(c.layer, c.alive)
    loc = torch.full((c.alive.numel(),), -1, dtype=torch.long)  # local column index of each live column
    loc[c.alive] = torch.arange(n_w)
    blk = loc[c.cols]
    if bool((blk < 0).any()):
        raise RuntimeError(f"obs: {c.name}: unit {unit}'s columns already removed")
    hinv = _inv_spd(xx + torch.diag(pen))
    w = hinv @ (xy + pen[:, None] * w0)
    return {"hinv": hinv, "w": w, "xx": xx, "xy": xy, "w0": w0, "pen": pen, "blk": blk,
            "yy": max(float(yy), 1e-300), "yy_raw": yy, "live": torch.ones(xx.shape[0], dtype=torch.bool)}


def _check_counts(counts: Mapping[str, int] | Plan, widths: Mapping[str, int]) -> dict[str, int]:
    if isinstance(counts, Plan):
        counts = {u: len(counts.kept(u)) for u in counts.keep}
    for u, k in counts.items():
        if u not in widths:
            raise ValueError(f"obs: {u!r} is not a prunable unit of this model")
        if not 1 <= int(k) <= widths[u]:
            raise ValueError(f"obs: {u}: keep count {k} outside [1, {widths[u]}]")
    return dict(counts)


def _consumers_of(todo: Sequence[Any], spaces: Mapping[str, Any], wl: Mapping[str, nn.Module],
                  ol: Mapping[str, nn.Module], alive: Mapping[str, torch.Tensor],
                  shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, list[_Consumer]]]:
    """Per unit, every Conv2d/Linear reading its channel space, with the columns each channel owns."""
    found_all = []
    for u in todo:
        found = _consumer_columns(spaces[u.name], wl)
        if not found:
            raise ValueError(f"obs: no Conv2d/Linear reads unit {u.name} (only "
                             f"{', '.join(spaces[u.name].other_readers) or 'nothing'})")
        found_all.append((u.name, [_Consumer(n, wl[n], ol[n], cols, alive[n], shapes.get(n, ())) for n, cols in found]))
    return found_all


def _select_unit(name: str, width: int, k: int, cons: list[_Consumer], acc: Mapping[str, Any], ridge: float,
                 chunk: float, independent: bool, alive: dict[str, torch.Tensor],
                 fixed: torch.Tensor | None = None) -> tuple[list[int], float, float, list[float], int]:
    """One unit: remove channels down to ``k`` by the consumers' error (plus ``fixed``, what readers that
    cannot be refit lose); unless ``independent``, refit and write the consumers with the removed columns
    masked. Returns (kept, error before, after, trail, step)."""
    with _threads_for(max(int(acc[c.name][0].shape[0]) for c in cons)):
        stats = [_stats_of(c, acc[c.name], ridge, name) for c in cons]
        err_full = sum(_err(s) for s in stats)
        step = max(1, math.ceil(width * chunk))
        kept, trail = _remove(stats, width, k, step, err_full, fixed)
        kept = sorted(kept)
        if independent:
            return kept, err_full, (trail[-1] if trail else 0.0), trail, step
        gone = torch.ones(width, dtype=torch.bool)
        gone[kept] = False
        err_kept = 0.0  # fixed costs price the curves (independent) only
        for c, s in zip(cons, stats):
            s["w"] = _solve_fresh(s)
            err_kept += _err(s)
            new_alive = c.alive.clone()
            new_alive[c.cols[gone].reshape(-1)] = False
            _write(c.layer, new_alive, s["w"])
            alive[c.name] = new_alive
    return kept, err_full, err_kept, trail, step


def select(original: nn.Module, counts: Mapping[str, int] | Plan, batches: Iterable, *, positions: int = 32,
           ridge: float = 1e-3, chunk: float = 1 / 32, seed: int = 0, max_images: int | None = None,
           units: Sequence[Any] | None = None, chunk_rows: int = 8192, progress: bool = True,
           independent: bool = False) -> tuple[Plan, ObsReport]:
    """Keep ``counts[unit]`` channels of each unit, chosen by the consumers' refit error (see the module doc).

    ``counts``: ``{unit: channels to keep}`` (units not named keep all) or a ``Plan`` whose kept
    counts are used. ``batches``: calibration images (tensors or ``(x, y, ...)``), iterated once.
    ``independent``: every unit on the unpruned network (nothing masked or refit between units): each
    unit's ``removal_costs`` is then its own error curve, as the ``obs`` allocation policy reads it.
    Returns the plan (for ``surgery.apply`` / ``compressor.recover(plan=...)``) and a report.
    """
    from compressor.pruning import graph

    t0 = time.perf_counter()
    units = list(units) if units is not None else graph.units(original)
    widths = {u.name: int(u.width) for u in units}
    counts = _check_counts(counts, widths)
    dev = next(original.parameters()).device
    dtype = next(original.parameters()).dtype
    was = original.training
    original.eval()
    work = copy.deepcopy(original).eval()
    mask = _Mask(work)
    lin = lambda m: {n: x for n, x in m.named_modules() if isinstance(x, (nn.Conv2d, nn.Linear))}  # noqa: E731
    wl, ol = lin(work), lin(original)
    mods = dict(work.named_modules())
    alive = {n: torch.ones(m.weight[0].numel(), dtype=torch.bool) for n, m in wl.items()}
    keep: dict[str, tuple[int, ...]] = {}
    done: list[UnitSelection] = []
    try:
        with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
            xs = list(iter_images(batches, max_images, dev, dtype))
            if not xs:
                raise ValueError("obs: the calibration batches are empty")
            _, _, shapes = call_order(work, xs[0][:2])
            todo = [u for u in units if u.name in counts and int(counts[u.name]) < widths[u.name]]
            spaces = channel_spaces(original, xs[0][:1], {u.name: widths[u.name] for u in todo})
            found_all = _consumers_of(todo, spaces, wl, ol, alive, shapes)
            t_targets = time.perf_counter()
            pos, tg = _original_targets(original, found_all, xs, seed, positions)
            log.info("obs: targets of %d consumers from one pass of the original in %.1f s",
                     sum(len(c) for _, c in found_all), time.perf_counter() - t_targets)
            for u, (_, cons0) in zip(tqdm(todo, desc="obs", unit="unit", leave=False, disable=not progress),
                                     found_all):
                tu = time.perf_counter()
                cons = [_Consumer(c.name, c.layer, c.orig, c.cols, alive[c.name].clone(), c.out_hw) for c in cons0]
                carriers = {n: mods[n] for n in spaces[u.name].other_readers if n in mods} if independent else {}
                acc, energy = _accumulate(work, cons, xs, pos[u.name], tg[u.name], chunk_rows, carriers)
                t_acc = time.perf_counter() - tu
                width, k = widths[u.name], int(counts[u.name])
                fixed = _carried_cost(energy, width, u.name) if energy else None
                kept, err_full, err_kept, trail, step = _select_unit(u.name, width, k, cons, acc, ridge, chunk,
                                                                     independent, alive, fixed)
                keep[u.name] = tuple(kept)
                if not independent:
                    mask.add(spaces[u.name], sorted(set(range(width)) - set(kept)))
                tg[u.name] = {}  # free the unit's targets
                log.info("obs: %s keeps %d of %d (consumers %s%s): relative error %.4g -> %.4g; %.1f s "
                         "(statistics %.1f s)", u.name, k, width, ",".join(c.name for c in cons),
                         "".join(f", {n} not refit" for n in carriers), err_full, err_kept,
                         time.perf_counter() - tu, t_acc)
                done.append(UnitSelection(unit=u.name, width=width, kept=k, consumers=tuple(c.name for c in cons),
                                          unrefit_readers=tuple(carriers),
                                          error_full=err_full, error_kept=err_kept, removal_costs=tuple(trail),
                                          removal_kept=tuple(max(k, width - step * (i + 1)) for i in range(len(trail))),
                                          seconds=time.perf_counter() - tu))
    finally:
        mask.close()
        original.train(was)
    plan = Plan(keep=keep, widths=widths, model=str(getattr(original, "arch", "")))
    settings = {"positions": positions, "ridge": ridge, "chunk": chunk, "seed": seed, "max_images": max_images,
                "independent": independent}
    return plan, ObsReport(units=tuple(done), settings=settings, n_images=sum(x.shape[0] for x in xs),
                           seconds=time.perf_counter() - t0)


def prune_obs(original: nn.Module, counts: Mapping[str, int] | Plan, batches: Iterable, *, refit: bool = True,
              seed: int = 0, max_images: int | None = None, progress: bool = True, **options: Any
              ) -> tuple[nn.Module, Plan, ObsReport, Any]:
    """``select``, then ``surgery.apply`` and (``refit``) ``reconstruct`` with its defaults on the same images.

    Returns ``(pruned, plan, obs_report, reconstruct_report or None)``; ``original`` is untouched.
    """
    from compressor.pruning import surgery

    xs = [b[0] if isinstance(b, (list, tuple)) else b for b in batches]
    plan, rep = select(original, counts, xs, seed=seed, max_images=max_images, progress=progress, **options)
    pruned = surgery.apply(original, plan).eval()
    rec = None
    if refit:
        example = xs[0][:1].to(next(original.parameters()).device)
        rec = reconstruct(original, pruned, xs, keep=keep_from_plan(original, plan, example), seed=seed,
                          max_images=max_images, progress=progress)
    return pruned, plan, rep, rec
