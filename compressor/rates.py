"""The rates file: which fraction of each unit's filters to *remove*.

Accepted forms of ``rates`` in ``rates.yaml``::

    rates: "[0.21]*7+[0.75]*5"        # HRank's string syntax (parsed, never eval'ed)
    rates: [0.21, 0.21, ...]           # a list in convcfg (unit) order
    rates: {features.conv0: 0.2, ...}  # per unit name; others get ``default``
    default: 0.0                       # rate for units a mapping leaves out
    rounding: keep_floor               # or drop_floor (see ``n_keep``)

A model may accept a shorter list (``short_rate_list``): VGG16-BN takes HRank's 12-entry
lists and keeps conv 13 whole.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from compressor.errors import UserError, suggest

ROUNDING = ("keep_floor", "drop_floor")
TOP_LEVEL_KEYS = ("model", "rates", "default", "rounding", "target", "policy", "min_keep", "max_keep", "notes")

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


def parse_rate_string(text: str, source: str | None = None) -> list[float]:
    """Parse HRank's ``[0.21]*7+[0.75]*5`` syntax with a tiny grammar.

    expr := term ('+' term)* ; term := '[' num (',' num)* ']' ('*' int)?
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    text_s = text.strip()
    while pos < len(text_s):
        m = _TOKEN.match(text_s, pos)
        if not m or m.end() == pos:
            raise UserError(f"malformed rate string {text!r} at character {pos + 1}", source=source, field="rates")
        tokens.append(("num", m["num"]) if m["num"] is not None else ("op", m["op"]))
        pos = m.end()
        while pos < len(text_s) and text_s[pos].isspace():
            pos += 1

    def bad(why: str) -> UserError:
        return UserError(f"malformed rate string {text!r}: {why}", source=source, field="rates")

    out: list[float] = []
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
            times = int(tokens[i][1])
            i += 1
        out.extend(block * times)
        if i == len(tokens):
            return out
        if tokens[i] != ("op", "+"):
            raise bad(f"unexpected {tokens[i][1]!r}")
        i += 1


@dataclass(frozen=True)
class RateSpec:
    """Resolved per-unit rates plus how to round them."""

    rates: dict[str, float]
    rounding: str = "keep_floor"
    source: str = "<inline>"
    target: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDING:
            raise UserError(f"unknown rounding {self.rounding!r}; valid: {', '.join(ROUNDING)}", source=self.source, field="rounding")

    def keep_counts(self, widths: dict[str, int]) -> dict[str, int]:
        return {u: n_keep(w, self.rates.get(u, 0.0), self.rounding) for u, w in widths.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"rates": dict(self.rates), "rounding": self.rounding, "source": self.source, "target": self.target}


def _check_rate(value: Any, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise UserError(f"rate must be a number in [0, 1), got {value!r}", source=source, field=key)
    if not 0.0 <= float(value) < 1.0:
        raise UserError(f"rate must be in [0, 1), got {value!r}", source=source, field=key)
    return float(value)


def resolve_rates(
    raw: Any,
    unit_names: Sequence[str],
    *,
    default: Any = 0.0,
    short_list: int | None = None,
    source: str = "<inline>",
) -> dict[str, float]:
    """Turn a string, list or mapping of rates into ``{unit: rate}`` for every unit."""
    names = list(unit_names)
    if isinstance(raw, str):
        raw = parse_rate_string(raw, source)
    if isinstance(raw, (list, tuple)):
        allowed = {len(names)} | ({short_list} if short_list else set())
        if len(raw) not in allowed:
            want = " or ".join(str(n) for n in sorted(allowed))
            raise UserError(f"has {len(raw)} rates, the model has {want} (units: {names[0]} … {names[-1]})", source=source, field="rates")
        vals = [_check_rate(v, source, f"rates[{i}]") for i, v in enumerate(raw)]
        vals += [0.0] * (len(names) - len(vals))
        return dict(zip(names, vals))
    if isinstance(raw, dict):
        d = _check_rate(default, source, "default")
        out = {n: d for n in names}
        for key, v in raw.items():
            if key not in out:
                raise UserError(f"unknown layer {key!r}{suggest(str(key), names)}", source=source, field=f"rates.{key}")
            out[key] = _check_rate(v, source, f"rates.{key}")
        return out
    if raw is None:
        d = _check_rate(default, source, "default")
        return {n: d for n in names}
    raise UserError(f"must be a string, list or mapping, got {type(raw).__name__}", source=source, field="rates")


def load_rates(path: str | Path, unit_names: Sequence[str], *, model_name: str | None = None, short_list: int | None = None) -> RateSpec:
    """Read and validate ``rates.yaml`` against a model's unit names."""
    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise UserError("rates file not found", source=src)
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"not valid YAML{where}", source=src) from exc
    except UnicodeDecodeError as exc:
        raise UserError("not a text file", source=src) from exc
    if not isinstance(doc, dict):
        raise UserError(f"must be a YAML mapping with a 'rates' key, got {type(doc).__name__}", source=src)
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise UserError(f"unknown key {key!r}{suggest(str(key), TOP_LEVEL_KEYS)}; valid: {', '.join(TOP_LEVEL_KEYS)}", source=src, field=str(key))
    if model_name and doc.get("model") not in (None, model_name):
        raise UserError(f"is for model {doc['model']!r}, not {model_name!r}", source=src, field="model")
    if "rates" not in doc and "target" not in doc and "default" not in doc:
        raise UserError("needs 'rates', 'default' or 'target'", source=src)
    target = doc.get("target")
    if target is not None:
        if not isinstance(target, dict) or not target:
            raise UserError("must be a mapping like {macs: 0.5}", source=src, field="target")
        for k, v in target.items():
            if k not in ("macs", "params"):
                raise UserError(f"unknown budget {k!r}; valid: macs, params", source=src, field=f"target.{k}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
                raise UserError(f"budget must be a fraction kept in (0, 1], got {v!r}", source=src, field=f"target.{k}")
    rates = resolve_rates(doc.get("rates"), unit_names, default=doc.get("default", 0.0), short_list=short_list, source=src)
    extra = {k: doc[k] for k in ("policy", "min_keep", "max_keep") if k in doc}
    return RateSpec(rates=rates, rounding=doc.get("rounding", "keep_floor"), source=src,
                    target={k: float(v) for k, v in target.items()} if target else None, extra=extra)
