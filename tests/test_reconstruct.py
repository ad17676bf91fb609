"""Layer-wise least-squares reconstruction (compressor.pruning.reconstruct)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import oracles
from compressor.pruning import surgery
from compressor.models import get_model
from compressor.pruning.plan import Plan
from compressor.pruning.reconstruct import conv_patches, infer_kept, keep_from_plan, reconstruct


def _batches(n: int = 4, b: int = 8, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(n)]


def _two_convs() -> nn.Sequential:
    """conv1 (3→4, 1×1) → conv2 (4→5, 3×3); no activation in between, so channels combine linearly."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 4, 1), conv2=nn.Conv2d(4, 5, 3, padding=1)))


def _slice_pair(net: nn.Sequential, keep: list[int]) -> nn.Sequential:
    """Hand-made surgery: conv1 keeps ``keep`` rows, conv2 the matching input columns."""
    small = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, len(keep), 1),
                                      conv2=nn.Conv2d(len(keep), 5, 3, padding=1)))
    with torch.no_grad():
        small.conv1.weight.copy_(net.conv1.weight[keep])
        small.conv1.bias.copy_(net.conv1.bias[keep])
        small.conv2.weight.copy_(net.conv2.weight[:, keep])
        small.conv2.bias.copy_(net.conv2.bias)
    return small


def test_patches_equal_unfold_columns():
    conv = nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    x = torch.randn(3, 6, 9, 7)
    y = conv(x)
    hw = y.shape[2] * y.shape[3]
    pos = torch.stack([torch.randperm(hw)[:5] for _ in range(3)])
    rows = conv_patches(x, conv, pos, y.shape[3])  # [B·P, g, F]
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # B, C·kh·kw, L
    want = torch.stack([cols[b, :, pos[b]].T for b in range(3)]).reshape(15, 2, -1)
    assert torch.equal(rows, want)


def test_linear_combination_channels_are_recovered_exactly():
    net = _two_convs()
    with torch.no_grad():  # channels 2, 3 are exact linear combinations of channels 0, 1
        w, b = net.conv1.weight, net.conv1.bias
        w[2], b[2] = 0.5 * w[0] - 2.0 * w[1], 0.5 * b[0] - 2.0 * b[1]
        w[3], b[3] = 1.5 * w[1], 1.5 * b[1]
    small = _slice_pair(net, [0, 1])
    x = torch.randn(6, 3, 8, 8)
    assert (small(x) - net(x)).abs().max() > 0.1  # dropping them does change the output
    rep = reconstruct(net, small, _batches(), ridge=0.0, positions=64, progress=False)
    assert [f.name for f in rep.layers] == ["conv2"]
    assert rep.layers[0].kept_from == "all" and rep.layers[0].features == 2 * 9 + 1
    assert rep.layers[0].error_after < 1e-10 < rep.layers[0].error_before
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=0)


def test_inferred_kept_rows_match_the_plan():
    net = _two_convs()
    small = _slice_pair(net, [1, 3])
    assert infer_kept(net.conv1, small.conv1).tolist() == [1, 3]
    assert infer_kept(net.conv2, small.conv2).tolist() == [0, 1, 2, 3, 4]
    with torch.no_grad():
        small.conv1.weight.add_(1e-3)  # no longer a copy: inference must refuse, not guess
    assert infer_kept(net.conv1, small.conv1) is None


def _tiny_vgg() -> nn.Module:
    torch.manual_seed(0)
    m = get_model("vgg16_bn", cfg=[8, 8, "M", 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, 16])
    for mod in m.modules():  # non-trivial BN statistics, so stale ones would matter
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _half_plan(model: nn.Module, seed: int = 0) -> Plan:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for u in oracles.units_of(model):
        keep[u.name] = tuple(sorted(torch.randperm(u.width, generator=g)[: max(1, u.width // 2)].tolist()))
    return Plan(keep=keep, widths={u.name: u.width for u in oracles.units_of(model)})


def _cifar_batches(n: int = 3, b: int = 8) -> list[torch.Tensor]:
    return _batches(n, b, 32)


def test_error_never_increases_and_report_is_complete():
    base = _tiny_vgg()
    pruned = oracles.rebuild(base, _half_plan(base)).eval()
    for ridge_to in ("current", "zero"):
        m = copy.deepcopy(pruned)
        rep = reconstruct(base, m, _cifar_batches(), positions=16, ridge=1e-2, ridge_to=ridge_to, progress=False)
        # every conv after the first and linear1 consume pruned channels (all 13 convs are cut)
        assert [f.name for f in rep.layers][-2:] == ["features.conv16", "classifier.linear1"]
        assert len(rep.layers) == 13
        for f in rep.layers:
            assert f.error_after <= f.error_before
            assert f.kept_from == ("all" if f.name == "classifier.linear1" else "inferred")
        assert rep.settings["ridge_to"] == ridge_to and rep.n_images == 24


def test_first_layer_error_matches_a_direct_computation():
    base = _tiny_vgg()
    pruned = oracles.rebuild(base, _half_plan(base)).eval()
    xs = _cifar_batches()
    rep = reconstruct(base, copy.deepcopy(pruned), xs, positions=10**6, ridge=1e-3, progress=False)
    f = rep.layers[0]
    assert f.name == "features.conv1"
    kept = torch.tensor(_half_plan(base).kept("features.conv1"))
    with torch.no_grad():
        num = den = 0.0
        for x in xs:
            a = pruned.features.conv1(pruned.features[:3](x))  # conv0 + BN + ReLU, then conv1
            t = base.features.conv1(base.features[:3](x))[:, kept]
            num += (a - t).double().pow(2).sum().item()
            den += t.double().pow(2).sum().item()
    assert f.rows == 24 * 32 * 32
    assert f.error_before == pytest.approx(num / den, rel=1e-6)


def test_same_seed_same_weights_other_seed_differs():
    base = _tiny_vgg()
    pruned = oracles.rebuild(base, _half_plan(base)).eval()
    outs = []
    for seed in (0, 0, 1):
        m = copy.deepcopy(pruned)
        reconstruct(base, m, _cifar_batches(), positions=8, seed=seed, progress=False)
        outs.append(m.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_depthwise_is_solved_per_group():
    """The depthwise input is 2× the original's per channel: a per-group fit undoes it exactly."""
    torch.manual_seed(0)
    orig = nn.Sequential(OrderedDict(pw=nn.Conv2d(3, 4, 1), dw=nn.Conv2d(4, 4, 3, padding=1, groups=4)))
    new = copy.deepcopy(orig)
    with torch.no_grad():
        new.pw.weight.mul_(2.0)
        new.pw.bias.mul_(2.0)
    rep = reconstruct(orig, new, _batches(), layers=["dw"], ridge=0.0, progress=False)
    (f,) = rep.layers
    assert (f.groups, f.features, f.out_kept) == (4, 3 * 3 + 1, 4)
    torch.testing.assert_close(new.dw.weight, orig.dw.weight / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(new.dw.bias, orig.dw.bias, atol=1e-5, rtol=0)


def test_inputs_are_not_mutated_and_global_rng_untouched():
    base = _tiny_vgg().train()
    pruned = oracles.rebuild(base, _half_plan(base)).train()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pruned_bn = {k: v.clone() for k, v in pruned.state_dict().items() if "running" in k}
    xs = _cifar_batches()
    rng = torch.get_rng_state()
    rep = reconstruct(base, pruned, xs, positions=8, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(torch.equal(pruned_bn[k], pruned.state_dict()[k]) for k in pruned_bn)  # bn="keep"
    assert base.training and pruned.training
    for m in [*base.modules(), *pruned.modules()]:
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert rep.layers and all(f.accepted for f in rep.layers)


def test_bn_recalibrate_changes_statistics():
    base = _tiny_vgg()
    pruned = oracles.rebuild(base, _half_plan(base)).eval()
    rep = reconstruct(base, pruned, _cifar_batches(), positions=8, bn="recalibrate", progress=False)
    assert rep.bn_images == 24
    assert not torch.equal(pruned.features.norm1.running_mean, base.features.norm1.running_mean[
        torch.tensor(_half_plan(base).kept("features.conv1"))])


def _logit_error(a: nn.Module, b: nn.Module, xs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum((a(x) - b(x)).pow(2).sum().item() for x in xs) / sum(a(x).pow(2).sum().item() for x in xs)


QUARTER_VGG = [16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M", 128, 128, 128, 128]


# mobilenet_v2_res: residual groups are cut through the cfg rebuild (the graph path leaves them whole by default)
@pytest.mark.parametrize("name,method", [("vgg16_bn", "torch_pruning"), ("mobilenet_v2_res", "rebuild"),
                                         ("squeezenet1_1", "torch_pruning")])
def test_registered_models_get_closer_to_the_original(name, method):
    torch.manual_seed(0)
    base = (get_model(name, cfg=QUARTER_VGG) if name == "vgg16_bn" else get_model(name)).eval()
    plan = _half_plan(base)
    cut = (lambda: oracles.rebuild(base, plan)) if method == "rebuild" else (lambda: surgery.apply(base, plan))
    pruned = cut().eval()
    xs = _batches(2, 8, base.input_size)
    # the inferred kept rows agree with the plan, for every refit layer
    given = keep_from_plan(base, plan)
    rep_i = reconstruct(base, copy.deepcopy(pruned), xs, positions=8, progress=False)
    rep = reconstruct(base, pruned, xs, keep=given, positions=8, progress=False)
    assert not rep_i.skipped and not rep.skipped
    assert [f.error_after for f in rep_i.layers] == [f.error_after for f in rep.layers]
    assert any(f.kept_from == "inferred" for f in rep_i.layers)
    assert len(rep.layers) > 5 and all(f.error_after <= f.error_before for f in rep.layers)
    assert _logit_error(base, pruned, xs) < _logit_error(base, cut().eval(), xs)


def test_target_cache_budget_does_not_change_the_result():
    base = _tiny_vgg()
    pruned = oracles.rebuild(base, _half_plan(base)).eval()
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    rep_a = reconstruct(base, a, _cifar_batches(), positions=8, progress=False)
    rep_b = reconstruct(base, b, _cifar_batches(), positions=8, cache_mib=0, progress=False)
    assert rep_a.target_cache.startswith("13 layers cached")
    assert rep_b.target_cache.startswith("0 layers cached") and "prefix passes" in rep_b.target_cache
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_layers_that_cannot_be_refit_are_reported():
    net = _two_convs()
    small = _slice_pair(net, [0, 2])
    with torch.no_grad():
        small.conv1.weight.mul_(1.01)  # conv1 is no longer a copy: conv2's kept rows are still all of them
        small.conv2.weight.mul_(1.01)  # conv2 keeps all 5 outputs, so nothing needs inferring
    rep = reconstruct(net, small, _batches(), layers=["conv1", "conv2", "nope"], progress=False)
    assert [f.name for f in rep.layers] == ["conv2"]
    assert dict(rep.skipped)["nope"].startswith("not a Conv2d/Linear")
    assert "could not be inferred" in dict(rep.skipped)["conv1"]
