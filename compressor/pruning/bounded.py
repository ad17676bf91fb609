"""A time bound on torch-pruning's tracing and grouping: refuse in one line, never hang.

Torch-pruning's grouping (``get_pruning_group`` → ``_fix_dependency_graph_non_recursive``) does
not finish on some graphs (swin_v2_t, timm's rexnet_100). Its loops cannot be interrupted from
outside, so the methods they call on every step (``Dependency.is_triggered_by``,
``Group.add_dep``, ``Node.add_input``/``add_output``) are wrapped once, at import, to check a
per-thread deadline. Without an active deadline the wrappers only pass through. When the deadline
passes, the step raises ``GraphTimeout``, which ``within`` turns into a one-line ``UserError``
naming the model and the step.

The bound is ``COMPRESSOR_GRAPH_TIMEOUT`` seconds (default 120) per step (tracing; grouping).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from typing import Callable, Iterator

from torch_pruning.dependency import dependency as _dep
from torch_pruning.dependency import group as _group
from torch_pruning.dependency import node as _node

from compressor.errors import UserError

_LOCAL = threading.local()
DEFAULT_S = 120.0


class GraphTimeout(Exception):
    """Raised inside torch-pruning's loops when the active deadline has passed."""


def limit_s() -> float:
    """The bound in seconds (``COMPRESSOR_GRAPH_TIMEOUT``; invalid or unset: 120)."""
    try:
        v = float(os.environ.get("COMPRESSOR_GRAPH_TIMEOUT", DEFAULT_S))
    except ValueError:
        return DEFAULT_S
    return v if v > 0 else DEFAULT_S


def _check() -> None:
    end = getattr(_LOCAL, "deadline", None)
    if end is not None and time.monotonic() > end:
        _LOCAL.deadline = None  # raise once; the unwinding code must not trip again
        raise GraphTimeout


def _wrap(cls: type, name: str) -> None:
    fn = getattr(cls, name, None)
    if fn is None or getattr(fn, "_compressor_bounded", False):
        return

    @functools.wraps(fn)
    def bounded(*args, **kwargs):  # type: ignore[no-untyped-def]
        _check()
        return fn(*args, **kwargs)

    bounded._compressor_bounded = True  # type: ignore[attr-defined]
    setattr(cls, name, bounded)


for _cls, _name in ((_dep.Dependency, "is_triggered_by"), (_group.Group, "add_dep"),
                    (_node.Node, "add_input"), (_node.Node, "add_output")):
    _wrap(_cls, _name)


def model_label(model: object) -> str:
    """How a refusal names the model: its ``arch`` if it has one, else its class."""
    return str(getattr(model, "arch", None) or type(model).__name__)


@contextlib.contextmanager
def within(model: object, step: str, seconds: float | None = None) -> Iterator[None]:
    """Run a tracing or grouping step under a deadline; past it, a one-line ``UserError``."""
    seconds = limit_s() if seconds is None else seconds
    outer = getattr(_LOCAL, "deadline", None)
    _LOCAL.deadline = time.monotonic() + seconds
    try:
        yield
    except GraphTimeout:
        raise UserError(f"{model_label(model)}: torch-pruning's {step} did not finish within {seconds:g} s "
                        "(COMPRESSOR_GRAPH_TIMEOUT); the model is refused rather than left hanging",
                        field="model") from None
    finally:
        _LOCAL.deadline = outer


@contextlib.contextmanager
def for_one(seconds: float) -> Iterator[None]:
    """A shorter deadline inside the current one (one root's grouping). ``GraphTimeout`` raised past it is the
    caller's to catch (``check()`` then tells whether the outer deadline has passed too); the outer one is
    restored either way."""
    outer = getattr(_LOCAL, "deadline", None)
    end = time.monotonic() + seconds
    _LOCAL.deadline = end if outer is None else min(outer, end)
    try:
        yield
    finally:
        _LOCAL.deadline = outer


def check() -> None:
    """Raise ``GraphTimeout`` if the current deadline has passed."""
    _check()


def bounded_call(model: object, step: str, fn: Callable, *args, **kwargs):  # type: ignore[no-untyped-def]
    with within(model, step):
        return fn(*args, **kwargs)


# A reshape torch-pruning cannot map (a channel shuffle's ``view(b, g, c // g, h, w)`` divides by zero in its
# flatten rule) is marked on the node instead of failing the whole trace; discovery refuses the groups that run
# through a marked node, so the rest of the model (e.g. the widths inside each ShuffleNet branch) stays prunable.
UNMAPPED = "_compressor_unmapped_reshape"


def _beside_transpose(node: object) -> bool:
    """Whether a reshape node reads from or feeds a transpose/permute (through a ``.contiguous()`` copy)."""
    for way in ("inputs", "outputs"):
        for n in getattr(node, way, ()):
            kind = type(getattr(n, "grad_fn", None)).__name__
            if kind.startswith("Clone"):
                kind = " ".join(type(getattr(m, "grad_fn", None)).__name__ for m in getattr(n, way, ()))
            if "Transpose" in kind or "Permute" in kind:
                return True
    return False


def _total_reshape_mapping() -> None:
    from torch_pruning.dependency import index_mapping as _im

    fn = _im.update_reshape_index_mapping
    if getattr(fn, "_compressor_total", False):
        return

    @functools.wraps(fn)
    def total(graph, node):  # type: ignore[no-untyped-def]
        if _beside_transpose(node):  # a shuffle or permute of channels: no flatten rule applies, nothing to map
            setattr(node, UNMAPPED, True)
            return None
        try:
            return fn(graph, node)
        except ArithmeticError:
            setattr(node, UNMAPPED, True)
            return None

    total._compressor_total = True  # type: ignore[attr-defined]
    _im.update_reshape_index_mapping = total


_total_reshape_mapping()
