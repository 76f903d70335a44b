"""evaluate.py end to end on the bundled world: a tiny agent is fitted for one epoch, then scored
against every strategy, its predictions saved, and run on a folder of new (partly broken) images.

The checks are about what each strategy does and what the command leaves behind, not about the
numbers of an agent trained for one epoch.
"""
from __future__ import annotations

import contextlib
import csv
import io
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alignsam.cli import evaluate_main
from alignsam.tasks import TASKS
from alignsam.evaluation.strategies import STRATEGIES, BatchContext, default_strategies
from alignsam.geometry import sam_to_original_points
from alignsam.metrics import HEADLINE_METRICS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_module import tiny_data, tiny_model, tiny_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ORACLE_CLICKS = 4


@pytest.fixture(scope="module", params=["saliency", "categories"], ids=["implicit-saliency", "explicit-categories"])
def trained(request, tmp_path_factory):
    """(task, model, checkpoint path) after a one-epoch fit; the checkpoint sits in ``<run>/checkpoints``."""
    task = request.param
    tmp = tmp_path_factory.mktemp(f"eval-{task}")
    L.seed_everything(0)
    model = tiny_model(task, tmp / "cache")
    tiny_trainer(1, tmp, callbacks=[ModelCheckpoint(dirpath=tmp / "run" / "checkpoints", save_last=True)]).fit(
        model, tiny_data(task))
    return task, model, tmp / "run" / "checkpoints" / "last.ckpt"


def run_evaluate(task: str, ckpt: Path, *extra: str) -> None:
    evaluate_main([
        "--config", str(ROOT / "conf" / "scenes" / f"{task}.yaml"), "--ckpt_path", str(ckpt),
        "--model.env.grid", "4",  # tiny_model's grid: evaluate.py refuses a config that differs from the checkpoint
        "--data.init_args.train_pool", "50", "--data.init_args.train_size", "8",
        "--data.init_args.val_size", "4", "--data.init_args.test_size", "4",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--oracle_clicks", str(ORACLE_CLICKS), *extra,
    ])


PRINTED = {}  # what evaluate.py printed, per task


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    task, _, ckpt = trained
    predictions = tmp_path_factory.mktemp(f"pred-{task}")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        run_evaluate(task, ckpt, "--save_predictions", str(predictions))
    PRINTED[task] = buffer.getvalue()
    return task, ckpt.parent.parent / "evaluation", predictions


def test_the_terminal_shows_the_tasks_own_metrics_headline_first(evaluated):
    """A compact table: the task's headline metrics first, its other own metrics, NoC@85 with the
    failure share; no metric of another task (saliency shows no BER); the full table is on disk."""
    task, directory, _ = evaluated
    printed = PRINTED[task]
    header = next(line for line in printed.splitlines() if "strategy" in line)
    shown = TASKS[task].headline + TASKS[task].shown
    positions = [header.index(m) for m in shown if m in header]
    assert positions == sorted(positions) and TASKS[task].headline[0] in header
    assert "ber_shadow" not in printed and "iou@1" not in header
    assert "AlignSAM agent" in printed and "oracle clicks" in printed
    if task == "saliency":
        assert "NoC@85 (fail)" in header and "%)" in printed
    assert f"every metric and click: {directory / 'test.md'}" in printed


def test_the_per_episode_csv_has_each_episodes_clicks_and_iou_curve(evaluated):
    task, directory, predictions = evaluated
    with open(predictions / "episodes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((predictions / "masks").glob("*.png")))
    first = rows[0]
    steps = 2  # tiny_model's T
    assert [k for k in first if k.startswith("iou@")] == [f"iou@{k}" for k in range(steps + 1)]
    clicks = first["clicks (x y label; ...)"].split("; ")
    assert len(clicks) == 2 + steps  # the SRM's two seed prompts, then T clicks
    x, y, label = clicks[0].split()
    assert 0 <= float(x) < 256 and 0 <= float(y) < 256 and label in ("0", "1")
    agent_curve = read_csv(directory / "test.csv")["agent"]
    mean_last = np.mean([float(r[f"iou@{steps}"]) for r in rows])
    assert mean_last == pytest.approx(float(agent_curve[f"iou@{steps}"]), abs=1e-5)


def read_csv(path: Path):
    with open(path) as f:
        return {row["strategy"]: row for row in csv.DictReader(f)}


def test_the_table_has_every_strategy_the_task_allows_with_its_metrics(evaluated):
    task, results, _ = evaluated
    rows = read_csv(results / "test.csv")
    expected = default_strategies(has_matcher=task == "categories")
    assert list(rows) == expected
    assert ("clip_surgery" in rows) == (task == "categories")  # CLIP Surgery points need the matcher
    for name, row in rows.items():
        for metric in HEADLINE_METRICS[task]:
            assert 0.0 <= float(row[metric]) <= 100.0, f"{name}/{metric} = {row[metric]!r}"
    # per-click IoU: the agent from its seeds (click 0) to T = 2; the oracle from 1 to --oracle_clicks
    assert all(rows["agent"][f"iou@{k}"] for k in range(3))
    assert all(rows["oracle"][f"iou@{k}"] for k in range(1, ORACLE_CLICKS + 1))
    assert rows["oracle"]["iou@0"] == "" and rows["centre"]["iou@1"] == ""
    assert 1.0 <= float(rows["oracle"]["noc@85"]) <= ORACLE_CLICKS
    assert 2.0 <= float(rows["agent"]["noc@90"]) <= 4.0  # 2 seed prompts + at most T = 2 clicks
    markdown = (results / "test.md").read_text()
    assert "| AlignSAM agent |" in markdown and "| oracle clicks |" in markdown
    assert f"iou@{ORACLE_CLICKS}" not in markdown.splitlines()[-12]  # the Markdown stops at click T


def test_the_agents_last_click_iou_is_its_per_image_iou(evaluated):
    """Two independent paths to the same number: the click curve's last point and the iou_fg metric."""
    task, results, _ = evaluated
    if task == "categories":
        pytest.skip("categories scores label maps; its click curve is per episode")
    agent = read_csv(results / "test.csv")["agent"]
    assert float(agent["iou@2"]) == pytest.approx(float(agent["iou_fg"]), abs=1e-5)


def test_the_table_is_in_tensorboard_next_to_the_run(evaluated):
    task, results, _ = evaluated
    events = EventAccumulator(str(results), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert "test/table/text_summary" in events.Tags()["tensors"]
    assert f"test_agent/{HEADLINE_METRICS[task][0]}" in events.Tags()["scalars"]
    assert f"test_oracle/{HEADLINE_METRICS[task][0]}" in events.Tags()["scalars"]


def test_scoring_the_validation_split_keeps_the_test_tables(evaluated):
    task, results, _ = evaluated
    test_csv = (results / "test.csv").read_text()
    run_evaluate(task, results.parent / "checkpoints" / "last.ckpt", "--data.init_args.test_split", "val",
                 "--strategies", "[agent, no_rl]")
    val_rows = read_csv(results.parent / "evaluation_val" / "test.csv")
    assert set(val_rows) == {"agent", "no_rl"}
    assert "val split" in (results.parent / "evaluation_val" / "test.md").read_text()
    assert (results / "test.csv").read_text() == test_csv


def test_saved_predictions_are_at_original_resolution(evaluated):
    task, _, predictions = evaluated
    masks = sorted((predictions / "masks").glob("*.png"))
    overlays = sorted((predictions / "overlays").glob("*.png"))
    assert masks and [m.name for m in masks] == [o.name for o in overlays]
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(overlays[0])).shape == (256, 256, 3)
    if task == "categories":  # one label map per image, assembled from its class episodes
        label_maps = sorted((predictions / "label_maps" / "masks").glob("*.png"))
        assert label_maps and Image.open(label_maps[0]).mode == "P"
        assert len(label_maps) < len(masks)


# -- what each strategy does, on one batch ---------------------------------------------------------
@pytest.fixture(scope="module")
def context(trained):
    task, model, _ = trained
    batch = [tiny_data(task).test_dataset[i] for i in range(4)]
    episodes, embedded = model.agent.prepare(batch)
    from alignsam.evaluation.strategies import persam_prototypes

    train = tiny_data(task).train_dataset
    return lambda: BatchContext(model.agent, batch, episodes, embedded, torch.Generator().manual_seed(0),
                                oracle_clicks=3, prototypes=persam_prototypes(model.agent, train))


def test_ablations_change_only_what_they_name(context):
    agent, no_srm, single = (STRATEGIES[n].run(context()) for n in ("agent", "no_srm", "single_step"))
    assert agent.points.shape[1] == 2 + 2 and single.points.shape[1] == 2 + 1  # seeds + T clicks / 1 click
    assert torch.equal(no_srm.labels[:, 2:], torch.ones_like(no_srm.labels[:, 2:]))
    assert torch.equal(no_srm.labels[:, :2], agent.labels[:, :2])  # the same seed prompts
    assert torch.equal(single.points[:, :3], agent.points[:, :3])  # greedy: the same first click


def test_srm_point_baselines_keep_the_seeds_and_rank_the_srm_map(context):
    ctx = context()
    seeds, seed_labels = ctx.seed_prompts()
    for name in ("no_rl", "grid_srm"):
        outcome = STRATEGIES[name].run(ctx)
        assert outcome.points.shape[1] == 2 + ctx.steps
        assert torch.equal(outcome.points[:, :2], seeds) and torch.equal(outcome.labels[:, :2], seed_labels)
    no_rl = STRATEGIES["no_rl"].run(ctx)
    assert no_rl.labels[:, 2:].tolist() == [[1, 0]] * 4  # ceil(T/2) positive, floor(T/2) negative


def test_oracle_clicks_start_inside_the_target_and_random_clicks_repeat_with_the_seed(context):
    ctx = context()
    oracle = STRATEGIES["oracle"].run(ctx)
    assert oracle.points.shape[1] == ctx.steps  # the outcome is the one at the agent's budget
    assert oracle.curve.ious.shape == (3, 4)
    first = sam_to_original_points(oracle.points[:, :1], ctx.embedded.original_hw, ctx.agent.segmenter.img_size)
    for gt, (x, y), label in zip(ctx.gts, first[:, 0].tolist(), oracle.labels[:, 0].tolist()):
        assert label == 1 and gt[int(y), int(x)], "the first oracle click is a positive one on the target"
    a, b = STRATEGIES["random"].run(context()), STRATEGIES["random"].run(context())
    assert torch.equal(a.points, b.points)


def test_persam_clicks_the_cell_most_like_the_few_shot_target(context):
    ctx = context()
    outcome = STRATEGIES["persam"].run(ctx)
    assert outcome.labels.tolist() == [[1, 0]] * 4
    assert set(ctx.prototypes) == ({0} if ctx.agent.task == "saliency" else set(ctx.prototypes))


# -- errors --------------------------------------------------------------------------------------------
def test_bad_arguments_fail_before_scoring(trained, tmp_path, capsys):
    task, _, ckpt = trained
    with pytest.raises(SystemExit) as exit_:
        run_evaluate(task, tmp_path / "missing.ckpt")
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        run_evaluate(task, ckpt, "--strategies", "[agent, magic]")
    assert exit_.value.code == 2 and "error: --strategies: unknown" in capsys.readouterr().err
    if task == "saliency":
        with pytest.raises(SystemExit):
            run_evaluate(task, ckpt, "--strategies", "[agent, clip_surgery]")
        assert "clip_surgery needs a text matcher" in capsys.readouterr().err


# -- evaluate.py predict on a folder ------------------------------------------------------------------
def write_mixed_folder(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (120, 90), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    rotated = Image.fromarray(rng.integers(0, 255, (100, 160, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    rotated.save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image")


def test_predict_writes_every_readable_image_and_names_the_broken_ones(trained, tmp_path, capsys):
    task, _, ckpt = trained
    images, out = tmp_path / "images", tmp_path / "out"
    write_mixed_folder(images)
    text = ["--text", "red"] if task == "categories" else []
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["predict", "--ckpt_path", str(ckpt), "--images", str(images), "--out", str(out),
                       "--batch_size", "3", *text])
    assert exit_.value.code == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "notes.txt" in err
    sizes = {p.stem: Image.open(p).size for p in (out / "masks").glob("*.png")}
    assert sizes == {"rgb": (300, 200), "grey": (90, 120), "alpha": (64, 64), "rotated": (100, 160)}
    assert len(list((out / "overlays").glob("*.png"))) == 4


def test_predict_needs_a_class_name_for_the_semantic_tasks(trained, tmp_path, capsys):
    task, _, ckpt = trained
    if task != "categories":
        pytest.skip("binary tasks default to their own word")
    images = tmp_path / "images"
    write_mixed_folder(images)
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["predict", "--ckpt_path", str(ckpt), "--images", str(images), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "text is required" in err and "--text cat" in err


def test_evaluate_py_help_lists_its_own_options():
    import subprocess

    for args, expected in ((["--help"], "--save_predictions"), (["predict", "--help"], "--images")):
        out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        assert expected in out.stdout
        assert "fit" not in out.stdout.split("usage:")[1].split("\n")[0]  # only evaluate.py's own commands
