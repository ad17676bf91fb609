"""The training loop: exact resume, NaN stop, val selection, recipes, KD, the train/finetune CLI.

Everything runs on a tiny VGG16-BN over at most 64 digits images, so the file takes seconds.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import Subset

from compressor import data
from compressor.storage import checkpoint
from compressor.cli import main
from compressor.models import get_model
from compressor.training.train import NonFiniteLossError, TrainConfig, fit, loss_fn, lr_lambda

ROOT = Path(__file__).resolve().parents[1]
CFG = [4, 4, "M", 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, 16]


@lru_cache(maxsize=1)
def _digits() -> data.DataBundle:
    return data.digits()


def tiny_bundle(n_train: int = 64, n_val: int = 32, n_test: int = 32, augment: bool = False) -> data.DataBundle:
    b = copy.copy(_digits())
    full = copy.copy(b.train.dataset)
    full.augment = augment
    b.train = Subset(full, b.train.indices[:n_train])
    b.train_eval = Subset(b.train_eval.dataset, b.train_eval.indices[:n_train])
    b.val = Subset(b.val.dataset, b.val.indices[:n_val])
    b.test = Subset(b.test, range(n_test))
    return b


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return get_model("vgg16_bn", cfg=list(CFG))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def epoch_rows(path: Path) -> list[dict]:
    """The per-epoch rows of a metrics.jsonl (the others are the recovery curve's evaluations)."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if "epoch" in r]


class Interrupt(Exception):
    pass


def test_resume_is_bit_identical(tmp_path):
    """2 epochs in one go == 1 epoch, interrupted, then resumed from last.pt (with augmentation)."""
    bundle = tiny_bundle(augment=True)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.5, label_smoothing=0.1)
    whole = tiny_model()
    h_whole = fit(whole, bundle, cfg, progress=False, out_dir=tmp_path / "whole")

    def stop_after_first(row):
        raise Interrupt

    with pytest.raises(Interrupt):
        fit(tiny_model(), bundle, cfg, progress=False, out_dir=tmp_path / "cut", log=stop_after_first)
    assert [r["epoch"] for r in epoch_rows(tmp_path / "cut" / "metrics.jsonl")] == [1]
    resumed = tiny_model(seed=123)  # different init: everything must come from last.pt
    h_res = fit(resumed, bundle, cfg, progress=False, out_dir=tmp_path / "cut", resume=tmp_path / "cut" / "last.pt")
    assert same_weights(whole, resumed)
    strip = [{k: v for k, v in r.items() if k != "img_per_s"} for r in h_whole]
    assert [{k: v for k, v in r.items() if k != "img_per_s"} for r in h_res] == strip
    rows = epoch_rows(tmp_path / "cut" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"epoch", "lr", "train_loss", "train_acc", "val_acc", "img_per_s", "epoch_frac", "step"} <= set(rows[0])
    whole_curve = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    cut_curve = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip_l = lambda lines: [{k: v for k, v in json.loads(ln).items() if k != "img_per_s"} for ln in lines]  # noqa: E731
    assert strip_l(cut_curve) == strip_l(whole_curve) and json.loads(cut_curve[0])["epoch_frac"] == 0
    # the checkpoint is plain data: optimizer, scheduler, scaler, sampler and epoch; no RNG state, because
    # every epoch re-seeds from (seed, epoch, rank), which is what this test checks (it fails without that)
    ts = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["extra"]["train_state"]
    assert ts["epoch"] == 2 and {"optimizer", "scheduler", "scaler", "sampler"} <= set(ts) and "rng" not in ts
    assert ts["sampler"] == {"seed": 0, "epoch": 2, "world_size": 1}


def test_best_checkpoint_is_selected_on_val(tmp_path):
    bundle = tiny_bundle()
    hist = fit(tiny_model(), bundle, TrainConfig(epochs=3, batch_size=16, lr=0.1), progress=False, out_dir=tmp_path)
    best_epoch = max(range(3), key=lambda i: (hist[i]["val_acc"], -i)) + 1
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["metrics"]["epoch"] == best_epoch
    assert best["metrics"]["val_acc"] == max(r["val_acc"] for r in hist)
    assert "test" not in best["metrics"]  # fit never looks at the test split


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_model()

    def poison(row):  # after epoch 1 is saved, make the next forward produce NaN
        with torch.no_grad():
            model.classifier.linear2.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="epoch 2.*last good checkpoint"):
        fit(model, tiny_bundle(), TrainConfig(epochs=3, batch_size=16), progress=False, out_dir=tmp_path, log=poison)
    net, ck = checkpoint.load(tmp_path / "last.pt", strict_finite=True)  # finite weights, epoch 1
    assert ck["extra"]["train_state"]["epoch"] == 1
    assert len(epoch_rows(tmp_path / "metrics.jsonl")) == 1
    assert issubclass(NonFiniteLossError, FloatingPointError)  # old callers caught this


def test_kd_changes_the_loss():
    bundle = tiny_bundle(n_train=32)
    cfg = TrainConfig(epochs=1, batch_size=16, kd_alpha=0.7, kd_temperature=3.0)
    plain = fit(tiny_model(), bundle, cfg, progress=False)
    teacher = tiny_model(seed=7)
    kd = fit(tiny_model(), bundle, cfg, progress=False, teacher=teacher)
    assert math.isfinite(kd[0]["train_loss"]) and kd[0]["train_loss"] != plain[0]["train_loss"]
    # the KD term: zero against itself, CE alone at alpha 0
    out, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(out, y)
    assert torch.allclose(loss_fn(out, y, cfg, out), (1 - cfg.kd_alpha) * ce, atol=1e-6)
    assert torch.equal(loss_fn(out, y, TrainConfig(kd_alpha=0.0), torch.randn(8, 10)), ce)


def test_lr_schedules():
    cfg = TrainConfig(epochs=4, lr=1.0, schedule="multistep", milestones=(1, 3), gamma=0.1, warmup_epochs=0.5)
    f = lr_lambda(cfg, steps_per_epoch=10)
    assert [f(0), f(4), f(5), f(9), f(10), f(30)] == [0.2, 1.0, 1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]
    g = lr_lambda(TrainConfig(epochs=2, schedule="cosine"), steps_per_epoch=10)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.5) and g(20) == pytest.approx(0.0)


# --- CLI -------------------------------------------------------------------------------

@pytest.fixture
def small_data(monkeypatch):
    """Make every command's data.load return the 64-image bundle."""
    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_bundle())


@pytest.fixture
def tiny_ckpt(tmp_path):
    return checkpoint.save(tmp_path / "pruned.pt", tiny_model())


def test_recipe_is_overridden_by_flags_and_resolved_config_is_saved(tmp_path, tiny_ckpt, small_data, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 1\nbatch-size: 16\nlr: 0.2\nschedule: constant\nmilestones: [5, 9]\n")
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(tiny_ckpt), "--config", str(recipe), "--lr", "0.03",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["lr"] == 0.03 and resolved["batch_size"] == 16 and resolved["schedule"] == "constant"
    assert resolved["milestones"] == [5, 9] and resolved["epochs"] == 1 and resolved["momentum"] == 0.9
    rows = epoch_rows(out / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["lr"] == 0.03
    assert {"last.pt", "best.pt", "summary.json"} <= {p.name for p in out.iterdir()}
    assert "test top-1" in capsys.readouterr().out
    # the resolved file is itself a valid recipe
    from compressor.jobs import options as recipe
    from compressor.cli import get_args_parser

    again = recipe.resolve(get_args_parser().parse_args(["finetune", "--config", str(out / "resolved_config.yaml")]))
    assert (again.lr, again.batch_size, again.schedule, again.epochs) == (0.03, 16, "constant", 1)
    # --resume alone takes the run's own options (lr 0.03, constant, batch 16), --epochs extends it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["finetune", "--resume", str(out / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert not [w for w in caught if "changed settings" in str(w.message)]
    rows = epoch_rows(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["lr"] == 0.03
    text = (out / "resolved_config.yaml").read_text()
    assert "changed options: epochs" in text
    resolved = yaml.safe_load(text)
    assert (resolved["epochs"], resolved["lr"], resolved["batch_size"], resolved["milestones"]) == (2, 0.03, 16, [5, 9])


class Stop(Exception):
    pass


@pytest.mark.parametrize("cmd", ["finetune", "train"])
def test_cli_resume_alone_repeats_the_run_exactly(tmp_path, tiny_ckpt, monkeypatch, cmd):
    """2 epochs with non-default options == 1 epoch, interrupted, then ``--resume last.pt`` and no other flag."""
    import compressor.commands.train as train_cmd
    from compressor import models

    loads = []

    def load(name, root=None, **kw):
        loads.append((name, root, kw.get("val_size"), kw.get("seed")))
        return tiny_bundle(augment=True)

    monkeypatch.setattr(data, "load", load)
    real = models.get_model
    monkeypatch.setattr(models, "get_model", lambda name, num_classes=10, cfg=None, **k: real(
        name, num_classes=num_classes, cfg=cfg or list(CFG), **k))
    src = ["--model", "vgg16_bn"] if cmd == "train" else ["--checkpoint", str(tiny_ckpt)]
    flags = [*src, "--epochs", "2", "--lr", "0.03", "--batch-size", "16", "--schedule", "multistep", "--milestones",
             "1", "--gamma", "0.5", "--momentum", "0.8", "--no-nesterov", "--weight-decay", "1e-3",
             "--label-smoothing", "0.1", "--seed", "3", "--val-size", "7", "--data-root", str(tmp_path / "d"),
             "--device", "cpu", "--no-progress"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([cmd, *flags, "--out", str(whole)]) == 0

    def stop(row, epochs):
        raise Stop

    fmt = train_cmd._fmt
    monkeypatch.setattr(train_cmd, "_fmt", stop)
    with pytest.raises(Stop):
        main([cmd, *flags, "--out", str(cut)])
    monkeypatch.setattr(train_cmd, "_fmt", fmt)
    assert len(epoch_rows(cut / "metrics.jsonl")) == 1
    resolved = (cut / "resolved_config.yaml").read_bytes()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([cmd, "--resume", str(cut / "last.pt")]) == 0
    assert not [str(w.message) for w in caught if "changed settings" in str(w.message)]
    assert len(set(loads)) == 1 and loads[0] == ("digits", str(tmp_path / "d"), 7, 3)  # the same data every time
    for name in ("last.pt", "best.pt"):
        a, b = checkpoint.load(whole / name)[0], checkpoint.load(cut / name)[0]
        assert same_weights(a, b), name
    ts = [torch.load(d / "last.pt", weights_only=True)["extra"]["train_state"] for d in (whole, cut)]
    assert ts[0]["config"] == ts[1]["config"] and ts[1]["epoch"] == 2
    assert (ts[1]["config"]["schedule"], ts[1]["config"]["batch_size"]) == ("multistep", 16)
    strip = [[{k: v for k, v in json.loads(ln).items() if k != "img_per_s"}
              for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, cut)]
    assert strip[0] == strip[1]
    assert (cut / "resolved_config.yaml").read_bytes() == resolved  # not rewritten
    docs = [{k: v for k, v in yaml.safe_load((d / "resolved_config.yaml").read_text()).items() if k != "out"}
            for d in (whole, cut)]
    assert docs[0] == docs[1]

    # flags typed with --resume win; one that breaks exactness says so
    with pytest.warns(UserWarning) as rec:
        assert main([cmd, "--resume", str(cut / "last.pt"), "--epochs", "3", "--batch-size", "8",
                     "--val-size", "5"]) == 0
    said = " | ".join(str(w.message) for w in rec)
    for words in ("changed settings (batch_size 16 -> 8)", "changed settings (val_size 7 -> 5)",
                  "steps per epoch changed (4 -> 8)"):
        assert words in said
    assert loads[-1][2] == 5
    doc = yaml.safe_load((cut / "resolved_config.yaml").read_text())
    assert (doc["epochs"], doc["batch_size"], doc["lr"], doc["val_size"]) == (3, 8, 0.03, 5)
    assert "changed options: batch_size, epochs, val_size" in (cut / "resolved_config.yaml").read_text()


def test_cli_resume_needs_a_training_state(tmp_path, tiny_ckpt, capsys):
    assert main(["finetune", "--resume", str(tiny_ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no training state to resume from" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_unwritable_out_fails_before_training(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    import compressor.commands.train as train_cmd

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(train_cmd, "run_training", lambda *a, **k: pytest.fail("trained before checking --out"))
    assert main(["finetune", "--checkpoint", str(tiny_ckpt), "--out", str(blocker / "ft"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write here" in err[0]


@pytest.mark.parametrize("text,match", [
    ("lrr: 0.1\n", "unknown key 'lrr' (did you mean: lr"),
    ("epochs: many\n", "epochs: must be an integer"),
    ("schedule: linear\n", "schedule: 'linear' is not one of"),
    ("nesterov: 3\n", "nesterov: must be true or false"),
    ("- 1\n", "a recipe is a mapping"),
])
def test_bad_recipe_is_one_line_exit_2(tmp_path, tiny_ckpt, capsys, text, match):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "never"
    assert main(["finetune", "--checkpoint", str(tiny_ckpt), "--config", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "bad.yaml" in err[0]
    assert not out.exists()


def test_cli_nonfinite_loss_is_one_line_nonzero_exit(tmp_path, tiny_ckpt, small_data, capsys):
    code = main(["finetune", "--checkpoint", str(tiny_ckpt), "--epochs", "1", "--batch-size", "16", "--lr", "1e30",
                 "--out", str(tmp_path / "ft"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == NonFiniteLossError.exit_code != 0
    assert len(err) == 1 and "NaN/inf" in err[0]


def test_cli_train_with_teacher(tmp_path, small_data, monkeypatch, capsys):
    import compressor.models as models

    teacher = checkpoint.save(tmp_path / "teacher.pt", tiny_model(seed=3))
    real = models.get_model
    monkeypatch.setattr(models, "get_model", lambda name, num_classes=10, cfg=None, **k: real(
        name, num_classes=num_classes, cfg=cfg or list(CFG), **k))
    assert main(["train", "--model", "vgg16_bn", "--config", str(ROOT / "experiments/recipes/digits_quick.yaml"),
                 "--epochs", "1", "--batch-size", "16", "--teacher", str(teacher), "--out", str(tmp_path / "t"),
                 "--device", "cpu", "--no-progress"]) == 0
    ck = torch.load(tmp_path / "t" / "best.pt", weights_only=True)
    assert ck["provenance"]["teacher"] == str(teacher) and ck["provenance"]["train"]["kd_alpha"] == 0.5
    assert "test" in ck["metrics"]  # evaluated after selection, for the report only


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_resolve(path):
    from compressor.jobs import options as recipe
    from compressor.cli import get_args_parser
    from compressor.commands.train import train_config

    for cmd in (["train", "--model", "vgg16_bn"], ["finetune", "--checkpoint", "x.pt"]):
        args = recipe.resolve(get_args_parser().parse_args([*cmd, "--config", str(path)]))
        cfg = train_config(args)
        assert cfg.epochs == yaml.safe_load(path.read_text())["epochs"]


def test_best_pt_is_weights_only_and_last_pt_the_resume_point(tmp_path, capsys):
    """Issue 23: best.pt carried the optimizer state (twice the model's size); now only last.pt does."""
    model = tiny_model()
    fit(model, tiny_bundle(), TrainConfig(epochs=1, batch_size=16), progress=False, out_dir=tmp_path)
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    bts = torch.load(best, weights_only=True)["extra"]["train_state"]
    lts = torch.load(last, weights_only=True)["extra"]["train_state"]
    assert not {"optimizer", "scheduler", "scaler"} & set(bts)
    assert lts["optimizer"]["state"] and {"optimizer", "scheduler", "scaler"} <= set(lts)
    assert bts["epoch"] == lts["epoch"] == 1 and bts["history"] == lts["history"]  # the plain record stays
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert best.stat().st_size < last.stat().st_size - params // 2  # no momentum buffers in best.pt
    net, ck = checkpoint.load(best, strict_finite=True)
    assert same_weights(net, model) and ck["metrics"]["val_acc"] == lts["history"][-1]["val_acc"]
    # best.pt is not a resume point: refused in one line, pointing at last.pt
    with pytest.raises(Exception, match="no training state to resume from.*last.pt"):
        fit(tiny_model(), tiny_bundle(), TrainConfig(epochs=2, batch_size=16), progress=False, resume=best)
