"""Checkpoints: exact round trips, HRank format, and clean refusals of wrong or hostile files."""

from __future__ import annotations

import pytest
import torch

from compressor.pruning.graph import units as units_of
from compressor.storage import checkpoint
from compressor.pruning import surgery
from compressor.errors import UserError
from compressor.models import get_model
from compressor.pruning.plan import make_plan
from compressor.pruning.rates import RateSpec
from tests.conftest import TINY_VGG


@pytest.fixture
def pruned(tiny_vgg):
    w = {u.name: u.width for u in units_of(tiny_vgg)}
    g = torch.Generator().manual_seed(0)
    plan = make_plan({u: torch.rand(n, generator=g) for u, n in w.items()}, RateSpec(rates={u: 0.5 for u in w}), w)
    return surgery.apply(tiny_vgg, plan).eval(), plan


def test_round_trip_same_logits(pruned, tmp_path):
    model, plan = pruned
    path = checkpoint.save(tmp_path / "p.pt", model, plan=plan.to_json(), metrics={"top1": 1.0})
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 2 and raw["cfg"] == model.cfg and raw["plan"]["units"]
    back, meta = checkpoint.load(path, model="vgg16_bn")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back.eval()(x), model(x))
    assert back.features.conv0.cp_rate == pytest.approx(0.5)
    assert meta["provenance"]["versions"]["torch"] == torch.__version__
    from importlib import metadata

    assert meta["provenance"]["versions"]["torch_pruning"] == metadata.version("torch-pruning")


def test_format_1_files_still_load(pruned, tmp_path):
    model, plan = pruned
    raw = checkpoint.to_dict(model, plan=plan.to_json())
    v1 = {k: v for k, v in raw.items() if k not in ("builder_kwargs", "shapes")} | {"format_version": 1}
    torch.save(v1, tmp_path / "v1.pt")
    back, meta = checkpoint.load(tmp_path / "v1.pt")
    x = torch.randn(2, 3, 32, 32)
    assert meta["format_version"] == 1 and torch.equal(back.eval()(x), model(x))


def test_shapes_that_widen_or_do_not_fit_are_one_line_errors(tmp_path):
    from compressor.errors import UserError
    from compressor.models import get_model

    m = get_model("resnet20").eval()
    raw = checkpoint.to_dict(m)
    for shapes, words in (({"conv1": {"type": "Conv2d", "in": 3, "out": 10**9, "groups": 1}}, r"in \[1, 16\]"),
                          ({"nope": {"type": "Conv2d"}}, "does not have"),
                          ({"bn1": {"type": "Linear", "in": 1, "out": 1}}, "does not fit a BatchNorm2d"),
                          ("a string", "must be a mapping")):
        torch.save({**raw, "shapes": shapes}, tmp_path / "s.pt")
        with pytest.raises(UserError, match=words):
            checkpoint.load(tmp_path / "s.pt")


def test_user_code_is_imported_only_when_named(tmp_path):
    from compressor.errors import UserError
    from compressor.models import get_model

    m = get_model("resnet20")
    raw = {**checkpoint.to_dict(m), "model": "os:system"}
    torch.save(raw, tmp_path / "u.pt")
    with pytest.raises(UserError, match="built by user code 'os:system'; pass --model"):
        checkpoint.load(tmp_path / "u.pt")


def test_wrong_arch_classes_cfg_refused(pruned, tmp_path):
    model, _ = pruned
    path = checkpoint.save(tmp_path / "p.pt", model)
    with pytest.raises(UserError, match="is a 'vgg16_bn', not a 'mobilenet_v2'"):
        checkpoint.load(path, model="mobilenet_v2")
    with pytest.raises(UserError, match="10 classes, 100 were asked"):
        checkpoint.load(path, num_classes=100)
    with pytest.raises(UserError, match="cfg"):
        checkpoint.load(path, cfg=list(TINY_VGG))


def test_cfg_not_matching_weights_is_clear(pruned, tmp_path):
    model, _ = pruned
    d = checkpoint.to_dict(model)
    d["cfg"] = list(TINY_VGG)
    torch.save(d, tmp_path / "x.pt")
    with pytest.raises(UserError, match="weights do not fit vgg16_bn"):
        checkpoint.load(tmp_path / "x.pt")


def test_hrank_plain_state_dict_and_wrapped(tmp_path):
    ref = get_model("vgg16_bn", cfg=list(TINY_VGG)).eval()
    torch.save(ref.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}, "best_prec1": 1.0},
               tmp_path / "wrapped.pt")
    x = torch.randn(2, 3, 32, 32)
    for name in ("plain.pt", "wrapped.pt"):
        net, meta = checkpoint.load(tmp_path / name, model="vgg16_bn")
        assert net.cfg == TINY_VGG and torch.equal(net.eval()(x), ref(x)) and meta["format"] == "hrank"
    with pytest.raises(UserError, match="needs --model"):
        checkpoint.load(tmp_path / "plain.pt")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused"):
        checkpoint.load(tmp_path / "evil.pt", model="vgg16_bn")
    assert not marker.exists()


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"not a zip at all", "not a readable checkpoint")])
def test_garbage_files(tmp_path, content, match):
    (tmp_path / "g.pt").write_bytes(content)
    with pytest.raises(UserError, match=match):
        checkpoint.load(tmp_path / "g.pt")


def test_truncated_file(pruned, tmp_path):
    path = checkpoint.save(tmp_path / "p.pt", pruned[0])
    data = path.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "t.pt")
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_nan_weights_warn_or_fail(pruned, tmp_path):
    model, _ = pruned
    model.features.conv0.weight.data[0, 0, 0, 0] = float("nan")
    path = checkpoint.save(tmp_path / "n.pt", model)
    with pytest.warns(UserWarning, match="NaN/inf"):
        checkpoint.load(path)
    with pytest.raises(UserError, match="NaN/inf"):
        checkpoint.load(path, strict_finite=True)


def test_atomic_save_keeps_old_file_on_failure(pruned, tmp_path, monkeypatch):
    model, _ = pruned
    path = checkpoint.save(tmp_path / "p.pt", model)
    good = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        checkpoint.save(path, model)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["p.pt"]


@pytest.mark.parametrize("key,value,match", [("state_dict", None, "must be a dict"), ("state_dict", [1], "must be a dict"),
                                             ("model", 3, "must be a str"), ("cfg", "x", "must be a list"),
                                             ("num_classes", True, "must be a int")])
def test_malformed_fields_are_one_line_errors(pruned, tmp_path, key, value, match):
    d = checkpoint.to_dict(pruned[0])
    d[key] = value
    torch.save(d, tmp_path / "m.pt")
    with pytest.raises(UserError, match=f"{key}: {match}"):
        checkpoint.load(tmp_path / "m.pt")
