"""Layer-wise least-squares reconstruction after pruning (no gradient step).

Surgery copies the surviving filters exactly, but a layer that *consumes* pruned channels has
lost part of its input, so its output drifts from the unpruned network's and the drift
compounds with depth. Refitting each such layer by ridge-regularized linear least squares,
so that on a few hundred calibration images its output matches the unpruned layer's output
for the channels it kept, recovers most of the accuracy in seconds.

How (``reconstruct``):

* **Layers.** ``nn.Conv2d`` and ``nn.Linear`` modules are matched by module name between the
  unpruned and the pruned model (torch-pruning surgery and the cfg rebuild keep names).
  Model classes are never inspected. By default a layer is refit when its input width
  shrank (it consumes pruned channels); ``layers="all"`` refits every matched layer, and a
  collection of names refits exactly those.
* **Order.** Forward call order, found with pre-hooks on one forward of the pruned model.
  Inputs ``X`` come from the *pruned* network with the earlier layers already refit; targets
  ``Y`` are the *original* layer's outputs (pre-BN, bias included) on the same images,
  restricted to the output channels the pruned layer kept.
* **Kept output channels.** Taken from ``keep`` (``{layer: kept_out_indices}``, e.g.
  ``keep_from_plan(model, plan)``) where given. Otherwise all of them when the output widths
  match, else *inferred by exact weight matching*: transplanted rows are bit-identical copies
  of original rows restricted to the kept input columns, and surgery keeps their order. The
  column subset is found on the first row, then every row is matched by its bytes (bias
  too). Two original rows with identical weights and bias have identical outputs, so any
  remaining ambiguity does not change the target. Inference needs the transplanted weights:
  run it before any other change to ``pruned`` (or pass ``keep``). A layer whose channels
  cannot be inferred is skipped, with the reason in the report.
* **Solve.** Convs by im2col at ``positions`` seeded, subsampled output positions per image
  (all positions when the map is smaller), gathered directly from the padded input (the same
  columns ``F.unfold`` gives, without materializing all of them); Linear layers directly,
  one row per sample. ``XᵀX``, ``XᵀY`` and ``ΣY²`` are accumulated in float64 over batches
  (rows in chunks of ``row_chunk``), so memory is flat in the number of images. A ones
  column refits the bias when the layer has one. The penalty ``λ = ridge × mean diag(XᵀX)``
  (weights only, not the bias) pulls towards the current, transplanted weights by default
  (``ridge_to="current"``), or towards zero. With ``"current"`` the refit can never raise
  the calibration error (the old weights are a feasible point of the penalized objective);
  in any case a refit that would raise it is not applied (``accepted=False``). Cholesky,
  falling back to ``lstsq`` when the matrix is not positive definite.
* **Groups.** Grouped and depthwise convs are solved per group (each group is its own small
  regression over its own input channels), so they need no special case.
* **Cost.** One pass of the original network records the targets at the sampled positions
  for all refit layers, up to ``cache_mib`` MiB (layers that do not fit get a prefix pass of
  the original per batch instead). Then, per refit layer, one *prefix* pass of the pruned
  network: a hook stops the forward with an exception once the layer's input is captured.
  So the cost is at most one forward of the calibration set per layer, plus the solves.
* **Numerics.** Forward passes in the models' own dtype and device, outside autocast; sums
  and solves in float64; refit weights are cast back. Positions come from a local
  ``torch.Generator``: the global RNG is never advanced.
* **BN.** ``bn="keep"`` leaves BN running statistics as they are (the targets are pre-BN, so
  the original statistics fit the refit outputs); ``bn="recalibrate"`` re-estimates them
  afterwards with ``compressor.training.evaluation.recalibrate_bn`` on the same batches.

Measured (``experiments/recovery/RESULTS_recovery.md``): VGG16-BN at CHIP-58, l1, 512 images,
these defaults: 10.0% after surgery, 74.2% with BN re-estimation only, 86.5% reconstructed (test
split, baseline 87.9%), in 21 s on 2 idle CPU cores. Ridge towards zero gave the same accuracy;
re-estimating BN after reconstruction cost 0.7 points, hence ``bn="keep"`` by default.

Layout: the regression's rows (calibration images, prefix passes, sampled positions, im2col)
are in ``compressor.pruning.reconstruct_rows``, shared with ``select_obs``; which output channels
each layer kept (``keep_from_plan``, ``infer_kept``) in ``compressor.pruning.reconstruct_kept``;
this module holds the normal equations, the solve and the driver.

``original`` is never mutated; ``pruned`` is refit in place (only its Conv/Linear weights and
biases, and its BN statistics with ``bn="recalibrate"``). ``batches`` is iterated once (tensors
or ``(x, y, ...)`` tuples); its images are held in memory for the per-layer passes, which is
small at calibration sizes (512 CIFAR images: 6 MiB; 512 ImageNet images: 300 MiB).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.pruning.reconstruct_kept import infer_kept, keep_from_plan
from compressor.pruning.reconstruct_rows import (
    Stop, call_order, capture, check_device, conv_patches, conv_targets, draw_positions, iter_images, layer_seed,
    linear_layers, linear_targets,
)

__all__ = ["LayerFit", "ReconstructReport", "reconstruct", "infer_kept", "keep_from_plan", "conv_patches",
           "layer_seed"]

LAYER_MODES = ("shrunk", "all")
RIDGE_TO = ("current", "zero")
BN_MODES = ("keep", "recalibrate")


@dataclass(frozen=True)
class LayerFit:
    """One refit layer. Errors are relative: ``‖XW − Y‖² / ‖Y‖²`` on the calibration rows."""

    name: str
    kind: str  # "conv" or "linear"
    groups: int
    in_width: tuple[int, int]  # (original, pruned)
    out_kept: int
    kept_from: str  # "all", "given" or "inferred"
    rows: int
    features: int  # per group, bias column included
    error_before: float
    error_after: float
    ridge_lambda: float  # mean over groups
    solver: str  # "cholesky" or "lstsq"
    accepted: bool
    seconds: float


@dataclass(frozen=True)
class ReconstructReport:
    layers: tuple[LayerFit, ...]
    skipped: tuple[tuple[str, str], ...]  # (layer, why)
    settings: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0
    target_cache: str = ""
    bn_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(f) for f in self.layers]
        d["skipped"] = [list(s) for s in self.skipped]
        return d

    def table(self) -> str:
        """Markdown table of the refit layers."""
        lines = ["| layer | groups | in (orig→pruned) | out kept | rows | error before | error after | solver |",
                 "|---|---|---|---|---|---|---|---|"]
        for f in self.layers:
            mark = "" if f.accepted else " (not applied)"
            lines.append(f"| {f.name} | {f.groups} | {f.in_width[0]}→{f.in_width[1]} | {f.out_kept} | {f.rows} | "
                         f"{f.error_before:.4g} | {f.error_after:.4g}{mark} | {f.solver} |")
        return "\n".join(lines)


@dataclass
class _Layer:
    name: str
    orig: nn.Module
    new: nn.Module
    kept: torch.Tensor  # original output indices, one per pruned output channel
    kept_from: str
    out_hw: tuple[int, ...] = ()


# --- small helpers --------------------------------------------------------------------------


def _in_width(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _out_width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _geometry_mismatch(a: nn.Module, b: nn.Module) -> str | None:
    if type(a) is not type(b):
        return f"module types differ ({type(a).__name__} vs {type(b).__name__})"
    if (a.bias is None) != (b.bias is None):
        return "one has a bias, the other not"
    if isinstance(a, nn.Conv2d):
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            if getattr(a, attr) != getattr(b, attr):
                return f"{attr} differs"
        if isinstance(b.padding, str) and b.padding != "valid":
            return f"padding={b.padding!r} is not supported (explicit padding only)"
        if b.padding_mode != "zeros":
            return f"padding_mode={b.padding_mode!r} is not supported"
    return None


# --- accumulation and solve -----------------------------------------------------------------

class _Normal:
    """Running ``XᵀX``, ``XᵀY`` and ``ΣY²`` per group, in float64."""

    def __init__(self, groups: int, feats: int, outs: int, bias: bool, device: torch.device, chunk: int) -> None:
        f = feats + int(bias)
        self.xx = torch.zeros(groups, f, f, dtype=torch.float64, device=device)
        self.xy = torch.zeros(groups, f, outs, dtype=torch.float64, device=device)
        self.yy = torch.zeros(groups, dtype=torch.float64, device=device)
        self.bias, self.chunk, self.rows = bias, chunk, 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x``: [R, g, F]; ``y``: [R, g, out/g]."""
        for i in range(0, x.shape[0], self.chunk):
            xc = x[i:i + self.chunk].double()
            yc = y[i:i + self.chunk].double()
            if self.bias:
                xc = torch.cat([xc, xc.new_ones(xc.shape[0], xc.shape[1], 1)], dim=2)
            xg, yg = xc.transpose(0, 1), yc.transpose(0, 1)  # g, R, F
            self.xx += xg.transpose(1, 2) @ xg
            self.xy += xg.transpose(1, 2) @ yg
            self.yy += yg.pow(2).sum(dim=(1, 2))
        self.rows += x.shape[0]

    def error(self, w: torch.Tensor) -> float:
        """Relative ``Σ‖XW − Y‖² / Σ‖Y‖²`` from the sums (w: [g, F(+1), out/g])."""
        sq = (w * (self.xx @ w)).sum() - 2 * (w * self.xy).sum() + self.yy.sum()
        return max(0.0, sq.item()) / max(self.yy.sum().item(), 1e-300)


def _solve(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, str]:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info.max()) == 0:
        return torch.cholesky_solve(b, chol), "cholesky"
    return torch.linalg.lstsq(a.cpu(), b.cpu()).solution.to(a.device), "lstsq"


def _current(layer: nn.Module) -> torch.Tensor:
    """The layer's weights in the regression layout [g, F(+1), out/g], float64."""
    g = getattr(layer, "groups", 1)
    w = layer.weight.detach().double()
    out = w.shape[0]
    w = w.reshape(g, out // g, -1).transpose(1, 2)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().double().reshape(g, 1, out // g)], dim=1)
    return w


@torch.no_grad()
def _write(layer: nn.Module, w: torch.Tensor) -> None:
    out = layer.weight.shape[0]
    feats = layer.weight[0].numel()
    weight = w[:, :feats].transpose(1, 2).reshape(layer.weight.shape)
    layer.weight.copy_(weight.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(w[:, feats].reshape(out).to(layer.bias.dtype))


def _fit(normal: _Normal, layer: nn.Module, ridge: float, ridge_to: str) -> tuple[torch.Tensor, float, str]:
    w0 = _current(layer)
    feats = layer.weight[0].numel()
    diag = torch.diagonal(normal.xx, dim1=1, dim2=2)[:, :feats]
    lam = ridge * diag.mean(dim=1)  # per group
    pen = torch.zeros_like(normal.xx[0, 0])
    pen[:feats] = 1.0
    a = normal.xx + lam[:, None, None] * torch.diag(pen)[None]
    b = normal.xy + (lam[:, None, None] * pen[None, :, None] * w0 if ridge_to == "current" else 0.0)
    w, solver = _solve(a, b)
    return w, lam.mean().item(), solver


# --- the driver -----------------------------------------------------------------------------

def _select(original: nn.Module, pruned: nn.Module, order: list[str], twice: set[str],
            shapes: Mapping[str, tuple[int, ...]], layers: str | Collection[str],
            keep: Mapping[str, Sequence[int]] | None) -> tuple[list[_Layer], list[tuple[str, str]]]:
    """The layers to refit (in call order) with their kept output channels, and the skipped ones."""
    orig_layers, new_layers = linear_layers(original), linear_layers(pruned)
    named = None if isinstance(layers, str) else set(layers)
    todo, skipped = [], []
    for name in order:
        new = new_layers[name]
        orig = orig_layers.get(name)
        shrunk = orig is not None and _in_width(new) < _in_width(orig)
        if named is not None and name not in named:
            continue
        if named is None and layers == "shrunk" and not shrunk:
            continue
        why = None
        if orig is None:
            why = "no layer of that name in the original model"
        elif name in twice:
            why = "called more than once per forward (shared module)"
        else:
            why = _geometry_mismatch(orig, new)
        if why is None and _in_width(new) > _in_width(orig):
            why = "input wider than the original's"
        if why is None and _out_width(new) > _out_width(orig):
            why = "more outputs than the original"
        if why is not None:
            skipped.append((name, why))
            continue
        if keep is not None and name in keep:
            kept, src = torch.tensor(list(keep[name]), dtype=torch.long), "given"
            if kept.numel() != _out_width(new) or (kept.numel() and int(kept.max()) >= _out_width(orig)):
                raise ValueError(f"keep[{name!r}] has {kept.numel()} indices for {_out_width(new)} outputs "
                                 f"(of {_out_width(orig)})")
        elif _out_width(new) == _out_width(orig):
            kept, src = torch.arange(_out_width(new)), "all"
        else:
            kept, src = infer_kept(orig, new), "inferred"
            if kept is None:
                skipped.append((name, "kept output channels could not be inferred from the weights "
                                      "(already refit?); pass keep={layer: indices}"))
                continue
        todo.append(_Layer(name, orig, new, kept, src, shapes[name]))
    if named is not None:
        for name in sorted(named - set(order)):
            skipped.append((name, "not a Conv2d/Linear called in the pruned model's forward"))
    return todo, skipped


class _Targets:
    """Original outputs at the sampled rows, cached for all layers in one pass within a byte budget."""

    def __init__(self, original: nn.Module, todo: list[_Layer], budget: int) -> None:
        self.original, self.todo, self.budget = original, todo, budget
        self.cache: dict[str, list[torch.Tensor]] = {}

    def fill(self, xs: Sequence[torch.Tensor], pos: "_PosTable") -> None:
        """One pass of the original over ``xs``; a layer whose rows overflow the budget is dropped."""
        self.pos, self.used, self.batch = pos, 0, 0
        self.cache = {l.name: [] for l in self.todo}
        last = self.todo[-1].name
        handles = [l.orig.register_forward_hook(self._hook(l, l.name == last)) for l in self.todo]
        try:
            for self.batch, x in enumerate(xs):
                if not self.cache:
                    break
                try:
                    self.original(x)
                except Stop:
                    pass
        finally:
            for h in handles:
                h.remove()

    def _hook(self, l: _Layer, stop: bool):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            if l.name in self.cache:
                t = self.rows(l, out.detach(), self.batch)
                size = t.numel() * t.element_size()
                if self.used + size > self.budget:  # this layer falls back to prefix passes
                    self.used -= sum(c.numel() * c.element_size() for c in self.cache.pop(l.name))
                else:
                    self.used += size
                    self.cache[l.name].append(t)
            if stop:
                raise Stop
        return hook

    def rows(self, l: _Layer, y: torch.Tensor, b: int) -> torch.Tensor:
        if tuple(y.shape[2:]) != tuple(l.out_hw[1:]):
            raise RuntimeError(f"{l.name}: the original's output is {tuple(y.shape[1:])}, the pruned one's "
                               f"{l.out_hw}: the spatial sizes must agree")
        if isinstance(l.new, nn.Conv2d):
            return conv_targets(y, l.kept, self.pos.get(l, b, y.shape[0]))
        return linear_targets(y, l.kept)

    def get(self, l: _Layer, b: int, x: torch.Tensor) -> torch.Tensor:
        if l.name in self.cache:
            return self.cache[l.name][b]
        return self.rows(l, capture(self.original, l.orig, x, "output"), b)

    def describe(self) -> str:
        n = sum(c.numel() * c.element_size() for v in self.cache.values() for c in v)
        miss = [l.name for l in self.todo if l.name not in self.cache]
        s = f"{len(self.cache)} layers cached in one pass ({n / 2**20:.1f} MiB of {self.budget / 2**20:.0f} MiB)"
        return s + (f"; prefix passes of the original for {', '.join(miss)}" if miss else "")


class _PosTable:
    """Seeded sampled positions per (layer, batch), drawn once and reused by targets and inputs."""

    def __init__(self, todo: list[_Layer], seed: int, per_image: int) -> None:
        self.gens = {l.name: torch.Generator().manual_seed(layer_seed(seed, i)) for i, l in enumerate(todo)}
        self.per_image = per_image
        self.table: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, l: _Layer, b: int, n: int) -> torch.Tensor:
        key = (l.name, b)
        if key not in self.table:
            hw = int(np.prod(l.out_hw[1:]))
            self.table[key] = draw_positions(self.gens[l.name], n, hw, self.per_image)
        return self.table[key]


def _refit_layer(pruned: nn.Module, l: _Layer, xs: list[torch.Tensor], targets: _Targets, pos: _PosTable,
                 ridge: float, ridge_to: str, chunk: int) -> LayerFit:
    t0 = time.perf_counter()
    new = l.new
    conv = isinstance(new, nn.Conv2d)
    g = new.groups if conv else 1
    feats = new.weight[0].numel()
    normal = _Normal(g, feats, new.weight.shape[0] // g, new.bias is not None, xs[0].device, chunk)
    for b, x in enumerate(xs):
        inp = capture(pruned, new, x, "input")
        if conv:
            rows = conv_patches(inp, new, pos.get(l, b, x.shape[0]), l.out_hw[2])
        else:
            rows = inp.reshape(-1, inp.shape[-1])[:, None, :]
        y = targets.get(l, b, x)
        normal.add(rows, y.reshape(y.shape[0], g, -1))
    w0 = _current(new)
    before = normal.error(w0)
    w, lam, solver = _fit(normal, new, ridge, ridge_to)
    after = normal.error(w)
    accepted = bool(np.isfinite(after) and after <= before)
    if accepted:
        _write(new, w)
    else:
        after = before
    return LayerFit(name=l.name, kind="conv" if conv else "linear", groups=g,
                    in_width=(_in_width(l.orig), _in_width(new)), out_kept=int(l.kept.numel()),
                    kept_from=l.kept_from, rows=normal.rows, features=normal.xx.shape[-1],
                    error_before=before, error_after=after, ridge_lambda=lam, solver=solver,
                    accepted=accepted, seconds=time.perf_counter() - t0)


def reconstruct(original: nn.Module, pruned: nn.Module, batches: Iterable, *,
                keep: Mapping[str, Sequence[int]] | None = None, layers: str | Collection[str] = "shrunk",
                positions: int = 128, ridge: float = 1e-3, ridge_to: str = "current", seed: int = 0,
                max_images: int | None = None, device: torch.device | str | None = None, bn: str = "keep",
                bn_images: int = 512, cache_mib: float = 512, row_chunk: int = 8192,
                progress: bool = True) -> ReconstructReport:
    """Refit ``pruned``'s layers in place so their outputs match ``original``'s on ``batches``.

    See the module docstring for the method. ``device`` defaults to ``pruned``'s; both models
    must live there (a ValueError otherwise). Returns what was done, per layer, with the settings.
    """
    if isinstance(layers, str) and layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES} or a collection of names, got {layers!r}")
    if ridge_to not in RIDGE_TO or bn not in BN_MODES:
        raise ValueError(f"ridge_to must be one of {RIDGE_TO} and bn one of {BN_MODES}")
    if ridge < 0 or positions < 1 or row_chunk < 1:
        raise ValueError("ridge >= 0, positions >= 1 and row_chunk >= 1 are required")
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else next(pruned.parameters()).device
    check_device(dev, original=original, pruned=pruned)
    modes = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    settings = {"layers": layers if isinstance(layers, str) else sorted(layers), "positions": positions,
                "ridge": ridge, "ridge_to": ridge_to, "seed": seed, "max_images": max_images, "bn": bn,
                "cache_mib": cache_mib, "row_chunk": row_chunk, "keep_given": keep is not None,
                "device": str(dev), "dtype": str(next(pruned.parameters()).dtype)}
    try:
        with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
            xs = list(iter_images(batches, max_images, dev, next(pruned.parameters()).dtype))
            if not xs:
                raise ValueError("reconstruct: the calibration batches are empty")
            order, twice, shapes = call_order(pruned, xs[0][:2])
            todo, skipped = _select(original, pruned, order, twice, shapes, layers, keep)
            pos = _PosTable(todo, seed, positions)
            targets = _Targets(original, todo, int(cache_mib * 2**20))
            fits: list[LayerFit] = []
            if todo:
                targets.fill(xs, pos)
                for l in tqdm(todo, desc="reconstruct", unit="layer", leave=False, disable=not progress):
                    fits.append(_refit_layer(pruned, l, xs, targets, pos, ridge, ridge_to, row_chunk))
        bn_seen = 0
        if bn == "recalibrate":
            from compressor.training.evaluation import recalibrate_bn

            bn_seen = recalibrate_bn(pruned, [(x,) for x in xs], dev, max_images=bn_images)
    finally:
        original.train(modes[0])
        pruned.train(modes[1])
    return ReconstructReport(layers=tuple(fits), skipped=tuple(skipped), settings=settings,
                             n_images=sum(x.shape[0] for x in xs),
                             target_cache=targets.describe() if todo else "no layer to refit",
                             bn_images=bn_seen, seconds=time.perf_counter() - t_start)
