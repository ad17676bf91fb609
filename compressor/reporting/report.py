"""Accuracy/size/latency tradeoff reports over checkpoints and run folders.

One row per checkpoint, for any model the engine prunes (registered families, CIFAR ResNets,
``torchvision:<name>``, ``package.module:builder``). Each pruned model is compared with *its*
baseline: an unpruned checkpoint in the inputs of the same architecture reference, builder
arguments and class count whose unit widths (found by the dependency-graph engine) equal the
widths recorded in the pruned model's plan (same folder preferred, then the baseline a sweep
recorded); see ``compressor.reporting.report_baseline``. When no such checkpoint is given, the model before
pruning is rebuilt from the architecture reference and the plan (random weights: good for
counting and latency, not for accuracy).

Definitions used in every table:

* params / MACs: ``compressor.pruning.counting`` on the physical model (conv + linear MACs, one image).
* latency: median wall time of one forward pass after warm-up, models of one group timed
  interleaved (``compressor.deploy.latency``); the thread count and backend settings are recorded.
  The spread is the interquartile range (IQR, q3 − q1) of the repeats.
* Δtop-1 = model top-1 − baseline top-1 on the same test split (``top1_delta``): a drop is negative.
* rates: how the rates were written (the rates file's name, and its ``rates:`` string when the
  checkpoint recorded it); the resolved per-unit rates are in ``rates_per_unit`` (CSV/JSON).
* BN re-estimated: only for a model that has BatchNorm layers, from the recorded recovery steps.
* speedup = baseline latency / model latency; ``speedup/MACs`` = speedup ÷ (baseline MACs /
  model MACs): 1.0 means latency fell exactly as fast as the MAC count. A speedup whose IQR
  overlaps the baseline's is flagged (``speedup_<slot>_uncertain``; ``≈`` in the table): the
  measurement does not separate the two models.

Tables are rendered in ``compressor.reporting.report_render``; ``curves`` (recovery curves of several
train/finetune runs overlaid, ``compressor.reporting.report_curves``) is re-exported here.
"""

from __future__ import annotations

import glob
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from compressor.storage import checkpoint
from compressor.pruning import counting
from compressor.storage import io
from compressor.deploy import latency as lat
from compressor.reporting import plots
from compressor.reporting import report_baseline as rb
from compressor.errors import UserError
from compressor.reporting.report_curves import CURVES_PNG, METRICS_FILE, curve_summary, curves, curves_table, read_metrics
from compressor.reporting.report_render import _csv, _safe, markdown

__all__ = ["CURVES_PNG", "METRICS_FILE", "Entry", "ReportConfig", "build", "collect", "curve_summary", "curves",
           "curves_table", "markdown", "read_metrics", "run_report", "write"]

log = logging.getLogger("compressor")

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class ReportConfig:
    data: str | None = None  # None: the data each checkpoint was made on (its data contract), else digits
    data_root: str | None = None
    device: str = "auto"  # evaluation device
    batch_size: int = 256
    seed: int = 0
    evaluate: bool = True
    latency: lat.LatencyConfig | None = field(default_factory=lat.LatencyConfig)
    plots: bool = True
    progress: bool = False
    models: tuple[str, ...] = ()  # user-code references (module:builder) whose checkpoints may be loaded


@dataclass
class Entry:
    path: Path
    scores: Path | None = None
    baseline_hint: Path | None = None  # e.g. the baseline a sweep recorded
    target: str | None = None  # e.g. a sweep point's budget ("macs 0.5, policy local")
    rates_file: str | None = None  # the rates file a sweep point was made from (its copy is <point>/rates.yaml)


def budget_label(budget: dict | None, policy: str | None = None) -> str | None:
    if not budget:
        return None
    return ", ".join(f"{k} {v:g}" for k, v in budget.items()) + (f" ({policy})" if policy else "")


# ----------------------------------------------------------------------------- inputs
def _is_checkpoint(p: Path) -> bool:
    """Whether ``p`` is a compressor checkpoint, from its header (tensors memory-mapped, not read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip-format torch file: the full, checked read decides
        try:
            obj = checkpoint.read(p)
        except UserError:
            return False
    return isinstance(obj, dict) and obj.get("format") == checkpoint.CKPT_FORMAT


def _scores_near(p: Path) -> Path | None:
    for folder in (p.parent, p.parent.parent):
        cand = folder / "scores.pt"
        if cand.is_file():
            return cand
    return None


def _from_folder(folder: Path) -> list[Entry]:
    sweep = folder / SWEEP_FILE
    if sweep.is_file():
        try:
            doc = json.loads(sweep.read_text())
            named = doc["baseline"]
            points = list(doc.get("points", []))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"unreadable sweep state ({type(exc).__name__}: {exc})", source=str(sweep)) from exc
        base = rb.sweep_baseline(folder, sweep, named, _is_checkpoint)  # a path kept to what a sweep can name
        out = [Entry(base)] if base is not None and base.is_file() else []
        if not out:
            log.info("%s: the sweep's baseline %s is not here; it is rebuilt for counting", sweep, named)
        for i, pt in enumerate(points):
            if not isinstance(pt, dict):
                raise UserError("must be a mapping", source=str(sweep), field=f"points[{i}]")
            ck = rb.sweep_point_folder(folder, sweep, i, pt.get("name")) / "pruned.pt"
            if ck.is_file():
                out.append(Entry(ck, _scores_near(ck), base, budget_label(pt.get("budget"), pt.get("policy")),
                                 pt.get("rates_file")))
        return out
    files = [p for p in sorted(folder.rglob("*.pt")) if p.name != "scores.pt" and not p.name.startswith(".")]
    found = [p for p in files if _is_checkpoint(p)]
    if len(found) < len(files):
        log.info("%s: skipped %d .pt file(s) that are not compressor checkpoints", folder, len(files) - len(found))
    return [Entry(p, _scores_near(p)) for p in found] + [Entry(p) for p in sorted(folder.rglob("*.onnx"))
                                                          if not p.name.startswith(".")]


def collect(inputs: Sequence[str]) -> list[Entry]:
    """Expand globs, run folders and sweep folders into checkpoint entries (deduplicated)."""
    entries: dict[Path, Entry] = {}
    for pattern in inputs:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if Path(pattern).exists() else [])
        if not matches:
            raise UserError("no such file or folder (nothing matches)", source=pattern)
        for m in matches:
            p = Path(m)
            for e in (_from_folder(p) if p.is_dir() else [Entry(p, _scores_near(p))]):
                key = e.path.resolve()
                if key not in entries or (e.baseline_hint and not entries[key].baseline_hint):
                    entries[key] = e
    if not entries:
        raise UserError("no checkpoints found in the inputs", source=" ".join(inputs))
    return list(entries.values())


# ----------------------------------------------------------------------------- rows
def rate_string(rates: Sequence[float]) -> str:
    """Per-unit rates in HRank's run-length syntax, e.g. ``[0.21]*7+[0.75]*5``."""
    parts: list[str] = []
    i = 0
    while i < len(rates):
        j = i
        while j < len(rates) and rates[j] == rates[i]:
            j += 1
        parts.append(f"[{float(rates[i])!r}]" + (f"*{j - i}" if j - i > 1 else ""))
        i = j
    return "+".join(parts)


def rates_label(rates: Mapping[str, Any] | None, rates_file: str | None = None) -> str | None:
    """How the rates were given: ``file.yaml``, ``file.yaml: [0.5]*13`` or the string alone; None when unknown.

    The string is the checkpoint's ``rates["rates_string"]`` (the ``rates:`` value as written, when
    it was a string); the file is ``rates_file`` (a sweep's original), else ``rates["source"]``
    unless that is a placeholder such as ``<inline>`` or ``<sweep budget …>``.
    """
    rates = rates or {}
    text = rates.get("rates_string") or (rates.get("extra") or {}).get("rates_string")
    src = rates_file or rates.get("source")
    name = Path(str(src)).name if src and not str(src).startswith("<") else None
    text = str(text) if text else None
    if name and text:
        return f"{name}: {text}"
    return name or text


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def recovery_steps(ck: Mapping[str, Any]) -> str | None:
    """The recorded recovery after surgery (``"bn"``, ``"reconstruct+finetune"``, ``"none"``), else None.

    A prune run records it in its metrics and provenance; a fine-tune carries the prune metrics
    under ``metrics["prune"]`` and the source's provenance under ``provenance["source"]``.
    """
    m = ck.get("metrics") or {}
    for cand in (m.get("recovery"), (m.get("prune") or {}).get("recovery") if isinstance(m.get("prune"), Mapping)
                 else None, origin(ck, "recovery")):
        if isinstance(cand, str):
            return cand
    return None


def bn_reestimated(net: nn.Module, ck: Mapping[str, Any]) -> bool | None:
    """Whether BN statistics were re-estimated after surgery: never for a model without BatchNorm
    (SqueezeNet: a recorded ``True`` there is a no-op); else the recorded recovery steps, else the
    provenance flag; None when nothing was recorded."""
    if not has_batchnorm(net):
        return False
    steps = recovery_steps(ck)
    if steps is not None:
        return "bn" in steps.split("+")
    flag = origin(ck, "bn_recalibrated")
    return bool(flag) if flag is not None else None


def compare_to_baseline(row: dict[str, Any], base: Mapping[str, Any], *, accuracy: bool = True) -> None:
    """Add the reductions vs ``base`` to ``row``: params/MACs −%, and ``top1_delta`` = model − baseline
    (a drop is negative) when both were evaluated on the same data."""
    for k in ("params", "macs"):
        row[f"{k}_reduction_pct"] = 100.0 * (1.0 - row[k] / base[k])
    if accuracy and row.get("top1") is not None and base.get("top1") is not None \
            and base.get("data") == row.get("data"):
        row["top1_delta"] = row["top1"] - base["top1"]


def row_label(p: Path, taken: set[str], *, suffix: bool = False) -> str:
    """A row's name: ``folder/stem`` (``folder/file.ext`` with ``suffix``, so an ``.onnx`` file and its
    ``.pt`` source differ), or the whole path when that name is taken already."""
    leaf = p.name if suffix else p.stem
    name = f"{p.parent.name}/{leaf}" if p.parent.name else leaf
    if name in taken:
        name = str(p)
    taken.add(name)
    return name


@dataclass
class _Loaded:
    entry: Entry
    name: str
    net: nn.Module
    ck: dict[str, Any]
    role: str
    ident: rb.Identity  # (model reference, builder_kwargs, num_classes): which architecture this is
    pre: dict[str, int]  # a pruned model's unit widths before pruning (its plan's), else {}
    _widths: dict[str, int] | None = None

    def widths(self) -> dict[str, int]:
        """This model's own unit widths (the engine's discovery; computed once, for baselines)."""
        if self._widths is None:
            self._widths = rb.unit_widths(self.net)
        return self._widths


def _reference_in(path: Path) -> Any:
    """The ``model`` field of a checkpoint, from its header (tensors memory-mapped, not read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("model")
    except Exception:  # noqa: BLE001 - checkpoint.load gives the one-line error
        return None


def _load(entries: Sequence[Entry], allow: Sequence[str] = ()) -> list[_Loaded]:
    """Load each checkpoint; user code (``module:builder``) only when named in ``allow`` (``--model``)."""
    taken: set[str] = set()
    out = []
    for e in entries:
        ref = _reference_in(e.path)
        net, ck = checkpoint.load(e.path, model=ref if ref in allow else None)
        role = "pruned" if ck.get("plan") else "baseline"
        out.append(_Loaded(e, row_label(e.path, taken), net, ck, role, rb.identity(ck), rb.pre_prune_widths(ck)))
    return out


def _pick_baseline(item: _Loaded, loaded: Sequence[_Loaded]) -> _Loaded | None:
    cands = [b for b in loaded
             if b.role == "baseline" and b.ident == item.ident and rb.matches(b.widths(), item.pre)]
    if not cands:
        return None
    same_dir = [b for b in cands if b.entry.path.parent.resolve() == item.entry.path.parent.resolve()]
    hinted = [b for b in cands if item.entry.baseline_hint and b.entry.path.resolve() == item.entry.baseline_hint.resolve()]
    return (same_dir or hinted or cands)[0]


def origin(ck: Mapping[str, Any], key: str) -> Any:
    """A provenance field of ``ck``, else of the checkpoint it was fine-tuned from (``provenance["source"]``), …"""
    prov = ck.get("provenance")
    while isinstance(prov, Mapping):
        if prov.get(key) is not None:
            return prov[key]
        prov = prov.get("source")
    return None


def finetune_epochs(ck: Mapping[str, Any]) -> int:
    """Fine-tune epochs the weights have had: those recorded before (``finetune_history``: in the prune run,
    or carried by a fine-tune) plus those of the training state (a train/finetune checkpoint)."""
    before = (ck.get("metrics") or {}).get("finetune_history") or []
    ts = (ck.get("extra") or {}).get("train_state") or {}
    return len(before) + len(ts.get("history") or [])


def _describe(item: _Loaded) -> dict[str, Any]:
    ck = item.ck
    rates = ck.get("rates") or {}
    target = rates.get("target")
    per_unit = rate_string(list(rates["rates"].values())) if rates.get("rates") else None
    pruned = item.role == "pruned"
    return {
        "name": item.name,
        "path": str(item.entry.path),
        "model": ck["model"],
        "role": item.role,
        "criterion": origin(ck, "criterion") if item.role == "pruned" else None,
        "rates": (rates_label(rates, item.entry.rates_file) or per_unit) if rates else None,
        "rates_per_unit": per_unit,
        "rates_source": rates.get("source") if rates else None,
        "target": ", ".join(f"{k} {v:g}" for k, v in target.items()) if target else item.entry.target,
        "has_bn": has_batchnorm(item.net),
        "bn_recalibrated": bn_reestimated(item.net, ck) if pruned else None,
        "finetune_epochs": finetune_epochs(ck) if item.role == "pruned" else None,
        "file_bytes": item.entry.path.stat().st_size,
        "weights_bytes": sum(t.numel() * t.element_size() for t in ck["state_dict"].values() if torch.is_tensor(t)),
    }


def _evaluate(item: _Loaded, cfg: ReportConfig, bundles: dict[tuple, Any]) -> dict[str, Any]:
    """Test accuracy of the loaded model (as ``eval`` computes it); one data bundle per (data, root, size)."""
    from compressor import data as data_mod
    from compressor.training.evaluation import evaluate, resolve_device

    from compressor.data import contract

    src = str(item.entry.path)
    c = contract.of(item.net)
    name, root = contract.resolve_source(c, cfg.data, cfg.data_root, item.ck.get("provenance"), src)
    key = (name, root, item.net.input_size, c.to_dict().__repr__() if c else None)
    if key not in bundles:  # one bundle per (data, root, size, contract)
        bundles[key] = contract.load_data(item.net, name, root, seed=cfg.seed, source=src)[0]
    bundle = bundles[key]
    if c is not None:
        contract.check(c, bundle, src)
    data_mod.check_classes(bundle, item.net.num_classes, what="checkpoint", source=src)
    device = resolve_device(cfg.device)
    try:
        res = evaluate(item.net.to(device), data_mod.loader(bundle.test, cfg.batch_size, device=device), device,
                       cfg.progress, "eval")
    finally:
        item.net.cpu()
    return {"data": name, "n_test": res["n"], "top1": res["top1"], "top5": res["top5"], "loss": res["loss"]}


def _time_groups(groups: dict[str, dict[str, nn.Module]], sizes: dict[str, int],
                 cfg: lat.LatencyConfig) -> dict[str, dict[str, lat.Timing]]:
    """``{model name: {"cpu_b1": Timing, ...}}``; each group (a baseline and its pruned models) interleaved."""
    out: dict[str, dict[str, lat.Timing]] = {}
    for models in groups.values():
        for dev in lat.devices(cfg):
            res = lat.compare(models, sizes, cfg, dev)
            for n, per_batch in res.items():
                for b, t in per_batch.items():
                    out.setdefault(n, {})[f"{dev}_b{b}"] = t
    return out


@dataclass
class _Baselines:
    """Which model each row is compared with, and the groups timed together."""

    of: dict[str, str | None] = field(default_factory=dict)  # row name -> baseline name (None: none)
    groups: dict[str, dict[str, nn.Module]] = field(default_factory=dict)  # baseline name -> models
    synthetic: dict[str, dict[str, int]] = field(default_factory=dict)  # rebuilt baselines' counts
    sizes: dict[str, Any] = field(default_factory=dict)


def _rebuilt_baseline(item: _Loaded, rebuilt: dict[tuple, tuple[str | None, Any]],
                      bl: _Baselines) -> tuple[str | None, Any]:
    """``(name, None)`` of the unpruned model rebuilt for ``item`` (random weights), shared by pruned
    models of the same architecture and pre-pruning widths; ``(None, reason)`` if it cannot be rebuilt."""
    key = (item.ident, tuple(sorted(item.pre.items())))
    if key not in rebuilt:
        arch = item.ident[0]
        k = sum(kk[0][0] == arch for kk in rebuilt) + 1
        sname = f"{arch} rebuilt from plan widths" + (f" #{k}" if k > 1 else "")
        try:
            snet = rb.rebuild_unpruned(item.net, item.ck)
            bl.synthetic[sname] = counting.count(snet)
        except (UserError, RuntimeError, ValueError) as exc:
            log.warning("%s: its baseline is not in the inputs and cannot be rebuilt (%s)", item.entry.path, exc)
            rebuilt[key] = (None, str(exc).split("\n")[0][:160])
        else:
            bl.sizes[sname] = snet.input_size
            bl.groups.setdefault(sname, {})[sname] = snet
            rebuilt[key] = (sname, snet)
    name, net_or_why = rebuilt[key]
    return (name, None) if name is not None else (None, net_or_why)


def _match(loaded: Sequence[_Loaded], rows: dict[str, dict[str, Any]]) -> _Baselines:
    bl = _Baselines(sizes={item.name: item.net.input_size for item in loaded})
    rebuilt: dict[tuple, tuple[str | None, Any]] = {}
    for item in loaded:
        row = rows[item.name]
        match = item if item.role == "baseline" else _pick_baseline(item, loaded)
        if match is not None:
            bname: str | None = match.name
            bl.groups.setdefault(match.name, {})[match.name] = match.net
            row["baseline"] = "(itself)" if match is item else match.name
        else:
            bname, why = _rebuilt_baseline(item, rebuilt, bl)
            row["baseline"] = (f"{bname} (not in inputs: random weights)" if bname is not None
                               else f"(none: not in the inputs and not rebuilt: {why})")
        bl.of[item.name] = bname
        bl.groups.setdefault(bname or item.name, {})[item.name] = item.net
    return bl


def _latency_columns(rows: dict[str, dict[str, Any]], bl: _Baselines,
                     timings: dict[str, dict[str, lat.Timing]]) -> None:
    """Latency, spread and, against the row's baseline (when it has one), speedup and speedup per MAC."""
    for name, row in rows.items():
        bname = bl.of[name]
        for slot, t in timings[name].items():
            row[f"lat_{slot}_ms"] = t.median_ms
            row[f"lat_{slot}_iqr_ms"] = t.iqr_ms
            if bname is None:
                continue
            bt = timings[bname][slot]
            bmacs = (rows.get(bname) or bl.synthetic[bname])["macs"]
            row[f"speedup_{slot}"] = bt.median_ms / t.median_ms
            row[f"speedup_{slot}_uncertain"] = bname != name and lat.overlaps(bt, t)
            row[f"speedup_per_mac_{slot}"] = row[f"speedup_{slot}"] / (bmacs / row["macs"])


def build(entries: Sequence[Entry], cfg: ReportConfig = ReportConfig()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per checkpoint or ``.onnx`` file: ``compressor.reporting.report_onnx``) and report metadata."""
    from compressor.reporting import report_onnx

    onnx_entries = [e for e in entries if report_onnx.is_onnx_entry(e)]
    loaded = _load([e for e in entries if not report_onnx.is_onnx_entry(e)], cfg.models)
    rows: dict[str, dict[str, Any]] = {}
    bundles: dict[tuple, Any] = {}
    for item in loaded:
        row = _describe(item)
        row.update(counting.count(item.net))
        if cfg.evaluate:
            row.update(_evaluate(item, cfg, bundles))
        rows[item.name] = row
    bl = _match(loaded, rows)
    onnx_names = report_onnx.add_rows(onnx_entries, loaded, rows, bl, cfg, bundles)
    for name, row in rows.items():
        bname = bl.of[name]
        if bname is not None:
            compare_to_baseline(row, rows.get(bname) or bl.synthetic[bname], accuracy=cfg.evaluate and bname in rows)
    timings: dict[str, dict[str, lat.Timing]] = {}
    if cfg.latency is not None:
        timings = _time_groups(bl.groups, bl.sizes, cfg.latency)
        report_onnx.drop_cuda_slots(timings, onnx_names)
        _latency_columns(rows, bl, timings)
        report_onnx.int8_vs_float(rows, onnx_names)
    order = sorted(rows.values(), key=lambda r: (r["model"], r["role"] != "baseline", -r["macs"], r["name"]))
    any_t = next(iter(timings.values()), {})
    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "cpu_threads": next((t.threads for s, t in any_t.items() if s.startswith("cpu")), torch.get_num_threads()),
        "backends": next((t.backends for t in any_t.values()), lat.backend_settings()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "latency": asdict(cfg.latency) if cfg.latency else None,
        "latency_slots": sorted(any_t),
        "evaluated": cfg.evaluate,
        "counted": "MACs: conv + linear multiply-accumulates for one image; params: all parameters",
        "synthetic_baselines": bl.synthetic,
    }
    return order, {"meta": meta, "loaded": loaded}


def write_plots(rows: Sequence[dict[str, Any]], loaded: Sequence[_Loaded], out: Path) -> list[Path]:
    from compressor.pruning.scores import Scores

    paths = [p for p in (plots.tradeoff(rows, "macs", out / "acc_vs_macs.png", title="top-1 vs MACs"),
                         plots.tradeoff(rows, "params", out / "acc_vs_params.png", title="top-1 vs params")) if p]
    done_scores: set[Path] = set()
    for item in loaded:
        if item.role != "pruned":
            continue
        names, before, after = rb.kept_widths(item.net, item.ck)
        paths.append(plots.widths(names, before, after, out / f"widths_{_safe(item.name)}.png",
                                  title=f"{item.name}: channels before → after"))
        sp = item.entry.scores
        if sp is not None and sp.resolve() not in done_scores:
            done_scores.add(sp.resolve())
            sc = Scores.load(sp)
            crit = origin(item.ck, "criterion")
            crit = crit if crit in sc.scores else next(iter(sc.scores))
            per_unit = {u: t.float().tolist() for u, t in sc.scores[crit].items()}
            tag = _safe(f"{sp.parent.name}_{sp.stem}")
            paths.append(plots.score_boxes(per_unit, out / f"scores_{tag}.png",
                                           title=f"{crit} scores per layer ({sp.parent.name}/{sp.name})"))
    return paths


def write(rows: Sequence[dict[str, Any]], info: dict[str, Any], out: str | Path, make_plots: bool = True) -> dict[str, Any]:
    out = Path(out)
    meta = info["meta"]
    paths = {
        "markdown": io.write_text(out / "report.md", markdown(rows, meta)),
        "csv": io.write_text(out / "report.csv", _csv(rows)),
        "json": io.write_json(out / "report.json", {"meta": meta, "rows": list(rows)}),
    }
    pngs = write_plots(rows, info["loaded"], out) if make_plots else []
    return {"paths": {k: str(v) for k, v in paths.items()}, "plots": [str(p) for p in pngs]}


def run_report(inputs: Sequence[str] | Sequence[Entry], out: str | Path, cfg: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Collect, evaluate, count, time, and write ``report.md/.csv/.json`` plus PNGs under ``out``."""
    entries = [e for e in inputs if isinstance(e, Entry)] or collect([str(i) for i in inputs])
    rows, info = build(entries, cfg)
    res = write(rows, info, out, cfg.plots)
    res["rows"] = rows
    res["markdown"] = markdown(rows, info["meta"])
    return res


