"""Learning curves: reading TensorBoard event files and drawing the figures of docs/results.md."""
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from alignsam.evaluation import curves  # noqa: E402
from alignsam.metrics import HEADLINE_METRICS  # noqa: E402

BATCHES_PER_EPOCH = 5
EPOCHS = 4


def write_scalars(run_dir: Path, scalars: dict, suffix: str = "") -> None:
    """One event file in ``run_dir``: ``{tag: [(step, value) or (step, value, wall_time)]}``."""
    writer = SummaryWriter(str(run_dir), filename_suffix=suffix)
    for tag, points in scalars.items():
        for point in points:
            step, value = point[:2]
            writer.add_scalar(tag, value, step, walltime=point[2] if len(point) > 2 else None)
    writer.close()


def fake_run(run_dir: Path, seed: int, task: str = "blur", centre: float = 0.3, random: float = 0.1) -> dict:
    """A run shaped like AlignSAMModule's logs: 4 epochs of 5 PPO iterations, validation every 2 epochs."""
    rng = np.random.default_rng(seed)
    steps = range(EPOCHS * BATCHES_PER_EPOCH)
    val_steps = [2 * BATCHES_PER_EPOCH - 1, 4 * BATCHES_PER_EPOCH - 1]
    scalars = {
        "train/final_iou": [(s, float(v)) for s, v in zip(steps, rng.uniform(0, 1, len(steps)))],
        "epoch": [(s, float(s // BATCHES_PER_EPOCH)) for s in steps],
        "val/miou_fgbg": [(s, 0.5 + 0.1 * i + 0.01 * seed) for i, s in enumerate(val_steps)],
        "val/final_iou_low_res": [(s, 0.4 + 0.1 * i) for i, s in enumerate(val_steps)],
        "val_centre/miou_fgbg": [(s, centre) for s in val_steps],
        "val_random/miou_fgbg": [(s, random) for s in val_steps],
    }
    write_scalars(run_dir, scalars)
    (run_dir / "hparams.yaml").write_text(f"task: {task}\nseed: {seed}\n")
    return scalars


def lines_by_gid(fig) -> dict:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


# -- reading --------------------------------------------------------------------------------------
def test_read_scalars_merges_event_files_sorted_by_step(tmp_path):
    # The second file holds the earlier steps; step 3 is in both and the value with the later wall
    # time wins (0.25 from the first file), whichever file is read last.
    write_scalars(tmp_path, {"train/final_iou": [(3, 0.25, 300.0), (4, 0.5, 300.0), (5, 0.75, 300.0)]}, suffix=".a")
    write_scalars(tmp_path, {"train/final_iou": [(0, 0.125, 200.0), (1, 0.0, 200.0), (3, 1.0, 200.0)],
                             "train/return": [(0, -1.0)]}, suffix=".b")
    assert len(curves.event_files(tmp_path)) == 2
    assert curves.read_scalars(tmp_path, "train/final_iou") == [(0, 0.125), (1, 0.0), (3, 0.25), (4, 0.5), (5, 0.75)]
    assert curves.read_scalars(tmp_path, "train/return") == [(0, -1.0)]


def test_read_scalars_keeps_every_point(tmp_path):
    # EventAccumulator's default keeps a 1000-point reservoir sample of each scalar tag.
    values = [(s, s / 4096) for s in range(3000)]
    write_scalars(tmp_path, {"x": values})
    assert curves.read_scalars(tmp_path, "x") == values


def test_read_scalars_unknown_tag_lists_the_available_ones(tmp_path):
    write_scalars(tmp_path, {"train/final_iou": [(0, 0.5)], "val/miou_fgbg": [(0, 0.5)]})
    with pytest.raises(KeyError) as info:
        curves.read_scalars(tmp_path, "val/miou")
    message = str(info.value)
    assert "'val/miou'" in message and str(tmp_path) in message
    assert "available tags: train/final_iou, val/miou_fgbg" in message


def test_read_scalars_without_event_files_names_the_directory(tmp_path):
    (tmp_path / "hparams.yaml").write_text("task: blur\n")
    with pytest.raises(FileNotFoundError, match=f"no TensorBoard event files .* in {re.escape(str(tmp_path))}"):
        curves.read_scalars(tmp_path, "train/final_iou")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path / 'missing'))} does not exist"):
        curves.read_scalars(tmp_path / "missing", "train/final_iou")


def test_read_run_collects_curves_baselines_and_label(tmp_path):
    scalars = fake_run(tmp_path, seed=3, centre=0.3, random=0.1)
    run = curves.read_run(tmp_path, "miou_fgbg")
    assert run.label == "seed 3"
    assert run.val_iou_tag == "val/final_iou_low_res"
    pairs = ((run.train, "train/final_iou"), (run.val, "val/miou_fgbg"), (run.val_iou, "val/final_iou_low_res"))
    for got, tag in pairs:
        assert [s for s, _ in got] == [s for s, _ in scalars[tag]]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in scalars[tag]], rtol=1e-6)  # stored as float32
    assert run.baselines == pytest.approx({"centre": 0.3, "random": 0.1})
    assert curves.read_run(tmp_path, "miou_fgbg", label="mine").label == "mine"
    with pytest.raises(KeyError, match="val/fbeta_max"):
        curves.read_run(tmp_path, "fbeta_max")


def test_validation_iou_falls_back_to_the_last_click_of_the_iou_curve(tmp_path):
    # Runs after the evaluation refactor log val_iou_curve/step_NN (NN = prompts) instead.
    write_scalars(tmp_path, {"train/final_iou": [(0, 0.1)], "val/miou_fgbg": [(0, 0.5)],
                             "val_iou_curve/step_02": [(0, 0.25)], "val_iou_curve/step_09": [(0, 0.5)],
                             "val_iou_curve/step_10": [(0, 0.75)]})
    run = curves.read_run(tmp_path, "miou_fgbg")
    assert run.val_iou_tag == "val_iou_curve/step_10" and run.val_iou == [(0, 0.75)]
    assert curves.validation_iou_tag(["val/final_iou_low_res", "val_iou_curve/step_03"]) == "val/final_iou_low_res"
    assert curves.validation_iou_tag(["train/final_iou", "val_iou_curve/step_x"]) is None


# -- helpers --------------------------------------------------------------------------------------
def test_moving_average_is_trailing_with_short_windows_at_the_start():
    np.testing.assert_allclose(curves.moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(curves.moving_average([1, 2, 6], 5), [1, 1.5, 3])
    np.testing.assert_allclose(curves.moving_average([4, 2], 1), [4, 2])
    with pytest.raises(ValueError, match="window"):
        curves.moving_average([1.0], 0)


def test_epoch_ends_counts_iterations_per_epoch():
    # Lightning logs `epoch` at every batch and again at an epoch's end (same step, same value).
    epochs = [(s, float(s // 7)) for s in range(21)] + [(6, 0.0), (13, 1.0), (20, 2.0)]
    assert curves.epoch_ends(sorted(epochs)) == [7, 14, 21]
    assert curves.epoch_ends([]) == []


# -- plotting -------------------------------------------------------------------------------------
def test_plot_draws_the_input_at_step_plus_one(tmp_path):
    runs = []
    for seed in (0, 1):
        fake_run(tmp_path / f"version_{seed}", seed)
        runs.append(curves.read_run(tmp_path / f"version_{seed}", "miou_fgbg"))
    fig = curves.plot_learning_curves(runs, "miou_fgbg", title="blur", smooth=3)
    lines = lines_by_gid(fig)
    for i, run in enumerate(runs):
        steps, values = np.array(run.train).T
        np.testing.assert_array_equal(lines[f"train_raw/{i}"].get_xdata(), steps + 1)
        np.testing.assert_allclose(lines[f"train_raw/{i}"].get_ydata(), values)
        np.testing.assert_allclose(lines[f"train_smooth/{i}"].get_ydata(), curves.moving_average(values, 3))
        val_steps, val_values = np.array(run.val).T
        np.testing.assert_array_equal(lines[f"val/{i}"].get_xdata(), [10, 20])  # after epochs 2 and 4
        np.testing.assert_allclose(lines[f"val/{i}"].get_ydata(), val_values)
        np.testing.assert_allclose(lines[f"val_iou/{i}"].get_ydata(), [0.4, 0.5])
    # Both runs share the baselines: one line each, at the logged value.
    assert {g for g in lines if g.startswith("baseline")} == {"baseline_centre", "baseline_random"}
    np.testing.assert_allclose(lines["baseline_centre"].get_ydata(), [0.3, 0.3])
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["seed 0: agent (greedy clicks)", "seed 1: agent (greedy clicks)", "centre click", "random clicks"]
    assert fig.axes[1].get_xlabel() == "PPO iterations (training batches)"
    assert "blur" in [text.get_text() for text in fig.findobj(Text)]  # the title


def test_plot_draws_baselines_per_run_when_they_differ(tmp_path):
    fake_run(tmp_path / "a", 0, centre=0.3)
    fake_run(tmp_path / "b", 1, centre=0.2)
    runs = [curves.read_run(tmp_path / name, "miou_fgbg") for name in ("a", "b")]
    lines = lines_by_gid(curves.plot_learning_curves(runs, "miou_fgbg"))
    np.testing.assert_allclose(lines["baseline_centre/0"].get_ydata(), [0.3, 0.3])
    np.testing.assert_allclose(lines["baseline_centre/1"].get_ydata(), [0.2, 0.2])
    assert "baseline_random" in lines


def test_plot_without_baselines_or_epochs(tmp_path):
    write_scalars(tmp_path, {"train/final_iou": [(0, 0.1), (1, 0.2)], "val/categories_miou": [(1, 0.3)]})
    run = curves.read_run(tmp_path, "categories_miou")
    fig = curves.plot_learning_curves([run], "categories_miou")
    lines = lines_by_gid(fig)
    assert not any(g.startswith(("baseline", "val_iou")) for g in lines)
    np.testing.assert_array_equal(lines["val/0"].get_xdata(), [2])
    with pytest.raises(ValueError, match="at least one run"):
        curves.plot_learning_curves([], "miou_fgbg")


# -- command --------------------------------------------------------------------------------------
def test_command_writes_the_png_and_reports_what_it_read(tmp_path, capsys):
    for seed in (0, 1):
        fake_run(tmp_path / f"version_{seed}", seed)
    out = tmp_path / "images" / "curve_blur.png"
    written = curves.main(["--runs", str(tmp_path / "version_0"), str(tmp_path / "version_1"),
                           "--metric", "miou_fgbg", "--labels", "seed 0", "seed 1", "--out", str(out)])
    assert written == out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (round(curves.FIGSIZE[0] * curves.DPI), round(curves.FIGSIZE[1] * curves.DPI))
        pixels = np.asarray(image)
    assert (pixels != 255).any(axis=-1).mean() > 0.02  # something is drawn, not a blank page
    assert sorted(p.name for p in out.parent.iterdir()) == ["curve_blur.png"]  # no temporary file left
    printed = capsys.readouterr().out
    assert printed.count("train/final_iou: 20 points") == 2
    assert "val/miou_fgbg: 2 points, last 0.6100 at step 19 (PPO iteration 20)" in printed
    assert "val_centre/miou_fgbg: 0.3000" in printed
    assert "4 epochs, 5 PPO iterations in the first" in printed


def test_command_defaults_to_the_tasks_headline_metric(tmp_path, capsys):
    fake_run(tmp_path, seed=0, task="blur")
    curves.main(["--runs", str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert HEADLINE_METRICS["blur"][0] == "miou_fgbg"
    assert "val/miou_fgbg: 2 points" in capsys.readouterr().out
    (tmp_path / "hparams.yaml").write_text("seed: 0\n")
    with pytest.raises(ValueError, match="no --metric given .*hparams.yaml names no known task"):
        curves.main(["--runs", str(tmp_path), "--out", str(tmp_path / "c.png")])


def test_command_rejects_a_label_count_that_does_not_match(tmp_path):
    fake_run(tmp_path, seed=0)
    with pytest.raises(SystemExit):
        curves.main(["--runs", str(tmp_path), "--labels", "a", "b", "--out", str(tmp_path / "c.png")])
    assert not (tmp_path / "c.png").exists()
