"""A training or fine-tuning run in a folder: claim, lineage, resume layering, fit, test report.

The library side of the ``train`` and ``finetune`` commands, with typed arguments: the command
parses options and recipes into a ``TrainRun`` and calls ``run``; everything a run does with
its folder and its records is here.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from compressor.data import DataBundle
from compressor.training.train import TrainConfig

RESOLVED = "resolved_config.yaml"
# About one invocation, not the run: never taken from a saved run, ignored when comparing runs.
NOT_RESTORED = ("config", "resume", "out", "no_progress")
# Options outside TrainConfig that a resumed run must keep to repeat an uninterrupted one
# (fit() itself checks the TrainConfig ones against the checkpoint's training state).
EXACT_KEYS = ("data", "data_root", "val_size", "teacher")


@dataclass(frozen=True)
class TrainRun:
    """What one run is: its training config and the records around it.

    ``options``: every resolved option, as written to ``resolved_config.yaml`` (the command's
    flags, recipe and defaults); ``recipe``: the ``--config`` file, if any; ``resume``: the
    last.pt it continues.
    """

    config: TrainConfig
    command: str = "train"                     # "train" or "finetune": how the folder is claimed
    device: str = "auto"
    data: str | None = None
    data_root: str | None = None
    val_size: int | None = None
    teacher: str | None = None
    resume: str | None = None
    recipe: str | None = None
    overwrite: bool = False
    progress: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    log: Callable[[dict[str, Any]], None] | None = None


# --- resume: the run's own options ------------------------------------------------------

def saved_options(resume: str, ck: Mapping[str, Any]) -> dict[str, Any]:
    """The options the run in ``resume`` was made with.

    ``<resume dir>/resolved_config.yaml`` first; the checkpoint's own training config and data
    provenance override it (they are what the saved state was trained with).
    """
    from compressor.jobs import options as recipe
    from compressor.errors import UserError

    out: dict[str, Any] = {}
    path = Path(resume).parent / RESOLVED
    if path.is_file():
        try:
            out.update(recipe.read(path))
        except UserError as exc:
            warnings.warn(f"{exc}; resuming with the settings stored in {resume}", stacklevel=2)
    ts = ((ck.get("extra") or {}).get("train_state") or {})
    out.update(ts.get("config") or {})
    prov = ck.get("provenance") or {}
    out.update({k: prov[k] for k in EXACT_KEYS if k in prov})
    for k in NOT_RESTORED:
        out.pop(k, None)
    return out


def plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v


def _options(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: plain(v) for k, v in doc.items() if k not in NOT_RESTORED}


def write_resolved(out: Path, options: Mapping[str, Any], resume: str | None, header: str) -> None:
    """``resolved_config.yaml``: the options of the run; a resume with the same options leaves it as it is."""
    from compressor.errors import UserError
    from compressor.storage import io, yaml_io
    from compressor.jobs import options as recipe

    path = out / RESOLVED
    text = recipe.to_yaml(argparse.Namespace(**{**options, "out": str(out)}), header=header)
    if resume and path.is_file():
        try:
            old = yaml_io.load_yaml(path, kind="resolved config")
        except UserError:  # unreadable or hostile: the options count as changed
            old = None
        new = _options(yaml_io.parse_yaml(text, source=str(path)))
        if isinstance(old, dict):
            before = _options(old)
            if before == new:
                return
            changed = sorted(k for k in set(new) | set(before) if before.get(k) != new.get(k))
            text = f"# resumed from {resume} with changed options: {', '.join(changed)}\n" + text
    io.write_text(path, text)


# --- what a fine-tune keeps of its source ----------------------------------------------------

def source_record(path: str, ck: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(provenance["source"], metrics)`` a fine-tune of checkpoint ``ck`` (read from ``path``) carries.

    The source entry names the file and keeps how it was pruned (criterion, BN re-estimation,
    rates, and the source's own source); the metrics keep the prune metrics under ``prune`` and
    the fine-tune epochs the weights already had under ``finetune_history`` (this run's epochs
    are in each checkpoint's training state).
    """
    sprov = ck.get("provenance") or {}
    m = ck.get("metrics") or {}
    ts = (ck.get("extra") or {}).get("train_state") or {}
    up = sprov.get("source") if isinstance(sprov.get("source"), Mapping) else {}
    src: dict[str, Any] = {"path": str(path), "model": ck.get("model"), "data": sprov.get("data"),
                           "command": sprov.get("command"), "time": sprov.get("time")}
    for key in ("criterion", "bn_recalibrated", "n_images"):
        val = sprov.get(key, up.get(key))
        if val is not None:
            src[key] = val
    if ck.get("rates"):
        src["rates"] = ck["rates"]
    if sprov.get("source") is not None:
        src["source"] = sprov["source"]
    tuned_before = "finetune_history" in m or sprov.get("source") is not None
    metrics: dict[str, Any] = {"finetune_history": list(m.get("finetune_history") or [])
                               + (list(ts.get("history") or []) if tuned_before else [])}
    prune = m.get("prune")
    if not isinstance(prune, Mapping) and ck.get("plan") and not ts:  # a prune run's output: its metrics
        prune = {k: v for k, v in m.items() if k != "finetune_history"}
    if prune:
        metrics["prune"] = dict(prune)
    return src, metrics


def load_teacher(path: str, student_arch: str) -> nn.Module:
    """A compressor checkpoint of any architecture, or a plain (HRank-style) state_dict of the student's."""
    from compressor.storage import checkpoint

    plain_file = checkpoint.read(path).get("format") != checkpoint.CKPT_FORMAT
    return checkpoint.load(path, model=student_arch if plain_file else None)[0]


# --- the run ------------------------------------------------------------------------------

def run(net: nn.Module, bundle: DataBundle, spec: TrainRun, out: Path, *, ck: Mapping[str, Any] | None = None,
        source: str | None = None) -> int:
    """Fit ``net`` as ``spec`` says; rank 0 writes ``out``; then evaluate on test.

    ``ck``: the checkpoint ``net`` came from: the resumed last.pt (its carried provenance,
    metrics and training state are kept) or, with ``source`` its path, a checkpoint to fine-tune.
    """
    from compressor.training import distributed

    ck = ck or {}
    if spec.resume:
        sprov = ck.get("provenance") or {}
        src_rec = sprov.get("source")
        carried = {k: v for k, v in (ck.get("metrics") or {}).items() if k in ("finetune_history", "prune")}
        spec = replace(spec, recipe=spec.recipe or sprov.get("recipe"))
    elif source is not None:
        src_rec, carried = source_record(source, ck)
    else:
        src_rec, carried = None, {}
    ctx = distributed.init(spec.device)
    ok, rc = False, 0
    try:
        with _claim(out, spec, ctx) as claimed:
            started = time.time_ns()
            try:
                rc = _train_and_report(net, bundle, spec, out, ck, src_rec, carried, source, ctx)
            except BaseException:
                _keep_resume_point(claimed, out, started)
                raise
        ok = True
        return rc
    finally:
        distributed.shutdown(barrier=ok)  # unwinding from an error: the peers stopped at the same point


def _claim(out: Path, spec: TrainRun, ctx: Any) -> Any:
    """The run folder, claimed by the process that writes (``compressor.storage.runfolder``): a foreign
    non-empty ``out`` is refused unless ``overwrite``/``resume``, a concurrent run too."""
    from compressor.storage import runfolder

    if not ctx.is_main:
        return contextlib.nullcontext()
    return runfolder.claim(out, command=spec.command, overwrite=spec.overwrite, resume=bool(spec.resume))


def _keep_resume_point(claimed: Any, out: Path, started_ns: int) -> None:
    """An interrupted run keeps what ``--resume`` needs once it wrote a last.pt; before that it leaves nothing."""
    from compressor.errors import UserError

    last = out / "last.pt"
    if claimed is None or not last.exists() or last.stat().st_mtime_ns < started_ns:
        return
    for name in ("last.pt", "best.pt", "metrics.jsonl", RESOLVED):
        if (out / name).exists():
            try:
                claimed.record(out / name, keep=True)
            except UserError:  # the manifest cannot be rewritten (a full disk): the run's own error is the news
                return


def _train_and_report(net: nn.Module, bundle: DataBundle, spec: TrainRun, out: Path, ck: Mapping[str, Any],
                      src_rec: Any, carried: dict[str, Any], source: str | None, ctx: Any) -> int:
    """Fit, then (rank 0) the test report."""
    from compressor import data
    from compressor.storage import checkpoint
    from compressor.data import contract
    from compressor.training import distributed
    from compressor.training.train import config_dict, fit

    device = ctx.device
    data.check_classes(bundle, net.num_classes, source=source or spec.resume)
    teacher = load_teacher(spec.teacher, net.arch) if spec.teacher else None
    cfg = spec.config
    extra = {"resumed_from": str(spec.resume)} if spec.resume else {}
    dc = contract.of(net)
    options = dict(spec.options)
    if dc is not None and spec.data is None:  # resolved from the contract: the records say what was used
        options["data"] = dc.dataset
        options["data_root"] = spec.data_root if spec.data_root is not None else dc.root
    prov = checkpoint.provenance(seed=cfg.seed, data=dc.dataset if dc else spec.data,
                                 data_root=dc.root if dc else spec.data_root,
                                 val_size=spec.val_size, train=config_dict(cfg), recipe=spec.recipe,
                                 processes=ctx.world_size, teacher=spec.teacher, source=src_rec, **extra)
    distributed.run_on_main(lambda: write_resolved(out, options, spec.resume,
                                                   header=f"resolved options of: {prov['command']}"),
                            ctx)  # rank 0 writes; a failure there stops every rank, at once
    meta = {"rates": ck.get("rates"), "plan": ck.get("plan"), "prov": prov, "metrics": carried}
    history = fit(net, bundle, cfg, device, progress=spec.progress and ctx.is_main, log=spec.log, teacher=teacher,
                  out_dir=out, resume=ck if spec.resume else None, resume_source=spec.resume, ckpt_meta=meta,
                  ctx=ctx)
    rc = distributed.run_on_main(lambda: _report(net, bundle, out, history, device), ctx)
    return int(rc or 0)


def _report(net: nn.Module, bundle: DataBundle, out: Path, history: list[dict[str, Any]], device: Any) -> int:
    """Test accuracy of best.pt (selected on val) and of the last epoch; never used to select."""
    from compressor import data
    from compressor.storage import checkpoint
    from compressor.storage import io
    from compressor.training.evaluation import evaluate

    test_loader = data.loader(bundle.test, 256, device=device)
    summary: dict[str, Any] = {"epochs": len(history), "last": {"val_acc": history[-1].get("val_acc") if history else None}}
    summary["last"]["test"] = evaluate(net.to(device), test_loader, device)
    best = out / "best.pt"
    if best.exists():
        bnet, obj = checkpoint.load(best)  # obj is the file's dict: written back with the test result
        summary["best"] = {"epoch": obj["metrics"].get("epoch"), "val_acc": obj["metrics"].get("val_acc"),
                           "test": evaluate(bnet.to(device), test_loader, device)}
        obj["metrics"]["test"] = summary["best"]["test"]
        io.save_torch(best, obj)
    where = {k: f"{bundle.notes[k]}/" if k == "test_split" else bundle.notes[k]
             for k in ("test_split", "val_split") if bundle.notes.get(k)}  # an ImageFolder's folders
    summary.update(where)
    io.write_json(out / "summary.json", summary)
    folder = f" [{where['test_split']}, {summary['last']['test']['n']} images]" if where else ""
    line = f"test top-1{folder}: last epoch {summary['last']['test']['top1']:.2f}%"
    if "best" in summary:
        line += (f", best.pt (epoch {summary['best']['epoch']}, val {summary['best']['val_acc']:.2f}%) "
                 f"{summary['best']['test']['top1']:.2f}%")
    print(line + " (test is never used for selection)")
    print(f"outputs in {out}: " + ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
    return 0
