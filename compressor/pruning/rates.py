"""The rates file: which fraction of each unit's filters to *remove*.

Accepted forms of ``rates`` in ``rates.yaml``::

    rates: "[0.21]*7+[0.75]*5"        # HRank's string syntax (parsed, never eval'ed)
    rates: [0.21, 0.21, ...]           # a list in convcfg (unit) order
    rates: {features.conv0: 0.2, ...}  # per unit name; others get ``default``
    default: 0.0                       # rate for units a mapping leaves out
    rounding: keep_floor               # or drop_floor (see ``n_keep``)
    round_to: 8                        # every kept width a multiple of 8 (see ``round_keep``)
    target: {macs: 0.5}                # a budget: ``rates`` (if given) is the profile it scales
    target: {latency: 0.5, batch_size: 64, threads: 1, device: cpu}   # measured speed budget

A model may accept a shorter list (``short_rate_list``): VGG16-BN takes HRank's 12-entry
lists and keeps conv 13 whole.

A file with both ``rates`` and ``target`` means "the target scales this profile" (``policy:
local``: ``rate_i = α·p_i``). With ``policy: global`` the ranking decides the rates, so giving
``rates`` as well as a ``target`` there is an error rather than silently ignored.

The file is untrusted input, so reading it is bounded: at most ``MAX_FILE_BYTES``; YAML
aliases may not expand beyond ``MAX_YAML_NODES`` nodes (a few hundred bytes of nested
aliases can otherwise expand to billions); duplicate keys are errors, not last-one-wins; a rate
string may not ask for more entries than the model has (checked before the list is built);
and every value echoed in an error is cut to ``ECHO_CHARS`` characters.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from compressor.errors import UserError, suggest
from compressor.storage import yaml_io

ROUNDING = ("keep_floor", "drop_floor")
TOP_LEVEL_KEYS = ("model", "rates", "default", "rounding", "round_to", "target", "policy", "min_keep", "max_keep",
                  "notes")
BUDGET_KEYS = ("macs", "params", "latency")
LATENCY_OPTIONS = ("batch_size", "threads", "device")
MAX_FILE_BYTES = 256 << 10  # a rates file for a 500-layer model is well under 100 KiB
MAX_RATES = 100_000  # entries a rate string may produce when the model's length is not known
MAX_ROUND_TO = 4096
ECHO_CHARS = 80

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(?P<op>[\[\],*+]))")


def n_keep(width: int, rate: float, rounding: str = "keep_floor") -> int:
    """Filters kept out of ``width`` at ``rate`` (fraction removed); never fewer than 1.

    ``keep_floor`` (default, HRankPlus/CHIP): keep ``floor(C·(1−rate))``; this reproduces the
    published VGG16-BN counts. ``drop_floor`` (HRank): remove ``floor(C·rate)``.
    A 1e-9 slack absorbs float error such as 0.7·100 = 69.999….
    """
    if rounding == "keep_floor":
        k = math.floor(width * (1.0 - rate) + 1e-9)
    elif rounding == "drop_floor":
        k = width - math.floor(width * rate + 1e-9)
    else:
        raise UserError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDING)}", field="rounding")
    return max(1, min(width, k))


def round_keep(width: int, keep: int, round_to: int = 1, lo: int = 1, hi: int | None = None) -> int:
    """``keep`` rounded to a multiple of ``round_to`` so the kept width suits vector units / tensor cores.

    The nearest multiple (halves round up), never below ``round_to`` nor above ``width``; within
    ``[lo, hi]`` (a policy's min/max_keep) when a multiple lies there. A unit kept whole stays whole
    (rounding never prunes a layer the rates leave alone), and so does one narrower than ``round_to``.
    """
    if round_to <= 1 or keep >= width or width < round_to:
        return keep if round_to <= 1 or keep >= width else width
    hi = width if hi is None else min(hi, width)
    top = (width // round_to) * round_to
    m = round_to * math.floor(keep / round_to + 0.5)
    lo_m = max(round_to, round_to * math.ceil(lo / round_to))
    hi_m = min(top, round_to * (hi // round_to))
    if lo_m <= hi_m:
        return min(max(m, lo_m), hi_m)
    return min(max(m, round_to), top)


def short(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages must stay one short line.

    Containers are summarized by type and size before ``repr`` so that a huge (or alias-expanded)
    value is never turned into a string in full.
    """
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = reprlib_repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails must not hide the real error
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def reprlib_repr(value: Any) -> str:
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = ECHO_CHARS, ECHO_CHARS, 8, 8, 3
    return r.repr(value)


def parse_rate_string(text: str, source: str | None = None, max_len: int = MAX_RATES) -> list[float]:
    """Parse HRank's ``[0.21]*7+[0.75]*5`` syntax with a tiny grammar.

    expr := term ('+' term)* ; term := '[' num (',' num)* ']' ('*' int)?

    The length the string asks for is checked against ``max_len`` *before* the list is built,
    so ``[0.2]*100000000`` costs nothing.
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    text_s = text.strip()
    while pos < len(text_s):
        m = _TOKEN.match(text_s, pos)
        if not m or m.end() == pos:
            raise UserError(f"malformed rate string {short(text)} at character {pos + 1}", source=source,
                            field="rates")
        tokens.append(("num", m["num"]) if m["num"] is not None else ("op", m["op"]))
        pos = m.end()
        while pos < len(text_s) and text_s[pos].isspace():
            pos += 1

    def bad(why: str) -> UserError:
        return UserError(f"malformed rate string {short(text)}: {why}", source=source, field="rates")

    out: list[float] = []
    total = 0
    i = 0
    if not tokens:
        raise bad("empty")
    while True:
        if i >= len(tokens) or tokens[i] != ("op", "["):
            raise bad("expected '['")
        i += 1
        block: list[float] = []
        while True:
            if i >= len(tokens) or tokens[i][0] != "num":
                raise bad("expected a number")
            block.append(float(tokens[i][1]))
            i += 1
            if i < len(tokens) and tokens[i] == ("op", ","):
                i += 1
                continue
            break
        if i >= len(tokens) or tokens[i] != ("op", "]"):
            raise bad("expected ']'")
        i += 1
        times = 1
        if i < len(tokens) and tokens[i] == ("op", "*"):
            i += 1
            if i >= len(tokens) or tokens[i][0] != "num" or not tokens[i][1].isdigit():
                raise bad("'*' must be followed by a non-negative integer")
            if len(tokens[i][1]) > 12:
                raise UserError(f"has more than {max_len} rates (a repeat count of {len(tokens[i][1])} digits)",
                                source=source, field="rates")
            times = int(tokens[i][1])
            i += 1
        total += len(block) * times
        if total > max_len:
            raise UserError(f"has at least {total} rates, more than the {max_len} allowed here", source=source,
                            field="rates")
        out.extend(block * times)
        if i == len(tokens):
            return out
        if tokens[i] != ("op", "+"):
            raise bad(f"unexpected {short(tokens[i][1])}")
        i += 1


@dataclass(frozen=True)
class RateSpec:
    """Resolved per-unit rates plus how to round them.

    ``round_to`` makes every kept width a multiple of it (``round_keep``); ``target`` holds budgets
    (``macs``/``params``/``latency``: fractions kept) and ``latency_options`` how latency is measured
    (``batch_size``, ``threads``, ``device``), when a latency budget is given.
    """

    rates: dict[str, float]
    rounding: str = "keep_floor"
    source: str = "<inline>"
    target: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    round_to: int = 1
    latency_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDING:
            raise UserError(f"unknown rounding {short(self.rounding)}; valid: {', '.join(ROUNDING)}",
                            source=self.source, field="rounding")
        check_round_to(self.round_to, self.source)
        for k, v in (self.target or {}).items():
            if k not in BUDGET_KEYS:
                raise UserError(f"unknown budget {short(k)}; valid: {', '.join(BUDGET_KEYS)}", source=self.source,
                                field=f"target.{k}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < as_float(v) <= 1.0:
                raise UserError(f"budget must be a fraction kept in (0, 1], got {short(v)}", source=self.source,
                                field=f"target.{k}")
        if self.latency_options is not None:
            check_latency_options(self.latency_options, self.source)

    def keep_counts(self, widths: dict[str, int]) -> dict[str, int]:
        return {u: round_keep(w, n_keep(w, self.rates.get(u, 0.0), self.rounding), self.round_to)
                for u, w in widths.items()}

    def to_dict(self) -> dict[str, Any]:
        out = {"rates": dict(self.rates), "rounding": self.rounding, "source": self.source, "target": self.target}
        if self.round_to > 1:
            out["round_to"] = self.round_to
        if self.latency_options:
            out["latency_options"] = dict(self.latency_options)
        if self.extra.get("rates_string"):  # the published list as written (HRankPlus ResNet layout), for reports
            out["rates_string"] = str(self.extra["rates_string"])[:200]
        return out

    def replace(self, **changes: Any) -> RateSpec:
        """A copy with some fields changed (re-validated): e.g. ``spec.replace(round_to=8)`` for ``--round-to``."""
        return dataclasses.replace(self, **changes)


def check_round_to(value: Any, source: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ROUND_TO:
        raise UserError(f"must be an integer in [1, {MAX_ROUND_TO}], got {short(value)}", source=source,
                        field="round_to")
    return value


def check_latency_options(opts: Any, source: str | None = None) -> dict[str, Any]:
    """``batch_size`` ≥ 1, ``threads`` ≥ 1, ``device`` cpu/cuda[:N] (all optional)."""
    if not isinstance(opts, dict):
        raise UserError(f"latency options must be a mapping, got {short(opts)}", source=source, field="target")
    for k, v in opts.items():
        if k not in LATENCY_OPTIONS:
            raise UserError(f"unknown latency option {short(k)}; valid: {', '.join(LATENCY_OPTIONS)}",
                            source=source, field=f"target.{k}")
        if k in ("batch_size", "threads"):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65536:
                raise UserError(f"must be a positive integer, got {short(v)}", source=source, field=f"target.{k}")
        elif not isinstance(v, str) or not re.fullmatch(r"cpu|cuda(:\d{1,3})?", v):
            raise UserError(f"must be 'cpu' or 'cuda[:N]', got {short(v)}", source=source, field=f"target.{k}")
    return opts


def as_float(value: int | float) -> float:
    """``float(value)``, with integers too large for a float mapped to ±inf instead of raising."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _check_rate(value: Any, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(as_float(value)):
        raise UserError(f"rate must be a number in [0, 1), got {short(value)}", source=source, field=key)
    if not 0.0 <= as_float(value) < 1.0:
        raise UserError(f"rate must be in [0, 1), got {short(value)}", source=source, field=key)
    return float(value)


def resolve_rates(
    raw: Any,
    unit_names: Sequence[str],
    *,
    default: Any = 0.0,
    short_list: int | None = None,
    source: str = "<inline>",
) -> dict[str, float]:
    """Turn a number (every unit), string, list or mapping of rates into ``{unit: rate}`` for every unit."""
    names = list(unit_names)
    if isinstance(raw, str):
        raw = parse_rate_string(raw, source, max_len=max(len(names), short_list or 0))
    if isinstance(raw, (list, tuple)):
        allowed = {len(names)} | ({short_list} if short_list else set())
        if len(raw) not in allowed:
            want = " or ".join(str(n) for n in sorted(allowed))
            raise UserError(f"has {len(raw)} rates, the model has {want} (units: {names[0]} … {names[-1]})",
                            source=source, field="rates")
        vals = [_check_rate(v, source, f"rates[{i}]") for i, v in enumerate(raw)]
        vals += [0.0] * (len(names) - len(vals))
        return dict(zip(names, vals))
    if isinstance(raw, dict):
        d = _check_rate(default, source, "default")
        out = {n: d for n in names}
        for key, v in raw.items():
            if not isinstance(key, str) or key not in out:
                k = short(key, 60)
                raise UserError(f"unknown layer {k}{suggest(str(key)[:200], names)}", source=source,
                                field=f"rates.{k.strip(chr(39))}")
            out[key] = _check_rate(v, source, f"rates.{key}")
        return out
    if raw is None:
        d = _check_rate(default, source, "default")
        return {n: d for n in names}
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):  # one rate for every unit
        _check_rate(default, source, "default")
        d = _check_rate(raw, source, "rates")
        return {n: d for n in names}
    raise UserError(f"must be a number, string, list or mapping, got {type(raw).__name__}", source=source, field="rates")


def read_yaml(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Parse a small, untrusted rates file with the shared bounds (``storage.yaml_io``); every failure
    is one ``UserError`` naming the file."""
    return yaml_io.load_yaml(path, max_bytes=max_bytes, kind="rates file")


def load_rates(path: str | Path, unit_names: Sequence[str], *, model_name: str | None = None,
               short_list: int | None = None) -> RateSpec:
    """Read and validate ``rates.yaml`` against a model's unit names."""
    return spec_from_doc(read_yaml(path), unit_names, source=str(path), model_name=model_name, short_list=short_list)


def spec_from_doc(doc: Any, unit_names: Sequence[str], *, source: str = "<rates>", model_name: str | None = None,
                  short_list: int | None = None) -> RateSpec:
    """Validate a rates document (a parsed ``rates.yaml``, or the same dict from Python)."""
    src = source
    if not isinstance(doc, dict):
        raise UserError(f"must be a YAML mapping with a 'rates' key, got {type(doc).__name__}", source=src)
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            k = short(key, 60)
            raise UserError(f"unknown key {k}{suggest(str(key)[:200], TOP_LEVEL_KEYS)}; valid: "
                            f"{', '.join(TOP_LEVEL_KEYS)}", source=src, field=k.strip("'"))
    if model_name and doc.get("model") not in (None, model_name):
        raise UserError(f"is for model {short(doc['model'])}, not {model_name!r}", source=src, field="model")
    if "rates" not in doc and "target" not in doc and "default" not in doc:
        raise UserError("needs 'rates', 'default' or 'target'", source=src)
    target, lat_opts = _read_target(doc.get("target"), src)
    pol = doc.get("policy")
    pol_name = pol.get("name") if isinstance(pol, dict) else pol
    if target and pol_name == "global" and "rates" in doc:
        raise UserError("policy global with a target ranks channels itself, so 'rates' would be ignored; remove "
                        "'rates' (or use policy local, where the target scales the rates as a profile)",
                        source=src, field="rates")
    rates = resolve_rates(doc.get("rates"), unit_names, default=doc.get("default", 0.0), short_list=short_list,
                          source=src)
    round_to = check_round_to(doc.get("round_to", 1), src)
    rounding = doc.get("rounding", "keep_floor")
    if not isinstance(rounding, str):
        raise UserError(f"unknown rounding {short(rounding)}; valid: {', '.join(ROUNDING)}", source=src,
                        field="rounding")
    extra = {k: doc[k] for k in ("policy", "min_keep", "max_keep") if k in doc}
    return RateSpec(rates=rates, rounding=rounding, source=src, target=target, extra=extra, round_to=round_to,
                    latency_options=lat_opts)


def _read_target(target: Any, src: str) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """Split ``target`` into budgets (fractions kept) and latency measurement options."""
    if target is None:
        return None, None
    if not isinstance(target, dict) or not target:
        raise UserError("must be a mapping like {macs: 0.5}", source=src, field="target")
    budgets: dict[str, float] = {}
    opts: dict[str, Any] = {}
    for k, v in target.items():
        if k in LATENCY_OPTIONS:
            opts[k] = v
            continue
        if k not in BUDGET_KEYS:
            ks = short(k, 40)
            raise UserError(f"unknown budget {ks}; valid: {', '.join(BUDGET_KEYS)} (latency options: "
                            f"{', '.join(LATENCY_OPTIONS)})", source=src, field=f"target.{ks.strip(chr(39))}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < as_float(v) <= 1.0:
            raise UserError(f"budget must be a fraction kept in (0, 1], got {short(v)}", source=src,
                            field=f"target.{k}")
        budgets[k] = float(v)
    if not budgets:
        raise UserError("needs a budget (macs, params or latency), not only latency options", source=src,
                        field="target")
    if opts and "latency" not in budgets:
        raise UserError(f"{', '.join(opts)} only apply to a latency budget", source=src, field="target")
    check_latency_options(opts, src)
    return budgets, (opts if "latency" in budgets else None)
