"""train.py and its LightningCLI (alignsam/cli.py): a tiny run from a task config, --print_config of
every task config, and the errors a misconfigured run must stop with before training."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import yaml

from alignsam.cli import main
from alignsam.metrics import HEADLINE_METRICS

ROOT = Path(__file__).resolve().parents[1]
# every training config (conf/scenes/matcher_tiny.yaml is a matcher's options, conf/**/_*.yaml are bases)
TASK_CONFIGS = sorted(p for p in [*ROOT.glob("conf/*.yaml"), *ROOT.glob("conf/scenes/*.yaml")]
                      if not p.name.startswith("_") and "model" in (yaml.safe_load(p.read_text()) or {}))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and ``sys.argv[1:]`` (pytest's own) are given."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


def tiny_overrides(tmp_path: Path) -> list:
    """Dotted overrides that shrink a bundled-world config to seconds and keep its files under tmp_path."""
    return [
        "--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--model.env.steps=2", "--model.env.grid=4", "--model.ppo.epochs=2",
        f"--model.feature_cache={tmp_path / 'cache'}",
        "--data.init_args.train_size=8", "--data.init_args.val_size=4", "--data.init_args.batch_size=4",
    ]


def run_cli(args: list, capsys) -> str:
    """``main(args)``; returns the error text (exception and stderr) of a run that must fail."""
    with pytest.raises((Exception, SystemExit)) as failure:
        main(args)
    if isinstance(failure.value, SystemExit):
        assert failure.value.code not in (0, None), "the run was expected to fail"
    return f"{failure.value}\n{capsys.readouterr().err}"


def test_train_py_runs_a_tiny_scene_config_and_writes_the_run_directory(tmp_path, monkeypatch, capsys):
    argv = ["train.py", "--config", str(ROOT / "conf/scenes/saliency.yaml"), *tiny_overrides(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)  # train.py adds the 'fit' subcommand
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    out = capsys.readouterr().out

    run_dir = tmp_path / "logs" / "saliency" / "version_0"  # logger name: ${model.task}, resolved
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert "${" not in (run_dir / "config.yaml").read_text()
    assert config["trainer"]["logger"]["init_args"]["name"] == "saliency"
    assert config["data"]["init_args"]["task"] == "saliency"
    assert config["model"]["env"]["steps"] == 2 and config["data"]["init_args"]["train_size"] == 8

    ids = [line for line in (run_dir / "fewshot_ids.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(ids) == 8 and all(i.startswith("saliency-") for i in ids)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # --precompute (on by default) embedded the 8 training and 4 validation scenes before training
    assert len(list((tmp_path / "cache").rglob("*.feat"))) == 12

    table = out[out.index("| strategy |"):]
    header = table.splitlines()[0]
    assert all(metric in header for metric in HEADLINE_METRICS["saliency"])
    for strategy in ("agent", "centre", "random"):
        assert f"| {strategy} |" in table


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "conf")))
def test_print_config_works_for_every_task_config(config, capsys):
    """Printing parses and resolves the config only: the real checkpoints and data need not exist."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "${" not in printed
    resolved = yaml.safe_load(printed)
    task = yaml.safe_load(config.read_text())["model"]["task"]
    assert resolved["model"]["task"] == task
    assert resolved["model"]["segmenter"]["checkpoint"]
    if resolved["data"]["class_path"].endswith("SceneDataModule"):
        assert resolved["data"]["init_args"]["task"] == task


def test_explicit_policy_without_matcher_fails_naming_model_matcher(tmp_path, capsys):
    args = ["fit", "--config", str(ROOT / "conf/scenes/shadow.yaml"), *tiny_overrides(tmp_path),
            "--model.policy.variant=explicit", "--model.matcher=null"]
    assert "model.matcher" in run_cli(args, capsys)
    assert not (tmp_path / "logs").exists()


def test_missing_sam_checkpoint_fails_naming_the_path_before_training(tmp_path, capsys):
    missing = tmp_path / "absent" / "sam_vit_b_01ec64.pth"
    args = ["fit", "--config", str(ROOT / "conf/scenes/saliency.yaml"), *tiny_overrides(tmp_path),
            f"--model.segmenter.checkpoint={missing}"]
    assert str(missing) in run_cli(args, capsys)
    assert not (tmp_path / "logs").exists() and not list(tmp_path.rglob("*.ckpt"))
    assert not list(tmp_path.rglob("*.feat"))
