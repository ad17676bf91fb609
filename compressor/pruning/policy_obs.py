"""Allocation by the reconstruction's error (``policy: obs``, issue 20 part 2).

The ``local`` and ``global`` policies spend a budget by score magnitudes; ``obs`` spends it where the
consumers' least-squares refit loses least per unit of cost saved, using the errors that the ``obs``
selection computes:

1. **Curves.** Each unit, on the *unpruned* network, is taken down to ``min_keep`` by the selection's
   optimal-brain-surgeon removal (``select_obs.select(..., independent=True)``): after every removal step
   (``chunk`` of its width) the summed relative error of its consumers' refit is recorded, with what its
   readers that cannot be refit lose (a zero-pad shortcut: the removed channels' energy share; the
   selection at given counts leaves that out, see ``select_obs``). One statistics pass per unit, as
   the selection itself makes.
2. **Greedy.** Starting from full width, repeatedly take the one next step, over all units, whose error
   increase per fraction of the budgeted cost saved (MACs and/or params, counted by the size model on
   the whole network, so a cut's effect on its consumers is included) is smallest, until the budget is
   met; the step that crosses it is taken only as far as needed (channel by channel).
3. The keep counts are then selected and refit in forward order by ``obs`` as usual.

The errors are relative to each consumer's output energy, so they add across units the same way the
selection adds a residual space's consumers. Units read by grouped convs keep their width here (the
selection refuses grouped consumers), and ``round_to`` is refused: the curves move by ``chunk``.
Cost: about one more selection pass (the curves) on top of the selection of the final counts.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from compressor.errors import UserError


def curves(model: nn.Module, batches: Iterable, units: Sequence[Any], min_keep: float, *, seed: int = 0,
           chunk: float = 1 / 32, progress: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Per unit, ``[(kept, summed relative error), ...]`` from full width down to ``min_keep``."""
    from compressor.pruning.select_obs import select

    floor = {u.name: max(1, math.ceil(min_keep * u.width - 1e-9)) for u in units}
    _, rep = select(model, floor, batches, seed=seed, chunk=chunk, units=units, progress=progress, independent=True)
    out: dict[str, list[tuple[int, float]]] = {}
    for us in rep.units:
        out[us.unit] = [(us.width, us.error_full), *zip(us.removal_kept, us.removal_costs)]
    return out


def allocate(curve: Mapping[str, list[tuple[int, float]]], widths: Mapping[str, int],
             count: Callable[[Mapping[str, int]], Mapping[str, int]], target: Mapping[str, float]) -> dict[str, int]:
    """Keep counts meeting ``target`` (fractions of ``count({})`` kept) by the greedy of the module doc."""
    base = count({})
    keys = [k for k in target if k in ("macs", "params")]
    if not keys:
        raise UserError("policy obs needs a MACs or params target (e.g. target: {macs: 0.5})", field="target")

    def cost(keep: Mapping[str, int]) -> float:
        c = count(keep)
        return sum(c[k] / base[k] for k in keys)

    def met(keep: Mapping[str, int]) -> bool:
        c = count(keep)
        return all(c[k] / base[k] <= float(target[k]) + 1e-12 for k in keys)

    keep = dict(widths)
    at = {u: 0 for u in curve}
    while not met(keep):
        now = cost(keep)
        best: tuple[float, str] | None = None
        for u, pts in curve.items():
            i = at[u]
            if i + 1 >= len(pts):
                continue
            saved = now - cost({**keep, u: pts[i + 1][0]})
            if saved <= 0:
                continue
            ratio = max(pts[i + 1][1] - pts[i][1], 0.0) / saved
            if best is None or ratio < best[0]:
                best = (ratio, u)
        if best is None:
            c = count(keep)
            raise UserError("target " + ", ".join(f"{k} {target[k]}" for k in keys) + " is out of reach for policy "
                            "obs: with every unit at min_keep the model keeps "
                            + ", ".join(f"{k} {c[k] / base[k]:.4f}" for k in keys), field="target")
        u = best[1]
        lo, hi = curve[u][at[u] + 1][0], keep[u]
        if met({**keep, u: lo}):  # the crossing step: only as many channels as the budget needs
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if met({**keep, u: mid}):
                    lo = mid
                else:
                    hi = mid - 1
            keep[u] = lo
            break
        keep[u] = lo
        at[u] += 1
    return {u: k for u, k in keep.items() if k < widths[u]}
