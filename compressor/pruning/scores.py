"""Compute criterion scores in one shared pass, and read/write the scores file.

The scores file (``torch.save`` of plain data, loads with ``weights_only=True``) is keyed by
unit (layer) name and records what produced it: criterion and its settings, number of
images, seed, input size, rank-point mode and a checksum of the model's weights.
HRank's per-layer ``rank_conv{k}.npy`` files are imported and exported by ``compressor.models.hrank``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

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
        """Read a scores file (``weights_only``). What it declares is counted and sized before it is
        used (checkpoint's bounds on values, depth and tensor storage; ``MAX_CRITERIA`` criteria,
        ``MAX_UNITS`` units, one finite real score per channel): any failure is one line naming the field."""
        from compressor.storage.checkpoint import read_torch_file

        src = str(path)
        doc = read_torch_file(path, "scores file")
        if doc.get("format") != SCORES_FORMAT:
            raise UserError(f"not a compressor scores file (format must be {SCORES_FORMAT!r})", source=src, field="format")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCORES_VERSION:
            raise UserError(f"must be an integer in [1, {SCORES_VERSION}] (a newer compressor's file?), got "
                            f"{short(version)}", source=src, field="version")
        if "scores" not in doc:
            raise UserError("missing: a scores file maps criterion -> unit -> one score per channel", source=src,
                            field="scores")
        tiebreak = doc.get("tiebreak", {})
        meta = doc.get("meta", {})
        sc = cls(scores=doc["scores"], tiebreak={} if tiebreak is None else tiebreak, meta={} if meta is None else meta)
        sc.validate(src)
        return sc

    def validate(self, source: str = "<scores>") -> None:
        """The shape of a scores document: criteria -> units -> 1-D finite real tensors, a tie-break of
        the same form and widths, a meta mapping. One line naming the field for the first thing wrong."""
        if not isinstance(self.scores, dict):
            raise UserError(f"must be a mapping of criterion -> {{unit: tensor}}, got {type(self.scores).__name__}",
                            source=source, field="scores")
        if not self.scores:
            raise UserError("holds no criteria", source=source, field="scores")
        if len(self.scores) > MAX_CRITERIA:
            raise UserError(f"holds {len(self.scores):,} criteria; at most {MAX_CRITERIA} are read", source=source,
                            field="scores")
        for crit, per_unit in self.scores.items():
            if not isinstance(crit, str):
                raise UserError(f"a criterion name must be a string, got {short(crit)}", source=source, field="scores")
            _check_unit_table(per_unit, source, f"scores.{crit}")
        if not isinstance(self.tiebreak, dict):
            raise UserError(f"must be a mapping of unit -> tensor, got {type(self.tiebreak).__name__}", source=source,
                            field="tiebreak")
        if self.tiebreak:
            _check_unit_table(self.tiebreak, source, "tiebreak")
            for crit, per_unit in self.scores.items():
                for unit, t in self.tiebreak.items():
                    if unit in per_unit and per_unit[unit].numel() != t.numel():
                        raise UserError(f"has {t.numel()} values, scores.{crit}.{unit} has {per_unit[unit].numel()}",
                                        source=source, field=f"tiebreak.{unit}")
        if not isinstance(self.meta, dict):
            raise UserError(f"must be a mapping, got {type(self.meta).__name__}", source=source, field="meta")
        for key in ("model", "model_checksum", "rank_points", "imported_from"):
            value = self.meta.get(key)
            if value is not None and not (isinstance(value, str) and len(value) <= 4096):
                raise UserError(f"must be a string, got {short(value)}", source=source, field=f"meta.{key}")

    def check_model(self, model: nn.Module, source: str = "<scores>") -> None:
        """Refuse scores made for another architecture, cfg or checkpoint (weights checksum), and
        scores that leave out one of the model's units or tie-break channels it does not have.

        A missing checksum is refused: nothing then says the scores are for these weights. HRank's
        ``rank_conv{k}.npy`` files carry none; ``import_hrank`` records the checksum of the
        checkpoint they are imported for, so a run's scores.pt made from them is checked like any other."""
        self.validate(source)
        name = getattr(model, "arch", type(model).__name__)
        arch = self.meta.get("model")
        if arch and arch != name:
            raise UserError(f"scores are for model {arch!r}, not {name!r}", source=source, field="meta.model")
        found = units_of(model)
        widths = {u.name: u.width for u in found}
        for crit, per_unit in self.scores.items():
            for unit, t in per_unit.items():
                if unit not in widths:
                    raise UserError(f"unit {unit!r} is not in {name}", source=source, field=f"scores.{crit}")
                if t.numel() != widths[unit]:
                    raise UserError(f"{unit} has {t.numel()} scores, the model has {widths[unit]} channels",
                                    source=source, field=f"scores.{crit}.{unit}")
            left_out = [u for u in found if u.name not in per_unit and not self._may_skip(u)]
            if left_out:
                kinds = {u.kind for u in left_out} - {"plain"}
                how = (f"rank with the same unit choice as prune ({', '.join(sorted(kinds))} units: "
                       "residual=True / --residual)" if kinds else "re-run `rank` on this checkpoint")
                raise UserError(f"no scores for unit {left_out[0].name!r}" + (f" (and {len(left_out) - 1} more)"
                                                                            if len(left_out) > 1 else "")
                                + f" of {name}; {how}", source=source, field=f"scores.{crit}")
        for unit, t in self.tiebreak.items():
            if unit not in widths or t.numel() != widths[unit]:
                why = (f"unit {unit!r} is not in {name}" if unit not in widths
                       else f"{t.numel()} values, the model has {widths[unit]} channels")
                raise UserError(why, source=source, field=f"tiebreak.{unit}")
        made_on = self.meta.get("model_checksum")
        if not made_on:
            raise UserError("missing: nothing says these scores were computed on this checkpoint's weights; re-run "
                            "`rank` on it (HRank's rank_conv*.npy files import with --import-hrank)", source=source,
                            field="meta.model_checksum")
        here = model_checksum(model)
        if made_on != here:
            raise UserError(f"scores were computed on other weights (checksum {made_on}, this checkpoint {here}); "
                            "re-run `rank` on this checkpoint", source=source, field="meta.model_checksum")

    def _may_skip(self, unit: Any) -> bool:
        """Units a complete scores file may leave out: those without an HRank rank point in compat
        mode, and any unit of an HRank import (its folder may hold rank files for some layers only)."""
        if self.meta.get("imported_from"):
            return True
        return self.meta.get("rank_points") == "hrank_compat" and getattr(unit, "compat_rank_points", None) is None


MAX_CRITERIA = 32
MAX_UNITS = 10_000  # a scores file's units per criterion (a ResNet-152: about 150)


def short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not torch.is_tensor(value) else f"a tensor of shape {tuple(value.shape)}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_unit_table(table: Any, source: str, field: str) -> None:
    """``table``: unit name -> one finite real score per channel (a 1-D tensor of at most ``MAX_WIDTH``)."""
    from compressor.storage.checkpoint import MAX_WIDTH

    if not isinstance(table, dict):
        raise UserError(f"must be a mapping of unit -> tensor, got {type(table).__name__}", source=source, field=field)
    if len(table) > MAX_UNITS:
        raise UserError(f"holds {len(table):,} units; at most {MAX_UNITS:,} are read", source=source, field=field)
    for unit, t in table.items():
        if not isinstance(unit, str):
            raise UserError(f"a unit name must be a string, got {short(unit)}", source=source, field=field)
        where = f"{field}.{unit[:120]}"
        if not torch.is_tensor(t):
            raise UserError(f"must be a tensor of one score per channel, got {type(t).__name__}", source=source,
                            field=where)
        if t.ndim != 1 or not 1 <= t.numel() <= MAX_WIDTH:
            raise UserError(f"must be one score per channel (1-D, 1 to {MAX_WIDTH:,} values), got shape "
                            f"{tuple(t.shape)}", source=source, field=where)
        if t.is_complex() or t.dtype == torch.bool or not (t.is_floating_point() or _is_integer(t)):
            raise UserError(f"scores must be real numbers, got {str(t.dtype).replace('torch.', '')}", source=source,
                            field=where)
        bad = (~torch.isfinite(t)).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise UserError(f"score {i} is {float(t[i])} ({len(bad)} not finite); scores must be finite numbers",
                            source=source, field=where)


def _is_integer(t: torch.Tensor) -> bool:
    return t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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
