"""The policy's view of a model's size: exact MACs/params (and predicted latency) at any keep counts.

``SizeCounter`` wraps the one size model (``pruning.size.SizeModel``: built from the dependency graph and
one forward pass, arithmetic per candidate) or a caller's own counter, caches counts per candidate and
turns them into fractions of the unpruned model. ``unit_widths``/``unit_groups`` are the units' widths and
the ``groups`` of the grouped convs that read them (their kept counts are multiples of it).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from compressor.deploy import latency_table as lt
from compressor.errors import UserError
from compressor.pruning.graph import discovery, units as graph_units
from compressor.pruning.rates import RateSpec
from compressor.pruning.size import SizeModel

BUDGETS = ("macs", "params")  # what a size counter returns


def size_model(model: nn.Module) -> SizeModel:
    """The engine's size model of ``model`` (its discovered units, one forward pass)."""
    return SizeModel(model, discovery(model))


def _as_size_model(counter: Any) -> SizeModel | None:
    """``counter`` itself when it is a ``SizeModel``, or the one its bound ``count`` belongs to."""
    if isinstance(counter, SizeModel):
        return counter
    owner = getattr(counter, "__self__", None)
    if isinstance(owner, SizeModel) and getattr(counter, "__name__", "") == "count":
        return owner
    return None


class SizeCounter:
    """Exact MACs/params of a model at given keep counts, its conv shapes there, and predicted latency
    when a table is set: the policy's view of the one size model, ``pruning.size.SizeModel``.

    ``counter`` is a ``SizeModel`` (or its bound ``count``), or for a caller with its own size model any
    ``counter(keep) -> {"macs": int, "params": int}`` given a keep count for *every* unit (then ``widths``
    are needed, and conv shapes, for a latency budget, come from the ``SizeModel`` of ``model``). Without
    ``counter`` the ``SizeModel`` of ``model`` is built (any model: from its graph and one forward pass).
    """

    def __init__(self, model: nn.Module | None = None, *,
                 counter: SizeModel | Callable[[Mapping[str, int]], Mapping[str, int]] | None = None,
                 widths: Mapping[str, int] | None = None) -> None:
        sizer = _as_size_model(counter)
        custom = None if sizer is not None else counter
        if sizer is None and custom is None:
            if model is None:
                raise ValueError("SizeCounter needs a model or a counter")
            sizer = size_model(model)
        if widths is None:
            if sizer is not None:
                widths = sizer.widths
            elif model is not None:
                widths = unit_widths(model)
            else:
                raise ValueError("an injected counter needs widths")
        self.model = model
        self.sizer = sizer
        self.widths = dict(widths)
        self._count = custom if custom is not None else sizer.count  # type: ignore[union-attr]
        self._cache: dict[tuple[int, ...], dict[str, int]] = {}
        self.latency: lt.LatencyTable | None = None
        self.base = self({})

    def _key(self, keep: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(int(keep.get(u, w)) for u, w in self.widths.items())

    def __call__(self, keep: Mapping[str, int]) -> dict[str, int]:
        key = self._key(keep)
        if key not in self._cache:
            got = self._count(dict(zip(self.widths, key)))
            self._cache[key] = {k: int(got[k]) for k in BUDGETS}
        return self._cache[key]

    @property
    def has_shapes(self) -> bool:
        return self.sizer is not None or self.model is not None

    def conv_shapes(self, keep: Mapping[str, int]) -> dict[str, lt.ConvShape]:
        """Every conv's (and Linear's) shape at ``keep``, from the size model: no model is built."""
        if self.sizer is None:
            if self.model is None:
                raise UserError("a latency budget needs the model's conv shapes at any widths: pass the model "
                                "(or latency_shapes=) to policy.resolve", field="target.latency")
            self.sizer = size_model(self.model)
        return self.sizer.conv_shapes({**self.widths, **keep})

    def fractions(self, keep: Mapping[str, int]) -> dict[str, float]:
        c = self(keep)
        out = {k: c[k] / self.base[k] for k in BUDGETS}
        if self.latency is not None:
            out["latency"] = self.latency.fraction(keep)
        return out


def engine_counter(model: nn.Module) -> tuple[Callable[[Mapping[str, int]], Mapping[str, int]], dict[str, int]]:
    """``(count, widths)`` of the engine's size model of ``model``."""
    size = size_model(model)
    return size.count, dict(size.widths)


def unit_widths(model: nn.Module) -> dict[str, int]:
    """``{unit: width}`` of the model's discovered units (the same for every model)."""
    return {u.name: u.width for u in graph_units(model)}


def unit_groups(model: nn.Module | None, widths: Mapping[str, int]) -> dict[str, int]:
    """``{unit: groups}`` of the units of ``widths`` that a grouped conv reads or makes (``Discovery.groups``).

    Their kept counts must be multiples of ``groups`` (the plan keeps the same number in every group).
    Without a model (an injected counter alone) nothing is known of groups: ``{}``.
    """
    if model is None:
        return {}
    found = discovery(model).groups
    return {u: int(g) for u, g in found.items() if u in widths and int(g) > 1}


def keep_counts_for(spec: RateSpec, model: nn.Module) -> dict[str, int]:
    """Keep counts of a (resolved) spec for ``model``'s units."""
    return spec.keep_counts(unit_widths(model))


def achieved(spec: RateSpec, model: nn.Module) -> dict[str, float]:
    """Kept MACs/params fractions of ``spec`` on ``model`` (exact, from the size model)."""
    return SizeCounter(model).fractions(keep_counts_for(spec, model))
