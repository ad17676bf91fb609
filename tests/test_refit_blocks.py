"""Block-wise refit (compressor.pruning.refit_blocks): which blocks, known answers, and that it helps.

The models are constructed here; the engine prunes them (``compressor.prune``), so the blocks
are found from real pruned shapes, never from a class name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressor
from compressor.pruning.reconstruct_kept import keep_from_plan
from compressor.pruning.refit_blocks import find_blocks, refit_blocks

from tests.conftest import one_thread, randomize_bn


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Res(nn.Module):
    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, h, 3, padding=1, bias=False), nn.BatchNorm2d(h)
        self.conv2, self.bn2 = nn.Conv2d(h, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    """stem → two residual blocks (inner width ``h``) → pool → Linear."""

    def __init__(self, c: int = 8, h: int = 8) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.b0, self.b1 = Res(c, h), Res(c, h)
        self.fc = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b1(self.b0(F.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def _images(n: int = 4, b: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 8, 8, generator=g) for _ in range(n)]


def _pruned(net: nn.Module, rates: dict) -> nn.Module:
    small, _ = compressor.prune(net, torch.randn(1, 3, 8, 8), rates, criterion="l1")
    return small.eval()


def _net(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return randomize_bn(ResNet()).eval()


def test_residual_blocks_are_found_and_a_flat_chain_is_cut_in_segments():
    net = _net()
    small = _pruned(net, {"b0.conv1": 0.5, "b1.conv1": 0.25})
    blocks, skipped = find_blocks(net, small, _images(1)[0][:2])
    assert [b.name for b in blocks] == ["b0", "b1"] and skipped == []
    assert blocks[0].changed == ["b0.bn1", "b0.conv1", "b0.conv2"] and blocks[0].kept is None
    # a flat chain (the model is one Sequential of layers): it is refit in segments, each conv with the layers
    # after it; without the kept channels, conv 0's segment is merged into the next, whose output is comparable
    chain = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(6, 4))).eval()
    small, info = compressor.prune(chain, torch.randn(1, 3, 8, 8), {"0": 0.5}, criterion="l1")
    blocks, _ = find_blocks(chain, small, _images(1)[0][:2])
    assert [(b.name, b.parts, b.changed, b.kept) for b in blocks] == [
        ("0…5", ("0", "1", "2", "3", "4", "5"), ["0", "1", "3"], None)]
    keep = keep_from_plan(chain, info.plan, torch.zeros(1, 3, 8, 8))
    blocks, _ = find_blocks(chain, small, _images(1)[0][:2], keep)
    assert [(b.parts, b.changed) for b in blocks] == [(("0", "1", "2"), ["0", "1"]), (("3", "4", "5"), ["3"])]
    assert blocks[0].kept.tolist() == list(info.plan.kept("0"))
    rep = refit_blocks(chain, small, _images(), steps=30, lr=1e-2, keep=keep, progress=False)
    assert [b.name for b in rep.blocks] == ["0…2", "3…5"] and rep.blocks[0].changed == ("0", "1")
    # conv 0's kept channels are exact copies: nothing to fit there; conv 3 lost inputs and is refit
    assert rep.blocks[0].error_before < 1e-10 and not rep.blocks[0].accepted
    assert rep.blocks[1].accepted and rep.blocks[1].error_after < rep.blocks[1].error_before


def test_a_module_called_twice_is_not_a_block():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.res, self.fc = nn.Conv2d(3, 8, 1), Res(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.res(self.res(self.stem(x))).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = randomize_bn(Twice()).eval()
    small = copy.deepcopy(net)
    with torch.no_grad():  # cut res's inner width by hand (the engine refuses a shared module)
        small.res.conv1 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        small.res.bn1 = nn.BatchNorm2d(4).eval()
        small.res.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    blocks, _ = find_blocks(net, small.eval(), _images(1)[0][:2])
    assert [b.name for b in blocks] == [""]


def test_dead_channels_leave_nothing_to_fit_and_weights_untouched():
    net = _net()
    with torch.no_grad():  # half of b0's inner channels output exactly zero after BN-ReLU
        net.b0.conv1.weight[:4] = 0
        net.b0.bn1.running_mean[:4] = 0
        net.b0.bn1.bias[:4] = -1.0
    small = _pruned(net, {"b0.conv1": 0.5})
    xs = _images()
    assert torch.equal(small(xs[0]), net(xs[0])) or torch.allclose(small(xs[0]), net(xs[0]), atol=1e-6)
    before = copy.deepcopy(small.state_dict())
    rep = refit_blocks(net, small, xs, steps=20, lr=1e-2, progress=False)
    assert [b.name for b in rep.blocks] == ["b0"]
    b0 = rep.blocks[0]
    assert b0.error_before < 1e-10 and not b0.accepted and b0.best_step == 0
    after = small.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refit_lowers_held_out_error_and_touches_only_the_blocks():
    net = _net()
    small = _pruned(net, {"b0.conv1": 0.5, "b1.conv1": 0.5})
    before = copy.deepcopy(small.state_dict())
    xs, fresh = _images(4, seed=0), _images(2, seed=9)

    def logit_error(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((m(x) - net(x)).pow(2).sum()) for x in fresh)

    err0 = logit_error(small)
    original = copy.deepcopy(net.state_dict())
    rep = refit_blocks(net, small, xs, steps=60, lr=1e-2, holdout=0.25, checks=6, seed=0, progress=False)
    assert [b.name for b in rep.blocks] == ["b0", "b1"] and all(b.accepted for b in rep.blocks)
    assert all(b.error_after < 0.8 * b.error_before for b in rep.blocks)
    assert all(b.held_images == 16 and b.fit_images == 48 for b in rep.blocks)
    assert logit_error(small) < 0.8 * err0  # on images it never saw
    after = small.state_dict()
    outside = [k for k in before if not k.startswith(("b0.", "b1."))]
    assert outside and all(torch.equal(before[k], after[k]) for k in outside)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("b0.conv"))
    assert all(torch.equal(original[k], v) for k, v in net.state_dict().items())  # the original is untouched
    # BN statistics are not re-estimated: only parameters move
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k)
    # the same seed gives the same weights
    again = _pruned(net, {"b0.conv1": 0.5, "b1.conv1": 0.5})
    refit_blocks(net, again, xs, steps=60, lr=1e-2, holdout=0.25, checks=6, seed=0, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())


@pytest.mark.parametrize("kw", [{"steps": 0}, {"lr": 0.0}, {"holdout": 1.0}, {"batch_size": True}])
def test_bad_settings_are_refused(kw):
    net = _net()
    with pytest.raises(ValueError):
        refit_blocks(net, copy.deepcopy(net), _images(1), progress=False, **kw)


def test_models_elsewhere_than_the_device_are_refused_by_name():
    """The refits run where the models are and do not move them: a device= they are not on is one clear error."""
    from compressor.pruning.reconstruct import reconstruct

    net = _net()
    for refit in (refit_blocks, reconstruct):
        with pytest.raises(ValueError, match="original is on cpu, not on device meta"):
            refit(net, copy.deepcopy(net), _images(1), device="meta", progress=False)


def test_pruned_residual_widths_are_compared_on_the_kept_channels():
    from compressor.pruning.reconstruct_kept import keep_from_plan

    net = _net()
    small, info = compressor.prune(net, torch.randn(1, 3, 8, 8), 0.25, criterion="l1", residual=True)
    small.eval()
    keep = keep_from_plan(net, info.plan, torch.zeros(1, 3, 8, 8))
    xs = _images()
    blocks, skipped = find_blocks(net, small, xs[0][:2], keep)
    assert [b.name for b in blocks] == ["b0", "b1"]
    assert blocks[0].kept.tolist() == list(keep["b0.conv2"]) == list(info.plan.kept("stem"))
    assert {n for n, _ in skipped} == {"stem", "bn", "fc"}  # left to the layer-wise refit
    assert [b.name for b in find_blocks(net, small, xs[0][:2])[0]] == [""]  # without keep: the model
    # the block's starting error is its output against the original's kept channels (computed here by hooks)
    got: dict[str, torch.Tensor] = {}
    hs = [net.b0.register_forward_hook(lambda m, i, o: got.__setitem__("o", o)),
          small.b0.register_forward_hook(lambda m, i, o: got.__setitem__("p", o))]
    with torch.no_grad():
        for x in xs:
            net(x), small(x)
            got.setdefault("num", torch.zeros(()))
            got["num"] = got["num"] + (got["p"] - got["o"][:, blocks[0].kept]).pow(2).sum()
            got["den"] = got.get("den", torch.zeros(())) + got["o"][:, blocks[0].kept].pow(2).sum()
    for h in hs:
        h.remove()
    rep = refit_blocks(net, small, xs, steps=40, lr=1e-2, holdout=0.0, checks=4, keep=keep, progress=False)
    b0 = rep.blocks[0]
    assert b0.held_images == 0 and b0.error_before == pytest.approx(float(got["num"] / got["den"]), rel=1e-4)
    assert all(b.accepted and b.error_after < b.error_before for b in rep.blocks)


def test_recover_runs_the_block_refit_after_reconstruction():
    net = _net()
    small, info = compressor.prune(net, torch.randn(1, 3, 8, 8), {"b0.conv1": 0.5, "b1.conv1": 0.5}, criterion="l1")
    batches = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in _images()]
    rec, rep = compressor.recover(small, batches, original=net, plan=info.plan, block_steps=20, images=64,
                                  progress=False)
    assert rep.steps == ["reconstruct", "blocks"] and rep.label == "reconstruct+blocks"
    assert [b.name for b in rep.blocks.blocks] == ["b0", "b1"] and rep.blocks.n_images == 64
    assert any(b.accepted for b in rep.blocks.blocks)
    assert all(b.error_after < b.error_before for b in rep.blocks.blocks if b.accepted)
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in compressor.prune(
        net, torch.randn(1, 3, 8, 8), {"b0.conv1": 0.5, "b1.conv1": 0.5}, criterion="l1")[0].state_dict().items())
    with pytest.raises(compressor.errors.UserError, match="original"):
        compressor.recover(small, batches, block_steps=5, progress=False)
    with pytest.raises(compressor.errors.UserError, match="block_steps"):
        compressor.recover(small, batches, original=net, block_steps=-1, progress=False)


def test_block_refit_alone_keeps_bn_statistics_and_restores_modes_and_flags():
    """Without reconstruction the refit is the only step: BN statistics are not re-estimated afterwards; a model
    given in train mode, and a frozen parameter, come back as they were."""
    net = _net()
    small = _pruned(net, {"b0.conv1": 0.5})
    batches = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in _images()]
    rec, rep = compressor.recover(small, batches, original=net, reconstruct=False, block_steps=10, images=64,
                                  progress=False)
    assert rep.steps == ["blocks"] and rep.bn_images == 0
    assert all(torch.equal(v, rec.state_dict()[k]) for k, v in small.state_dict().items() if "running" in k)
    small.train()
    net.train()
    small.fc.weight.requires_grad_(False)
    stats = copy.deepcopy(small.state_dict())
    refit_blocks(net, small, [x for x, _ in batches], steps=5, progress=False)
    assert small.training and net.training and not small.fc.weight.requires_grad
    assert all(p.requires_grad for n, p in small.named_parameters() if n != "fc.weight")
    assert all(torch.equal(stats[k], v) for k, v in small.state_dict().items() if "running" in k or k == "fc.weight")


def test_a_block_with_tied_weights_is_skipped():
    net = _net()
    small = _pruned(net, {"b0.conv1": 0.5, "b1.conv1": 0.5})
    small.b1.conv2.weight = small.b0.conv2.weight  # tied across the two blocks
    before = copy.deepcopy(small.state_dict())
    rep = refit_blocks(net, small, _images(), steps=10, lr=1e-2, progress=False)
    assert rep.blocks == () and {n for n, _ in rep.skipped} == {"b0", "b1"}
    assert all("shares parameters" in why for _, why in rep.skipped)
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in before.items())


def test_an_error_during_the_steps_leaves_the_starting_weights():
    net = _net()
    small = _pruned(net, {"b0.conv1": 0.5})
    before = copy.deepcopy(small.state_dict())
    calls = {"n": 0}

    def boom(mod, inp, out):
        calls["n"] += 1
        if torch.is_grad_enabled() and calls["n"] > 3:
            raise RuntimeError("interrupted")

    h = small.b0.conv2.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        refit_blocks(net, small, _images(), steps=50, lr=1e-1, checks=1, progress=False)
    h.remove()
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad and p.grad is None for p in small.parameters()) and not small.training


def test_inputs_inside_a_list_are_skipped_with_the_reason():
    class Pair(nn.Module):  # a block whose input is a list of tensors
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, xs):
            return self.conv2(F.relu(self.bn1(self.conv1(xs[0] + xs[1]))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.pair, self.fc = nn.Conv2d(3, 8, 1), Pair(), nn.Linear(8, 3)

        def forward(self, x):
            h = self.stem(x)
            return self.fc(self.pair([h, h]).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = randomize_bn(Net()).eval()
    small = _pruned(net, {"pair.conv1": 0.5})
    rep = refit_blocks(net, small, _images(), steps=5, progress=False)
    assert [b.name for b in rep.blocks] == [] and rep.skipped == (("pair", rep.skipped[0][1]),)
    assert "inside a list" in rep.skipped[0][1]
