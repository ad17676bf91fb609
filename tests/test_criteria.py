"""Criteria: known answers on constructed inputs, determinism, one shared pass, every model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.pruning.graph import units as units_of
from compressor.pruning import criteria
from compressor.pruning import scores
from compressor.pruning.criteria.chip import channel_independence
from compressor.pruning.criteria.taylor import taylor_scores
from compressor.pruning.criteria.weight import fpgm_distances
from compressor.errors import UserError
from compressor.models import PrunableUnit, get_model, list_models
from compressor.pruning.plan import rank_order
from compressor.pruning.sensitivity_scan import compute_scores

# CIFAR models; of the depth-scaled ResNets one is enough here (ResNet-56/110 only add blocks)
CIFAR_MODELS = [m for m in list_models() if not m.endswith("_imagenet") and m not in ("resnet56", "resnet110")]
ACTIVATION = ["hrank", "apoz", "chip", "mean_activation"]


def tiny(name: str, seed: int = 0) -> nn.Module:
    """The model at 1/16 of its widths (≥ 2), randomly initialized, BN statistics non-trivial."""
    torch.manual_seed(seed)
    base = get_model(name)
    cfg = [max(2, c // 16) if isinstance(c, int) and not isinstance(c, bool) else c for c in base.cfg] \
        if getattr(base, "cfg", None) is not None else None
    m = get_model(name, cfg=cfg) if cfg is not None else base
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.uniform_(mod.weight, 0.2, 1.0)
            nn.init.uniform_(mod.bias, -0.1, 0.3)
    return m.eval()


def batches(n: int = 8, bs: int = 4, seed: int = 0, labels: bool = False) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) if labels else x[i:i + bs] for i in range(0, n, bs)]


def unit(name: str, width: int, bns: tuple[str, ...] = ()) -> PrunableUnit:
    return PrunableUnit(name=name, convs=(name,), bns=bns, rank_points=(name,), cfg_index=(0,), width=width)


def run_acc(crit_name: str, act: torch.Tensor) -> torch.Tensor:
    acc = criteria.get(crit_name).accumulator()
    acc.update("u", act)
    acc.end_batch(act.shape[0])
    return acc.result()["u"]


def test_registry_has_every_criterion():
    assert {"hrank", "l1", "l2", "bn_scale", "fpgm", "apoz", "mean_activation", "taylor", "chip",
            "random"} <= set(criteria.list_criteria())
    with pytest.raises(UserError, match="did you mean"):
        criteria.get("fpmg")


# ---------------------------------------------------------------- known answers


def test_hrank_known_ranks():
    g = torch.Generator().manual_seed(0)
    act = torch.zeros(2, 4, 8, 8)
    for b in range(2):
        for c in range(4):  # channel c is a sum of c+1 random outer products: rank c+1
            for _ in range(c + 1):
                act[b, c] += torch.outer(torch.randn(8, generator=g), torch.randn(8, generator=g))
    r = run_acc("hrank", act)
    assert r.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert rank_order(r).tolist() == [3, 2, 1, 0]


def test_apoz_and_mean_activation_known_values():
    act = torch.zeros(2, 3, 2, 2)
    act[:, 0] = 2.0  # always active
    act[:, 1, 0, :] = 1.0  # half of the positions
    assert run_acc("apoz", act).tolist() == [1.0, 0.5, 0.0]
    assert torch.allclose(run_acc("mean_activation", act), torch.tensor([2.0, 0.5, 0.0]))


def test_chip_linear_combination_scores_lowest():
    a = torch.zeros(1, 4, 2, 2)
    a[0, 0, 0, 0] = a[0, 1, 0, 1] = a[0, 2, 1, 0] = 1.0  # three orthogonal channels
    a[0, 3] = (a[0, 0] + a[0, 1]) / 2  # a combination of the first two
    ci = channel_independence(a)[0]
    # by hand: ||A||_* = sqrt(1.5) + 1 + 1; removing channel 3 leaves 3, channel 2 leaves 1 + sqrt(1.5)
    assert ci[3].item() == pytest.approx(1.5 ** 0.5 + 2 - 3, abs=1e-12)
    assert ci[2].item() == pytest.approx(1.0, abs=1e-12)
    assert int(ci.argmin()) == 3
    assert run_acc("chip", a).argmin().item() == 3


@pytest.mark.parametrize("shape", [(2, 6, 4, 4), (2, 20, 2, 2), (1, 9, 3, 3)])  # row form, column form, square
def test_chip_matches_masked_svd(shape):
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    x[:, 1] = 0.0  # a dead channel: independence exactly 0
    a = x.double().flatten(2)
    masked = a[:, None].repeat(1, a.shape[1], 1, 1)
    idx = torch.arange(a.shape[1])
    masked[:, idx, idx, :] = 0.0
    want = torch.linalg.svdvals(a).sum(-1)[:, None] - torch.linalg.svdvals(masked).sum(-1)
    got = channel_independence(x)
    assert torch.allclose(got, want, atol=1e-10)
    assert got[:, 1].abs().max().item() < 1e-12
    assert torch.equal(channel_independence(x, max_elems=7), got)  # chunking does not change the result


def _set_conv0(m: nn.Module, rows: torch.Tensor) -> str:
    u = units_of(m)[0]
    conv = m.get_submodule(u.name)
    w = torch.zeros_like(conv.weight).flatten(1)
    w[: rows.shape[0], : rows.shape[1]] = rows
    with torch.no_grad():
        conv.weight.copy_(w.view_as(conv.weight))
    return u.name


def test_l1_l2_orderings():
    m = tiny("vgg16_bn")
    rows = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0, 0, 0], [0.5, 0, 0, 0], [2.0, 1.5, 0, 0]])
    name = _set_conv0(m, rows)
    units = units_of(m)
    l1 = criteria.get("l1").score(m, units, None)[name]
    l2 = criteria.get("l2").score(m, units, None)[name]
    assert l1.tolist() == [4.0, 3.0, 0.5, 3.5]
    assert torch.allclose(l2, torch.tensor([2.0, 3.0, 0.5, 2.5]))
    assert rank_order(l1).tolist() == [0, 3, 1, 2]
    assert rank_order(l2).tolist() == [1, 3, 0, 2]


def test_fpgm_median_filter_scores_lowest():
    m = tiny("vgg16_bn")
    c = torch.tensor([0.3, -0.2, 0.1])
    e1, e2 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    rows = torch.stack([c + e1, c - e1, c, c + e2])  # filter 2 is the geometric median of 0, 1, 2 and 3
    name = _set_conv0(m, rows)
    s = criteria.get("fpgm").score(m, units_of(m), None)[name]
    assert int(s.argmin()) == 2
    w = m.get_submodule(name).weight.detach().flatten(1).double()
    assert torch.allclose(fpgm_distances(w).double(), torch.cdist(w, w).sum(1), atol=1e-5)


def test_bn_scale_ordering_and_no_bn_error():
    m = tiny("vgg16_bn")
    u = units_of(m)[0]
    with torch.no_grad():
        m.get_submodule(u.bns[0]).weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.1]))
    s = criteria.get("bn_scale").score(m, units_of(m), None)[u.name]
    assert s.tolist() == pytest.approx([0.5, 2.0, 1.0, 0.1])
    assert rank_order(s).tolist() == [1, 2, 0, 3]
    with pytest.raises(UserError, match="needs BatchNorm"):
        criteria.get("bn_scale").score(m, [unit(u.name, u.width)], None)


class _Toy(nn.Module):
    """conv 1×1 → ReLU → spatial mean → linear: ∂L/∂a has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_taylor_closed_form_and_batch_invariance():
    torch.manual_seed(0)
    toy = _Toy()
    x, y = torch.randn(6, 3, 5, 5), torch.tensor([0, 1, 2, 3, 0, 1])
    u = PrunableUnit(name="conv", convs=("conv",), bns=(), rank_points=("relu",), cfg_index=(0,), width=3)
    got = taylor_scores(toy, [(x[:4], y[:4]), (x[4:], y[4:])], [u], n_images=6)["conv"]
    with torch.no_grad():
        a = toy.relu(toy.conv(x))
        p = torch.softmax(toy.fc(a.mean(dim=(2, 3))), 1)
        dl_dmean = (p - nn.functional.one_hot(y, 4).float()) @ toy.fc.weight  # [B, C]
        # g = dl_dmean / HW at every position, so mean_hw(a*g) = dl_dmean * mean_hw(a) / HW
        want = (dl_dmean * a.mean(dim=(2, 3)) / 25).abs().mean(0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    one_by_one = taylor_scores(toy, [(x[i:i + 1], y[i:i + 1]) for i in range(6)], [u], n_images=6)["conv"]
    assert torch.allclose(got, one_by_one, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in toy.parameters())  # parameter gradients untouched


def test_taylor_dead_channel_is_zero_and_needs_labels():
    m = tiny("vgg16_bn")
    u = units_of(m)[0]
    with torch.no_grad():
        bn = m.get_submodule(u.bns[0])
        bn.weight[1] = 0.0
        bn.bias[1] = 0.0
    s = taylor_scores(m, batches(4, labels=True), units_of(m), n_images=4)
    assert s[u.name][1].item() == 0.0 and s[u.name].sum() > 0
    crit = criteria.get("taylor")  # the path scores.compute takes: own pass -> accumulator -> score
    acc = crit.gradient_pass(m, batches(4, labels=True), units_of(m), n_images=4)
    assert acc.count == 4 and all(torch.equal(crit.score(m, [], acc)[k], s[k]) for k in s)
    with pytest.raises(UserError, match="only 4"):
        taylor_scores(m, batches(4, labels=True), units_of(m), n_images=8)
    with pytest.raises(UserError, match="labelled"):
        taylor_scores(m, batches(4), units_of(m), n_images=4)
    with pytest.raises(RuntimeError, match="gradient"):
        criteria.get("taylor").score(m, units_of(m), None)


def test_random_is_seeded_and_order_independent():
    m = tiny("vgg16_bn")
    units = units_of(m)
    a = criteria.get("random", seed=3).score(m, units, None)
    b = criteria.get("random", seed=3).score(m, list(reversed(units)), None)
    c = criteria.get("random", seed=4).score(m, units, None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- passes, determinism, every model


def test_shared_pass_equals_separate_passes_and_is_deterministic():
    m = tiny("vgg16_bn")
    together = scores.compute(m, batches(), ACTIVATION, n_images=8, seed=0, progress=False)
    again = scores.compute(m, batches(), ACTIVATION, n_images=8, seed=0, progress=False)
    for name in ACTIVATION:
        alone = scores.compute(m, batches(), [name], n_images=8, seed=0, progress=False)
        for u, t in alone.scores[name].items():
            assert torch.equal(together.scores[name][u], t), (name, u)
            assert torch.equal(again.scores[name][u], t), (name, u)
    assert all(torch.equal(together.tiebreak[u], again.tiebreak[u]) for u in together.tiebreak)


@pytest.mark.parametrize("model_name", CIFAR_MODELS)
def test_every_criterion_on_every_model(model_name):
    m = tiny(model_name)
    units = units_of(m)
    has_bn = all(u.bns for u in units)
    names = [c for c in criteria.list_criteria() if criteria.get(c).kind != "gradient"]
    if not has_bn:
        names.remove("bn_scale")
        with pytest.raises(UserError, match="BatchNorm"):
            scores.compute(m, batches(), ["bn_scale"], n_images=8, seed=0, progress=False)
    sc = scores.compute(m, batches(), names, n_images=8, seed=0, progress=False, options={"seed": 0})
    tay, _ = compute_scores(m, batches(labels=True), "taylor", n_images=8, seed=0)
    for name, per_unit in {**sc.scores, "taylor": tay}.items():
        for u in units:
            t = per_unit[u.name]
            assert t.shape == (u.width,) and torch.isfinite(t).all(), (name, u.name)
