"""Who writes and reads a unit's channels (compressor.pruning.channel_space), checked against the
hand-written family descriptions kept as oracles (``channel_map()``: ``Slot.out`` / ``Slot.inp``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.models import get_model
from compressor.pruning import graph
from compressor.pruning.channel_space import channel_spaces, layer_writers
from compressor.pruning.plan import Plan
from compressor.pruning.reconstruct import keep_from_plan

from tests import oracles
from tests.conftest import TINY_VGG, one_thread


def _oracle_readers(model: nn.Module, unit: str, width: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """From the channel map: each Conv/Linear reading ``unit``, its input positions per unit channel."""
    mods = dict(model.named_modules())
    out = {}
    for key, slot in oracles.channel_map_of(model).items():
        name = key.rsplit(".", 1)[0]
        if not key.endswith(".weight") or unit not in slot.inp or slot.out == unit:
            continue
        if not isinstance(mods[name], (nn.Conv2d, nn.Linear)):
            continue
        per: list[list[int]] = [[] for _ in range(width)]
        off = 0
        for part in slot.inp:
            w = int(part) if isinstance(part, int) else mods[part].out_channels
            if part == unit:
                for c in range(width):
                    per[c].extend(range((off + c) * slot.repeat, (off + c + 1) * slot.repeat))
            off += w
        out[name] = tuple(tuple(p) for p in per)
    return out


def _oracle_writers(model: nn.Module, unit: str) -> set[str]:
    mods = dict(model.named_modules())
    return {k.rsplit(".", 1)[0] for k, s in oracles.channel_map_of(model).items()
            if k.endswith(".weight") and s.out == unit and isinstance(mods[k.rsplit(".", 1)[0]], (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("arch", ["vgg16_bn", "mobilenet_v1", "squeezenet1_1"])
def test_readers_and_writers_equal_the_family_descriptions(arch: str) -> None:
    """Linear after flatten (vgg: k×k columns per channel), depthwise followers (mobilenet_v1: part of
    the unit, the pointwise conv after them reads it), concat slices (squeezenet's expand branches)."""
    torch.manual_seed(0)
    m = (get_model(arch, cfg=list(TINY_VGG)) if arch == "vgg16_bn" else get_model(arch)).eval()
    units = {u.name: u.width for u in graph.units(m)}
    with one_thread():
        spaces = channel_spaces(m, graph.example_input(m), units)
    for unit, width in units.items():
        sp = spaces[unit]
        assert {r.name: r.where for r in sp.readers} == _oracle_readers(m, unit, width), unit
        assert {w.name for w in layer_writers(m, sp)} == _oracle_writers(m, unit), unit


def test_keep_from_plan_follows_every_writer_of_a_residual_space() -> None:
    """resnet20's stage-1 space: every conv2 of the stage keeps the plan's channels; the inner unit
    keeps its own; the readers are not named (their outputs are whole)."""
    m = get_model("resnet20").eval()
    widths = {u.name: u.width for u in graph.units(m)}
    plan = Plan(keep={"layer1.0.conv2": (0, 2, 5, 9), "layer2.2.conv1": (1, 7)}, widths=widths, model="resnet20")
    with one_thread():
        keep = keep_from_plan(m, plan)
    assert keep == {"layer1.0.conv2": (0, 2, 5, 9), "layer1.1.conv2": (0, 2, 5, 9), "layer1.2.conv2": (0, 2, 5, 9),
                    "layer2.2.conv1": (1, 7)}
