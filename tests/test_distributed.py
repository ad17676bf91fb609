"""Two CPU processes with gloo: DDP training (rank 0 alone writes) and sharded HRank ranking.

One spawn serves both property tests (process start-up dominates on a 2-core machine);
a third test runs the real CLI under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compressor import data
from compressor.storage import checkpoint
from compressor.training import distributed
from compressor.pruning import scores
from compressor.training.train import TrainConfig, fit
from tests.conftest import randomize_bn
from tests.test_train import CFG, tiny_bundle, tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
N_CALIB, CALIB_BATCH = 40, 16  # 3 batches (16, 16, 8): rank 0 gets two, rank 1 one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calib_model():
    return randomize_bn(tiny_model(seed=5)).eval()


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    try:
        out = Path(tmp)
        model = tiny_model()
        hist = fit(model, tiny_bundle(), TrainConfig(epochs=2, batch_size=8, lr=0.05), "cpu", progress=False,
                   out_dir=out / f"rank{rank}", ctx=ctx)  # each rank names its own folder: only rank 0 may write
        calib = data.calibration_subset(tiny_bundle().train_eval, N_CALIB, seed=0)
        sc = distributed.compute_scores(_calib_model(), calib, ["hrank"], batch_size=CALIB_BATCH, ctx=ctx,
                                        progress=False)
        torch.save({"history": hist, "state": model.state_dict(), "scores": sc.scores, "tiebreak": sc.tiebreak,
                    "meta": {"n_images": sc.meta["n_images"], "processes": sc.meta["processes"]}},
                   out / f"result{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    procs = mp.start_processes(_worker, args=(WORLD, _free_port(), str(tmp)), nprocs=WORLD, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 240
    while not procs.join(timeout=2):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the two gloo processes did not finish in 240 s")
    return tmp, [torch.load(tmp / f"result{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ddp_trains_in_step_and_only_rank0_writes(two_ranks):
    tmp, res = two_ranks
    assert {"last.pt", "best.pt", "metrics.jsonl"} <= {p.name for p in (tmp / "rank0").iterdir()}
    assert not (tmp / "rank1").exists()
    s0, s1 = res[0]["state"], res[1]["state"]
    assert all(torch.equal(v, s1[k]) for k, v in s0.items())  # weights and BN statistics
    h0, h1 = res[0]["history"], res[1]["history"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "img_per_s"} for r in h]  # noqa: E731
    assert strip(h0) == strip(h1) and len(h0) == 2  # metrics are reduced over ranks
    rows = [json.loads(ln) for ln in (tmp / "rank0" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "epoch" in r]  # the epoch rows (the others are mid-epoch curve points)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["train_loss"] == pytest.approx(h0[1]["train_loss"])
    ck = torch.load(tmp / "rank0" / "last.pt", weights_only=True)
    assert ck["extra"]["train_state"]["sampler"]["world_size"] == WORLD
    assert torch.equal(ck["state_dict"]["features.conv0.weight"], s0["features.conv0.weight"])


def test_distributed_scores_equal_single_process(two_ranks):
    _, res = two_ranks
    calib = data.calibration_subset(tiny_bundle().train_eval, N_CALIB, seed=0)
    single = scores.compute(_calib_model(), data.loader(calib, CALIB_BATCH), ["hrank"], n_images=N_CALIB, seed=0,
                            progress=False)
    for r in res:
        assert r["meta"] == {"n_images": N_CALIB, "processes": WORLD}
        for unit, s in single.scores["hrank"].items():
            torch.testing.assert_close(r["scores"]["hrank"][unit], s, atol=1e-6, rtol=0)
            torch.testing.assert_close(r["tiebreak"][unit], single.tiebreak[unit], atol=1e-6, rtol=0)
    # one process through the sharded path is the library's compute, exactly
    one = distributed.compute_scores(_calib_model(), calib, ["hrank"], batch_size=CALIB_BATCH, progress=False)
    for unit, s in single.scores["hrank"].items():
        assert torch.equal(one.scores["hrank"][unit], s) and torch.equal(one.tiebreak[unit], single.tiebreak[unit])


def test_torchrun_finetune_cli(tmp_path):
    ck = checkpoint.save(tmp_path / "pruned.pt", tiny_model())
    out = tmp_path / "ft"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
         "-m", "compressor", "finetune", "--checkpoint", str(ck), "--epochs", "1", "--batch-size", "32",
         "--val-size", "64", "--device", "cpu", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("epoch 1/1:") == 1 and proc.stdout.count("test top-1") == 1  # rank 0 prints
    assert {"last.pt", "best.pt", "metrics.jsonl", "resolved_config.yaml", "summary.json"} <= {
        p.name for p in out.iterdir()}
    net, meta = checkpoint.load(out / "best.pt")
    assert meta["provenance"]["processes"] == WORLD and net.cfg == CFG
