from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from compressor.pruning.graph import units as units_of

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


# Shared by the model-family tests -----------------------------------------------------------
def model_input(model: torch.nn.Module, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def unit_widths(model: torch.nn.Module) -> dict[str, int]:
    return {u.name: u.width for u in units_of(model)}


def random_plan(model: torch.nn.Module, frac: float, seed: int, units: set[str] | None = None):
    """Keep a random ``1 - frac`` of each unit (of ``units``, or all)."""
    from compressor.pruning.plan import Plan

    g = torch.Generator().manual_seed(seed)
    keep = {}
    for u in units_of(model):
        if units is None or u.name in units:
            k = max(1, int(u.width * (1 - frac)))
            keep[u.name] = tuple(sorted(torch.randperm(u.width, generator=g)[:k].tolist()))
    return Plan(keep=keep, widths=unit_widths(model), model=model.arch)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


def seed_files(folder: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Outputs of an earlier run: a failed command must leave them byte-identical."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files
