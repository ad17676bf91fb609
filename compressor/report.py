"""Accuracy/size/latency tradeoff reports over checkpoints and run folders.

One row per checkpoint. Each pruned model is compared with *its* baseline: an unpruned
checkpoint in the inputs whose cfg equals the pre-pruning cfg recorded in the pruned model's
plan (same folder preferred, then the baseline a sweep recorded). When no such checkpoint is
given, the pre-pruning model is rebuilt from the plan's widths (random weights: good for
counting and latency, not for accuracy), or from the architecture's default cfg without a plan.

Definitions used in every table:

* params / MACs: ``compressor.counting`` on the physical model (conv + linear MACs, one image).
* latency: median wall time of one forward pass after warm-up, models of one group timed
  interleaved (``compressor.latency``); the thread count and backend settings are recorded.
  The spread is the interquartile range (IQR, q3 − q1) of the repeats.
* Δtop-1 = model top-1 − baseline top-1 on the same test split (``top1_delta``): a drop is negative.
* rates: how the rates were written (the rates file's name, and its ``rates:`` string when the
  checkpoint recorded it); the resolved per-unit rates are in ``rates_per_unit`` (CSV/JSON).
* BN re-estimated: only for a model that has BatchNorm layers, from the recorded recovery steps.
* speedup = baseline latency / model latency; ``speedup/MACs`` = speedup ÷ (baseline MACs /
  model MACs): 1.0 means latency fell exactly as fast as the MAC count. A speedup whose IQR
  overlaps the baseline's is flagged (``speedup_<slot>_uncertain``; ``≈`` in the table): the
  measurement does not separate the two models.

``curves``: recovery curves (validation top-1 vs epochs, from each run's ``metrics.jsonl``) of
several train/finetune runs overlaid in one PNG, with a start/best/final table.
"""

from __future__ import annotations

import csv
import glob
import io as _io
import json
import logging
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from compressor import checkpoint, counting, io, latency as lat, plots
from compressor.errors import UserError
from compressor.models import get_model

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
            base = Path(doc["baseline"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"unreadable sweep state ({type(exc).__name__}: {exc})", source=str(sweep)) from exc
        out = [Entry(base)] if base.is_file() else []
        if not out:
            log.info("%s: the sweep's baseline %s is not here; it is rebuilt for counting", sweep, base)
        for pt in doc.get("points", []):
            ck = folder / pt["name"] / "pruned.pt"
            if ck.is_file():
                out.append(Entry(ck, _scores_near(ck), base, budget_label(pt.get("budget"), pt.get("policy")),
                                 pt.get("rates_file")))
        return out
    files = [p for p in sorted(folder.rglob("*.pt")) if p.name != "scores.pt" and not p.name.startswith(".")]
    found = [p for p in files if _is_checkpoint(p)]
    if len(found) < len(files):
        log.info("%s: skipped %d .pt file(s) that are not compressor checkpoints", folder, len(files) - len(found))
    return [Entry(p, _scores_near(p)) for p in found]


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


def pre_prune_cfg(net: nn.Module, plan: dict | None) -> list:
    """The cfg the model had before pruning, from the widths its plan recorded."""
    cfg = list(net.cfg)
    units = (plan or {}).get("units", {})
    for u in net.prunable_units():
        if u.name in units:
            for i in u.cfg_index:
                cfg[i] = int(units[u.name]["width"])
    return cfg


def _label(p: Path, taken: set[str]) -> str:
    name = f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem
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
    key: tuple  # (arch, num_classes, cfg): what this model is, for baseline matching
    pre_key: tuple  # the same for the model it was pruned from


def _load(entries: Sequence[Entry]) -> list[_Loaded]:
    taken: set[str] = set()
    out = []
    for e in entries:
        net, ck = checkpoint.load(e.path)
        role = "pruned" if ck.get("plan") else "baseline"
        key = (ck["model"], int(net.num_classes), tuple(net.cfg))
        pre = (ck["model"], int(net.num_classes), tuple(pre_prune_cfg(net, ck.get("plan"))))
        out.append(_Loaded(e, _label(e.path, taken), net, ck, role, key, pre))
    return out


def _pick_baseline(item: _Loaded, loaded: Sequence[_Loaded]) -> _Loaded | None:
    cands = [b for b in loaded if b.role == "baseline" and b.key == item.pre_key]
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
    from compressor.evaluate import evaluate, resolve_device

    from compressor import contract

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

    of: dict[str, str] = field(default_factory=dict)  # row name -> baseline name
    groups: dict[str, dict[str, nn.Module]] = field(default_factory=dict)  # baseline name -> models
    synthetic: dict[str, dict[str, int]] = field(default_factory=dict)  # rebuilt baselines' counts
    sizes: dict[str, int] = field(default_factory=dict)


def _match(loaded: Sequence[_Loaded], rows: dict[str, dict[str, Any]]) -> _Baselines:
    bl = _Baselines(sizes={item.name: item.net.input_size for item in loaded})
    rebuilt: dict[tuple, tuple[str, nn.Module]] = {}
    for item in loaded:
        row = rows[item.name]
        match = item if item.role == "baseline" else _pick_baseline(item, loaded)
        if match is not None:
            bname, bnet = match.name, match.net
            row["baseline"] = "(itself)" if match is item else match.name
        else:
            if item.pre_key not in rebuilt:
                arch, ncls, pre_cfg = item.pre_key
                k = sum(key[0] == arch for key in rebuilt) + 1
                sname = f"{arch} rebuilt from {'plan widths' if item.ck.get('plan') else 'default cfg'}"
                sname += f" #{k}" if k > 1 else ""
                snet = get_model(arch, num_classes=ncls, cfg=list(pre_cfg))
                rebuilt[item.pre_key] = (sname, snet)
                bl.sizes[sname] = snet.input_size
                bl.synthetic[sname] = counting.count(snet)
            bname, bnet = rebuilt[item.pre_key]
            row["baseline"] = f"{bname} (not in inputs: random weights)"
        bl.of[item.name] = bname
        bl.groups.setdefault(bname, {})[bname] = bnet
        bl.groups[bname][item.name] = item.net
    return bl


def build(entries: Sequence[Entry], cfg: ReportConfig = ReportConfig()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per checkpoint) and report metadata."""
    loaded = _load(entries)
    rows: dict[str, dict[str, Any]] = {}
    bundles: dict[tuple, Any] = {}
    for item in loaded:
        row = _describe(item)
        row.update(counting.count(item.net))
        if cfg.evaluate:
            row.update(_evaluate(item, cfg, bundles))
        rows[item.name] = row
    bl = _match(loaded, rows)
    for name, row in rows.items():
        base = rows.get(bl.of[name]) or bl.synthetic[bl.of[name]]
        compare_to_baseline(row, base, accuracy=cfg.evaluate and bl.of[name] in rows)
    timings: dict[str, dict[str, lat.Timing]] = {}
    if cfg.latency is not None:
        timings = _time_groups(bl.groups, bl.sizes, cfg.latency)
        for name, row in rows.items():
            bt = timings[bl.of[name]]
            bmacs = (rows.get(bl.of[name]) or bl.synthetic[bl.of[name]])["macs"]
            for slot, t in timings[name].items():
                row[f"lat_{slot}_ms"] = t.median_ms
                row[f"lat_{slot}_iqr_ms"] = t.iqr_ms
                row[f"speedup_{slot}"] = bt[slot].median_ms / t.median_ms
                row[f"speedup_{slot}_uncertain"] = bl.of[name] != name and lat.overlaps(bt[slot], t)
                row[f"speedup_per_mac_{slot}"] = row[f"speedup_{slot}"] / (bmacs / row["macs"])
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


# ----------------------------------------------------------------------------- outputs
def _m(n: float) -> str:
    return f"{n / 1e6:.3f}M" if n < 1e7 else f"{n / 1e6:.1f}M"


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    slots = meta.get("latency_slots", [])
    head = ["model", "name", "criterion", "rates / target", "data", "top-1", "top-5", "Δtop-1", "params (−%)",
            "MACs (−%)", "file MB (weights)"]
    head += [f"{s.replace('_b', ' b')} ms ±IQR/2 (×, ×/MACs)" for s in slots]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        # A budget's resolved per-layer rates are long: the table shows the budget, the CSV/JSON both.
        rt = r.get("target") or r.get("rates") or ("unpruned" if r["role"] == "baseline" else "–")
        cells = [r["model"], r["name"], r.get("criterion") or "–", rt, r.get("data", "–"), _f(r.get("top1")),
                 _f(r.get("top5")), _f(r.get("top1_delta"), "{:+.2f}"),
                 f"{_m(r['params'])} ({r['params_reduction_pct']:.1f}%)",
                 f"{_m(r['macs'])} ({r['macs_reduction_pct']:.1f}%)", f"{r['file_bytes'] / 1e6:.2f} ({r['weights_bytes'] / 1e6:.2f})"]
        for s in slots:
            if f"lat_{s}_ms" not in r:
                cells.append("–")
                continue
            flag = "≈" if r.get(f"speedup_{s}_uncertain") else ""
            iqr = r.get(f"lat_{s}_iqr_ms")
            spread = f" ±{iqr / 2:.2f}" if iqr is not None else ""  # no spread recorded: none shown
            cells.append(f"{r[f'lat_{s}_ms']:.2f}{spread} "
                         f"({flag}{r[f'speedup_{s}']:.2f}×, {r[f'speedup_per_mac_{s}']:.2f})")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lc = meta.get("latency") or {}
    notes = [
        "",
        f"- Counted: {meta['counted']} (`compressor.counting`).",
        "- Δtop-1 = model top-1 − baseline top-1, same test split (a drop is negative); baselines are matched by "
        "the pre-pruning cfg.",
    ]
    if lc:
        be = meta.get("backends") or {}
        notes.append(f"- Latency: median of {lc['repeats']} runs after {lc['warmup']} warm-up runs, random inputs, "
                     f"models of one baseline group timed interleaved (ABAB…); ±IQR/2 = half the interquartile "
                     f"range; CPU threads: {meta['cpu_threads']}; mkldnn "
                     f"{'on' if be.get('mkldnn_enabled') else 'off'}; "
                     f"{'channels_last' if lc.get('channels_last') else 'contiguous'} tensors"
                     + (f"; CUDA: {meta['cuda']} (CUDA-event timing)" if meta.get("cuda") else "; no CUDA device")
                     + ".")
        notes.append("- ≈ marks a speedup whose IQR overlaps the baseline's: not separated by this measurement.")
        notes.append("- × = speedup vs baseline; ×/MACs = speedup ÷ (baseline MACs / model MACs), 1.0 = latency "
                     "falls as fast as MACs.")
    syn = meta.get("synthetic_baselines") or {}
    if syn:
        notes.append(f"- Baselines not in the inputs were rebuilt with random weights for counting/latency: "
                     f"{', '.join(syn)}.")
    bn_note = _bn_note(rows)
    if bn_note:
        notes.append(bn_note)
    notes.append(f"- Generated {meta['time']} with torch {meta['torch']}.")
    return "\n".join(lines + notes) + "\n"


def _bn_note(rows: Sequence[dict[str, Any]]) -> str | None:
    """Which pruned models had their BN statistics re-estimated after surgery (none without BatchNorm)."""
    pruned = [r for r in rows if r["role"] == "pruned"]
    groups: dict[str, list[str]] = {"re-estimated": [], "not re-estimated": [], "no BatchNorm layers (nothing to "
                                    "re-estimate)": [], "not recorded": []}
    keys = list(groups)
    for r in pruned:
        k = keys[2] if r.get("has_bn") is False else keys[0] if r.get("bn_recalibrated") is True \
            else keys[1] if r.get("bn_recalibrated") is False else keys[3]
        groups[k].append(r["name"])
    if not pruned or len(groups[keys[3]]) == len(pruned):
        return None
    parts = []
    for k, names in groups.items():
        if names:
            parts.append(f"{k}: {'all pruned models' if len(names) == len(pruned) else ', '.join(names)}")
    return "- BN statistics after surgery: " + "; ".join(parts) + "."


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def write_plots(rows: Sequence[dict[str, Any]], loaded: Sequence[_Loaded], out: Path) -> list[Path]:
    from compressor.scores import Scores

    paths = [p for p in (plots.tradeoff(rows, "macs", out / "acc_vs_macs.png", title="top-1 vs MACs"),
                         plots.tradeoff(rows, "params", out / "acc_vs_params.png", title="top-1 vs params")) if p]
    done_scores: set[Path] = set()
    for item in loaded:
        if item.role != "pruned":
            continue
        units = item.ck["plan"]["units"]
        names = [u.name for u in item.net.prunable_units()]
        after = [u.width for u in item.net.prunable_units()]
        before = [int(units.get(n, {}).get("width", w)) for n, w in zip(names, after)]
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


# ----------------------------------------------------------------------------- recovery curves
METRICS_FILE = "metrics.jsonl"
CURVES_PNG = "recovery_curves.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``; a missing file or a bad line is one ``UserError`` naming the file."""
    p = Path(path)
    src = str(p)
    if not p.is_file():
        raise UserError("no such file (not a train/finetune output folder?)", source=src)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})", source=src) from exc
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"line {i} is not valid JSON ({getattr(exc, 'msg', exc)})", source=src) from None
        if not isinstance(row, dict):
            raise UserError(f"line {i} is not a JSON object", source=src)
        for key in ("epoch_frac", "epoch", "val_acc"):
            v = row.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise UserError(f"line {i}: {key} must be a finite number, got {str(v)[:40]!r}", source=src)
        rows.append(row)
    return rows


def _curve_inputs(runs: Sequence[str]) -> list[Path]:
    """Run folders (or their metrics.jsonl files), globs expanded, in the order given."""
    out: list[Path] = []
    for pattern in runs:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for m in matches:
            p = Path(m)
            f = p if p.name == METRICS_FILE and not p.is_dir() else p / METRICS_FILE
            if f not in out:
                out.append(f)
    return out


def curve_summary(points: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Start (the epoch-0 evaluation, None without one), best and final val top-1, and epochs done."""
    start = next((y for x, y in points if x == 0), None)
    return {"start_val": start, "best_val": max(y for _, y in points), "final_val": points[-1][1],
            "epochs": max(x for x, _ in points)}


def curves(runs: Sequence[str], out: str | Path, *, title: str = "") -> dict[str, Any]:
    """Overlay the recovery curves of train/finetune runs in one PNG (one line per run).

    ``runs``: output folders holding ``metrics.jsonl`` (or the files); label = the folder's name
    (its parent's too when two share a name). ``out``: a ``.png`` path, else a folder for
    ``recovery_curves.png``. Returns ``{"rows", "table", "png"}``.
    """
    from compressor.train import curve_points

    files = _curve_inputs(runs)
    if not files:
        raise UserError("no run folders given", field="curves")
    taken: set[str] = set()
    data: dict[str, list[tuple[float, float]]] = {}
    rows = []
    for f in files:
        pts = curve_points(read_metrics(f))
        if not pts:
            raise UserError("has no validation rows (val_acc): was the run trained without a validation split?",
                            source=str(f))
        run = f.parent
        label = run.resolve().name or str(run)
        if label in taken:
            label = f"{run.resolve().parent.name}/{label}"
        if label in taken:
            label = str(run)
        taken.add(label)
        data[label] = pts
        rows.append({"run": label, "path": str(f), **curve_summary(pts), "evaluations": len(pts)})
    target = Path(out)
    png = target if target.suffix.lower() == ".png" else target / CURVES_PNG
    plots.recovery_curves(data, png, title=title)
    return {"rows": rows, "table": curves_table(rows), "png": str(png)}


def curves_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: run, start val, best val, final val, epochs (val top-1 in %)."""
    lines = ["| run | start val | best val | final val | epochs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {_f(r['start_val'])} | {_f(r['best_val'])} | {_f(r['final_val'])} | "
                     f"{r['epochs']:g} |")
    return "\n".join(lines) + "\n"
