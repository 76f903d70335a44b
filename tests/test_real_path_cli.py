"""What a user of train.py / evaluate.py meets outside the happy path (issue 12): one-line errors
found before any model is built, checkpoints that are not what they claim, an evaluate config that
does not fit its checkpoint, commands run from another folder, a run whose last epoch is not a
validation epoch, and two-process DDP to the final table."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignsam.cli import evaluate_main, main
from alignsam.module import AlignSAM

ROOT = Path(__file__).resolve().parents[1]
SALIENCY = str(ROOT / "conf/scenes/saliency.yaml")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


def tiny(tmp_path: Path, epochs: int = 1, validate_every: int = 1) -> list:
    return [
        "--trainer.accelerator=cpu", f"--trainer.max_epochs={epochs}",
        f"--trainer.check_val_every_n_epoch={validate_every}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--model.env.steps=2", "--model.env.grid=4", "--model.ppo.epochs=1",
        f"--model.feature_cache={tmp_path / 'cache'}",
        "--data.init_args.train_size=4", "--data.init_args.val_size=2", "--data.init_args.test_size=4",
        "--data.init_args.batch_size=2",
    ]


def one_line_error(run, capsys) -> str:
    """Run a command that must fail as the user's mistake: exit 2, no traceback, one ``error:`` line."""
    with pytest.raises(SystemExit) as failure:
        run()
    err = capsys.readouterr().err
    assert failure.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny saliency run (1 epoch), trained once for the tests below."""
    tmp = tmp_path_factory.mktemp("run")
    old = sys.argv
    sys.argv = ["train.py"]
    try:
        main(["fit", "--config", SALIENCY, *tiny(tmp)])
    finally:
        sys.argv = old
    return tmp / "logs" / "saliency" / "version_0"


# -- errors: one line, exit 2, before anything is built --------------------------------------------
def test_no_config_says_which_config_to_pass(capsys):
    line = one_line_error(lambda: main(["fit"]), capsys)
    assert "--config conf/" in line


def test_a_misspelt_key_suggests_the_nearest_valid_one(tmp_path, capsys):
    line = one_line_error(lambda: main(["fit", "--config", SALIENCY, "--model.srmm.threshold=0.3"]), capsys)
    assert "--model.srmm.threshold" in line and "did you mean --model.srm.threshold?" in line


def test_a_dataset_error_is_one_line_naming_the_config_key(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    line = one_line_error(lambda: main(["fit", "--config", str(ROOT / "conf/voc.yaml"),
                                        f"--data.init_args.root={missing}"]), capsys)
    assert "data.root" in line and str(missing) in line


def test_an_out_of_range_knob_is_one_line(tmp_path, capsys):
    line = one_line_error(lambda: main(["fit", "--config", SALIENCY, *tiny(tmp_path), "--model.srm.threshold=2.0"]), capsys)
    assert "model.srm.threshold" in line
    assert not (tmp_path / "logs").exists()


def test_the_traceback_is_shown_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNSAM_TRACEBACK", "1")
    with pytest.raises(Exception, match="model.srm.threshold"):
        main(["fit", "--config", SALIENCY, *tiny(tmp_path), "--model.srm.threshold=2.0"])


def _bad_checkpoints(tmp_path: Path) -> dict:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"task": "saliency"}}, good)
    data = good.read_bytes()
    files = {
        "missing": tmp_path / "absent.ckpt",
        "empty": tmp_path / "empty.ckpt",
        "truncated": tmp_path / "truncated.ckpt",
        "random": tmp_path / "random.ckpt",
        "sam": tmp_path / "sam_vit_b_01ec64.pth",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"].write_bytes(os.urandom(4096))
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, files["sam"])
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "sam"])
def test_a_bad_resume_checkpoint_is_named_before_any_work(kind, tmp_path, capsys):
    ckpt = _bad_checkpoints(tmp_path)[kind]
    line = one_line_error(lambda: main(["fit", "--config", SALIENCY, *tiny(tmp_path), f"--ckpt_path={ckpt}"]), capsys)
    assert str(ckpt) in line and "--ckpt_path" in line
    if kind == "sam":
        assert "SAM weights file" in line
    # found before the precompute and before the run folder exists
    assert not (tmp_path / "logs").exists() and not list(tmp_path.rglob("*.feat"))


@pytest.mark.parametrize("kind", ["empty", "random", "sam"])
def test_evaluate_names_a_bad_checkpoint(kind, tmp_path, capsys):
    ckpt = _bad_checkpoints(tmp_path)[kind]
    line = one_line_error(lambda: evaluate_main(["--config", SALIENCY, "--ckpt_path", str(ckpt)]), capsys)
    assert str(ckpt) in line


# -- evaluate.py and its checkpoint ----------------------------------------------------------------
def test_evaluate_refuses_a_config_of_another_task(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    line = one_line_error(lambda: evaluate_main(["--config", str(ROOT / "conf/scenes/shadow.yaml"),
                                                 "--ckpt_path", str(ckpt)]), capsys)
    assert "model.task is 'shadow' in the config but 'saliency' in the checkpoint" in line
    assert not (run_dir / "evaluation").exists()


def test_evaluate_defaults_to_the_runs_own_config(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    evaluate_main(["--ckpt_path", str(ckpt), "--strategies", "[agent, centre]", "--trainer.enable_progress_bar=false"])
    table = (run_dir / "evaluation" / "test.md").read_text()
    assert "saliency" in table.splitlines()[0]
    # the run's config.yaml holds test_size 4: the run's own data, not conf/'s 200 test scenes
    assert (run_dir / "evaluation" / "test.csv").is_file()
    assert "| AlignSAM agent |" in table


def test_predict_runs_from_another_folder_and_takes_segmenter_checkpoint(run_dir, tmp_path, monkeypatch, capsys):
    """The checkpoint stores checkpoints/tiny_sam.pt (relative): it resolves from any folder; and
    --segmenter_checkpoint replaces it (it was a TypeError)."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / "a.png")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert AlignSAM.load_from_checkpoint  # the stored path is relative:
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["segmenter"]["checkpoint"]
    assert not Path(stored).is_absolute()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        evaluate_main(["predict", "--ckpt_path", str(ckpt), "--images", str(images), "--out", str(tmp_path / "out")])
    assert done.value.code == 0
    assert (tmp_path / "out" / "masks" / "a.png").is_file()
    with pytest.raises(SystemExit) as done:
        evaluate_main(["predict", "--ckpt_path", str(ckpt), "--images", str(images), "--out", str(tmp_path / "out2"),
                       "--segmenter_checkpoint", str(ROOT / "checkpoints/tiny_sam.pt")])
    assert done.value.code == 0
    assert (tmp_path / "out2" / "masks" / "a.png").is_file()
    line = one_line_error(lambda: evaluate_main(
        ["predict", "--ckpt_path", str(ckpt), "--images", str(images), "--out", str(tmp_path / "out3"),
         "--segmenter_checkpoint", "absent/tiny_sam.pt"]), capsys)
    assert "absent/tiny_sam.pt" in line and str(tmp_path) in line  # names the working directory


# -- the end of a run --------------------------------------------------------------------------------
def test_last_checkpoint_after_every_epoch_and_a_final_validation(tmp_path, monkeypatch, capsys):
    """check_val_every_n_epoch=5 with 2 epochs: last.ckpt exists after epoch 1 already (a crash in
    epoch 2 loses one epoch, not the run), and the final weights are validated and tabled."""
    seen = {}
    original = AlignSAM.on_train_epoch_start

    def probe(self):
        if self.current_epoch == 1:
            last = Path(self.trainer.checkpoint_callback.dirpath) / "last.ckpt"
            seen["epoch_of_last"] = torch.load(last, map_location="cpu", weights_only=True)["epoch"] if last.is_file() else None
        return original(self)

    monkeypatch.setattr(AlignSAM, "on_train_epoch_start", probe)
    main(["fit", "--config", SALIENCY, *tiny(tmp_path, epochs=2, validate_every=5)])
    out = capsys.readouterr().out
    assert seen["epoch_of_last"] == 0
    assert "Validation ran never" in out and "validating the final weights (epoch 2)" in out
    assert "Validation (saliency, after epoch 2)" in out and "| agent |" in out
    assert "next: python evaluate.py --ckpt_path" in out


def test_two_process_ddp_train_py_reaches_its_final_table(tmp_path):
    """Both ranks run after_fit; rank 0 alone asking for trainer.log_dir (a broadcast) used to end
    the run with gloo's 'Connection closed by peer' and exit 1."""
    args = [sys.executable, str(ROOT / "train.py"), "--config", SALIENCY, *tiny(tmp_path),
            "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1", ALIGNSAM_TEST_THREADS="1")
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| agent |" in done.stdout and "Validation (saliency, after epoch 1)" in done.stdout
    assert (tmp_path / "logs" / "saliency" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_train_py_script_turns_user_errors_into_one_line(tmp_path):
    """Through the script itself, as a user types it: stderr ends in one error line."""
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "conf/voc.yaml"),
                           f"--data.init_args.root={tmp_path / 'voc'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: [data.root]")


def test_runpy_train_py_without_args_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as failure:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert failure.value.code == 2
    assert "no config given" in capsys.readouterr().err


def test_train_py_help_is_fits_and_other_subcommands_are_pointed_to_evaluate_py():
    helped = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--trainer.max_epochs" in helped.stdout  # fit's own options
    assert "{fit,validate,test,predict}" not in helped.stdout
    wrong = subprocess.run([sys.executable, str(ROOT / "train.py"), "predict"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "evaluate.py predict" in wrong.stderr
    ev = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0 and "evaluate.py predict" in ev.stdout
