"""The reference model: HRank's CIFAR VGG16-BN layout, names and index lists."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import UserError
from compressor.models import get_model, list_models
from tests import oracles
from tests.conftest import TINY_VGG, VGG_BASELINE, needs_vgg_baseline

# HRank's vgg.py: relucfg/convcfg (12 entries: conv 13 is not ranked there).
HRANK_RELUCFG = [2, 6, 9, 13, 16, 19, 23, 26, 29, 33, 36, 39]
HRANK_CONVCFG = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37]


def hrank_keys() -> list[str]:
    """State_dict keys of HRank's vgg_16_bn, written from its layer naming rule."""
    keys = []
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    for i, x in enumerate(cfg):
        if x == "M":
            continue
        keys += [f"features.conv{i}.weight", f"features.conv{i}.bias"]
        keys += [f"features.norm{i}.{t}" for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys += ["classifier.linear1.weight", "classifier.linear1.bias"]
    keys += [f"classifier.norm1.{t}" for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys += ["classifier.linear2.weight", "classifier.linear2.bias"]
    return keys


def test_state_dict_keys_match_hrank():
    assert list(get_model("vgg16_bn").state_dict()) == hrank_keys()


def test_index_lists_derived_from_names():
    m = get_model("vgg16_bn")
    assert m.convcfg[:12] == HRANK_CONVCFG
    assert m.hrank_relucfg[:12] == HRANK_RELUCFG
    feats = list(m.features.children())
    # our default rank points are the ReLUs; HRank's positions 6, 13, 23, 33 are MaxPools
    assert all(isinstance(feats[i], torch.nn.ReLU) for i in m.relucfg)
    assert [i for i in HRANK_RELUCFG if isinstance(feats[i], torch.nn.MaxPool2d)] == [6, 13, 23, 33]
    assert len(oracles.units_of(m)) == 13


def test_every_conv_has_cp_rate_and_bias():
    m = get_model("vgg16_bn")
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 13
    assert all(c.cp_rate == 0.0 and c.bias is not None for c in convs)


def test_reduced_cfg_derives_linear1_width():
    m = get_model("vgg16_bn", cfg=list(TINY_VGG), num_classes=7)
    assert m.classifier.linear1.in_features == TINY_VGG[-2]
    assert m.classifier.linear1.out_features == TINY_VGG[-1]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("bad", [[64, 64], TINY_VGG[:-1] + ["M"], [0] + TINY_VGG[1:], [True] + TINY_VGG[1:]])
def test_bad_cfg_is_user_error(bad):
    with pytest.raises(UserError, match="cfg"):
        get_model("vgg16_bn", cfg=bad)


def test_unknown_model_suggests():
    with pytest.raises(UserError, match="did you mean: vgg16_bn"):
        get_model("vgg16bn")
    assert "vgg16_bn" in list_models()


def test_imagenet_variant_runs_at_224():
    from compressor.models.vgg import IMAGENET_CFG

    tiny = [max(1, x // 16) if x != "M" else x for x in IMAGENET_CFG]
    m = get_model("vgg16_bn_imagenet", cfg=tiny, num_classes=5).eval()
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    assert "features.0.weight" in m.state_dict() and "classifier.6.weight" in m.state_dict()


@needs_vgg_baseline
def test_shared_baseline_loads_as_hrank_checkpoint():
    from compressor.storage import checkpoint

    net, meta = checkpoint.load(VGG_BASELINE, model="vgg16_bn")
    assert net.cfg == get_model("vgg16_bn").cfg
    assert meta["format"] == "hrank"


def test_imagenet_variant_loads_torchvision_state_dict(tmp_path):
    import torchvision

    from compressor.storage import checkpoint

    tv = torchvision.models.vgg16_bn(weights=None, num_classes=3).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    net, _ = checkpoint.load(tmp_path / "tv.pth", model="vgg16_bn_imagenet")
    assert net.num_classes == 3
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), tv(x))
