"""Per-model training defaults live in one YAML table, and every command reads it."""

from __future__ import annotations

from compressor.models import finetune_lr
from compressor.jobs.pipeline import PruneJob, quick_baseline_config
from compressor.models import get_model
from compressor.training.recipe import model_recipe


def test_the_table_resolves_exact_then_prefix_then_defaults() -> None:
    assert finetune_lr("squeezenet1_1") == 0.002 and finetune_lr("squeezenet1_0_imagenet") == 0.002
    assert finetune_lr("vgg16_bn") == 0.01 and finetune_lr("torchvision:resnet18") == 0.01
    assert model_recipe("mobilenet_v2_res")["quick_baseline"]["epochs"] == 6
    assert model_recipe("torchvision:resnet18")["source"] == "models.yaml:defaults"


def test_prune_quick_baseline_comes_from_the_table() -> None:
    cfg = quick_baseline_config(get_model("squeezenet1_1"), PruneJob(model="squeezenet1_1", rates="r.yaml"))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.warmup_epochs) == (15, 0.01, 32, 2)
    cfg = quick_baseline_config(get_model("vgg16_bn"), PruneJob(model="vgg16_bn", rates="r.yaml", baseline_epochs=1))
    assert (cfg.epochs, cfg.lr) == (1, 0.02)


def test_finetune_without_lr_takes_the_models(tmp_path, capsys) -> None:
    from compressor.storage import checkpoint
    from compressor.cli import main

    m = get_model("squeezenet1_1", cfg=[max(4, c // 8) for c in get_model("squeezenet1_1").cfg])
    ck = checkpoint.save(tmp_path / "s.pt", m)
    assert main(["finetune", "--checkpoint", str(ck), "--epochs", "0", "--out", str(tmp_path / "ft"),
                 "--no-progress"]) == 0
    assert "fine-tune lr 0.002 (models.yaml:squeezenet" in capsys.readouterr().out


def test_finetune_warms_up_unless_a_flag_or_the_recipe_says_otherwise(tmp_path, capsys) -> None:
    import yaml

    from compressor.storage import checkpoint
    from compressor.cli import main

    m = get_model("squeezenet1_1", cfg=[max(4, c // 8) for c in get_model("squeezenet1_1").cfg])
    ck = checkpoint.save(tmp_path / "s.pt", m)

    def run(name: str, *extra: str) -> tuple[float, str]:
        capsys.readouterr()
        assert main(["finetune", "--checkpoint", str(ck), "--epochs", "0", "--out",
                     str(tmp_path / name), "--no-progress", *extra]) == 0
        resolved = yaml.safe_load((tmp_path / name / "resolved_config.yaml").read_text())
        return resolved["warmup_epochs"], capsys.readouterr().out

    warm, out = run("default")
    assert warm == 0.1 and "fine-tune warm-up 0.1 epochs (models.yaml:squeezenet" in out
    warm, out = run("typed", "--warmup-epochs", "0")
    assert warm == 0 and "warm-up" not in out
    (tmp_path / "r.yaml").write_text("lr: 0.003\nwarmup_epochs: 2\n")
    warm, out = run("recipe", "--config", str(tmp_path / "r.yaml"))
    assert warm == 2 and "warm-up" not in out and "fine-tune lr" not in out
    (tmp_path / "lr_only.yaml").write_text("lr: 0.003\n")  # what the recipe leaves out, the model fills
    warm, out = run("lr_only", "--config", str(tmp_path / "lr_only.yaml"))
    assert warm == 0.1 and "fine-tune lr" not in out


def test_prune_and_sweep_fine_tunes_take_the_models_warm_up_unless_typed(tmp_path, monkeypatch) -> None:
    """The CLI's jobs carry the warm-up: the model's (models.yaml) by default, the typed flag otherwise."""
    from compressor.cli import main
    from compressor.jobs import pipeline, sweep
    from compressor.storage import checkpoint

    jobs: list = []

    def stop(job, *a, **k):
        jobs.append(job)
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "run_prune", stop)
    monkeypatch.setattr(sweep, "run_sweep", stop)
    ck = checkpoint.save(tmp_path / "s.pt", get_model("squeezenet1_1", cfg=[max(4, c // 8) for c in
                                                                            get_model("squeezenet1_1").cfg]))
    for extra in ([], ["--warmup-epochs", "0"], ["--warmup-epochs", "2"]):
        for cmd in (["prune", "--checkpoint", str(ck), "--macs", "0.5", "--finetune-epochs", "1"],
                    ["sweep", "--checkpoint", str(ck), "--macs", "0.5"]):
            try:
                main(cmd + extra + ["--out", str(tmp_path / "o")])
            except SystemExit:
                pass
    prune_jobs, sweep_jobs = jobs[0::2], jobs[1::2]
    assert [j.finetune.warmup_epochs for j in prune_jobs] == [0.1, 0, 2]
    assert [(j.model_warmup, j.finetune.warmup_epochs) for j in sweep_jobs] == [(True, 0.0), (False, 0), (False, 2)]
