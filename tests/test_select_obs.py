"""obs selection (compressor.pruning.select_obs): constructed cases with a known answer, and a tiny end to end.

The models here have no ``channel_map()``: each unit's consumers come from the dependency graph."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compressor.pruning.select_obs import prune_obs, select

from tests.conftest import TINY_VGG, one_thread, randomize_bn, units_of


def _batches(n: int = 2, b: int = 16, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(n)]


def _units(**widths: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(name=n.replace("__", "."), width=w) for n, w in widths.items()]


def _copy_channel(conv: nn.Conv2d, bn: nn.BatchNorm2d, src: int, dst: int, scale: float = 1.0) -> None:
    """Channel ``dst`` of conv→BN becomes ``scale`` × channel ``src`` (scale > 0 commutes with ReLU)."""
    with torch.no_grad():
        conv.weight[dst] = conv.weight[src]
        if conv.bias is not None:
            conv.bias[dst] = conv.bias[src]
        bn.running_mean[dst] = bn.running_mean[src]
        bn.running_var[dst] = bn.running_var[src]
        bn.weight[dst] = scale * bn.weight[src]
        bn.bias[dst] = scale * bn.bias[src]


class Chain(nn.Module):
    """conv a → BN → ReLU → conv b → BN → ReLU → pool → Linear; unit ``a`` read by ``b``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.b, self.bn_b = nn.Conv2d(width, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(x.mean((2, 3)))


class Concat(nn.Module):
    """Two branches (1×1 ``e1`` and 3×3 ``e3``, each conv-BN-ReLU) concatenated into conv ``c``."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.e3, self.bn3 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.c = nn.Conv2d(9, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.bn1(self.e1(x))), torch.relu(self.bn3(self.e3(x)))], dim=1)
        return self.c(y)


class Residual(nn.Module):
    """A residual space ``s`` (stem and block's conv2 write it) read by conv1 and by the head conv h."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.s, self.bn_s = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c1, self.bn1 = nn.Conv2d(width, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.c2, self.bn2 = nn.Conv2d(5, width, 3, padding=1), nn.BatchNorm2d(width)
        self.h = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_s(self.s(x)))
        y = self.bn2(self.c2(torch.relu(self.bn1(self.c1(x)))))
        return self.h(torch.relu(x + y))


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    return randomize_bn(model, seed).eval()


def _removed(plan, unit: str, width: int) -> set[int]:
    return set(range(width)) - set(plan.kept(unit))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_a_copied_channel_goes_first_and_costs_nothing(scale: float) -> None:
    """Channel 5 = scale × channel 2 after BN-ReLU: the consumer folds it into channel 2's column."""
    m = _randomized(Chain())
    _copy_channel(m.a, m.bn_a, 2, 5, scale)
    with one_thread():
        plan, rep = select(m, {"a": 7}, _batches(), units=_units(a=8), ridge=1e-9, progress=False)
    assert _removed(plan, "a", 8) & {2, 5} and len(_removed(plan, "a", 8)) == 1
    u = rep.units[0]
    assert u.consumers == ("b",)
    assert u.error_full < 1e-5 and u.error_kept < 1e-6
    # the working copy's refit really reproduces b's output without the channel
    assert u.removal_costs[-1] < 1e-4
    assert u.removal_kept == (7,)  # one step, its kept count recorded with its cost


def test_a_channel_bn_relu_kills_is_removed_first_despite_the_largest_weights() -> None:
    """Not linear in the channel: BN shifts channel 4 far below zero, so after ReLU it is zero.

    Its conv filter has by far the largest l1 norm (an l1 criterion keeps it first), but ``X`` is
    taken after BN-ReLU, where the channel contributes nothing: obs removes it at no cost."""
    m = _randomized(Chain())
    with torch.no_grad():
        m.a.weight[4] *= 10
        m.bn_a.bias[4] = -1e4
    assert int(m.a.weight.abs().sum((1, 2, 3)).argmax()) == 4
    with one_thread():
        plan, rep = select(m, {"a": 7}, _batches(), units=_units(a=8), progress=False)
    assert _removed(plan, "a", 8) == {4}
    assert rep.units[0].error_kept < 1e-7


def test_removal_order_follows_cost() -> None:
    """Three channels to go: the dead one and a copy go before anything that carries signal."""
    m = _randomized(Chain())
    _copy_channel(m.a, m.bn_a, 0, 6)
    with torch.no_grad():
        m.bn_a.bias[3] = -1e4
    with one_thread():
        plan, rep = select(m, {"a": 6}, _batches(), units=_units(a=8), ridge=1e-9, chunk=1 / 8, progress=False)
    gone = _removed(plan, "a", 8)
    assert 3 in gone and gone & {0, 6} and len(gone) == 2
    assert rep.units[0].error_kept < 1e-7


def test_a_redundant_concat_slice() -> None:
    """e3's channel 1 is a 3×3 filter with only the centre tap, equal to e1's channel 2: redundant
    in the concat; its group is its 9 columns at offset 4 of ``c``'s input."""
    m = _randomized(Concat())
    with torch.no_grad():
        m.e3.weight[1].zero_()
        m.e3.weight[1, :, 1, 1] = m.e1.weight[2, :, 0, 0]
        m.e3.bias[1] = m.e1.bias[2]
        for a, b in ((m.bn3.running_mean, m.bn1.running_mean), (m.bn3.running_var, m.bn1.running_var),
                     (m.bn3.weight, m.bn1.weight), (m.bn3.bias, m.bn1.bias)):
            a[1] = b[2]
    with one_thread():
        plan, rep = select(m, {"e1": 4, "e3": 4}, _batches(), units=_units(e1=4, e3=5), ridge=1e-9,
                           progress=False)
    assert _removed(plan, "e3", 5) == {1}
    assert "e1" not in plan.keep  # full units are not touched
    assert rep.units[0].unit == "e3" and rep.units[0].error_kept < 1e-7


def test_a_residual_group_sums_its_consumers() -> None:
    """Channel 4 of the residual space copies channel 1 in every producer: after the add and
    ReLU it is a copy in both consumers (c1 and h), so it goes first and both refits lose nothing."""
    m = _randomized(Residual())
    _copy_channel(m.s, m.bn_s, 1, 4)
    _copy_channel(m.c2, m.bn2, 1, 4)
    with one_thread():
        plan, rep = select(m, {"s": 5}, _batches(), units=_units(s=6), ridge=1e-9, progress=False)
    assert _removed(plan, "s", 6) & {1, 4} and len(_removed(plan, "s", 6)) == 1
    u = rep.units[0]
    assert set(u.consumers) == {"c1", "h"}
    assert u.error_kept < 1e-7


def test_residual_costs_add_over_consumers() -> None:
    """Channel 5 is read by neither consumer (zero columns in c1 and h): free. Channel 2 is
    unused by h only: free for h, not for c1. The summed cost removes 5, never 2."""
    m = _randomized(Residual())
    with torch.no_grad():
        m.h.weight[:, 2] = 0
        m.h.weight[:, 5] = 0
        m.c1.weight[:, 5] = 0
    with one_thread():
        plan, rep = select(m, {"s": 5}, _batches(), units=_units(s=6), ridge=1e-9, progress=False)
    assert _removed(plan, "s", 6) == {5}
    assert rep.units[0].error_kept < 1e-6
    with one_thread():  # removing two must cost: channel 2 carries signal for c1
        plan2, rep2 = select(m, {"s": 4}, _batches(), units=_units(s=6), ridge=1e-9, progress=False)
    assert 5 in _removed(plan2, "s", 6) and rep2.units[0].error_kept > 1e-4


def test_the_original_is_untouched_and_errors_are_reported(tiny_vgg) -> None:
    before = {k: v.clone() for k, v in tiny_vgg.state_dict().items()}
    counts = {u.name: u.width // 2 for u in units_of(tiny_vgg)[:3]}
    with one_thread():
        plan, rep = select(tiny_vgg, counts, _batches(size=32), progress=False)
    for k, v in tiny_vgg.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {u: len(plan.kept(u)) for u in plan.keep} == counts
    assert [u.unit for u in rep.units] == list(counts)
    with pytest.raises(ValueError, match="keep count"):
        select(tiny_vgg, {units_of(tiny_vgg)[0].name: 0}, _batches(size=32), progress=False)


def _last_conv_error(original: nn.Module, pruned: nn.Module, xs: list[torch.Tensor]) -> float:
    """Relative error of the last conv's output (full width, never pruned) on ``xs``."""
    name = [n for n, m in original.named_modules() if isinstance(m, nn.Conv2d)][-1]
    box = {}
    num = den = 0.0
    for x in xs:
        for key, model in (("o", original), ("p", pruned)):
            h = model.get_submodule(name).register_forward_hook(lambda m, i, o, key=key: box.__setitem__(key, o))
            with torch.no_grad():
                model(x)
            h.remove()
        num += float((box["p"] - box["o"]).pow(2).sum())
        den += float((box["o"] - box["o"].mean((0, 2, 3), keepdim=True)).pow(2).sum())
    return num / den


def test_tiny_vgg_obs_refit_beats_l1_refit_on_the_calibration_set() -> None:
    from compressor.pruning import surgery
    from compressor.models import get_model
    from compressor.pruning.plan import Plan
    from compressor.pruning.reconstruct import keep_from_plan, reconstruct

    torch.manual_seed(0)
    m = randomize_bn(get_model("vgg16_bn", cfg=list(TINY_VGG))).eval()
    xs = _batches(n=2, b=32, size=32, seed=3)
    units = units_of(m)[:-1]
    counts = {u.name: u.width // 2 for u in units}
    with one_thread():
        small, plan, rep, rec = prune_obs(m, counts, xs, progress=False)
        keep = {}
        for u in units:
            l1 = m.get_submodule(u.convs[0]).weight.abs().sum((1, 2, 3))
            keep[u.name] = tuple(sorted(torch.argsort(l1, descending=True, stable=True)[:counts[u.name]].tolist()))
        l1_plan = Plan(keep=keep, widths=plan.widths, model=m.arch)
        l1_small = surgery.apply(m, l1_plan).eval()
        reconstruct(m, l1_small, xs, keep=keep_from_plan(m, l1_plan), progress=False)
        e_obs, e_l1 = _last_conv_error(m, small, xs), _last_conv_error(m, l1_small, xs)
    assert {u: len(plan.kept(u)) for u in plan.keep} == counts
    assert rec is not None and all(f.accepted for f in rec.layers)
    assert e_obs <= e_l1, (e_obs, e_l1)


def test_obs_through_the_api_and_the_prune_command(tmp_path, capsys):
    """criterion='obs' from Python (prune with calibration, then recover) and from the CLI (--criterion obs
    --reconstruct): the same keep counts as l1, a recorded selection, and no larger calibration error."""
    import json

    import compressor
    from compressor.cli import main
    from compressor.errors import UserError
    from compressor.models import get_model
    from tests.conftest import TINY_VGG, one_thread, randomize_bn

    torch.manual_seed(0)
    net = randomize_bn(get_model("vgg16_bn", cfg=list(TINY_VGG))).eval()
    x = torch.randn(1, 3, 32, 32)
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(4)]
    rates = {"default": 0.5}
    with one_thread():
        with pytest.raises(UserError, match="calibration"):
            compressor.prune(net, x, rates, criterion="obs")
        with pytest.raises(UserError, match="selection, not a score"):
            compressor.rank(net, batches, ["obs"])
        small, info = compressor.prune(net, x, rates, criterion="obs", calibration=batches)
        l1, l1_info = compressor.prune(net, x, rates, criterion="l1")
        assert info.criterion == "obs" and info.selection is not None
        assert {u: len(k) for u, k in info.plan.keep.items()} == {u: len(k) for u, k in l1_info.plan.keep.items()}
        a, _ = compressor.recover(small, batches, original=net, plan=info.plan, progress=False)
        b, _ = compressor.recover(l1, batches, original=net, plan=l1_info.plan, progress=False)
        with torch.no_grad():
            xs = torch.cat([bx for bx, _ in batches])
            err = lambda m: float((m(xs) - net(xs)).pow(2).mean())  # noqa: E731
            assert err(a) <= err(b) * 1.05
        ck = compressor.save(net, tmp_path / "base.pt")
        r = tmp_path / "r.yaml"
        r.write_text("default: 0.5\n")
        assert main(["prune", "--checkpoint", str(ck), "--rates", str(r), "--criterion", "obs", "--reconstruct",
                     "--reconstruct-images", "64", "--eval-n", "40", "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 0
        r.write_text("policy: obs\ntarget: {macs: 0.5}\n")  # allocation by the same error, from the CLI
        assert main(["prune", "--checkpoint", str(ck), "--rates", str(r), "--criterion", "obs", "--reconstruct",
                     "--reconstruct-images", "64", "--eval-n", "40", "--out", str(tmp_path / "alloc"),
                     "--no-progress"]) == 0
        r.write_text("policy: obs\ntarget: {macs: 0.5}\n")
        assert main(["prune", "--checkpoint", str(ck), "--rates", str(r), "--criterion", "l1",
                     "--out", str(tmp_path / "no"), "--no-progress"]) == 2
    assert "policy obs needs criterion obs" in capsys.readouterr().err and not (tmp_path / "no").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recovery"] == "reconstruct" and summary["selection"]
    assert not (tmp_path / "run" / "scores.pt").exists()
    alloc = json.loads((tmp_path / "alloc" / "summary.json").read_text())
    assert alloc["policy"]["policy"] == "obs" and alloc["policy"]["met"]
    assert alloc["size_after"]["macs"] / alloc["size_before"]["macs"] == pytest.approx(0.5, abs=0.01)


def _dead_channel(bn: nn.BatchNorm2d, ch: int) -> None:
    """BN pushes channel ``ch`` far below zero: after the ReLU (and any add of bounded values) it is 0."""
    with torch.no_grad():
        bn.bias[ch] = -1e4


def _resnet20_with_a_copy_and_a_dead_channel(scale: float = 1.0) -> nn.Module:
    """resnet20 whose stage-1 residual space has channel 4 = scale × channel 1 and channel 6 = 0 everywhere.

    The space is written by the stem (through ``layer1.0``'s channel-map shortcut) and by every
    ``layer1.i.conv2``/``bn2``: the copy and the dead channel are made in all of them."""
    from compressor.models import get_model

    torch.manual_seed(0)
    m = randomize_bn(get_model("resnet20")).eval()
    writers = [("conv1", "bn1")] + [(f"layer1.{i}.conv2", f"layer1.{i}.bn2") for i in range(3)]
    for conv, bn in writers:
        _copy_channel(m.get_submodule(conv), m.get_submodule(bn), 1, 4, scale)
        _dead_channel(m.get_submodule(bn), 6)
    return m


def test_resnet20_stream_channels_cost_what_the_shortcut_loses() -> None:
    """CIFAR ResNet (no channel_map): the stage-1 space's consumers are every conv reading it, found in
    the graph, plus layer2.0's zero-pad shortcut, which has no weights to refit. On the curves policy obs
    reads (independent), the dead channel costs nothing. Channel 4 (0.1 × channel 1) costs the convs
    nothing, since their refit folds it into channel 1's column, but the shortcut loses it: after removing
    both, the error is exactly channel 4's share of the shortcut's input energy. The selection at given
    counts does not price the shortcut: there channel 4's removal is free."""
    m = _resnet20_with_a_copy_and_a_dead_channel(scale=0.1)
    xs = _batches(size=16)
    seen: list[torch.Tensor] = []
    hook = m.layer2[0].shortcut.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].double()))
    with torch.no_grad():
        for x in xs:
            m(x)
    hook.remove()
    energy = sum(t.pow(2).sum(dim=(0, 2, 3)) for t in seen)
    share = float(energy[4] / energy.sum())
    with one_thread():
        plan, rep = select(m, {"layer1.0.conv2": 14}, xs, ridge=1e-9, progress=False, independent=True)
        plan2, rep2 = select(m, {"layer1.0.conv2": 14}, xs, ridge=1e-9, progress=False)
    assert _removed(plan, "layer1.0.conv2", 16) == {4, 6} == _removed(plan2, "layer1.0.conv2", 16)
    u, u2 = rep.units[0], rep2.units[0]
    assert set(u.consumers) == {"layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"} == set(u2.consumers)
    assert u.unrefit_readers == ("layer2.0.shortcut",) and u2.unrefit_readers == ()
    assert 1e-4 < share and u.error_kept == pytest.approx(share, rel=1e-3)
    assert u.removal_costs[-1] == pytest.approx(share, rel=1e-3) and u2.error_kept < 1e-6


def test_resnet20_dead_residual_channel_prunes_and_refits_exactly() -> None:
    """Removing the dead channel of a residual space changes nothing: the pruned, refit resnet20 (keep
    indices of every writer from the graph) gives the original's logits."""
    m = _resnet20_with_a_copy_and_a_dead_channel()
    xs = _batches(size=16)
    with one_thread():
        small, plan, rep, rec = prune_obs(m, {"layer1.0.conv2": 15}, xs, progress=False)
        assert _removed(plan, "layer1.0.conv2", 16) == {6}
        assert small.layer1[1].conv2.out_channels == 15 and small.layer2[0].conv1.in_channels == 15
        assert rec is not None and not rec.skipped
        assert {f.kept_from for f in rec.layers} <= {"given", "all"}
        with torch.no_grad():
            ref, out = m(xs[0]), small(xs[0])
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


class UserResidual(nn.Module):
    """A user's CNN: stem ``s`` and block ``c1 → c2`` added into one 8-channel space, then ``t`` and a
    Linear head. No ``channel_map``, no registration."""

    def __init__(self) -> None:
        super().__init__()
        self.s, self.bn_s = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.t, self.bn_t = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_s(self.s(x)))
        x = torch.relu(x + self.bn2(self.c2(torch.relu(self.bn1(self.c1(x))))))
        x = torch.relu(self.bn_t(self.t(x)))
        return self.fc(x.mean((2, 3)))


def test_obs_on_a_user_module_through_the_api() -> None:
    """compressor.prune(..., criterion="obs") on a plain nn.Module with a residual add: the dead
    channel of the shared space is the one removed, recover() refits it to the original's logits, and
    the model passed in is unchanged."""
    import compressor

    net = _randomized(UserResidual())
    _dead_channel(net.bn_s, 3)
    _dead_channel(net.bn2, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    with one_thread():
        small, info = compressor.prune(net, torch.randn(1, 3, 8, 8), {"s": 0.125}, criterion="obs",
                                       calibration=batches, residual=True)
        assert info.criterion == "obs" and [u.unit for u in info.selection.units] == ["s"]
        assert set(info.selection.units[0].consumers) == {"c1", "t"}
        assert _removed(info.plan, "s", 8) == {3}
        assert small.c2.out_channels == 7 and small.t.in_channels == 7
        small, _ = compressor.recover(small, batches, original=net, plan=info.plan, progress=False)
        with torch.no_grad():
            ref, out = net(batches[0][0]), small(batches[0][0])
    assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


# ---------------------------------------------------------------- allocation by the same error (policy obs)


def test_obs_allocation_greedy_takes_the_cheapest_error_per_cost_first() -> None:
    """Known answer on constructed curves: the step with the least error per cost goes first, the crossing step
    is taken only as far as the budget needs, and an unreachable budget is one clear error."""
    from compressor.errors import UserError
    from compressor.pruning.policy_obs import allocate

    widths = {"x": 4, "y": 4}
    count = lambda keep: {"macs": 10 * keep.get("x", 4) + 30 * keep.get("y", 4),  # noqa: E731
                          "params": keep.get("x", 4) + keep.get("y", 4)}
    curve = {"x": [(4, 0.0), (3, 0.1), (2, 0.2), (1, 0.3)], "y": [(4, 0.0), (3, 0.01), (2, 0.9), (1, 2.0)]}
    # y's first step costs 0.01 for 30/160 of the MACs; then x (0.1 per 10/160) beats y's second (0.89 per 30/160)
    assert allocate(curve, widths, count, {"macs": 0.75}) == {"x": 3, "y": 3}
    assert allocate(curve, widths, count, {"macs": 0.85}) == {"y": 3}
    assert allocate(curve, widths, count, {"macs": 0.65}) == {"x": 1, "y": 3}  # x's steps all before y's second
    assert allocate(curve, widths, count, {"macs": 0.6}) == {"x": 1, "y": 2}
    with pytest.raises(UserError, match="out of reach for policy obs"):
        allocate(curve, widths, count, {"macs": 0.1})
    with pytest.raises(UserError, match="needs a MACs or params target"):
        allocate(curve, widths, count, {"latency": 0.5})


def test_policy_obs_spends_the_budget_on_dead_channels_and_recovers_the_logits() -> None:
    """Unit ``a`` has four dead channels, ``b`` none: a budget that four channels of ``a`` can pay is taken from
    ``a``'s dead channels only, and the refit network computes the original's logits."""
    import compressor
    from compressor.errors import UserError

    class Chain3(Chain):
        """Chain with a 3×3 conv ``c`` (kept whole) between ``b`` and the classifier: ``b``'s consumer is a conv."""

        def __init__(self) -> None:
            super().__init__(8)
            self.c = nn.Conv2d(6, 5, 3, padding=1)
            self.fc = nn.Linear(5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn_a(self.a(x)))
            x = torch.relu(self.bn_b(self.b(x)))
            return self.fc(torch.relu(self.c(x)).mean((2, 3)))

    net = _randomized(Chain3())
    for ch in (1, 3, 4, 6):
        _dead_channel(net.bn_a, ch)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    x = torch.randn(1, 3, 8, 8)
    rates = {"target": {"macs": 0.75}, "policy": "obs"}
    with one_thread():
        from compressor.pruning import graph, policy_obs

        net.input_size = 8
        curve = policy_obs.curves(net, [b for b, _ in batches], graph.units(net), 0.1)
        assert [k for k, _ in curve["a"]] == list(range(8, 0, -1))  # width 8: one channel a step, down to 1
        assert curve["a"][4][1] < 1e-3 < curve["a"][5][1]  # the four dead channels cost (almost) nothing
        del net.input_size
        with pytest.raises(UserError, match="policy obs needs criterion obs"):
            compressor.prune(net, x, rates, ignored_layers=["c"])
        small, info = compressor.prune(net, x, rates, criterion="obs", calibration=batches, ignored_layers=["c"])
        assert set(info.plan.keep) == {"a"} and _removed(info.plan, "a", 8) < {1, 3, 4, 6} and small.a.out_channels == 5
        assert info.kept["macs"] <= 0.75 and info.rates.extra["resolved"]["policy"] == "obs"
        small, _ = compressor.recover(small, batches, original=net, plan=info.plan, progress=False)
        with torch.no_grad():
            ref, out = net(batches[0][0]), small(batches[0][0])
    assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


class MLPHead(nn.Module):
    """conv trunk, then a hidden Linear ``fc1`` (a Linear-rooted unit, like MobileNetV3's classifier.0)
    → Hardswish → ``fc2``."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c(x))).mean((2, 3))
        return self.fc2(nn.functional.hardswish(self.fc1(x)))


def test_a_linear_rooted_unit_drops_its_copied_neuron_and_refits_exactly() -> None:
    """A hidden Linear's neuron 5 is a copy of neuron 1: obs (consumer fc2, found in the graph) removes one
    of the pair at (nearly) no cost, and recover's refit brings the logits back to the original's."""
    import compressor

    net = _randomized(MLPHead())
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    with torch.no_grad():  # spread the pooled features and centre fc1 on them: every neuron varies, none is dead
        feats = torch.cat([torch.relu(net.bn(net.c(x))).mean((2, 3)) for x, _ in batches])
        net.fc1.weight.mul_(50)
        net.fc1.bias.copy_(-net.fc1.weight @ feats.mean(0))
        net.fc1.weight[5], net.fc1.bias[5] = net.fc1.weight[1], net.fc1.bias[1]
        assert float(nn.functional.hardswish(net.fc1(feats)).std(0).min()) > 0.15
    with one_thread():
        small, info = compressor.prune(net, torch.randn(1, 3, 8, 8), {"fc1": 0.125}, criterion="obs",
                                       calibration=batches)
        u = info.selection.units[0]
        assert u.unit == "fc1" and u.consumers == ("fc2",)
        assert len(_removed(info.plan, "fc1", 8) & {1, 5}) == 1 and small.fc1.out_features == 7
        assert u.error_kept < 1e-5  # zero but for the ridge
        with torch.no_grad():
            ref, cut = net(batches[0][0]), small(batches[0][0])
        small, _ = compressor.recover(small, batches, original=net, plan=info.plan, progress=False)
        with torch.no_grad():
            out = small(batches[0][0])
    # the refit folds the copy's weights into its twin's column (up to its ridge toward the current weights)
    err_cut, err_fit = float((cut - ref).abs().max()), float((out - ref).abs().max())
    assert err_fit < 0.1 * err_cut and err_fit < 2e-3 * float(ref.abs().max())


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's layout: depthwise conv, then channels-last LayerNorm → ``pw1`` → GELU → ``pw2``, added back."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.ln, self.pw1, self.pw2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        return x + self.pw2(nn.functional.gelu(self.pw1(y))).permute(0, 3, 1, 2)


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1, self.b2, self.fc = nn.Conv2d(3, 8, 3, padding=1), ChannelsLastBlock(), ChannelsLastBlock(), \
            nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def test_channels_last_linear_units_in_sequence_drop_their_dead_neurons_exactly() -> None:
    """Two ConvNeXt-style hidden widths, selected one after the other: the first unit's removed neurons are
    masked on the last dim while the second is chosen. Each has one dead neuron (GELU of -1e4): those are the
    ones removed, at no cost, and prune + recover give the original's logits."""
    import compressor

    torch.manual_seed(0)
    net = TwoBlocks().eval()
    with torch.no_grad():
        net.b1.pw1.bias[20] = -1e4  # past the 8 rows of H: a mask on the wrong dim cannot hide
        net.b2.pw1.bias[7] = -1e4
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    with one_thread():
        small, info = compressor.prune(net, torch.randn(1, 3, 8, 8), {"b1.pw1": 1 / 32, "b2.pw1": 1 / 32},
                                       criterion="obs", calibration=batches)
        assert [(u.unit, u.consumers) for u in info.selection.units] == [("b1.pw1", ("b1.pw2",)),
                                                                         ("b2.pw1", ("b2.pw2",))]
        assert _removed(info.plan, "b1.pw1", 32) == {20} and _removed(info.plan, "b2.pw1", 32) == {7}
        assert small.b1.pw1.out_features == 31 and small.b2.pw2.in_features == 31
        small, _ = compressor.recover(small, batches, original=net, plan=info.plan, progress=False)
        with torch.no_grad():
            ref, out = net(batches[0][0]), small(batches[0][0])
    assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
