"""Compute criterion scores in one shared pass, and read/write the scores file.

The scores file (``torch.save`` of plain data, loads with ``weights_only=True``) is keyed by
unit (layer) name and records what produced it: criterion and its settings, number of
images, seed, input size, rank-point mode and a checksum of the model's weights.
HRank's per-layer ``rank_conv{k}.npy`` files (k = 1-based convcfg position) import and export.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compressor.pruning.graph import units as units_of
from compressor.pruning import criteria
from compressor.storage import io
from compressor.pruning.capture import MeanActivation, limit_images, record
from compressor.errors import UserError

SCORES_FORMAT = "compressor.pruning.scores"
SCORES_VERSION = 1


def model_checksum(model: nn.Module) -> str:
    """sha256 over the state_dict (names, shapes and bytes), for provenance checks."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Scores:
    """Per-criterion, per-unit scores plus the tie-break and provenance."""

    scores: dict[str, dict[str, torch.Tensor]]
    tiebreak: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def for_criterion(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.scores:
            raise UserError(f"scores file has no {name!r} scores (it has: {', '.join(self.scores)})", field="criterion")
        return self.scores[name]

    def save(self, path: str | Path) -> Path:
        doc = {
            "format": SCORES_FORMAT,
            "version": SCORES_VERSION,
            "scores": {c: {u: t.clone() for u, t in s.items()} for c, s in self.scores.items()},
            "tiebreak": {u: t.clone() for u, t in self.tiebreak.items()},
            "meta": self.meta,
        }
        return io.save_torch(path, doc)

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        src = str(path)
        if not Path(path).is_file():
            raise UserError("scores file not found", source=src)
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
            raise UserError(f"not a readable scores file ({type(exc).__name__})", source=src) from exc
        if not isinstance(doc, dict) or doc.get("format") != SCORES_FORMAT:
            raise UserError(f"not a compressor scores file (format must be {SCORES_FORMAT!r})", source=src, field="format")
        return cls(scores=doc["scores"], tiebreak=doc.get("tiebreak", {}), meta=doc.get("meta", {}))

    def check_model(self, model: nn.Module, source: str = "<scores>") -> None:
        """Refuse scores made for another architecture, cfg or checkpoint (weights checksum)."""
        arch = self.meta.get("model")
        if arch and arch != model.arch:
            raise UserError(f"scores are for model {arch!r}, not {model.arch!r}", source=source, field="meta.model")
        widths = {u.name: u.width for u in units_of(model)}
        for crit, per_unit in self.scores.items():
            for unit, t in per_unit.items():
                if unit not in widths:
                    raise UserError(f"unit {unit!r} is not in {model.arch}", source=source, field=f"scores.{crit}")
                if t.numel() != widths[unit]:
                    raise UserError(f"{unit} has {t.numel()} scores, the model has {widths[unit]} channels",
                                    source=source, field=f"scores.{crit}.{unit}")
        made_on = self.meta.get("model_checksum")
        here = model_checksum(model) if made_on else None
        if made_on and made_on != here:
            raise UserError(f"scores were computed on other weights (checksum {made_on}, this checkpoint {here}); "
                            "re-run `rank` on this checkpoint", source=source, field="meta.model_checksum")


def compute(
    model: nn.Module,
    loader: Iterable,
    criterion_names: Sequence[str],
    *,
    n_images: int,
    seed: int,
    compat: bool = False,
    device: torch.device | str = "cpu",
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
    extra_meta: Mapping[str, Any] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Scores:
    """Score every unit by each criterion; activation criteria share one forward pass.

    ``reduce`` sums a tensor over processes (``distributed.compute_scores``): each process
    feeds its shard of the images, then the accumulators' sums are combined before scoring.
    """
    units = units_of(model)
    crits = [criteria.get(n, **{"seed": seed, **dict(options or {})}) for n in criterion_names]
    accs = {c.name: c.accumulator() for c in crits}
    mean_act = MeanActivation()
    active = [a for a in accs.values() if a is not None]
    seen = 0
    if any(c.kind != "weight" for c in crits):
        active.append(mean_act)
        record(model, limit_images(loader, n_images), units, active, compat=compat, device=device,
               total=n_images, progress=progress)
        if reduce is not None:
            for acc in active:  # a process without batches still takes part in the reduction
                for u in units:
                    if not compat or u.compat_rank_points:
                        acc.sums.setdefault(u.name, torch.zeros(u.width, dtype=torch.float64, device=device))
                acc.all_reduce(reduce)
        seen = mean_act.count
        if seen < n_images:
            raise UserError(f"asked for {n_images} calibration images, the data has only {seen}", field="n_images")
    for c in crits:
        if c.kind == "gradient":  # labels + a backward pass: its own pass, reduced like the others
            acc = accs[c.name] = c.gradient_pass(model, loader, units, n_images=n_images, device=device,
                                                 progress=progress)
            if reduce is not None:
                for u in units:
                    acc.sums.setdefault(u.name, torch.zeros(u.width, dtype=torch.float64, device=device))
                acc.all_reduce(reduce)
    out = {c.name: c.score(model, units, accs[c.name]) for c in crits}
    for name, per_unit in out.items():
        for u in units:
            if compat and u.compat_rank_points is None and u.name not in per_unit:
                continue
            t = per_unit.get(u.name)
            if t is None or t.numel() != u.width:
                raise RuntimeError(f"criterion {name} returned {None if t is None else t.numel()} scores for "
                                   f"{u.name} ({u.width} channels)")
    meta = {
        "model": getattr(model, "arch", type(model).__name__),
        "cfg": list(model.cfg) if getattr(model, "cfg", None) is not None else None,
        "criteria": {c.name: c.settings() for c in crits},
        "n_images": seen,
        "seed": seed,
        "input_size": getattr(model, "input_size", None),
        "rank_points": "hrank_compat" if compat else "relu",
        "model_checksum": model_checksum(model),
        "tiebreak": "mean_activation, then lower index" if seen else "lower index",
        **dict(extra_meta or {}),
    }
    return Scores(scores=out, tiebreak=mean_act.result() if seen else {}, meta=meta)


def export_hrank(scores: Scores, criterion: str, model: nn.Module, folder: str | Path) -> list[Path]:
    """Write HRank's ``rank_conv{k}.npy`` (k = 1-based unit position)."""
    paths = []
    per_unit = scores.for_criterion(criterion)
    for k, u in enumerate(units_of(model), start=1):
        if u.name in per_unit:
            p = Path(folder) / f"rank_conv{k}.npy"
            io.atomic_write(p, lambda fh, t=per_unit[u.name]: np.save(fh, t.double().numpy()))
            paths.append(p)
    return paths


def import_hrank(folder: str | Path, model: nn.Module) -> Scores:
    """Read HRank's ``rank_conv{k}.npy`` files into a Scores (criterion ``hrank``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("HRank rank folder not found", source=str(folder))
    out: dict[str, torch.Tensor] = {}
    for k, u in enumerate(units_of(model), start=1):
        p = folder / f"rank_conv{k}.npy"
        if not p.exists():
            continue
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"not a numpy rank file ({exc})", source=str(p)) from exc
        if arr.ndim != 1 or arr.shape[0] != u.width:
            raise UserError(f"has {arr.size} ranks, {u.name} has {u.width} channels", source=str(p))
        out[u.name] = torch.from_numpy(arr.astype(np.float64)).float()
    if not out:
        raise UserError("no rank_conv{k}.npy files found", source=str(folder))
    return Scores(scores={"hrank": out}, meta={"model": model.arch, "imported_from": str(folder)})
