"""The notebook flow through public names only, on a user's own CNN (residual add, concat, SE).

rank -> prune to 50% MACs -> recover by reconstruction -> evaluate -> count -> export -> save
-> load, and the model passed in is unchanged (``vars()`` and state_dict) at every step.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressor
from compressor.errors import UserError
from tests.conftest import one_thread


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def _cbr(i: int, o: int, k: int = 3, s: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class MyNet(nn.Module):
    """A user's own CNN: a residual add, a concat of two branches, an SE block, a Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.block = nn.Sequential(_cbr(16, 24), _cbr(24, 16, relu=False))
        self.left, self.right = _cbr(16, 24, s=2), _cbr(16, 8, k=1, s=2)
        self.se = SE(32)
        self.head = _cbr(32, 48)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        x = self.se(torch.cat([self.left(x), self.right(x)], 1))
        return self.fc(self.head(x).mean((2, 3)))


def _snapshot(m: nn.Module) -> tuple[dict, dict]:
    attrs = {name: sorted(vars(mod)) for name, mod in m.named_modules()}
    return attrs, {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m: nn.Module, snap: tuple[dict, dict]) -> None:
    attrs, sd = _snapshot(m)
    assert attrs == snap[0]
    assert sd.keys() == snap[1].keys()
    for k in sd:
        assert torch.equal(sd[k], snap[1][k]), k


@pytest.fixture(scope="module")
def trained():
    """MyNet trained for a few epochs on the embedded digits (the test owns its data loading)."""
    from compressor import data
    from compressor.training.train import TrainConfig, fit

    with one_thread():
        bundle = data.load("digits")
        torch.manual_seed(0)
        net = MyNet(bundle.num_classes)
        fit(net, bundle, TrainConfig(epochs=3, lr=0.05, batch_size=64, amp=False, channels_last=False), "cpu",
            progress=False)
        train = [(x, y) for x, y in data.loader(bundle.train_eval, 128)]
        test = [(x, y) for x, y in data.loader(bundle.test, 256)]
    return net.eval(), train, test


def test_notebook_flow_on_a_users_cnn_with_public_names_only(trained, tmp_path) -> None:
    net, train, test = trained
    snap = _snapshot(net)
    example = torch.randn(1, 3, 32, 32)
    with one_thread():
        base_acc = compressor.evaluate(net, test)["top1"]
        with pytest.raises(UserError, match="no scores for unit 'stem.0'.*residual=True"):
            compressor.prune(net, example, {"target": {"macs": 0.5}, "policy": "global"}, residual=True,
                             scores=compressor.rank(net, train[:1], ["hrank"], example_inputs=example, progress=False))
        scores = compressor.rank(net, train[:2], ["hrank", "l1"], example_inputs=example, residual=True,
                                 progress=False)
        _assert_unchanged(net, snap)
        small, info = compressor.prune(net, example, {"target": {"macs": 0.5}, "policy": "global"}, scores=scores,
                                       residual=True)
        _assert_unchanged(net, snap)
        assert abs(info.kept["macs"] - 0.5) <= 0.01 * 0.5, info.summary()
        assert info.plan.widths["stem.0"] > len(info.plan.kept("stem.0"))  # the residual space is cut too
        assert compressor.count(small) == info.size_after
        assert info.size_after["macs"] == compressor.count(small)["macs"] < compressor.count(net, example)["macs"]
        raw = compressor.evaluate(small, test)["top1"]
        fixed, rep = compressor.recover(small, train, original=net, plan=info.plan, progress=False)
        _assert_unchanged(net, snap)
        assert rep.steps == ["reconstruct"] and rep.reconstruct.layers
        rec_acc = compressor.evaluate(fixed, test)["top1"]
        # the least-squares refit pulls the cut network back towards the original
        assert rec_acc > raw and rec_acc > base_acc - 15, (base_acc, raw, rec_acc)
        res = compressor.export(fixed, tmp_path / "small.onnx")
        assert res.ok and (tmp_path / "small.onnx").stat().st_size == res.bytes
        path = compressor.save(fixed, tmp_path / "small.pt")
        again = compressor.load(path, model=MyNet(10))
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(again.eval()(x), fixed.eval()(x))
        _assert_unchanged(net, snap)


def test_recover_bn_and_finetune_leave_the_input_alone(trained) -> None:
    net, train, test = trained
    example = torch.randn(1, 3, 32, 32)
    teacher_snap = _snapshot(net)
    with one_thread():
        small, _ = compressor.prune(net, example, {"block.0.0": 0.5, "head.0": 0.5}, criterion="l1")
        snap = _snapshot(small)
        bn_only, rep = compressor.recover(small, train, progress=False)
        assert rep.steps == ["bn"] and rep.bn_images == 512
        tuned, rep2 = compressor.recover(small, train[:4], reconstruct=False, bn=False, epochs=1, teacher=net,
                                         lr=0.01, progress=False)
        assert rep2.steps == ["finetune+kd"] and len(rep2.history) == 1
        _assert_unchanged(small, snap)
        _assert_unchanged(net, teacher_snap)
        assert all(p.requires_grad for p in net.parameters())  # the teacher is frozen on a copy
        assert not torch.equal(tuned.fc.weight, small.fc.weight)
        assert compressor.evaluate(bn_only, test)["n"] == len(test[0][1]) * (len(test) - 1) + len(test[-1][1])


def test_recover_warms_the_fine_tune_up_unless_told_not_to(trained) -> None:
    """The first step's lr is lr / warm-up steps (models.yaml: a tenth of an epoch), or lr with warmup_epochs=0."""
    net, train, _ = trained
    with one_thread():
        small, _ = compressor.prune(net, torch.randn(1, 3, 32, 32), {"block.0.0": 0.5}, criterion="l1")
        kw = dict(reconstruct=False, bn=False, epochs=1, lr=0.01, batch_size=16, progress=False)
        _, rep = compressor.recover(small, train[:4], **kw)
        _, rep0 = compressor.recover(small, train[:4], warmup_epochs=0, **kw)
    steps = sum(len(y) for _, y in train[:4]) // 16  # one epoch at batch 16
    warm = int(0.1 * steps)
    assert warm >= 2
    assert rep.history[0]["lr"] == pytest.approx(0.01 / warm) and rep0.history[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(UserError, match="warmup"):
        compressor.recover(small, train[:1], reconstruct=False, bn=False, epochs=1, warmup_epochs=-1, progress=False)


def test_public_errors_are_one_line_user_errors(trained, tmp_path) -> None:
    net, train, _ = trained
    example = torch.randn(1, 3, 32, 32)
    from compressor.errors import UserError

    with pytest.raises(UserError, match="ignored_layers"):
        compressor.prune(net, example, {"block.0.0": 0.5, "head.0": 0.5}, ignored_layers=["nope"])
    with pytest.raises(UserError, match="example"):
        compressor.count(MyNet())
    with pytest.raises(UserError, match="device"):
        compressor.rank(net, train[:1], ["l1"], example_inputs=example, device="tpu")
    with pytest.raises(UserError, match="cuda"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        compressor.rank(net, train[:1], ["l1"], example_inputs=example, device="cuda")
    with torch.device("meta"):
        ghost = MyNet()
    with pytest.raises(UserError, match="meta device"):
        compressor.prune(ghost, example, {"head.0": 0.5})
    with pytest.raises(UserError, match="original"):
        compressor.recover(net, train, reconstruct=True)
    small, _ = compressor.prune(net, example, {"block.0.0": 0.5, "head.0": 0.5}, criterion="l1")
    p = compressor.save(small, tmp_path / "s.pt")
    with pytest.raises(UserError, match=r"model=MyNet"):
        compressor.load(p)


def test_sensitivity_through_the_api_and_public_names_stay_functions(trained) -> None:
    import compressor.training.evaluation  # noqa: F401  the modules behind the functions do not shadow them
    import compressor.deploy.onnx_export  # noqa: F401
    import compressor.pruning.sensitivity_scan  # noqa: F401

    assert all(callable(getattr(compressor, n)) for n in compressor.__all__ if n != "__version__")
    net, _, test = trained
    snap = _snapshot(net)
    with one_thread():
        res = compressor.sensitivity(net, test[:1], rates=[0.0, 0.5], criterion="l1",
                                     example_inputs=torch.randn(1, 3, 32, 32))
        base = compressor.evaluate(net, test[:1])["top1"]
    _assert_unchanged(net, snap)
    assert res.baseline_top1 == base
    assert {r["unit"] for r in res.rows} == {"block.0.0", "se.fc1", "head.0"}
    assert all(r["drop"] == 0 for r in res.rows if r["rate"] == 0.0)  # rate 0 cuts nothing
    assert all(r["macs_kept"] < 1 for r in res.rows if r["rate"] == 0.5)


def test_int8_export_through_the_api(trained, tmp_path) -> None:
    """The pruned user CNN, calibrated on its own batches, checked on the digits test split (the default data of
    a model without a contract); a drop over the limit is refused and writes nothing."""
    from compressor.deploy.onnx_int8 import DropTooLarge

    net, train, test = trained
    example = torch.randn(1, 3, 32, 32)
    with one_thread():
        small, info = compressor.prune(net, example, {"block.0.0": 0.5, "head.0": 0.5}, criterion="l1")
        small, _ = compressor.recover(small, train, original=net, plan=info.plan, progress=False)
        with pytest.raises(DropTooLarge) as refused:
            compressor.export(small, tmp_path / "strict.onnx", int8=True, calibration=train[:2], max_drop=0.0)
        assert refused.value.exit_code == 3 and not (tmp_path / "strict.onnx").exists()
        res = compressor.export(small, tmp_path / "s.int8.onnx", int8=True, calibration=train[:2], max_drop=10.0)
        fp = compressor.export(small, tmp_path / "s.onnx")
    assert res.path == str(tmp_path / "s.int8.onnx") and res.calibration_images == 256
    assert res.n_test == 360 and abs(res.drop) <= 10.0 and res.agree > 0.6  # a weak 10-class model: some flips
    assert res.top1_float == compressor.evaluate(small, test)["top1"]
    # a 30k-parameter model: the QDQ nodes and scales weigh here (VGG16-BN: 0.26x, experiments/RESULTS.md)
    assert (tmp_path / "s.int8.onnx").stat().st_size < 0.75 * fp.bytes


def test_a_layer_replaced_between_calls_is_seen() -> None:
    """The engine's view of a model follows the model: a top-level layer replaced between two calls (same
    shapes, so the same record) is the one the next call prunes."""
    torch.manual_seed(0)
    net = MyNet().eval()
    x = torch.randn(1, 3, 32, 32)
    rates = {"head.0": 0.5}
    first, _ = compressor.prune(net, x, rates, criterion="l1")
    net.head = _cbr(32, 48)  # new weights, same shapes
    second, info = compressor.prune(net, x, rates, criterion="l1")
    keep = torch.tensor(info.plan.keep["head.0"])
    assert torch.equal(second.head[0].weight, net.head[0].weight[keep])
    assert not torch.equal(second.head[0].weight, first.head[0].weight)
