"""The rank job: score a checkpoint's filters on its data and write a reusable scores file.

Works under ``torchrun`` too: each process ranks a shard of the calibration images and the sums
are all-reduced; only the main process writes (``training.distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from compressor import data
from compressor.storage import checkpoint, io


@dataclass(frozen=True)
class RankJob:
    checkpoint: str
    criteria: tuple[str, ...]
    out: Path
    model: str | None = None
    n_images: int = 768
    batch_size: int = 128
    seed: int = 0
    hrank_compat: bool = False
    rank_options: dict[str, Any] = field(default_factory=dict)  # hrank's rtol / atol
    export_hrank: str | None = None  # also write HRank rank_conv{k}.npy files here
    device: str = "auto"
    progress: bool = True


def run_rank(job: RankJob, load_data: Callable[[nn.Module, dict], data.DataBundle],
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Rank ``job.checkpoint`` on ``load_data(model, checkpoint_fields)``'s training images (unaugmented).

    ``say`` prints on the main process only. Returns ``{"path", "n_images", "world_size", "hrank_files"}``.
    """
    from compressor.models import hrank
    from compressor.training import distributed

    io.check_writable(job.out.parent)  # fail before the pass, not after it
    ctx = distributed.init(job.device)
    out: dict[str, Any] = {"path": job.out, "world_size": ctx.world_size, "hrank_files": []}
    ok = False
    try:
        model, ck = checkpoint.load(job.checkpoint, model=job.model)
        bundle = load_data(model, ck)
        calib = data.calibration_subset(bundle.train_eval, job.n_images, job.seed)
        names = list(job.criteria)
        sc = distributed.compute_scores(
            model.to(ctx.device), calib, names, batch_size=job.batch_size, seed=job.seed, compat=job.hrank_compat,
            device=ctx.device, options=dict(job.rank_options), progress=job.progress,
            extra_meta={"data": bundle.name, "augmentation": "none", "checkpoint": job.checkpoint}, ctx=ctx)
        out["n_images"] = sc.meta["n_images"]

        def write() -> None:  # main process; the others learn whether it failed
            sc.save(job.out)
            say(f"scores ({', '.join(names)}, {sc.meta['n_images']} images, seed {job.seed}, "
                f"{ctx.world_size} process(es)) written to {job.out}")
            if job.export_hrank:
                crit = "hrank" if "hrank" in names else names[0]
                out["hrank_files"] = hrank.export_rank_files(sc, crit, model, job.export_hrank)
                say(f"HRank rank files: {len(out['hrank_files'])} written to {job.export_hrank}")

        distributed.run_on_main(write, ctx)
        ok = True
    finally:
        distributed.shutdown(barrier=ok)  # unwinding from an error: no barrier (the peers failed too)
    return out
