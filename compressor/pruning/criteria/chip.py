"""CHIP: channel independence (Sui et al., NeurIPS 2021).

For one image, a layer's output is a C×HW matrix A (rows = channels). The independence of
channel c is how much the nuclear norm drops when its row is zeroed::

    CI(c) = ||A||_* − ||M_c ⊙ A||_*

averaged over images. A channel that is (close to) a linear combination of the others
loses little when removed and scores low; higher = keep.

Computation, exact and batched (no Python loop over channels or images): the nuclear norm
is the sum of square roots of the eigenvalues of a Gram matrix, so with d = min(C, HW):

* C ≤ HW: K = AAᵀ (C×C); zeroing row c of A zeroes row and column c of K.
* C > HW: G = AᵀA (HW×HW); removing row c is the rank-1 downdate G − a_c a_cᵀ.

Each image then needs C batched ``eigvalsh`` of d×d matrices (instead of C SVDs of C×HW),
in float64 so that small singular values are not lost to squaring. Work is chunked to
bound memory and, on CPU, spread over threads like HRank's SVDs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from compressor.pruning.capture import Accumulator
from compressor.pruning.criteria.base import AccumulatorCriterion, register_criterion
from compressor.pruning.criteria.hrank import _pool

#: float64 elements per chunk of masked Gram matrices (128 MiB)
MAX_ELEMS = 1 << 24


def _nuclear_from_gram(m: torch.Tensor) -> torch.Tensor:
    """Σ sqrt(eigenvalues) of symmetric PSD matrices [..., d, d].

    Eigenvalues below ``d · eps64 · λ_max`` are rounding noise of a (numerically) singular
    Gram matrix and are set to 0; otherwise each would add ~1e-8·σ_max to the norm.
    """
    workers = min(torch.get_num_threads(), os.cpu_count() or 1)
    flat = m.reshape(-1, *m.shape[-2:])
    if flat.device.type == "cpu" and workers > 1 and flat.shape[0] > 1:
        ev = torch.cat(list(_pool(workers).map(torch.linalg.eigvalsh, flat.chunk(workers))))
    else:
        ev = torch.linalg.eigvalsh(flat)
    tol = ev[..., -1:].clamp_min(0) * (ev.shape[-1] * torch.finfo(torch.float64).eps)
    return torch.where(ev > tol, ev, torch.zeros_like(ev)).sqrt().sum(-1).reshape(m.shape[:-2])


def channel_independence(act: torch.Tensor, max_elems: int = MAX_ELEMS) -> torch.Tensor:
    """CI of every channel of every image: ``act`` [B, C, H, W] -> [B, C] (float64)."""
    with torch.autocast(device_type=act.device.type, enabled=False):
        a = act.detach().double().flatten(2)  # B, C, N
        b, c, n = a.shape
        rows = c <= n
        gram = a @ a.transpose(1, 2) if rows else a.transpose(1, 2) @ a  # B, d, d
        d = gram.shape[-1]
        full = _nuclear_from_gram(gram)  # B
        out = torch.empty(b, c, dtype=torch.float64, device=a.device)
        per_channel = d * d
        step_c = max(1, min(c, max_elems // per_channel))
        step_b = max(1, max_elems // (per_channel * step_c))
        for i in range(0, b, step_b):
            g = gram[i:i + step_b]
            for j in range(0, c, step_c):
                idx = torch.arange(j, min(c, j + step_c), device=a.device)
                if rows:
                    m = g[:, None].expand(-1, len(idx), -1, -1).clone()
                    k = torch.arange(len(idx), device=a.device)
                    m[:, k, idx, :] = 0.0
                    m[:, k, :, idx] = 0.0
                else:
                    v = a[i:i + step_b, idx]  # b', k, N
                    m = g[:, None] - v[..., :, None] * v[..., None, :]
                out[i:i + step_b, j:j + len(idx)] = full[i:i + step_b, None] - _nuclear_from_gram(m)
        return out


class ChipAccumulator(Accumulator):
    name = "chip"

    def batch_stat(self, act: torch.Tensor) -> torch.Tensor:
        return channel_independence(act)


@register_criterion
class CHIP(AccumulatorCriterion):
    name = "chip"

    def accumulator(self) -> Accumulator:
        return ChipAccumulator()

    def settings(self) -> dict[str, Any]:
        return {"score": "nuclear-norm drop when the channel's row is zeroed, mean over images",
                "method": "eigvalsh of the min(C,HW) Gram matrix, float64"}

