from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VGG_BASELINE = SHARED / "pretrained" / "vgg16_bn_cifar10_jpeg.pt"
CIFAR_TAR = SHARED / "cifar10-jpeg.tar.gz"

# A narrow VGG16-BN with the reference layout: every property that does not depend on width.
TINY_VGG = [8, 8, "M", 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, 32]

os.environ.setdefault("TQDM_DISABLE", "1")
# Tiny models run faster on one thread, and a loaded 2-core machine punishes two (see README).
torch.set_num_threads(1)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN layers non-trivial statistics so equality tests are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model


@pytest.fixture
def tiny_vgg():
    from compressor.models import get_model

    torch.manual_seed(0)
    return randomize_bn(get_model("vgg16_bn", cfg=list(TINY_VGG))).eval()


needs_vgg_baseline = pytest.mark.skipif(not VGG_BASELINE.exists(), reason=f"{VGG_BASELINE} not present (../shared/data)")
needs_cifar = pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"{CIFAR_TAR} not present (../shared/data)")


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine lose a lot."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
