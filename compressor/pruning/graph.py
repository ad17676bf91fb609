"""Prunable units of any CNN, discovered from torch-pruning's dependency graph.

A *unit* is one channel space that is cut as a whole: the conv whose output channels are
removed, its BN, and every layer the graph couples to it (depthwise followers, concat
slices of the next conv's input, residual members, SE convs, downsample convs, the Linear
after a flatten). One group of ``DependencyGraph.get_all_groups`` is one unit.

Rules (each documented in the README, "Any CNN"):

* **Roots** are ``Conv2d`` and ``Linear`` layers. A group with no conv writing its channels is
  *Linear-rooted* (an MLP's hidden width: ConvNeXt's ``pwconv1 -> GELU -> pwconv2`` in its
  channels-last block, an MLP head, an SE block made of Linears); it is a unit like a conv's, ranked
  on the Linear's output with its activation (channels on the last dim: ``capture.channel_maps``
  turns ``[N, H, W, C]`` / ``[N, C]`` into ``[N, C, H, W]`` / ``[N, C, 1, 1]`` maps) and cut with
  ``tp.prune_linear_out_channels``. Registered families (``unit_annotations``) keep their conv units
  only. Groups that would cut a *protected* layer's outputs (the classifier, or anything the
  caller names) are skipped; the protected layers stay in the trace, so the classifier's input
  columns still follow the unit that feeds it. A Linear that writes a conv's channels (added to
  them, as in ConvNeXt's blocks) is a producer of that unit: with the add it is residual.
* **Norms across channels.** A unit whose channels a ``LayerNorm`` (over channels, e.g. ConvNeXt's
  stage widths) or a ``GroupNorm`` with fewer groups than channels normalizes is refused: the
  norm's mean and variance include every channel, so no cut leaves the kept channels' values as
  they were, and the masked-model check would fail.
* **Kinds.** ``plain``: one producing conv (plus depthwise followers, SE gates);
  ``residual``: two or more producing convs tied by an add (one shared index set, scores
  summed over the members); ``linear``: a plain unit whose BN output feeds no activation
  (a linear bottleneck, full rank by design). Residual and linear units are listed but not
  prunable unless asked for (``residual=True``/``linear=True``): the defaults of the
  hand-described families.
* **Rank points** are found, not named: the output of the producing conv's BN (or of the
  conv, without BN) with the activation that consumes it applied (ReLU, ReLU6/hardtanh,
  Hardswish, SiLU, GELU, LeakyReLU, ELU, sigmoid). A hook on a BN fires once per forward
  even where an activation *module* is reused (torchvision's BasicBlock calls one ``relu``
  twice); ``capture.record`` asserts it. A unit with no activation is ranked on its BN
  output.
* **Norms with the activation inside** (timm's ``BatchNormAct2d``, any subclass of a torch norm
  whose output differs from its torch base class's ``forward`` on the same input: found by running
  both once, never by class name): the norm module's output is the rank point, already activated,
  and the unit is plain. torch-pruning traces such a module as its activation's op, so the
  batch-norm op between the conv and the module is stepped over (``_norm_after``).
* **Grouped convs** (``1 < groups``, not depthwise; RegNet, ResNeXt): a unit whose channels a
  grouped conv reads (or makes) one to one is cut the *same number of channels in every group*, so
  ``groups`` is kept; each group keeps its own best positions (``balanced_keep``), and the grouped
  conv's input columns are sliced group by group (``_grouped_prune_in_channels``). Such units are in
  ``Discovery.groups`` (unit -> groups: kept counts are multiples of it); the policy keeps their
  counts multiples of lcm(round_to, groups) and ``plan.make_plan`` picks them with ``balanced_keep``.
  They are pruned by default (``model.prune_grouped = False`` / ``grouped=False`` lists them as
  skipped instead). A grouped conv reading only part of a unit (a concat before it) is refused.
* **Time bound.** Tracing and grouping run under ``COMPRESSOR_GRAPH_TIMEOUT`` seconds (120) each
  (``compressor.pruning.bounded``); past it the model is refused in one line naming the step.
* **Refusal.** A group whose members disagree on the channel count (``F.pad`` on channels,
  as in option-A ResNet shortcuts, makes torch-pruning merge widths 16/32/64) is never
  pruned: it is reported in ``Discovery.refused`` with the op that caused it, and asking
  to prune it is a one-line error. Anything else the graph gets wrong is caught after
  surgery by the masked-model check in ``compressor.pruning.surgery``.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from compressor.errors import UserError
from compressor.models._spec import PrunableUnit
from compressor.pruning import bounded
from compressor.pruning.bounded import UNMAPPED, GraphTimeout, within

#: grad_fn name -> activation name understood by ``activation_fn``
_ACTIVATIONS = {
    "ReluBackward0": "relu", "ReluBackward1": "relu",
    "HardtanhBackward0": "hardtanh", "HardtanhBackward1": "hardtanh",
    "HardswishBackward0": "hardswish", "HardswishBackward1": "hardswish",
    "SiluBackward0": "silu", "SiluBackward1": "silu",
    "GeluBackward0": "gelu",
    "LeakyReluBackward0": "leaky_relu", "LeakyReluBackward1": "leaky_relu",
    "EluBackward0": "elu", "EluBackward1": "elu",
    "SigmoidBackward0": "sigmoid", "SigmoidBackward1": "sigmoid",
}
#: units whose channels a grouped conv reads or makes are cut the same number per group
#: (``Discovery.groups``): the policy rounds their counts to multiples of ``keep_multiple`` and the plan
#: picks them with ``balanced_keep``. On by default; ``model.prune_grouped = False`` skips them.
GROUPED_BY_DEFAULT = True
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)

# ---------------------------------------------------------------- custom channel ops


@dataclass(frozen=True)
class ChannelOp:
    """A parameter-free module that maps channels (e.g. a zero-pad shortcut).

    ``pruner`` is torch-pruning's per-layer function for it (decouples its input and output
    channel spaces); ``describe``/``restore`` turn its pruned state into plain data for
    checkpoints and back.
    """

    pruner: tp.pruner.function.BasePruningFunc
    describe: Callable[[nn.Module], dict[str, Any]]
    restore: Callable[[nn.Module, Mapping[str, Any]], None]


_CHANNEL_OPS: dict[type, ChannelOp] = {}


def register_channel_op(module_type: type, op: ChannelOp) -> None:
    """Teach the engine a module type the graph cannot handle on its own."""
    _CHANNEL_OPS[module_type] = op


def channel_ops() -> Mapping[type, ChannelOp]:
    return dict(_CHANNEL_OPS)


def customized_pruners() -> dict[type, tp.pruner.function.BasePruningFunc]:
    return {t: op.pruner for t, op in _CHANNEL_OPS.items()}


# ---------------------------------------------------------------- grouped convs


def _grouped_prune_in_channels(self: Any, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """torch-pruning's conv input-channel cut, with a grouped conv's inputs cut group by group.

    torch-pruning slices a grouped conv's input columns as if every group lost the same positions
    (it keeps the first ``len(keep) // groups`` of them). Here each group keeps its own positions:
    the cut must leave the same number of channels in every group (``groups`` is kept; the
    discovered unit's ``Discovery.groups`` says so and ``balanced_keep`` picks such a set), and
    output channel ``o`` of group ``k`` keeps the weight columns of group ``k``'s kept inputs.
    Where every group loses the same positions this is exactly torch-pruning's result.
    """
    g = layer.groups
    if g <= 1 or layer.transposed:
        return _ORIGINAL_PRUNE_IN(layer, idxs)
    size = layer.in_channels // g
    drop = set(int(i) for i in idxs)
    per_group = [[j for j in range(size) if k * size + j not in drop] for k in range(g)]
    if len({len(p) for p in per_group}) != 1 or not per_group[0]:
        raise UserError(f"grouped conv (groups={g}): a cut must keep the same number of input channels "
                        f"in every group, got {[len(p) for p in per_group]} (plan the unit with balanced_keep)",
                        field="plan")
    out_per = layer.out_channels // g
    cols = torch.tensor([per_group[o // out_per] for o in range(layer.out_channels)], dtype=torch.long,
                        device=layer.weight.device)
    w = layer.weight
    layer.weight = nn.Parameter(torch.gather(w.detach(), 1, cols[:, :, None, None].expand(-1, -1, *w.shape[2:])),
                                requires_grad=w.requires_grad)
    layer.in_channels = len(per_group[0]) * g
    return layer


# torch-pruning compares handlers by identity (bound methods of its one shared ConvPruner), and
# surgery roots its cuts at ``tp.prune_conv_out_channels``: so the shared instance gets the grouped
# input cut as an instance attribute, once, rather than a graph getting a pruner of its own.
_CONV_PRUNER = tp.pruner.function.PrunerBox[tp.ops.OPTYPE.CONV]
if not getattr(_CONV_PRUNER, "_compressor_grouped", False):
    _ORIGINAL_PRUNE_IN = _CONV_PRUNER.prune_in_channels
    _CONV_PRUNER.prune_in_channels = types.MethodType(_grouped_prune_in_channels, _CONV_PRUNER)
    _CONV_PRUNER._compressor_grouped = True
else:  # a reload of this module: keep the first original
    _ORIGINAL_PRUNE_IN = _CONV_PRUNER.prune_in_channels.__func__.__globals__["_ORIGINAL_PRUNE_IN"]


def balanced_keep(order: Sequence[int], k: int, width: int, groups: int) -> tuple[int, ...]:
    """The ``k`` channels to keep of a unit whose channels are read or made by a grouped conv.

    ``order`` lists the unit's channels from most to least important; each of the ``groups``
    contiguous blocks of ``width // groups`` channels keeps its ``k // groups`` best. ``k`` must be
    a multiple of ``groups`` (``keep_multiple``). With ``groups`` 1 this is the top ``k``.
    """
    if groups <= 1:
        return tuple(sorted(int(i) for i in list(order)[:k]))
    if k % groups or width % groups:
        raise ValueError(f"keeping {k} of {width} channels in {groups} equal groups is impossible")
    size, per = width // groups, k // groups
    taken = [0] * groups
    keep = []
    for i in order:
        b = int(i) // size
        if taken[b] < per:
            taken[b] += 1
            keep.append(int(i))
    return tuple(sorted(keep))


def keep_multiple(model: nn.Module, unit: str) -> int:
    """Kept counts of ``unit`` must be a multiple of this (its grouped conv's ``groups``; else 1)."""
    return int(discovery(model).groups.get(unit, 1))


# ---------------------------------------------------------------- model contract


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of one input: ``model.input_size`` (int or (H, W)) and ``in_channels`` (3)."""
    size = getattr(model, "input_size", None)
    if size is None:
        raise UserError("the model has no input_size: pass example inputs", field="input_size")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return int(getattr(model, "in_channels", 3)), h, w


def _param(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def example_input(model: nn.Module, batch: int = 1, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random input on the model's device and dtype (a local generator: the caller's RNG is kept)."""
    c, h, w = input_shape(model)
    p = _param(model)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    g = generator or torch.Generator().manual_seed(0)
    return torch.randn(batch, c, h, w, generator=g).to(device=device, dtype=dtype)


def forward_once(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One eval-mode, no-grad forward of ``example`` with ``handles`` (hooks) in place; the hooks are
    removed and the model's mode restored whatever happens (every hook walk of the engine uses it)."""
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def call_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of leaf modules in the order the forward pass first calls them."""
    order: list[str] = []
    seen: set[str] = set()
    handles = []

    def make(name: str) -> Callable:
        def hook(*_a: Any) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)
        return hook

    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            handles.append(mod.register_forward_hook(make(name)))
    forward_once(model, example, handles)
    return order


def protected_layers(model: nn.Module, example: torch.Tensor | None = None,
                     extra: Sequence[nn.Module | str] = ()) -> list[nn.Module]:
    """Layers whose outputs are never cut: ``model.ignored_layers()`` if the model says, else the
    last Conv2d/Linear the forward calls (the classifier), plus ``extra`` (modules or names)."""
    mods = dict(model.named_modules())
    if getattr(model, "_compressor_ignored", None):  # set by the Python API's ignored_layers
        layers = [mods[n] for n in model._compressor_ignored]
    elif hasattr(model, "ignored_layers"):
        layers = list(model.ignored_layers())
    else:
        example = example if example is not None else example_input(model)
        mods = dict(model.named_modules())
        last = [n for n in call_order(model, example) if isinstance(mods[n], (nn.Conv2d, nn.Linear))]
        layers = [mods[last[-1]]] if last else []
    for e in extra:
        if isinstance(e, str):
            if e not in mods:
                raise UserError(f"no module named {e!r} in the model", field="ignored_layers")
            layers.append(mods[e])
        else:
            layers.append(e)
    return layers


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph, traced in eval mode (a train-mode trace would update BN statistics).

    The tracer follows autograd, so a frozen model (``requires_grad_(False)``, as for inference or
    a distillation teacher) is traced with gradients switched on and its flags restored after.
    """
    was = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad(), within(model, "tracing (build_dependency)"):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                         customized_pruners=customized_pruners(), verbose=False)
    except (UserError, GraphTimeout):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the tracer trips on, the model is refused in one line
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1].name
        hint = " (a reshape/transpose of channels, such as a channel shuffle)" if "reshape" in where else ""
        raise UserError(f"the dependency graph cannot handle this model: torch-pruning failed in {where} with "
                        f"{type(exc).__name__}{hint}; it is refused rather than pruned wrongly", field="model") from exc
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was)


# ---------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Member:
    """One layer of a unit: how its channels follow the unit (for counting and checks)."""

    name: str
    role: str  # "out" (its output channels are the unit's) or "in" (some input channels are)
    n: int     # how many of its channels follow the unit at full width


@dataclass(frozen=True)
class Discovery:
    """Every unit of a model, those refused, and how each layer follows them."""

    units: tuple[PrunableUnit, ...]
    kinds: Mapping[str, str]
    members: Mapping[str, tuple[Member, ...]]
    refused: Mapping[str, str] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    #: unit -> the ``groups`` of the grouped conv that reads or makes its channels: kept counts are
    #: a multiple of it, the same number in each of its contiguous channel blocks (``balanced_keep``)
    groups: Mapping[str, int] = field(default_factory=dict)

    def unit(self, name: str) -> PrunableUnit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)


def _real_module(node: Any, direction: str, depth: int = 0) -> str | None:
    if not isinstance(node.module, (tp.ops._ElementWiseOp, tp.ops._ConcatOp, tp.ops._SplitOp,
                                    tp.ops._ReshapeOp, tp.ops._SliceOp)) or depth > 8:
        return node.name.split(" (")[0]
    nxt = node.inputs if direction == "in" else node.outputs
    for n in nxt:
        found = _real_module(n, direction, depth + 1)
        if found:
            return found
    return None


def _culprit(group: Any) -> str:
    """Name the op that made a group's widths disagree (a pad or reshape on channels)."""
    for item in group:
        node = item.dep.target
        gf = type(getattr(node, "grad_fn", None)).__name__
        if "Pad" in gf or "Shuffle" in gf or "Transpose" in gf or "Permute" in gf:
            src, dst = _real_module(node, "in"), _real_module(node, "out")
            pad = getattr(node.grad_fn, "_saved_pad", None)
            what = f"{gf.replace('Backward0', '')}{'' if pad is None else ' ' + str(tuple(pad))}"
            return f"op {what} on channels between {src} and {dst}"
    return "members of different widths (an op that changes the channel count)"


def _activation_of(node: Any) -> str:
    """The activation applied to a node's output, or '' if its consumer is anything else."""
    outs = list(node.outputs)
    if len(outs) != 1:
        return ""
    gf = getattr(outs[0], "grad_fn", None)
    name = _ACTIVATIONS.get(type(gf).__name__, "")
    if name == "hardtanh":
        return f"hardtanh:{float(gf._saved_min_val)}:{float(gf._saved_max_val)}"
    if name == "leaky_relu":
        return f"leaky_relu:{float(gf._saved_negative_slope)}"
    if name == "elu":
        return f"elu:{float(gf._saved_alpha)}"
    return name


def activation_label(spec: str) -> str:
    """The name a user knows an activation by: ``hardtanh`` clamped to [0, 6] is ReLU6."""
    name, *vals = spec.split(":")
    if name == "hardtanh" and [float(v) for v in vals] == [0.0, 6.0]:
        return "relu6"
    return name


def activation_fn(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function of an activation spec recorded on a unit ('' = identity)."""
    import torch.nn.functional as F

    if not spec:
        return lambda t: t
    name, *args = spec.split(":")
    vals = [float(a) for a in args]
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": F.relu, "hardswish": F.hardswish, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid,
        "hardtanh": lambda t: F.hardtanh(t, *vals), "leaky_relu": lambda t: F.leaky_relu(t, *vals),
        "elu": lambda t: F.elu(t, *vals),
    }
    if name not in table:
        raise ValueError(f"unknown activation {spec!r}")
    return table[name]


def _torch_base(mod: nn.Module) -> type | None:
    """The first ``torch.nn`` class a norm module derives from, if its own class is not one."""
    if type(mod).__module__.startswith("torch.nn"):
        return None
    for cls in type(mod).__mro__:
        if cls.__module__.startswith("torch.nn") and issubclass(cls, _NORMS):
            return cls
    return None


def norms_with_activation(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Norm modules that apply something after their norm (timm's ``BatchNormAct2d`` and kin).

    Found by behaviour, not by name: a module that derives from a torch norm class but is not one
    is run once on its real input (the example's forward, eval mode) and its output compared with
    its torch base class's ``forward`` on the same input and parameters. Any difference (an
    activation, a drop, a scale) makes its output the rank point and its unit plain: the
    nonlinearity is inside the module. An ``Identity`` activation (timm's linear bottlenecks) gives
    the same output, so such a unit stays linear.
    """
    bases = {n: b for n, m in model.named_modules() if isinstance(m, _NORMS) and (b := _torch_base(m)) is not None}
    if not bases:
        return set()
    found: set[str] = set()
    seen: set[str] = set()
    handles = []

    def make(name: str, base: type) -> Callable:
        def hook(mod: nn.Module, inp: tuple, out: Any) -> None:
            if name in seen or not inp or not torch.is_tensor(inp[0]) or not torch.is_tensor(out):
                return
            seen.add(name)
            try:
                ref = base.forward(mod, inp[0])
            except Exception:  # noqa: BLE001 - a forward the base class cannot run: treat as different
                found.add(name)
                return
            if ref.shape != out.shape or not torch.allclose(ref, out, rtol=1e-5, atol=1e-6):
                found.add(name)
        return hook

    mods = dict(model.named_modules())
    for n, b in bases.items():
        handles.append(mods[n].register_forward_hook(make(n, b)))
    forward_once(model, example, handles)
    return found


def _norm_after(node: Any) -> Any | None:
    """The norm node that a conv's output feeds alone, if any.

    A norm module that applies an activation inside (timm's ``BatchNormAct2d``) is traced as its
    activation's op, so the batch-norm op itself shows up as an unnamed elementwise node between
    the conv and the module: up to two such single-input norm ops (``Native*NormBackward``) are
    stepped over, nothing else (a ReLU between a conv and its BN keeps the conv as the rank point).
    """
    for _ in range(3):
        nxt = list(node.outputs)
        if len(nxt) != 1:
            return None
        node = nxt[0]
        if isinstance(node.module, _NORMS):
            return node
        if (not isinstance(node.module, tp.ops._ElementWiseOp) or len(node.inputs) != 1
                or "Norm" not in type(getattr(node, "grad_fn", None)).__name__):
            return None  # only the norm op itself is stepped over (conv -> relu -> bn keeps its conv point)
    return None


def _mixes_channels(mod: nn.Module) -> bool:
    """A norm whose statistics span several of the channels it carries (LayerNorm over channels, GroupNorm
    with fewer groups than channels): cutting channels changes the kept ones' outputs."""
    if isinstance(mod, nn.GroupNorm):
        return mod.num_groups < mod.num_channels
    return isinstance(mod, nn.LayerNorm)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _grouped_refusal(model: nn.Module, grouped: Sequence[str], out_mods: Mapping[str, int],
                     in_mods: Mapping[str, int], width: int) -> str:
    """Why a unit touched by grouped convs cannot be cut group by group ('' if it can).

    Its channels must be exactly the grouped conv's inputs (or outputs), one to one, and every
    grouped conv it touches must split them into the same number of groups.
    """
    gs = {model.get_submodule(n).groups for n in grouped}
    first = grouped[0]
    g = model.get_submodule(first).groups
    if len(gs) != 1:
        return f"grouped convs with different groups ({sorted(gs)}) read these channels"
    for n in grouped:
        conv = model.get_submodule(n)
        full = conv.out_channels if n in out_mods else conv.in_channels
        if (out_mods.get(n) or in_mods.get(n)) != width or full != width or width % g:
            return (f"grouped conv {n} (groups={g}) reads only part of these channels (a concat or slice before "
                    "it); pruning would have to remove whole groups, which is not supported")
        if n in out_mods and n in in_mods:
            return f"grouped conv {n} (groups={g}) both reads and makes these channels"
    return ""


def _is_depthwise_follower(conv: nn.Module, in_group: bool) -> bool:
    return (in_group and isinstance(conv, nn.Conv2d) and conv.groups > 1
            and conv.groups == conv.in_channels == conv.out_channels)


@dataclass
class _Found:
    """What discovery collects, unit by unit (``Discovery`` is made from it at the end)."""

    units: list[tuple[int, PrunableUnit]] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    members: dict[str, tuple[Member, ...]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)


@dataclass
class _Walk:
    """The model's traced graph and what every group is read against."""

    model: nn.Module
    dg: Any
    names: dict[nn.Module, str]
    order: dict[str, int]
    act_norms: Any

    def layer(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def first(self, names: Any) -> list[str]:
        return sorted(names, key=lambda n: self.order.get(n, 1 << 30))


def _group_layers(w: _Walk, group: Any) -> tuple[dict[str, int], dict[str, int], bool]:
    """The named layers whose outputs (``out``) and inputs (``in``) follow the group's channels, with their
    index counts, and whether an add/sub joins the channel space (a residual)."""
    out_mods: dict[str, int] = {}
    in_mods: dict[str, int] = {}
    adds = False
    for it in group:
        node, handler, n = it.dep.target, it.dep.handler, len(it.idxs)
        mod = node.module
        if isinstance(mod, tp.ops._ElementWiseOp) and type(node.grad_fn).__name__.startswith(("Add", "Sub")):
            adds = True
        if mod not in w.names:
            continue
        (out_mods if w.dg.is_out_channel_pruning_fn(handler) else in_mods)[w.names[mod]] = n
    return out_mods, in_mods, adds


def _refusal(w: _Walk, group: Any, out_mods: dict[str, int], in_mods: dict[str, int],
             width: int) -> tuple[str | None, bool]:
    """Why the group's channels cannot be cut exactly (None: they can), and whether the reason holds for
    every conv writing them (members that disagree on the channel count). Per-channel layers (BN) may
    follow the unit on a slice (a concat before them); a conv or Linear whose outputs are cut must be
    exactly the unit's width."""
    copies = {n for n, c in out_mods.items() if c != width and _whole_copies(w.layer(n), c, width)}
    layer_widths = {out_width(w.layer(n)) for n in out_mods
                    if isinstance(w.layer(n), (nn.Conv2d, nn.Linear)) and n not in copies}
    if layer_widths != {width} or any(c != width for n, c in out_mods.items() if n not in copies):
        return _culprit(group), True
    mixing = [n for n in out_mods if _mixes_channels(w.layer(n))]
    if mixing:  # no cut of these channels is exact: refused here rather than by the masked check
        return (f"{type(w.layer(mixing[0])).__name__} {mixing[0]} normalizes across these channels (its mean and "
                "variance include every one), so removing some changes the values of the rest"), False
    split = _split_in(group)
    if split:  # the model's code splits by sizes fixed in Python: a cut would change the chunks it expects
        return split, True
    grouped = _grouped_layers(w, out_mods, in_mods)
    return (_grouped_refusal(w.model, grouped, out_mods, in_mods, width) if grouped else None), False


def _whole_copies(layer: nn.Module, n: int, width: int) -> bool:
    """A depthwise conv or per-channel norm cut on all its ``n`` channels, a whole multiple of the unit's width:
    it runs over a concat of the unit's channels and their depthwise copies (GhostNet's ``cat([x, dw(x)])``), so
    each cut channel removes one channel from every copy."""
    per_channel = isinstance(layer, nn.modules.batchnorm._BatchNorm) or (
        isinstance(layer, nn.Conv2d) and _is_depthwise(layer))
    return per_channel and out_width(layer) == n and n % width == 0 and n > width


def _split_in(group: Any) -> str | None:
    """Why a group that runs through a channel split or slice (``torch.split``, ``chunk``, ``x[:, :k]``) is not cut,
    or None. The chunk sizes are fixed in the model's code (``torch.split(x, 26)``), not read off the tensor, so
    keeping fewer channels would hand each chunk the wrong ones."""
    for item in group:
        node = item.dep.target
        if getattr(node, UNMAPPED, False):
            what = "view/reshape beside a transpose of channels (a channel shuffle or a channels-last layout)"
            return (f"op {what} between {_real_module(node, 'in')} and {_real_module(node, 'out')}: the cut channels "
                    "would not map one to one through it")
        if isinstance(node.module, (tp.ops._SplitOp, tp.ops._SliceOp, tp.ops._UnbindOp)) and _on_channels(node):
            gf = type(getattr(node, "grad_fn", None)).__name__.replace("Backward0", "").replace("Backward1", "")
            return (f"op {gf} on channels between {_real_module(node, 'in')} and {_real_module(node, 'out')}: "
                    "the chunk sizes are fixed in the model's code, so a cut would misalign them")
    return None


def _on_channels(node: Any) -> bool:
    """Whether a split/slice node works on the channels: dim 1, or the last dim of an ``[N, C]``/``[N, L, C]``
    tensor (a spatial slice such as ``x[:, :, ::2, ::2]`` does not). A negative dim the tensor's rank does not
    resolve counts as channels (refused, not guessed)."""
    gf = getattr(node, "grad_fn", None)
    dim = int(getattr(gf, "_saved_dim", 1))
    if dim >= 1 << 63:  # autograd keeps a negative dim as an unsigned int64
        dim -= 1 << 64
    sizes = getattr(gf, "_saved_self_sym_sizes", None) or getattr(gf, "_saved_self_sizes", None)
    ndim = len(sizes) if sizes is not None else None
    if dim < 0:
        if ndim is None:
            return True
        dim += ndim
    return dim == 1 or (ndim in (2, 3) and dim == ndim - 1)


def _grouped_layers(w: _Walk, out_mods: dict[str, int], in_mods: dict[str, int]) -> list[str]:
    """Grouped (not depthwise) convs among the group's layers: they keep the same count in every group."""
    return [n for n in (*out_mods, *in_mods) if isinstance(w.layer(n), nn.Conv2d)
            and 1 < w.layer(n).groups and not _is_depthwise(w.layer(n))]


def _unit(w: _Walk, root: str, width: int, out_mods: dict[str, int], in_mods: dict[str, int],
          adds: bool) -> PrunableUnit:
    """The unit rooted at ``root``: every conv or Linear writing its channels (a Linear's output added to a
    conv's, as in ConvNeXt's blocks, makes a residual group), root first; where it is ranked (the norm after
    each head, with the activation after it) and its kind (plain, residual, or linear without activation)."""
    layers = sorted((n for n in out_mods if isinstance(w.layer(n), (nn.Conv2d, nn.Linear))),
                    key=lambda n: (n != root, w.order.get(n, 1 << 30)))
    producers = [n for n in layers if not _is_depthwise_follower(w.layer(n), n in in_mods)]
    kind = "residual" if (adds and len(producers) > 1) else "plain"
    heads = producers if kind == "residual" else producers[:1]
    points, acts, bns = [], [], []
    for conv in heads:
        node = w.dg.module2node[w.layer(conv)]
        point = conv
        norm = _norm_after(node)
        if norm is not None and norm.module in w.names:
            point, node = w.names[norm.module], norm
            bns.append(point)
        points.append(point)
        acts.append(_activation_of(node) if kind == "plain" else "")
    if kind == "plain" and not acts[0] and points[0] not in w.act_norms:
        kind = "linear"  # (a norm with its activation inside is ranked on its own output: plain)
    return PrunableUnit(name=root, convs=tuple(heads), bns=tuple(bns), rank_points=tuple(points), cfg_index=(),
                        width=width, rank_acts=tuple(acts), kind=kind)


def _root_of(w: _Walk, out_mods: dict[str, int], hand_described: bool) -> list[str]:
    """The convs writing the group's channels in forward order; without any, the Linears (an MLP's hidden
    width, channels last or [N, C]), except in HRank's families, which keep their conv units only."""
    convs = w.first(n for n in out_mods if isinstance(w.layer(n), nn.Conv2d))
    if convs:
        return convs
    linears = w.first(n for n in out_mods if isinstance(w.layer(n), nn.Linear))
    return [] if hand_described else linears


def root_s() -> float:
    """One root's grouping bound: a tenth of the whole grouping's (at least 2 s); past it that width is refused
    and the others are still grouped."""
    return max(2.0, bounded.limit_s() / 10)


def _groups(w: _Walk, protected: list[nn.Module], refused: dict[str, str]) -> list[Any]:
    """torch-pruning's groups, one per channel space rooted at a Conv2d or Linear (its ``get_all_groups``, with
    one difference: a root whose grouping fails, e.g. on an index map through a channel shuffle, is refused in
    ``refused`` instead of failing the whole model)."""
    dg, seen, found = w.dg, set(), []
    ignored = protected + list(dg.IGNORED_LAYERS_IN_TRACING)
    for m in list(dg.module2node):
        if m in ignored or m in seen or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        try:
            with bounded.for_one(root_s()):
                group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        except (IndexError, ValueError, ArithmeticError, KeyError, TypeError) as exc:
            if m in w.names:
                refused[w.names[m]] = (f"torch-pruning cannot map these channels through the graph "
                                       f"({type(exc).__name__}: {str(exc)[:80]}; e.g. a channel shuffle or reshape "
                                       "on the way)")
            continue
        except GraphTimeout:
            bounded.check()  # the whole grouping's deadline: the model is refused
            if m in w.names:
                refused[w.names[m]] = (f"torch-pruning's grouping of these channels did not finish within {root_s():g} s "
                                       "(a channel space it loops on); refused, the rest of the model is grouped")
            continue
        outs = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
        seen.update(outs)
        if not any(o in ignored for o in outs):
            found.append(group)
    return found


def discover(model: nn.Module, example: torch.Tensor | None = None, *,
             ignored: Sequence[nn.Module | str] = (), residual: bool | None = None,
             linear: bool = False, grouped: bool | None = None) -> Discovery:
    """Find every prunable unit of ``model`` (the model is not changed): one torch-pruning group per
    channel space, read as its layers, checked for an exact cut, and made a unit (or refused, or
    skipped when its kind is off)."""
    example = example if example is not None else example_input(model)
    if residual is None:
        residual = bool(getattr(model, "prune_residual", False))
    grouped_ok = bool(getattr(model, "prune_grouped", GROUPED_BY_DEFAULT)) if grouped is None else grouped
    protected = protected_layers(model, example, ignored)
    w = _Walk(model=model, dg=build_graph(model, example), names={m: n for n, m in model.named_modules()},
              order={n: i for i, n in enumerate(call_order(model, example))},
              act_norms=norms_with_activation(model, example))
    f = _Found()
    with within(model, "grouping (get_all_groups)"):
        found = _groups(w, list(protected), f.refused)
    hand_described = hasattr(model, "unit_annotations")
    for group in found:
        out_mods, in_mods, adds = _group_layers(w, group)
        convs = _root_of(w, out_mods, hand_described)
        if not convs:
            continue
        root = convs[0]
        width = out_width(w.layer(root))
        if width < 2:  # nothing left to cut (e.g. a depthwise conv pruned to 1 channel traces as a plain conv)
            continue
        why, every_conv = _refusal(w, group, out_mods, in_mods, width)
        if why:
            f.refused[root] = why
            for n in convs[1:] if every_conv else ():
                f.refused.setdefault(n, why)
            continue
        grouped = _grouped_layers(w, out_mods, in_mods)
        g_unit = w.layer(grouped[0]).groups if grouped else 1
        unit = _unit(w, root, width, out_mods, in_mods, adds)
        f.kinds[root] = unit.kind
        if g_unit > 1:
            f.groups[root] = g_unit
        f.members[root] = tuple(Member(n, "out", c) for n, c in out_mods.items()) + tuple(
            Member(n, "in", c) for n, c in in_mods.items())
        if (unit.kind == "residual" and not residual) or (unit.kind == "linear" and not linear):
            f.skipped[root] = unit.kind
        elif g_unit > 1 and not grouped_ok:
            f.skipped[root] = "grouped"
        else:
            f.units.append((w.order.get(root, 1 << 30), unit))
    f.units.sort(key=lambda t: t[0])
    return Discovery(units=tuple(u for _, u in f.units), kinds=f.kinds, members=f.members, refused=f.refused,
                     skipped=f.skipped, groups=f.groups)


def out_width(mod: nn.Module) -> int | None:
    """Output channels of a channel-carrying layer (None for anything else)."""
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.num_features
    if isinstance(mod, nn.GroupNorm):
        return mod.num_channels
    if isinstance(mod, nn.LayerNorm):
        return int(mod.normalized_shape[-1])
    return None


# ---------------------------------------------------------------- cached access

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Discovery]]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return (getattr(model, "input_size", None), getattr(model, "prune_residual", None),
            getattr(model, "prune_grouped", None),
            getattr(model, "_compressor_ignored", None),
            tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))


def discovery(model: nn.Module) -> Discovery:
    """``discover`` with the model's own defaults, cached until the model's shapes change."""
    sig = _signature(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    found = discover(model)
    _CACHE[model] = (sig, found)
    return found


def units(model: nn.Module) -> list[PrunableUnit]:
    """The prunable units of any model, in forward order.

    Registered families annotate the discovered units with their HRank bookkeeping
    (``cfg_index``, HRank's compat rank points) through ``model.unit_annotations()``; the
    discovery itself is the same graph walk for every model.
    """
    found = list(discovery(model).units)
    notes = model.unit_annotations() if hasattr(model, "unit_annotations") else {}
    if not notes:
        return found
    from dataclasses import replace

    return [replace(u, **notes[u.name]) if u.name in notes else u for u in found]


def check_prunable(model: nn.Module, names: Sequence[str]) -> None:
    """A rates file or plan that names a refused or skipped layer gets one line saying why."""
    d = discovery(model)
    ok = {u.name for u in d.units}
    for n in names:
        if n in ok:
            continue
        if n in d.refused:
            raise UserError(f"layer {n!r} cannot be pruned safely: {d.refused[n]}", field=n)
        if n in d.skipped:
            how = {"residual": "--residual", "linear": "linear=True", "grouped": "model.prune_grouped = True"}
            raise UserError(f"layer {n!r} is a {d.skipped[n]} unit, not pruned by default "
                            f"({how.get(d.skipped[n], d.skipped[n])} enables it)", field=n)


def _lowest(model: nn.Module, found: Discovery, min_keep: float) -> tuple[dict[str, int], dict[str, int]]:
    """MACs/params of ``model`` at full width and with every unit of ``found`` at ``min_keep``."""
    import math

    from compressor.pruning.size import SizeModel

    sizer = SizeModel(model, found)
    low = sizer.count({u.name: max(1, math.ceil(min_keep * u.width - 1e-9)) for u in found.units})
    return sizer.count({}), low


def _meets(base: Mapping[str, int], low: Mapping[str, int], target: Mapping[str, float]) -> bool:
    keys = [k for k in target if k in ("macs", "params")]
    return all(base[k] and low[k] / base[k] <= float(target[k]) for k in keys)


def within_reach(model: nn.Module, target: Mapping[str, float], min_keep: float) -> bool:
    """Whether the MACs/params budget ``target`` is reachable with the model's units at ``min_keep``."""
    found = discovery(model)
    if not found.units:
        return False
    return _meets(*_lowest(model, found, min_keep), target)


def residual_hint(model: nn.Module | None, target: Mapping[str, float], min_keep: float) -> str:
    """For an out-of-reach budget: '' or a clause saying residual groups would reach it.

    Said only when it is true: the model has residual groups that are off, and with them pruned to
    ``min_keep`` as well every MACs/params target in ``target`` is met.
    """
    if model is None or not [k for k in target if k in ("macs", "params")]:
        return ""
    try:
        if "residual" not in discovery(model).skipped.values():
            return ""
        met = _meets(*_lowest(model, discover(model, residual=True), min_keep), target)
    except UserError:
        return ""
    return ("; with residual groups pruned too (--residual, or residual=True in the API) it is within reach"
            if met else "")
