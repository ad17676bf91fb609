"""A command's data: the typed ``--data``/``--data-root``/``--mean``/``--std``, else the model's contract."""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from torch import nn


def load(args: argparse.Namespace, model: nn.Module | None, *, ck: Mapping[str, Any] | None = None,
         source: str | None = None, input_size: Any = None, val_size: int | None = None,
         probe: bool = False) -> Any:
    """The bundle for ``model`` (its contract picks and checks the data); a model without a contract
    gets the one made from this data, so what it is trained or pruned on travels with it. Prints
    the data line on stdout (``describe.data_line``: dataset, root, splits, input size, mean/std and their source)."""
    from compressor.data import contract, describe

    bundle, made = contract.load_data(
        model, getattr(args, "data", None), getattr(args, "data_root", None), input_size=input_size,
        seed=getattr(args, "seed", 0), val_size=val_size, download=getattr(args, "download", False),
        mean=getattr(args, "mean", None), std=getattr(args, "std", None),
        recorded=(ck or {}).get("provenance") if ck else None, source=source, check_classes=not probe)
    if model is not None:
        contract.attach(model, made)
    bundle.notes["data_line"] = describe.data_line(bundle, made)
    if not getattr(args, "json", False):  # --json: the line is the result's "data_line" (stdout stays JSON)
        print(bundle.notes["data_line"], flush=True)
    return bundle
