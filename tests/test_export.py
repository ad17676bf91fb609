"""ONNX export round trip: onnxruntime agrees with torch on pruned models of every family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from compressor.pruning.graph import units as units_of
from compressor.storage import checkpoint
from compressor.pruning import surgery
from compressor.deploy.onnx_export import export, real_images  # noqa: E402
from compressor.models import get_model, list_models  # noqa: E402
from compressor.pruning.plan import make_plan  # noqa: E402
from compressor.pruning.rates import RateSpec  # noqa: E402

CIFAR_MODELS = [m for m in list_models() if not m.endswith("_imagenet") and m not in ("resnet56", "resnet110")]
TINY_VGG = [8, 8, "M", 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, 32]


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics, so agreement is not between two near-zero outputs."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data, m.bias.data = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
            m.running_mean, m.running_var = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) + 0.5
    return model


def pruned(name: str, rate: float = 0.5, cfg: list | None = None) -> torch.nn.Module:
    """A physically pruned model with non-trivial BN statistics (random scores pick the channels)."""
    torch.manual_seed(0)
    model = randomize_bn(get_model(name, cfg=cfg)).eval()
    widths = {u.name: u.width for u in units_of(model)}
    g = torch.Generator().manual_seed(1)
    scores = {u: torch.rand(w, generator=g) for u, w in widths.items()}
    plan = make_plan(scores, RateSpec(rates={u: rate for u in widths}), widths, model=name)
    return surgery.apply(model, plan).eval()  # the one surgery method (torch_pruning)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_round_trip_every_family(name, tmp_path):
    model = pruned(name, cfg=list(TINY_VGG) if name == "vgg16_bn" else None)
    res = export(model, tmp_path / "m.onnx", n_real=16, batch_sizes=(1, 5))
    assert res.ok, res.to_dict()
    assert [c.shape[0] for c in res.checks] == [1, 5, 16]
    assert all(c.argmax_agree == 1.0 for c in res.checks)
    assert (tmp_path / "m.onnx").stat().st_size == res.bytes > 0


def test_graph_has_dynamic_batch_and_metadata(tmp_path):
    model = pruned("vgg16_bn", cfg=list(TINY_VGG))
    export(model, tmp_path / "v.onnx", n_real=0)
    proto = onnx.load(str(tmp_path / "v.onnx"))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch" and not dim0.HasField("dim_value")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["arch"] == "vgg16_bn" and json.loads(meta["cfg"]) == model.cfg and meta["num_classes"] == "10"
    # The file alone reproduces torch on real images, at a batch size never used while exporting.
    x = real_images(model, 33)[1]
    sess = ort.InferenceSession(str(tmp_path / "v.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max() <= 1e-4


def test_failed_check_writes_nothing(tmp_path):
    model = pruned("vgg16_bn", cfg=list(TINY_VGG))
    res = export(model, tmp_path / "x.onnx", atol=-1.0, n_real=0)  # an impossible tolerance
    assert not res.ok and res.path is None and not (tmp_path / "x.onnx").exists()


def test_cli_export(tmp_path, capsys):
    from compressor.cli import main

    model = pruned("vgg16_bn", cfg=list(TINY_VGG))
    ck = checkpoint.save(tmp_path / "p.pt", model)
    assert main(["export", "--checkpoint", str(ck), "--n-real", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["path"] == str(tmp_path / "p.onnx") and (tmp_path / "p.onnx").stat().st_size == doc["bytes"]
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
