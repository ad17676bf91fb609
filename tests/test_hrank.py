"""HRank ranking: known ranks, explicit tolerance, one pass, reproducible scores files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.models import hrank
from compressor.pruning import scores as scores_mod
from compressor.pruning.capture import record
from compressor.pruning.criteria.hrank import RankAccumulator, batch_ranks
from compressor.errors import UserError
from tests import oracles


def low_rank(r: int, h: int = 16, w: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, r, generator=g) @ torch.randn(r, w, generator=g) if r else torch.zeros(h, w)


def test_known_ranks_of_constructed_matrices():
    maps = torch.stack([low_rank(r, seed=r) for r in (0, 1, 3, 7, 12)])[None]  # [1, 5, 16, 12]
    assert batch_ranks(maps).tolist() == [[0, 1, 3, 7, 12]]


def test_batched_equals_matrix_rank_per_map():
    x = torch.relu(torch.randn(6, 9, 8, 8))
    x[:, 2] = low_rank(2, 8, 8)
    ref = torch.tensor([[int(torch.linalg.matrix_rank(x[i, j])) for j in range(9)] for i in range(6)])
    assert torch.equal(batch_ranks(x), ref)


def test_tolerance_is_explicit():
    # rank-1 map plus tiny noise: the default (eps-based) rule sees noise as rank; an explicit rtol does not.
    g = torch.Generator().manual_seed(0)
    m = (low_rank(1, 32, 32) + 1e-4 * torch.randn(32, 32, generator=g))[None, None]
    assert batch_ranks(m).item() > 20
    assert batch_ranks(m, rtol=1e-3).item() == 1
    assert batch_ranks(m, rtol=0.0, atol=1e9).item() == 0


def test_rank_ignores_autocast():
    x = low_rank(3, 16, 16)[None, None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert batch_ranks(x).item() == 3


def test_one_pass_hooks_removed(tiny_vgg):
    units = oracles.units_of(tiny_vgg)
    acc = RankAccumulator()
    calls = {"n": 0}
    orig = tiny_vgg.forward

    def counting_forward(x):
        calls["n"] += 1
        return orig(x)

    tiny_vgg.forward = counting_forward
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    record(tiny_vgg, batches, units, [acc], progress=False)
    assert calls["n"] == 3 and acc.count == 12
    assert set(acc.sums) == {u.name for u in units}
    assert all(not m._forward_hooks for m in tiny_vgg.modules())


def test_hooks_removed_on_failure(tiny_vgg):
    class Boom(RankAccumulator):
        def update(self, unit, act):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        record(tiny_vgg, [torch.randn(2, 3, 32, 32)], oracles.units_of(tiny_vgg), [Boom()], progress=False)
    assert all(not m._forward_hooks for m in tiny_vgg.modules())


def test_scores_match_manual_average(tiny_vgg):
    x = torch.randn(10, 3, 32, 32)
    sc = scores_mod.compute(tiny_vgg, [x[:4], x[4:]], ["hrank"], n_images=10, seed=0, progress=False)
    acts = {}
    h = tiny_vgg.features.relu4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.clone()))
    with torch.no_grad():
        tiny_vgg(x)
    h.remove()
    manual = torch.stack([torch.stack([torch.linalg.matrix_rank(a) for a in img]) for img in acts["a"]]).double().mean(0)
    assert torch.allclose(sc.scores["hrank"]["features.conv4"].double(), manual, atol=1e-6)
    assert sc.meta["n_images"] == 10 and sc.meta["rank_points"] == "relu"


def test_compat_rank_points_use_pool_outputs(tiny_vgg):
    x = torch.randn(4, 3, 32, 32)
    sc = scores_mod.compute(tiny_vgg, [x], ["hrank"], n_images=4, seed=0, compat=True, progress=False)
    h = sc.scores["hrank"]
    assert "features.conv16" not in h  # HRank never ranks conv 13
    assert float(h["features.conv1"].max()) <= 16  # pooled 16×16 map
    plain = scores_mod.compute(tiny_vgg, [x], ["hrank"], n_images=4, seed=0, progress=False)
    assert float(plain.scores["hrank"]["features.conv1"].max()) > 16


def test_deterministic_and_file_round_trip(tiny_vgg, tmp_path):
    x = torch.randn(6, 3, 32, 32)
    a = scores_mod.compute(tiny_vgg, [x], ["hrank", "l1"], n_images=6, seed=3, progress=False)
    b = scores_mod.compute(tiny_vgg, [x], ["hrank", "l1"], n_images=6, seed=3, progress=False)
    path = a.save(tmp_path / "s.pt")
    c = scores_mod.Scores.load(path)
    for crit in ("hrank", "l1"):
        for u, t in a.scores[crit].items():
            assert torch.equal(t, b.scores[crit][u]) and torch.equal(t, c.scores[crit][u])
    assert c.meta["seed"] == 3 and c.meta["criteria"]["hrank"]["atol"] == 0.0
    assert c.meta["model_checksum"] == scores_mod.model_checksum(tiny_vgg)
    c.check_model(tiny_vgg)


def test_scores_of_other_cfg_are_refused(tiny_vgg, tmp_path):
    from compressor.models import get_model

    sc = scores_mod.compute(tiny_vgg, [], ["l1"], n_images=0, seed=0, progress=False)
    with pytest.raises(UserError, match="channels"):
        sc.check_model(get_model("vgg16_bn"))


def test_too_few_images_is_user_error(tiny_vgg):
    with pytest.raises(UserError, match="only 2"):
        scores_mod.compute(tiny_vgg, [torch.randn(2, 3, 32, 32)], ["hrank"], n_images=5, seed=0, progress=False)


def test_hrank_npy_export_import(tiny_vgg, tmp_path):
    sc = scores_mod.compute(tiny_vgg, [torch.randn(3, 3, 32, 32)], ["hrank"], n_images=3, seed=0, progress=False)
    paths = hrank.export_rank_files(sc, "hrank", tiny_vgg, tmp_path)
    assert [p.name for p in paths][:2] == ["rank_conv1.npy", "rank_conv2.npy"] and len(paths) == 13
    assert np.load(paths[0]).shape == (8,)
    back = hrank.import_rank_files(tmp_path, tiny_vgg)
    for u, t in sc.scores["hrank"].items():
        assert torch.allclose(back.scores["hrank"][u], t)
    np.save(tmp_path / "rank_conv1.npy", np.zeros(5))
    with pytest.raises(UserError, match="rank_conv1.npy"):
        hrank.import_rank_files(tmp_path, tiny_vgg)


def test_threaded_svd_split_is_bit_identical():
    from compressor.pruning.criteria.hrank import _svdvals

    x = torch.relu(torch.randn(7, 5, 12, 12))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = _svdvals(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(split, torch.linalg.svdvals(x))
