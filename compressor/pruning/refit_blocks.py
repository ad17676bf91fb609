"""Block-wise refit after pruning: a few Adam steps per block against the unpruned block's outputs.

The layer-wise least-squares refit (``compressor.pruning.reconstruct``) matches each layer's
*pre-activation* output; what it cannot undo is the error a nonlinearity lets through and the
drift that adds up across a residual stage. This step refits whole *blocks* instead: for each
block, on calibration images, the pruned block's output is pulled towards the unpruned block's
output by gradient steps on the block's own parameters.

How (``refit_blocks``):

* **Blocks** are found from one forward of both models, never from the model's class: for every
  module whose own parameters changed shape (pruned convs, BNs, Linears), the smallest enclosing
  container (a module with children, not the model itself) that is called once per forward in
  both models and returns one tensor shaped like the original's, or shaped like it except for a
  pruned channel dimension whose kept channels are known: those of the last Conv/Linear called
  inside it, from ``keep`` (``{layer: kept_out_indices}``, ``keep_from_plan``). The target is then
  the original output on those channels. A block inside another block is covered by the outer one.
  On a CIFAR ResNet this is the residual block, with or without pruned residual widths (with
  ``keep``); on MobileNetV2 the inverted residual's branch. Changed modules inside no block (a stem
  conv, the classifier) are left to the layer-wise refit and listed in ``skipped``; only when no
  block is found at all does the whole model become the one block (the step is then a short
  distillation of the logits on the calibration images).
* **Flat stacks in segments.** A block that is an ``nn.Sequential`` with two or more Conv/Linear
  children of its own (VGG's ``features`` and ``classifier``: layers, no blocks) is refit in
  segments instead: each Conv/Linear child with the children after it up to the next one (its
  norm, activation and pooling), compared after them on the kept channels. A segment whose output
  cannot be compared is merged into the next; if the last cannot be closed the block is refit whole.
* **Order and data.** Blocks are refit in call order. A block's inputs come from the *pruned*
  network with the earlier blocks already refit (a prefix pass stops once they are captured); its
  targets are the *original* block's outputs on the same images. Both are held in memory for the
  block's steps, with about two more copies of the targets while they are gathered (ResNet-56 at
  512 CIFAR images: at most 32 MiB per block input; an ImageNet stage at 512 images: gigabytes, so
  use fewer images there).
* **Steps.** Adam on the block's floating-point parameters, minibatches drawn by a local seeded
  generator, loss ``‖out − target‖² / ‖target‖²`` (relative squared error). The block runs in eval
  mode: BN uses its running statistics, which stay as they are; dropout is off.
* **Held out.** ``holdout`` of the images (at least one) are never stepped on. The block's error
  on them is measured before and every ``steps // checks`` steps; the weights with the lowest
  held-out error are kept, so a block whose refit does not generalize is left as it was
  (``accepted=False``). With ``holdout=0`` the images stepped on choose instead.
* **Skipped** (with the reason in the report): a block that shares parameters with a module
  outside it (tied weights: refitting one user would move the other), or whose inputs do not carry
  the batch on the first dimension of each tensor (tensors inside lists or dicts included). A
  container called more than once per forward is never a block; the next enclosing one is tried.

``original`` is never changed; ``pruned`` is changed in place (its parameters only).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.pruning.reconstruct_rows import Stop, check_device, iter_images, layer_seed

__all__ = ["BlockFit", "BlockRefitReport", "find_blocks", "refit_blocks"]


@dataclass(frozen=True)
class BlockFit:
    """One block. Errors are relative squared errors ``‖out − target‖² / ‖target‖²``."""

    name: str                  # "" is the whole model
    changed: tuple[str, ...]   # the modules inside whose parameters changed shape
    params: int
    fit_images: int
    held_images: int
    steps: int
    error_before: float        # on the held-out images
    error_after: float
    fit_error_before: float    # on the images stepped on
    fit_error_after: float
    best_step: int             # 0: nothing better than the start was found
    accepted: bool
    seconds: float


@dataclass(frozen=True)
class BlockRefitReport:
    blocks: tuple[BlockFit, ...]
    skipped: tuple[tuple[str, str], ...]
    settings: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        d["skipped"] = [list(s) for s in self.skipped]
        return d

    def table(self) -> str:
        """Markdown table of the refit blocks."""
        lines = ["| block | changed modules | held-out error before | after | kept step | seconds |",
                 "|---|---|---|---|---|---|"]
        for b in self.blocks:
            mark = "" if b.accepted else " (not applied)"
            lines.append(f"| {b.name or '(model)'} | {len(b.changed)} | {b.error_before:.4g} | "
                         f"{b.error_after:.4g}{mark} | {b.best_step} | {b.seconds:.1f} |")
        return "\n".join(lines)


# --- finding the blocks ---------------------------------------------------------------------

def _trace(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, int], dict[str, tuple | None]]:
    """Modules in first-call order, their call counts and output shapes (None when not one tensor)."""
    order: list[str] = []
    calls: dict[str, int] = {}
    shapes: dict[str, tuple | None] = {}
    handles = []
    for name, m in model.named_modules():
        def pre(mod, inp, name=name):
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1

        def post(mod, inp, out, name=name):
            shapes[name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order, calls, shapes


def _changed(original: nn.Module, pruned: nn.Module) -> list[str]:
    """Modules of ``pruned`` whose own parameters or buffers differ in shape from the original's."""
    orig = dict(original.named_modules())
    out = []
    for name, m in pruned.named_modules():
        o = orig.get(name)
        mine = {k: v.shape for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
                if v is not None}
        if not mine:
            continue
        theirs = {} if o is None else {k: v.shape for k, v in list(o.named_parameters(recurse=False))
                                       + list(o.named_buffers(recurse=False)) if v is not None}
        if mine != theirs:
            out.append(name)
    return out


@dataclass(frozen=True)
class Block:
    name: str                      # "" is the whole model
    changed: list[str]             # the modules inside whose parameters changed shape
    kept: torch.Tensor | None      # the original output channels it kept (None: all of them)
    parts: tuple[str, ...] = ()    # a segment of a flat Sequential: its children, in order (else the module itself)


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` → ``["a.b.c", "a.b", "a", ""]``."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _inside(inner: str, outer: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _kept_out(name: str, order: list[str], pruned_mods: dict[str, nn.Module], width: tuple[int, int],
              keep: Mapping[str, Sequence[int]] | None) -> torch.Tensor | None:
    """The original output channels a block kept: those of the last Conv/Linear called inside it,
    when that layer's output widths (original, pruned) are the block's and ``keep`` names them."""
    last = [n for n in order if _inside(n, name) and isinstance(pruned_mods[n], (nn.Conv2d, nn.Linear))]
    if not last or keep is None or last[-1] not in keep:
        return None
    kept = torch.as_tensor(list(keep[last[-1]]), dtype=torch.long)
    layer = pruned_mods[last[-1]]
    out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    if kept.numel() != width[1] or out != width[1] or (kept.numel() and int(kept.max()) >= width[0]):
        return None
    return kept


def find_blocks(original: nn.Module, pruned: nn.Module, x: torch.Tensor,
                keep: Mapping[str, Sequence[int]] | None = None) -> tuple[list[Block], list[tuple[str, str]]]:
    """The blocks to refit, in call order, each with the changed modules it covers; and skipped names.

    ``keep`` (``{layer: kept_out_indices}``, e.g. ``plan.keep``) lets a block whose output width was
    pruned (a residual stage's) be compared on the channels it kept."""
    modes = (original.training, pruned.training)
    original.eval()
    pruned.eval()  # the trace must not move BN statistics
    try:
        with torch.no_grad():
            order_p, calls_p, shapes_p = _trace(pruned, x)
            _, calls_o, shapes_o = _trace(original, x)
    finally:
        original.train(modes[0])
        pruned.train(modes[1])
    mods = dict(pruned.named_modules())
    changed = [n for n in _changed(original, pruned) if n in calls_p]
    chosen: dict[str, tuple[list[str], torch.Tensor | None]] = {}
    skipped: list[tuple[str, str]] = []
    loose: list[str] = []
    for name in changed:
        for a in _ancestors(name)[:-1]:  # the model itself only when no block is found (below)
            if a in chosen:
                chosen[a][0].append(name)
                break
            if calls_p.get(a) != 1 or calls_o.get(a) != 1 or not any(True for _ in mods[a].children()):
                continue
            sp, so = shapes_p.get(a), shapes_o.get(a)
            if sp is None or so is None or len(sp) != len(so):
                continue
            if sp == so:
                chosen[a] = ([name], None)
                break
            if len(sp) >= 2 and sp[0] == so[0] and sp[2:] == so[2:] and sp[1] < so[1]:
                kept = _kept_out(a, order_p, mods, (so[1], sp[1]), keep)
                if kept is not None:
                    chosen[a] = ([name], kept)
                    break
        else:
            loose.append(name)
    if loose and not chosen and calls_p.get("") == 1 and shapes_p.get("") is not None \
            and shapes_p.get("") == shapes_o.get(""):
        chosen[""] = (loose, None)
    else:
        skipped += [(n, "inside no block (no enclosing module is called once with an output shaped like the "
                        "original's, or its kept channels are unknown: pass keep=)") for n in loose]
    outer = [b for b in chosen if not any(o != b and _inside(b, o) for o in chosen)]
    owners: dict[int, set[str]] = {}
    for n, m in pruned.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(n)
    for b in list(outer):
        shared = sorted({o for p in mods[b].parameters() for o in owners[id(p)] if not _inside(o, b)})
        if shared:
            outer.remove(b)
            skipped.append((b, f"shares parameters with {shared[0]}, outside the block: not refit"))
    rank = {n: i for i, n in enumerate(order_p)}
    blocks: list[Block] = []
    for b in outer:
        changed_in = sorted(n for c, (ns, _) in chosen.items() if _inside(c, b) for n in ns)
        trace = (order_p, calls_p, calls_o, shapes_p, shapes_o)
        blocks += _segments(b, mods, changed_in, trace, keep) or [Block(b, changed_in, chosen[b][1])]
    return sorted(blocks, key=lambda blk: rank[blk.parts[0] if blk.parts else blk.name]), skipped


def _segments(b: str, mods: dict[str, nn.Module], changed: list[str], trace: tuple,
              keep: Mapping[str, Sequence[int]] | None) -> list[Block] | None:
    """A flat ``nn.Sequential`` block (two or more Conv/Linear children of its own, as VGG's ``features``) in
    segments: each Conv/Linear child with the children after it up to the next one (its norm, activation,
    pooling), merged forward until the segment's output can be compared. None: not such a block, or a
    segment could not be closed (the block is then refit whole)."""
    order, calls_p, calls_o, shapes_p, shapes_o = trace
    seq = mods[b]
    if not isinstance(seq, nn.Sequential):
        return None
    kids = [f"{b}.{n}" if b else n for n, _ in seq.named_children()]
    if sum(isinstance(mods[k], (nn.Conv2d, nn.Linear)) for k in kids) < 2:
        return None
    if any(calls_p.get(k) != 1 or calls_o.get(k) != 1 for k in kids):
        return None
    linear = lambda k: isinstance(mods[k], (nn.Conv2d, nn.Linear))  # noqa: E731
    runs: list[list[str]] = []
    for k in kids:
        if not runs or (linear(k) and any(linear(r) for r in runs[-1])):
            runs.append([k])
        else:
            runs[-1].append(k)
    out: list[Block] = []
    pending: list[str] = []
    for run in runs:
        pending += run
        last = pending[-1]
        sp, so = shapes_p.get(last), shapes_o.get(last)
        if sp is None or so is None or len(sp) != len(so) or sp[0] != so[0] or sp[2:] != so[2:]:
            continue
        kept = None
        if sp[1] != so[1]:
            kept = _kept_out_of(pending, order, mods, (so[1], sp[1]), keep)
            if kept is None:
                continue
        inside = [c for c in changed if any(_inside(c, k) for k in pending)]
        if inside:
            out.append(Block(f"{pending[0]}…{last.rsplit('.', 1)[-1]}", inside, kept, tuple(pending)))
        pending = []
    return out if not pending and out else None


def _kept_out_of(parts: list[str], order: list[str], mods: dict[str, nn.Module], width: tuple[int, int],
                 keep: Mapping[str, Sequence[int]] | None) -> torch.Tensor | None:
    last = [n for n in order if any(_inside(n, k) for k in parts) and isinstance(mods[n], (nn.Conv2d, nn.Linear))]
    return _kept_out(last[-1], order, mods, width, keep) if last else None


# --- capturing a block's inputs and targets ---------------------------------------------------

def _module(model: nn.Module, name: str) -> nn.Module:
    return model if name == "" else model.get_submodule(name)


def _capture(model: nn.Module, block: nn.Module, xs: list[torch.Tensor], want: str) -> list[Any]:
    """Per batch: the block's ``(args, kwargs)`` (``want="input"``) or its output, from prefix passes."""
    got: list[Any] = []

    def pre(mod, args, kwargs):
        got.append((tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}))
        raise Stop

    def post(mod, args, out):
        got.append(out.detach())
        raise Stop

    h = (block.register_forward_pre_hook(pre, with_kwargs=True) if want == "input"
         else block.register_forward_hook(post))
    try:
        for x in xs:
            try:
                model(x)
            except Stop:
                pass
    finally:
        h.remove()
    return got


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
    return any(_has_tensor(x) for x in items)


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


class _Inputs:
    """A block's captured inputs, joined over batches: tensors along the batch, the rest as called."""

    def __init__(self, per_batch: list[tuple[tuple, dict]], sizes: list[int]) -> None:
        args0, kw0 = per_batch[0]
        self.args: list[Any] = []
        self.kwargs: dict[str, Any] = {}
        for i, a in enumerate(args0):
            self.args.append(self._join(a, [b[0][i] for b in per_batch], sizes, f"argument {i}"))
        for k, v in kw0.items():
            self.kwargs[k] = self._join(v, [b[1][k] for b in per_batch], sizes, f"argument {k!r}")

    @staticmethod
    def _join(first: Any, parts: list[Any], sizes: list[int], what: str) -> Any:
        if isinstance(first, (list, tuple, dict)) and _has_tensor(first):
            raise ValueError(f"its {what} holds tensors inside a {type(first).__name__}")
        if not isinstance(first, torch.Tensor):
            return first
        if first.dim() == 0 or any(p.shape[0] != s for p, s in zip(parts, sizes)):
            raise ValueError(f"its {what} does not carry the batch on its first dimension")
        return torch.cat(parts)

    def take(self, idx: torch.Tensor) -> tuple[list[Any], dict[str, Any]]:
        def pick(v: Any) -> Any:
            return v[idx] if isinstance(v, torch.Tensor) else v
        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


# --- the steps ------------------------------------------------------------------------------

def _rel_error(block: nn.Module, inputs: _Inputs, target: torch.Tensor, idx: torch.Tensor, batch: int) -> float:
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, idx.numel(), batch):
            j = idx[i:i + batch]
            args, kwargs = inputs.take(j)
            out = block(*args, **kwargs)
            num += (out.double() - target[j].double()).pow(2).sum().item()
            den += target[j].double().pow(2).sum().item()
    return num / max(den, 1e-300)


def _refit_one(name: str, changed: list[str], block: nn.Module, inputs: _Inputs, target: torch.Tensor,
               steps: int, lr: float, batch: int, holdout: float, checks: int, seed: int) -> BlockFit:
    t0 = time.perf_counter()
    n = target.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(target.device)
    n_held = min(n - 1, max(1, round(n * holdout))) if n > 1 and holdout > 0 else 0
    held, fit = perm[:n_held], perm[n_held:]
    params = [p for p in block.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    block.eval()
    best_state = copy.deepcopy(block.state_dict())
    held_idx = held if n_held else fit
    before = best = _rel_error(block, inputs, target, held_idx, batch)
    fit_before = _rel_error(block, inputs, target, fit, batch)
    best_step = 0
    every = max(1, steps // max(1, checks))
    opt = torch.optim.Adam(params, lr=lr)
    scale = sum(float(target[j].double().pow(2).sum()) for j in fit.split(batch)) / max(1, fit.numel())
    scale = scale / max(1, target[0].numel()) or 1.0
    try:
        for p in params:
            p.requires_grad_(True)
        for step in range(1, steps + 1):
            j = fit[torch.randint(fit.numel(), (min(batch, fit.numel()),), generator=gen).to(fit.device)]
            args, kwargs = inputs.take(j)
            with torch.enable_grad():
                loss = (block(*args, **kwargs) - target[j]).pow(2).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if step % every == 0 or step == steps:
                err = _rel_error(block, inputs, target, held_idx, batch)
                if err < best:
                    best, best_step = err, step
                    best_state = copy.deepcopy(block.state_dict())
    finally:  # the best weights seen (the starting ones unless a check found better), even after an error
        block.load_state_dict(best_state)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    return BlockFit(name=name, changed=tuple(changed), params=sum(p.numel() for p in params),
                    fit_images=int(fit.numel()), held_images=n_held, steps=steps, error_before=before,
                    error_after=best, fit_error_before=fit_before,
                    fit_error_after=_rel_error(block, inputs, target, fit, batch), best_step=best_step,
                    accepted=best_step > 0, seconds=time.perf_counter() - t0)


def refit_blocks(original: nn.Module, pruned: nn.Module, batches: Iterable, *, steps: int = 200, lr: float = 1e-3,
                 batch_size: int = 32, holdout: float = 0.125, checks: int = 10, seed: int = 0,
                 keep: Mapping[str, Sequence[int]] | None = None, max_images: int | None = None,
                 device: torch.device | str | None = None, progress: bool = True) -> BlockRefitReport:
    """Refit ``pruned``'s blocks in place so their outputs match ``original``'s on ``batches``.

    See the module docstring for the method. ``steps`` Adam steps of ``batch_size`` images per
    block at learning rate ``lr``; ``holdout`` is the fraction of images kept for choosing the
    weights, measured ``checks`` times. ``keep`` (``{layer: kept_out_indices}``, e.g. ``plan.keep``)
    lets blocks whose output width was pruned be refit on the channels they kept; without it only
    blocks with unchanged output shapes qualify (on a net with pruned residual widths, the model).
    ``device`` defaults to ``pruned``'s; both models must live there (a ValueError otherwise).
    """
    for what, v in (("steps", steps), ("batch_size", batch_size), ("checks", checks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if not lr > 0 or not 0 <= holdout < 1:
        raise ValueError(f"lr must be > 0 and holdout in [0, 1), got lr={lr!r}, holdout={holdout!r}")
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else next(pruned.parameters()).device
    check_device(dev, original=original, pruned=pruned)
    dtype = next(pruned.parameters()).dtype
    modes = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "holdout": holdout, "checks": checks,
                "seed": seed, "keep_given": keep is not None, "max_images": max_images, "device": str(dev),
                "dtype": str(dtype)}
    fits: list[BlockFit] = []
    skipped: list[tuple[str, str]] = []
    try:
        with torch.autocast(device_type=dev.type, enabled=False):
            with torch.no_grad():
                xs = list(iter_images(batches, max_images, dev, dtype))
            if not xs:
                raise ValueError("refit_blocks: the calibration batches are empty")
            blocks, skipped = find_blocks(original, pruned, xs[0][:2], keep)
            sizes = [x.shape[0] for x in xs]
            for i, blk in enumerate(tqdm(blocks, desc="block refit", unit="block", leave=False, disable=not progress)):
                name, first, last = blk.name, blk.parts[0] if blk.parts else blk.name, blk.parts[-1] if blk.parts \
                    else blk.name
                block = nn.Sequential(*[_module(pruned, p) for p in blk.parts]) if blk.parts else _module(pruned, name)
                with torch.no_grad():
                    try:
                        inputs = _Inputs(_capture(pruned, _module(pruned, first), xs, "input"), sizes)
                    except ValueError as exc:
                        skipped.append((name, str(exc)))
                        continue
                    parts = _capture(original, _module(original, last), xs, "output")
                    target = torch.cat(parts)
                    del parts
                    if blk.kept is not None:
                        target = target.index_select(1, blk.kept.to(target.device))
                fits.append(_refit_one(name, blk.changed, block, inputs, target, steps, lr, batch_size, holdout,
                                       checks, layer_seed(seed, i)))
    finally:
        original.train(modes[0])
        pruned.train(modes[1])
    return BlockRefitReport(blocks=tuple(fits), skipped=tuple(skipped), settings=settings,
                            n_images=sum(x.shape[0] for x in xs), seconds=time.perf_counter() - t_start)
