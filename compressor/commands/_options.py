"""Checked numeric option types, shared by every command (``type=positive_float`` etc.).

Each one is an argparse ``type=`` (a typed ``--lr nan`` becomes the one line
``error: --lr: must be a finite number > 0, got 'nan'``, exit 2, before any work) and also
checks values that did not come from the command line: ``check(value, field=, source=)``
validates a recipe's YAML number and names the file (see ``check_layer``).

``positive_float`` (> 0), ``nonneg_float`` (>= 0), ``unit_interval`` ([0, 1]),
``unit_interval_open`` ([0, 1), e.g. label smoothing, momentum), ``positive_int`` (>= 1),
``nonneg_int`` (>= 0), ``seed_int`` (0 .. 2**32 - 1, what numpy and torch accept),
``opset_int`` (the ONNX opsets torch's exporter writes). Floats must be finite.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Mapping

from compressor.errors import UserError

SEED_MAX = 2**32 - 1


class OptionError(UserError, argparse.ArgumentTypeError):
    """A bad option value: argparse adds the option's name; elsewhere it is a plain ``UserError``."""


class Checked:
    """A number type with a range: ``kind`` int or float, bounds ``lo``/``hi`` (``None``: open)."""

    def __init__(self, name: str, kind: type, lo: float | None = None, hi: float | None = None, *,
                 hi_open: bool = False, lo_open: bool = False) -> None:
        self.__name__ = name  # argparse names the type in some messages
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        lo = hi = ""
        if self.lo is not None:
            lo = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            hi = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        if lo and hi:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{what} in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
        return f"{what} {lo or hi}".rstrip()

    def check(self, value: Any, *, field: str | None = None, source: str | None = None) -> int | float:
        """``value`` (a string or a number) converted and range-checked, else ``OptionError``."""
        bad = OptionError(f"must be {self.describe()}, got {value!r}", source=source, field=field)
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            text = value.strip()
            try:
                v: int | float = int(text) if self.kind is int else float(text)
            except ValueError:
                raise bad from None
        elif isinstance(value, (int, float)):
            if self.kind is int and isinstance(value, float):  # YAML 3.0 is not an epoch count
                raise bad
            v = self.kind(value)
        else:
            raise bad
        if isinstance(v, float) and not math.isfinite(v):
            raise bad
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            raise bad
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            raise bad
        return v

    def __call__(self, text: str) -> int | float:
        return self.check(text)

    def __repr__(self) -> str:
        return self.__name__


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class _Opset(Checked):
    """The opsets torch's exporter writes; the upper bound is asked of torch on first use (no import at start-up)."""

    def check(self, value: Any, *, field: str | None = None, source: str | None = None) -> int | float:
        if self.hi is None:
            from compressor.deploy.onnx_export import max_opset

            self.hi = max_opset()
        return super().check(value, field=field, source=source)


finite_float = Checked("finite_float", float)
positive_float = Checked("positive_float", float, 0.0, lo_open=True)
nonneg_float = Checked("nonneg_float", float, 0.0)
unit_interval = Checked("unit_interval", float, 0.0, 1.0)
unit_interval_open = Checked("unit_interval_open", float, 0.0, 1.0, hi_open=True)
positive_int = Checked("positive_int", int, 1)
nonneg_int = Checked("nonneg_int", int, 0)
seed_int = Checked("seed_int", int, 0, SEED_MAX)
EPOCH_FRACTION = Checked("epoch_fraction", float, 0.0, 1.0, lo_open=True)  # (0, 1]: how often to evaluate
OPSET_MIN = 7  # the oldest opset onnxruntime runs the exported BatchNormalization with (= export.MIN_OPSET)
opset_int = _Opset("opset_int", int, OPSET_MIN)


def check_layer(values: Mapping[str, Any], actions: Mapping[str, argparse.Action], source: str) -> None:
    """Check the values of one options layer (a recipe, a resumed run's options) with their types.

    argparse checks only what was typed; a recipe's ``lr: .nan`` is a YAML float that the
    recipe layer passes through, so it is checked here, naming ``source`` and the key.
    """
    for key, value in values.items():
        key = str(key).replace("-", "_")
        action = actions.get(key)
        if action is None or value is None or not isinstance(action.type, Checked):
            continue
        for item in value if isinstance(value, list) else [value]:
            action.type.check(item, field=key, source=source)


class OneLineParser(argparse.ArgumentParser):
    """A command's parser whose errors are one ``UserError`` line (exit 2), without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("argument "):
            message = message[len("argument "):]
        raise UserError(f"{message} (see: {self.prog} --help)")
