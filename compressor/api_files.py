"""The public API over files: reports over checkpoints, recovery curves, and what the library offers.

``compressor.api`` works on models in memory; these work on what runs leave on disk (checkpoints,
prune run folders, sweep folders, ``metrics.jsonl``) and name the choices a caller has (criteria,
a model's recipe). The CLI's ``report`` command is a thin client of ``report``/``recovery_curves``::

    >>> import compressor
    >>> "hrank" in compressor.list_criteria()
    True
    >>> compressor.model_recipe("vgg16_bn")["finetune_lr"] > 0
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from compressor.deploy.latency import LatencyConfig
from compressor.errors import UserError


def list_criteria() -> list[str]:
    """The registered channel criteria (``rank(criteria=...)``, ``prune(criterion=...)``); ``obs`` is a
    selection made inside ``prune`` from calibration batches, not a ranking."""
    from compressor.pruning.criteria import list_criteria as _list

    return _list()


def check_criteria(names: str | Sequence[str]) -> list[str]:
    """``"hrank,l1"`` (or a list) -> ``["hrank", "l1"]``: no repeats, each a registered criterion (else one
    ``UserError`` naming the valid ones)."""
    from compressor.pruning import criteria

    parts = names.split(",") if isinstance(names, str) else list(names)
    out = list(dict.fromkeys(n.strip() for n in parts if n.strip()))
    if not out:
        raise UserError(f"no criterion named in {names!r}; valid: {', '.join(list_criteria())}", field="criterion")
    for n in out:
        criteria.get(n)
    return out


def model_recipe(name: str) -> dict[str, Any]:
    """A model's defaults from the packaged recipes (``finetune_lr``, ``quick_baseline``, ``source``):
    the exact name, else the longest matching prefix, else the defaults."""
    from compressor.training.recipe import model_recipe as _recipe

    return _recipe(name)


def report(inputs: Sequence[str | Path], out: str | Path, *, data: str | None = None, data_root: str | None = None,
           device: str = "auto", batch_size: int = 256, seed: int = 0, evaluate: bool = True,
           latency: LatencyConfig | None = LatencyConfig(), plots: bool = True, progress: bool = False,
           models: Sequence[str] = ()) -> dict[str, Any]:
    """Compare checkpoints, prune run folders and sweep folders: top-1, params/MACs, file size and
    latency in ``report.md``/``.csv``/``.json`` plus PNG plots under ``out``.

    Any model the engine prunes works (registered, CIFAR ResNets, ``torchvision:``, ``timm:``, user
    builders named in ``models``); each checkpoint is evaluated on its own data contract unless ``data``
    is given; ``latency=None`` skips timing. Returns ``{"rows", "markdown", "paths", "plots"}``.

    >>> res = compressor.report(["runs/prune_a", "runs/prune_b/pruned.pt"], "reports/ab")  # doctest: +SKIP
    >>> print(res["markdown"])                                                              # doctest: +SKIP
    """
    from compressor.reporting.report import ReportConfig, run_report

    if not inputs:
        raise UserError("give checkpoints, prune run folders or sweep folders", field="inputs")
    cfg = ReportConfig(data=data, data_root=data_root, device=device, batch_size=batch_size, seed=seed,
                       evaluate=evaluate, latency=latency, plots=plots, progress=progress, models=tuple(models))
    return run_report([str(i) for i in inputs], out, cfg)


def recovery_curves(runs: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Overlay the recovery curves (``metrics.jsonl``) of train/finetune/prune runs in one PNG, with each
    run's baseline accuracy as a reference line where its checkpoint records one.

    Returns ``{"rows", "table", "png"}``: per run its start/best/final validation top-1, and
    ``baseline`` (with ``label``) when one is drawn.

    >>> res = compressor.recovery_curves(["ft_lr0.01", "ft_kd"], "curves.png")  # doctest: +SKIP
    """
    from compressor.reporting.report_curves import baseline_label, curves

    res = curves([str(r) for r in runs], out)
    for r in res["rows"]:
        if r.get("baseline"):
            r["baseline"] = {**r["baseline"], "label": baseline_label(r["baseline"])}
    return res
