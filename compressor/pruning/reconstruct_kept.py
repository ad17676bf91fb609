"""Which output channels of the original each pruned layer kept (the reconstruction's targets).

``keep_from_plan`` reads them off a ``Plan`` and the dependency graph; ``infer_kept`` recovers them
from transplanted weights alone (bit-identical rows, see ``compressor.pruning.reconstruct``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def _rows_as_bytes(w: torch.Tensor) -> list[bytes]:
    a = np.ascontiguousarray(w.detach().cpu().reshape(w.shape[0], -1).numpy())
    return [a[i].tobytes() for i in range(a.shape[0])]


def _column_subset(w_orig: torch.Tensor, row: torch.Tensor) -> list[int] | None:
    """Input columns ``S`` (ascending) such that some original row restricted to ``S`` equals ``row``.

    ``w_orig`` is [C_out, C_in, K], ``row`` is [C_in', K]. Greedy subsequence matching of
    column "tokens" (k×k slices) by bytes; candidates are the rows containing ``row``'s first token.
    """
    first = row[0]
    cand = torch.nonzero((w_orig == first).all(-1).any(-1)).flatten().tolist()
    want = _rows_as_bytes(row)
    for i in cand:
        tokens = _rows_as_bytes(w_orig[i])
        cols, s = [], 0
        for tok in want:
            while s < len(tokens) and tokens[s] != tok:
                s += 1
            if s == len(tokens):
                break
            cols.append(s)
            s += 1
        if len(cols) == len(want):
            return cols
    return None


def infer_kept(orig: nn.Module, new: nn.Module) -> torch.Tensor | None:
    """Original output indices of ``new``'s rows by exact weight matching (None: no consistent match).

    Valid only on transplanted (not yet refit) weights; see the module docstring.
    """
    wo, wn = orig.weight.detach(), new.weight.detach()
    wo3, wn3 = wo.reshape(wo.shape[0], wo.shape[1], -1), wn.reshape(wn.shape[0], wn.shape[1], -1)
    if wo3.shape[1] == wn3.shape[1]:
        cols = list(range(wo3.shape[1]))
    else:
        found = _column_subset(wo3, wn3[0])
        if found is None:
            return None
        cols = found
    ref = wo3[:, cols]
    keys_o = _rows_as_bytes(ref if orig.bias is None else torch.cat([ref.flatten(1), orig.bias.detach()[:, None]], 1))
    keys_n = _rows_as_bytes(wn3 if new.bias is None else torch.cat([wn3.flatten(1), new.bias.detach()[:, None]], 1))
    where: dict[bytes, list[int]] = {}
    for i, k in enumerate(keys_o):
        where.setdefault(k, []).append(i)
    kept, prev = [], -1
    for k in keys_n:
        nxt = [i for i in where.get(k, ()) if i > prev]
        if not nxt:
            return None
        prev = nxt[0]
        kept.append(prev)
    return torch.tensor(kept, dtype=torch.long)


def keep_from_plan(model: nn.Module, plan: Any, example: torch.Tensor | None = None) -> dict[str, tuple[int, ...]]:
    """``{layer: kept_out_indices}`` for ``reconstruct(keep=...)`` from a ``Plan`` of ``model``.

    Every Conv2d/Linear whose output channels are a unit's (its producing conv, a depthwise
    follower, every member of a residual group) gets that unit's kept channels, in its own output
    positions: read off the dependency graph (``compressor.pruning.channel_space``), so it works
    for any model the engine prunes. ``example``: one input (default: from ``model.input_size``).
    """
    from compressor.pruning import graph
    from compressor.pruning.channel_space import channel_spaces, layer_writers

    units = {u: int(w) for u, w in plan.widths.items() if u in plan.keep}
    if not units:
        return {}
    example = example if example is not None else graph.example_input(model)
    out: dict[str, tuple[int, ...]] = {}
    for unit, space in channel_spaces(model, example[:1], units).items():
        kept = plan.kept(unit)
        for w in layer_writers(model, space):
            out[w.name] = tuple(sorted(i for c in kept for i in w.where[c]))
    return out
