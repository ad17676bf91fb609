"""NaN/inf checks: a loss that is not finite stops a run, and weights that are not finite are never written."""

from __future__ import annotations


import torch
from torch import nn

from compressor.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss (or the weights) became NaN/inf: the run stops; the last good checkpoint stays as it was."""

    exit_code = 3


class NonFiniteWeightsError(NonFiniteLossError):
    """A model's parameters or BN statistics hold NaN/inf: it is not written anywhere. Exit code 3."""


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and floating-point buffers (BN statistics) that hold NaN or inf."""
    named = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b.is_floating_point())]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()  # one host sync
    return [n for (n, _), good in zip(named, ok.tolist()) if not good]


def check_finite(model: nn.Module, *, what: str = "model", source: str | None = None) -> None:
    """Raise ``NonFiniteWeightsError`` (exit 3) when the weights or BN statistics of ``model`` are not finite.

    Call it before writing a model (``fit`` does, before every last.pt/best.pt).
    """
    bad = nonfinite_tensors(model)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteWeightsError(f"the {what}'s weights are NaN/inf ({', '.join(bad[:3])}{more}); not written",
                                    source=source, field="weights")
