"""CIFAR ResNets: akamaster's weights load exactly, the zero-pad shortcut prunes exactly, and
HRankPlus/CHIP's ResNet-56 rate lists reproduce the published sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.models import hrank
from compressor.storage import checkpoint
from compressor.pruning import counting
from compressor.pruning import surgery
from compressor.errors import UserError
from compressor.models import get_model
from compressor.models.resnet_cifar import PadShortcut
from compressor.pruning.plan import Plan, make_plan
from compressor.pruning import graph
from compressor.pruning.rates import RateSpec, parse_rate_string
from tests.conftest import one_thread, randomize_bn

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrained"
AKAMASTER = {"resnet20": SHARED / "resnet20-12fca82f.th", "resnet56": SHARED / "resnet56-4bfd9763.th"}


def _reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """akamaster's ResNet written out functionally (F.pad shortcut), as an independent oracle."""
    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    out = F.relu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for s, planes in ((1, 16), (2, 32), (3, 64)):
        for i in range(n):
            p = f"layer{s}.{i}"
            stride = 2 if (i == 0 and s > 1) else 1
            y = F.relu(bn(F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            y = bn(F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            sc = out if stride == 1 and out.shape[1] == planes else F.pad(out[:, :, ::2, ::2],
                                                                        (0, 0, 0, 0, planes // 4, planes // 4))
            out = F.relu(y + sc)
    out = F.avg_pool2d(out, out.shape[3]).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


@pytest.mark.parametrize("name", sorted(AKAMASTER))
def test_akamaster_weights_give_the_reference_logits(name: str) -> None:
    path = AKAMASTER[name]
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data)")
    with one_thread():
        model, obj = checkpoint.load(path, model=name)
        sd = {k: v for k, v in model.state_dict().items()}
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = model.eval()(x)
            want = _reference_forward(sd, x, (int(name[6:]) - 2) // 6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert obj["metrics"].get("best_prec1") is not None


def test_pad_shortcut_prunes_in_and_out_independently_and_exactly() -> None:
    """Cut input and output channels of the shortcut: kept channels carry what they carried."""
    sc = PadShortcut(4, 8, stride=2)
    x = torch.randn(2, 4, 6, 6)
    full = sc(x)
    pruner = graph.customized_pruners()[PadShortcut]
    pruner.prune_in_channels(sc, [1])           # input channel 1 (lands in 3) is gone
    pruner.prune_out_channels(sc, [0, 2, 5])    # output 2 received input 0; it is gone too
    keep_in, keep_out = [0, 2, 3], [1, 3, 4, 6, 7]
    got = sc(x[:, keep_in])
    want = full[:, keep_out].clone()
    want[:, 1] = 0  # output 3 received the removed input channel 1
    assert sc.dst.tolist() == [-1, 2, -1] and sc.out_channels == 5
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_units_are_stem_inner_convs_and_three_stage_groups() -> None:
    m = get_model("resnet20")
    units = graph.units(m)
    kinds = {u.name: u.kind for u in units}
    assert [n for n, k in kinds.items() if k == "residual"] == ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"]
    assert kinds["conv1"] == "plain" and sum(k == "plain" for k in kinds.values()) == 1 + 9
    stage2 = next(u for u in units if u.name == "layer2.0.conv2")
    assert stage2.rank_points == ("layer2.0.bn2", "layer2.1.bn2", "layer2.2.bn2") and stage2.width == 32


def _prune_with(model: nn.Module, rates: dict[str, float]) -> nn.Module:
    units = graph.units(model)
    widths = {u.name: u.width for u in units}
    g = torch.Generator().manual_seed(0)
    scores = {u.name: torch.rand(u.width, generator=g) for u in units}
    return surgery.apply(model, make_plan(scores, RateSpec(rates={n: rates.get(n, 0.0) for n in widths}), widths))


# CHIP README (../shared/REFERENCE.md): params, MACs. Published MACs count BN as thop does.
PUBLISHED = [("[0.]+[0.15]*2+[0.4]*27", 0.48e6, 65.94e6), ("[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9", 0.24e6, 34.78e6)]


@pytest.mark.parametrize("rates, params, macs", PUBLISHED)
def test_hrankplus_resnet56_lists_reproduce_the_published_sizes(rates: str, params: float, macs: float) -> None:
    with one_thread():
        m = get_model("resnet56").eval()
        pruned = _prune_with(m, hrank.layout_rates(m, parse_rate_string(rates)))
        c = counting.count(pruned)
        with_bn = c["macs"] + counting.count_norm_ops(pruned)
        assert abs(with_bn / macs - 1) < 0.01, with_bn  # 65.94M / 34.78M; conv+linear alone: 65.17M / 34.20M
        weights = sum(mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
                      for mod in pruned.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))
        assert abs(weights / params - 1) < 0.01, weights  # published params leave BN's γ/β out
        assert pruned.conv1.out_channels == 16 and pruned.layer3[0].conv2.out_channels == 64


def test_dead_stage_channels_prune_exactly_through_pad_shortcuts(tmp_path) -> None:
    with one_thread():
        torch.manual_seed(0)
        m = randomize_bn(get_model("resnet20")).eval()
        # A stage channel is dead only if the shortcut brings it a dead channel (or a pad zero):
        # stage 1 drops what the stem drops; stage 2 drops pad channels and the images of
        # stage 1's; stage 3 drops pad channels only.
        units = {u.name: u for u in graph.units(m)}
        stem_drop = [1, 4, 5, 11]
        s2_drop = [0, 3, 8 + 4, 8 + 11, 30]
        drops = {"conv1": stem_drop, "layer1.0.conv2": stem_drop, "layer2.0.conv2": s2_drop,
                 "layer3.0.conv2": [2, 9, 50, 63], "layer2.1.conv1": [0, 5, 6, 7, 20]}
        keep = {n: tuple(i for i in range(units[n].width) if i not in d) for n, d in drops.items()}
        found = graph.discovery(m)
        for n, k in keep.items():  # kill the channels the plan drops: every member BN gives 0 there
            drop = drops[n]
            for mb in found.members[n]:
                mod = m.get_submodule(mb.name)
                if mb.role == "out" and isinstance(mod, nn.BatchNorm2d):
                    mod.weight.data[drop] = 0
                    mod.bias.data[drop] = 0
        plan = Plan(keep=keep, widths={u: units[u].width for u in units})
        pruned = surgery.apply(m, plan)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), m(x), rtol=1e-5, atol=1e-5)
        back = checkpoint.load(checkpoint.save(tmp_path / "r.pt", pruned))[0].eval()
        assert back.layer2[0].shortcut.dst.tolist() == pruned.layer2[0].shortcut.dst.tolist()
        with torch.no_grad():
            assert torch.equal(back(x), pruned(x))


def test_a_rates_file_in_hrankplus_layout_maps_onto_the_units(tmp_path) -> None:
    from compressor.jobs.pipeline import PruneJob, _load_rates

    path = tmp_path / "r.yaml"
    path.write_text('model: resnet20\nrates: "[0.]+[0.25]*2+[0.5]*9"\nround_to: 2\n')
    m = get_model("resnet20")
    spec = _load_rates(PruneJob(model="resnet20", rates=str(path)), m)
    assert spec.rates["conv1"] == 0.0 and spec.rates["layer1.0.conv2"] == 0.25 and spec.rates["layer2.0.conv2"] == 0.25
    assert spec.rates["layer3.0.conv2"] == 0.0 and spec.rates["layer3.2.conv1"] == 0.5 and spec.round_to == 2
    assert spec.extra["layout"] == "hrankplus"
    path.write_text('rates: "[0.1]*5"\n')  # neither the unit count nor the layout
    with pytest.raises(UserError, match="has 12 entries, got 5"):
        _load_rates(PruneJob(model="resnet20", rates=str(path)), m)


def test_a_bad_rates_file_for_a_cifar_resnet_is_reported_as_itself(tmp_path) -> None:
    """Issue 22: a wrong round_to or rounding is not masked as an HRankPlus layout mismatch."""
    import compressor

    m = get_model("resnet20")
    path = tmp_path / "r.yaml"
    path.write_text("rates: {conv1: 0.1}\nround_to: -3\n")
    with pytest.raises(UserError, match="round_to") as exc:
        compressor.rates_spec(path, m)
    assert "HRankPlus" not in str(exc.value)
    path.write_text('rates: "[0.1]*13"\nrounding: sideways\n')
    with pytest.raises(UserError, match="rounding") as exc:
        compressor.rates_spec(path, m)
    assert "HRankPlus" not in str(exc.value)
    path.write_text('rates: "[0.1]*5"\n')  # the list fits neither: both readings are named
    with pytest.raises(UserError, match=r"has 5 rates.*HRankPlus's layout.*has 12 entries, got 5"):
        compressor.rates_spec(path, m)
