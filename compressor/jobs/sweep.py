"""A sweep: one baseline, ranked once, pruned and fine-tuned at several points, then reported.

Points are either rates files or budgets (``macs 0.5``: keep 50% of the baseline's MACs). A
budget is turned into exact per-layer rates by ``compressor.pruning.policy.resolve``: by default the
``local`` policy with a uniform profile (one rate for every layer, scaled by bisection and
counted exactly on the rebuilt cfg); ``global`` ranks channels across layers instead. The
resolved rates are written to the point's ``rates.yaml`` (with no ``target`` key, so the prune
job uses them as they are); the budget and what was achieved are recorded in ``sweep.json``.

Layout of the sweep folder::

    sweep.json            settings, baseline, and each point's state (written after every point)
    scores.pt             the one scores file every point reuses
    <point>/rates.yaml    the rates actually used
    <point>/pruned.pt     written last by the prune job: its presence marks the point done
    <point>/pruned.int8.onnx  with ``int8``: the point's calibrated int8 export (``compressor.export(int8=True)``),
                          absent when its top-1 drop exceeded ``int8_max_drop`` (the point's state says so)
    report/               report.md/.csv/.json and PNGs (``compressor.reporting.report``)

Re-running the same command resumes: points whose ``pruned.pt`` exists are skipped, and the
scores file is reused after checking it was made from this very baseline. With ``int8``, a done
point without an int8 record gets its export then; a refusal is kept unless the int8 settings change.

``int8``: each point is also quantized (static post-training int8, QDQ, per-channel weights; activations
calibrated on ``int8_calib_n`` unaugmented training images of the point's data, seeded by ``seed``)
and checked on the whole test split. A point whose int8 top-1 falls more than ``int8_max_drop``
points below its float32 graph is **refused**: no file, ``state["points"][i]["int8"]["status"] ==
"refused"`` with the measured figures, and a row marked refused in the report; the sweep goes on.
The int8 files join the report as ``.onnx`` rows (``compressor.reporting.report_onnx``): top-1 on
the sweep's test data, file size, and latency timed in the same group as the float rows.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from torch import nn

from compressor.pruning.graph import units as units_of
from compressor import data as data_mod
from compressor.storage import checkpoint
from compressor.data import contract as contract_mod
from compressor.pruning import criteria
from compressor.storage import io
from compressor.jobs import pipeline
from compressor.reporting import report
from compressor.storage import runfolder
from compressor.pruning import scores as scores_mod
from compressor.errors import UserError
from compressor.training.evaluation import resolve_device
from compressor.models import finetune_lr
from compressor.training.recipe import finetune_warmup
from compressor.pruning.rates import RateSpec, load_rates
from compressor.training.train import TrainConfig, config_dict

log = logging.getLogger("compressor")

SWEEP_FORMAT = "compressor.jobs.sweep"
SWEEP_VERSION = 1


@dataclass(frozen=True)
class SweepJob:
    checkpoint: str
    out: str
    budgets: tuple[tuple[str, float], ...] = ()  # (("macs", 0.5), ...): fraction kept
    rates: tuple[str, ...] = ()  # rates files
    data: str | None = None  # None: the baseline checkpoint's data contract, else digits
    data_root: str | None = None
    criterion: str = "hrank"
    n_images: int = 768
    seed: int = 0
    rounding: str | None = None  # None: each rates file's own (budget points: keep_floor)
    policy: str = "local"  # how a budget becomes per-layer rates (compressor.pruning.policy)
    tolerance: float = 0.01  # relative tolerance on a budget
    bn_recalibrate: bool = True
    surgery: str = "torch_pruning"
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=0.01))
    model_lr: bool = False  # replace finetune.lr by the model's own (models.finetune_lr)
    model_warmup: bool = False  # replace finetune.warmup_epochs by the model's own (recipe.finetune_warmup)
    device: str = "auto"
    report_out: str | None = None  # default <out>/report
    report: report.ReportConfig | None = field(default_factory=report.ReportConfig)
    progress: bool = True
    model: str | None = None  # for a plain state_dict (HRank, torchvision files)
    teacher: str | None = None  # "self": distil each fine-tune from the unpruned model
    reconstruct: bool = False  # least-squares refit after surgery (compressor.pruning.reconstruct)
    block_steps: int = 0  # > 0: then the block refit (compressor.pruning.refit_blocks)
    int8: bool = False  # also a calibrated int8 export per point (module docstring)
    int8_max_drop: float = 1.0  # top-1 points the int8 file may lose against float32; more: refused
    int8_calib_n: int = 256  # calibration images
    int8_calib_method: str | None = None  # None: onnx_int8.DEFAULT_METHOD


INT8_FILE = "pruned.int8.onnx"


# ----------------------------------------------------------------------------- budgets
def rates_for_budget(model: nn.Module, sc: scores_mod.Scores, criterion: str, key: str, keep: float, *,
                     policy: str = "local", tolerance: float = 0.01, rounding: str = "keep_floor") -> RateSpec:
    """Exact per-layer rates meeting ``key`` (macs/params) kept ≤ ``keep`` (within ``tolerance``).

    ``local``: one uniform rate scaled by bisection; ``global``: one cross-layer ranking of the
    normalized scores. The result's ``extra["resolved"]`` says what was achieved.
    """
    from compressor.pruning import policy as policy_mod

    if key not in policy_mod.BUDGETS:
        raise UserError(f"unknown budget {key!r}; valid: {', '.join(policy_mod.BUDGETS)}", field="budget")
    if not 0.0 < keep <= 1.0:
        raise UserError(f"a budget is the fraction kept, in (0, 1]; got {keep}", field=key)
    units = [u.name for u in units_of(model)]
    spec = RateSpec(rates={u: 0.0 for u in units}, rounding=rounding, source=f"<sweep budget {key} {keep:g}>",
                    target={key: keep}, extra={"policy": {"name": policy, "tolerance": tolerance}})
    return policy_mod.resolve(spec, model, sc.for_criterion(criterion), tiebreak=sc.tiebreak)


# ----------------------------------------------------------------------------- points and state
def point_name(kind: str, value: Any) -> str:
    return f"{kind}{value:g}" if kind in ("macs", "params") else Path(value).stem


def _points(job: SweepJob) -> list[dict[str, Any]]:
    pts = [{"name": point_name(k, v), "kind": "budget", "budget": {k: float(v)}} for k, v in job.budgets]
    pts += [{"name": point_name("rates", r), "kind": "rates", "rates_file": str(r)} for r in job.rates]
    if not pts:
        raise UserError("a sweep needs points: --macs/--params budgets or --rates files", field="points")
    names = [p["name"] for p in pts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two points would share the folder name {dup[0]!r}", field="points")
    return pts


def _settings(job: SweepJob) -> dict[str, Any]:
    return {"data": job.data, "criterion": job.criterion, "n_images": job.n_images, "seed": job.seed,
            "rounding": job.rounding, "policy": job.policy, "tolerance": job.tolerance,
            "bn_recalibrate": job.bn_recalibrate, "surgery": job.surgery, "reconstruct": job.reconstruct,
            "block_steps": job.block_steps, "finetune": config_dict(job.finetune)}


def _load_state(path: Path, job: SweepJob, checksum: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable sweep state ({exc}); move it away to start afresh", source=str(path)) from exc
    if doc.get("format") != SWEEP_FORMAT:
        raise UserError(f"not a sweep state file (format must be {SWEEP_FORMAT!r})", source=str(path))
    if doc.get("baseline_checksum") != checksum:
        raise UserError("this folder holds a sweep of another baseline; use another --out", source=str(path))
    old = doc.get("settings", {})
    for key in ("data", "criterion", "n_images", "seed"):
        if old.get(key) != _settings(job)[key]:
            raise UserError(f"the sweep here used {key}={old.get(key)!r}, not {_settings(job)[key]!r}; "
                            "points would not be comparable (use another --out)", source=str(path), field=key)
    points = doc.get("points", [])
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise UserError("must be a list of mappings", source=str(path), field="points")
    from compressor.reporting.report_baseline import sweep_point_folder

    for i, p in enumerate(points):  # a point's folder stays inside the sweep folder
        sweep_point_folder(path.parent, path, i, p.get("name"))
    changed = [k for k, v in _settings(job).items() if k in old and old[k] != v]
    if changed:
        log.warning("settings differ from the sweep's earlier run (%s); finished points keep theirs",
                    ", ".join(changed))
    return doc


def _scores(job: SweepJob, base: nn.Module, out: Path, device,
            bundle: data_mod.DataBundle | None = None) -> scores_mod.Scores:
    path = out / "scores.pt"
    if path.is_file():
        sc = scores_mod.Scores.load(path)
        sc.check_model(base, str(path))  # same architecture, cfg and weights (checksum)
        sc.for_criterion(job.criterion)
        log.info("reusing scores %s", path)
        return sc
    bundle = bundle or _load_data(job, base)
    calib = data_mod.calibration_subset(bundle.train_eval, job.n_images, job.seed)
    sc = scores_mod.compute(base.to(device), data_mod.loader(calib, 128, device=device), [job.criterion],
                            n_images=job.n_images, seed=job.seed, device=device, progress=job.progress,
                            extra_meta={"data": job.data, "augmentation": "none", "checkpoint": job.checkpoint})
    base.cpu()
    sc.save(path)
    return sc


def _load_data(job: SweepJob, base: nn.Module) -> data_mod.DataBundle:
    """The sweep's data, checked against the baseline's contract (or class count), which it then carries."""
    bundle, made = contract_mod.load_data(base, job.data, job.data_root, seed=job.seed, source=job.checkpoint)
    contract_mod.attach(base, made)
    return bundle


def _write_rates(folder: Path, pt: dict[str, Any], base: nn.Module, sc: scores_mod.Scores, job: SweepJob,
                 unit_names: Sequence[str]) -> Path:
    dest = folder / "rates.yaml"
    if pt["kind"] == "rates":
        src = Path(pt["rates_file"])
        load_rates(src, unit_names, model_name=base.arch, short_list=getattr(base, "short_rate_list", None))
        io.write_text(dest, src.read_text())
        return dest
    from compressor.pruning.policy import describe

    (key, keep), = pt["budget"].items()
    spec = rates_for_budget(base, sc, job.criterion, key, keep, policy=job.policy, tolerance=job.tolerance,
                            rounding=job.rounding or "keep_floor")
    info = spec.extra["resolved"]
    pt.update(policy=job.policy, achieved=dict(info["achieved"]), met=info.get("met"))
    doc = {"model": base.arch, "rates": {u: float(r) for u, r in spec.rates.items()}, "rounding": spec.rounding,
           "notes": f"sweep point {pt['name']} (budget {key} {keep:g}), resolved by compressor.pruning.policy: "
                    f"{describe(spec)}"}
    io.write_text(dest, yaml.safe_dump(doc, sort_keys=False))
    return dest


def _refuse_foreign(out: Path) -> None:
    """A sweep resumes its own folder (a sweep run's manifest, or a sweep.json from before manifests);
    a folder of other files is refused: the sweep would write among them."""
    if not out.is_dir() or runfolder._read_manifest(out) is not None or (out / "sweep.json").is_file():  # noqa: SLF001
        return
    content = [e.name for e in os.scandir(out) if not runfolder._ours(e.name)]  # noqa: SLF001
    if content:
        raise UserError(f"not empty and not a sweep's folder (found: {runfolder._names(content)}); "  # noqa: SLF001
                        "choose another --out", source=str(out))


def run_sweep(job: SweepJob, on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Rank once, prune + fine-tune each point not yet done, then write the report.

    The sweep folder is claimed as a resumable run (``compressor.storage.runfolder``): a concurrent sweep
    on it is refused, and an interrupted one keeps its finished points, scores and state.
    """
    out = Path(job.out)
    io.check_writable(out)
    _refuse_foreign(out)
    with runfolder.claim(out, command="sweep", resume=True) as run:
        try:
            return _sweep_into(job, out, run, on_point)
        except BaseException:
            for name in ("scores.pt", "sweep.json"):
                if (out / name).is_file():
                    run.record(out / name, keep=True)
            raise


def _sweep_into(job: SweepJob, out: Path, run: Any,
                on_point: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    device = resolve_device(job.device)
    base, ck = checkpoint.load(job.checkpoint, model=job.model)
    own = {**({"lr": finetune_lr(base.arch)} if job.model_lr else {}),
           **({"warmup_epochs": finetune_warmup(base.arch)} if job.model_warmup else {})}
    if own:
        job = replace(job, finetune=replace(job.finetune, **own), model_lr=False, model_warmup=False)
    name, root = contract_mod.resolve_source(contract_mod.of(base), job.data, job.data_root, ck.get("provenance"))
    job = replace(job, data=name, data_root=root)  # the checkpoint's data unless --data says otherwise
    if ck.get("plan"):
        log.warning("%s is itself pruned; the sweep treats it as the baseline", job.checkpoint)
    units = [u.name for u in units_of(base)]
    pts = _points(job)
    for pt in pts:  # validate every rates file before any work
        if pt["kind"] == "rates":
            load_rates(pt["rates_file"], units, model_name=base.arch, short_list=getattr(base, "short_rate_list", None))
    criteria.get(job.criterion)
    bundle = None
    if not (out / "scores.pt").is_file():  # data is needed to rank; compare class counts before writing
        bundle = _load_data(job, base)
        data_mod.calibration_subset(bundle.train_eval, job.n_images, job.seed)
    checksum = scores_mod.model_checksum(base)
    state_path = out / "sweep.json"
    old = _load_state(state_path, job, checksum)
    old_pts = {p["name"]: p for p in (old or {}).get("points", [])}
    state = {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "baseline": job.checkpoint,
             "baseline_checksum": checksum, "model": base.arch, "cfg": list(base.cfg) if getattr(base, "cfg", None) is not None else None,
             "settings": _settings(job), "points": [], "started": (old or {}).get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))}
    for pt in pts:
        prev = old_pts.get(pt["name"], {})
        state["points"].append({**prev, **pt} if (out / pt["name"] / "pruned.pt").is_file() else pt)
    state["points"] += [p for n, p in old_pts.items() if n not in {q["name"] for q in pts}]
    io.write_json(state_path, state)
    sc = _scores(job, base, out, device, bundle)

    for pt in state["points"]:
        folder = out / pt["name"]
        if (folder / "pruned.pt").is_file():
            log.info("point %s: done earlier (%s exists), skipped", pt["name"], folder / "pruned.pt")
            pt.setdefault("status", "done")
            if job.int8 and _int8_point(job, folder, pt):
                io.write_json(state_path, state)
            continue
        if pt["name"] not in {q["name"] for q in pts}:
            continue
        t0 = time.perf_counter()
        log.info("point %s: pruning and fine-tuning (%d epochs)", pt["name"], job.finetune.epochs)
        with runfolder.claim(folder, command="sweep point", overwrite=True):  # a failed point leaves nothing
            rates_path = _write_rates(folder, pt, base, sc, job, units)
            res = pipeline.run_prune(pipeline.PruneJob(
                model=base.arch, rates=str(rates_path), checkpoint=job.checkpoint, data=job.data,
                data_root=job.data_root, num_classes=base.num_classes, criterion=job.criterion,
                scores=str(out / "scores.pt"), seed=job.seed, rounding=job.rounding, surgery=job.surgery,
                bn_recalibrate=job.bn_recalibrate, finetune=job.finetune, weights=None, teacher=job.teacher,
                reconstruct=job.reconstruct, block_steps=job.block_steps, device=job.device, out=str(folder), claim=False, progress=job.progress))
        if run is not None:
            run.record(folder, keep=True)
        m = res["metrics"]
        pt.update(status="done", seconds=round(time.perf_counter() - t0, 1),
                  achieved={**pt.get("achieved", {}),
                            **{k: m["size_after"][k] / m["size_before"][k] for k in ("macs", "params")}},
                  recovery=m.get("recovery"),
                  test_top1=pipeline.final_accuracy(m)["top1"])
        io.write_json(state_path, state)
        if job.int8:
            _int8_point(job, folder, pt)
            io.write_json(state_path, state)
        if on_point:
            on_point(pt)
    state["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    io.write_json(state_path, state)
    result: dict[str, Any] = {"out": str(out), "state": state}
    if job.report is not None:
        rep_out = Path(job.report_out) if job.report_out else out / "report"
        result["report"] = _report(job, out, state, rep_out)
        io.write_json(rep_out / "sweep_settings.json", state)
    return result


# ----------------------------------------------------------------------------- int8
def _int8_settings(job: SweepJob) -> dict[str, Any]:
    from compressor.deploy import onnx_int8

    return {"max_drop": float(job.int8_max_drop), "calibration_images": int(job.int8_calib_n),
            "calibration_method": job.int8_calib_method or onnx_int8.DEFAULT_METHOD, "seed": int(job.seed)}


def _int8_point(job: SweepJob, folder: Path, pt: dict[str, Any]) -> bool:
    """Export the point's pruned model to int8 (``compressor.export(int8=True)``) into ``folder``, recording the
    outcome in ``pt["int8"]``; a drop over the limit is recorded as refused and leaves no file.
    Returns whether anything was done (False: the file or the same refusal exists already)."""
    import compressor
    from compressor.deploy.onnx_int8 import DropTooLarge

    dest = folder / INT8_FILE
    settings = _int8_settings(job)
    prev = pt.get("int8") or {}
    if dest.is_file() and prev.get("status") == "done":
        return False
    if prev.get("status") == "refused" and prev.get("settings") == settings:
        log.info("point %s: int8 refused earlier with these settings, not retried", pt["name"])
        return False
    model = compressor.load(folder / "pruned.pt")
    log.info("point %s: int8 export (%d calibration images, %s)", pt["name"], settings["calibration_images"],
             settings["calibration_method"])
    try:
        res = compressor.export(model, dest, int8=True, max_drop=settings["max_drop"], seed=settings["seed"],
                                n_calib=settings["calibration_images"], calib_method=settings["calibration_method"])
    except DropTooLarge as exc:
        pt["int8"] = {"status": "refused", "reason": str(exc), "settings": settings, **_int8_figures(exc.result)}
        log.warning("point %s: int8 refused: %s", pt["name"], exc)
        return True
    pt["int8"] = {"status": "done", "path": str(dest), "settings": settings, **_int8_figures(res)}
    return True


def _int8_figures(res: Any) -> dict[str, Any]:
    if res is None:
        return {}
    return {"top1_float": res.top1_float, "top1_int8": res.top1_int8, "drop": res.drop, "agree": res.agree,
            "bytes": res.bytes, "float_bytes": res.float_bytes, "test_images": res.n_test}


def _refused_row(pt: dict[str, Any], source: dict[str, Any] | None, model: str) -> dict[str, Any]:
    """A report row for a point whose int8 export was refused: no file, no latency, the check's figures named."""
    q = pt["int8"]
    src = source or {}
    if "top1_int8" in q:
        why = (f"int8 REFUSED: {q['top1_int8']:.2f}% vs float32 {q['top1_float']:.2f}% "
               f"(−{q['drop']:.2f} > {q['settings']['max_drop']:g} points), no file")
    else:
        why = "int8 REFUSED, no file"
    return {"name": f"{pt['name']}/{INT8_FILE} (refused)", "path": None, "model": src.get("model", model),
            "role": "onnx int8 refused", "runtime": "onnxruntime", "precision": "int8", "refused": True,
            "refused_reason": q.get("reason"), "criterion": src.get("criterion"), "rates": src.get("rates"),
            "target": f"{src.get('target') or src.get('rates') or pt['name']}; {why}", "data": src.get("data", "–"),
            "params": src.get("params", 0), "macs": src.get("macs", 0), "file_bytes": 0, "weights_bytes": 0,
            "top1": None, "int8_check_top1": q.get("top1_int8"), "int8_check_top1_float": q.get("top1_float"),
            "int8_check_drop": q.get("drop"), "source": src.get("name"), "baseline": src.get("baseline"),
            "params_reduction_pct": src.get("params_reduction_pct"), "macs_reduction_pct": src.get("macs_reduction_pct")}


def _report(job: SweepJob, out: Path, state: dict[str, Any], rep_out: Path) -> dict[str, Any]:
    """The sweep's report: the baseline, each done point, and with ``int8`` each point's int8 file (or a refused row
    after its point's row)."""
    assert job.report is not None
    rcfg = replace(job.report, data=job.data, data_root=job.data_root)
    done = [p for p in state["points"] if (out / p["name"] / "pruned.pt").is_file()]
    entries = [report.Entry(Path(job.checkpoint))]
    entries += [report.Entry(out / p["name"] / "pruned.pt", out / "scores.pt", Path(job.checkpoint),
                             report.budget_label(p.get("budget"), p.get("policy")), p.get("rates_file"))
                for p in done]
    entries += [report.Entry(out / p["name"] / INT8_FILE) for p in done if (out / p["name"] / INT8_FILE).is_file()]
    rows, info = report.build(entries, rcfg)
    for p in done:
        if (p.get("int8") or {}).get("status") != "refused":
            continue
        pruned = str(out / p["name"] / "pruned.pt")
        at = next((i for i, r in enumerate(rows) if r.get("path") == pruned), None)
        row = _refused_row(p, rows[at] if at is not None else None, state.get("model") or "?")
        rows.insert(len(rows) if at is None else at + 1, row)
    res = report.write(rows, info, rep_out, rcfg.plots)
    res["rows"] = rows
    res["markdown"] = report.markdown(rows, info["meta"])
    return res


def parse_budgets(text: str | None, key: str) -> list[tuple[str, float]]:
    """``"0.7,0.5"`` → ``[(key, 0.7), (key, 0.5)]``; each a fraction kept in (0, 1]."""
    if not text:
        return []
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            v = float(tok)
        except ValueError as exc:
            raise UserError(f"not a number: {tok!r}", field=key) from exc
        if not 0.0 < v <= 1.0 or math.isnan(v):
            raise UserError(f"a budget is the fraction kept, in (0, 1]; got {tok}", field=key)
        out.append((key, v))
    return out
