"""evaluate.py writes per-episode statistics that give back test.csv exactly, and ``evaluate.py
summary`` turns tiny real runs (train.py + evaluate.py on the bundled world) into mean +- sd and
bootstrap intervals; random_srm and the unscored path of the per-unit statistics."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from alignsam.cli import evaluate_main, main
from alignsam.evaluation.episodes import DATASET_METRICS, EpisodeStatistics
from alignsam.evaluation.evaluator import Evaluator
from alignsam.evaluation.strategies import STRATEGIES, BatchContext, srm_labels
from alignsam.metrics import HEADLINE_METRICS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_module import tiny_data, tiny_model  # noqa: E402
from test_real_path_cli import ROOT, tiny  # noqa: E402

@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])


BINARY_HEADLINE = sorted({m for task in ("blur", "shadow", "glass", "saliency") for m in HEADLINE_METRICS[task]})


def train_and_evaluate(task: str, save_dir: Path, seed: int) -> Path:
    """One tiny run of ``task`` under ``save_dir``, scored by evaluate.py; returns its run folder."""
    old = sys.argv
    sys.argv = ["train.py"]
    try:
        main(["fit", "--config", str(ROOT / f"conf/scenes/{task}.yaml"), *tiny(save_dir.parent),
              f"--trainer.logger.init_args.save_dir={save_dir}", f"--seed_everything={seed}", f"--model.seed={seed}"])
    finally:
        sys.argv = old
    run = sorted((save_dir / task).glob("version_*"))[-1]
    evaluate_main(["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar=false",
                   "--oracle_clicks", "3"])
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{name: run folder}``: saliency seeds 0 and 1 and categories seed 0 under one save_dir."""
    logs = tmp_path_factory.mktemp("summary") / "logs"
    return {"saliency0": train_and_evaluate("saliency", logs, 0), "saliency1": train_and_evaluate("saliency", logs, 1),
            "categories0": train_and_evaluate("categories", logs, 0)}


def read_csv(path: Path) -> dict:
    with path.open(newline="") as f:
        return {row["strategy"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("name", ["saliency0", "categories0"])
def test_the_episode_file_gives_back_every_headline_metric_of_test_csv(runs, name):
    """Binary runs store every binary headline metric's fields (miou_fgbg, ber, fbeta_max,
    emeasure_mean, mae: every binary task's headline); categories the per-image class counts."""
    run = runs[name]
    stats = EpisodeStatistics.load(run / "evaluation" / "test_episodes.npz")
    table = read_csv(run / "evaluation" / "test.csv")
    metrics = BINARY_HEADLINE if stats.task == "saliency" else HEADLINE_METRICS["categories"]
    assert list(stats.strategies) == list(table) and stats.scored.all()
    for metric in metrics:
        assert all(f in stats.fields for f in DATASET_METRICS[metric].fields)
        ours = stats.values(metric)
        for i, strategy in enumerate(stats.strategies):
            tolerance = 1e-6 if stats.task == "categories" else 1e-12  # torchmetrics' Jaccard is float32
            assert ours[i] == pytest.approx(float(table[strategy][metric]), abs=tolerance), (metric, strategy)
    assert stats.meta["unit"] == ("image" if stats.task == "categories" else "episode")


def test_episode_ids_are_the_test_scenes_whatever_the_seed(runs):
    a = EpisodeStatistics.load(runs["saliency0"] / "evaluation" / "test_episodes.npz")
    b = EpisodeStatistics.load(runs["saliency1"] / "evaluation" / "test_episodes.npz")
    assert a.ids.tolist() == b.ids.tolist() and all(i.startswith("saliency-") for i in a.ids)
    assert (a.meta["seed"], b.meta["seed"]) == (0, 1)


def test_summary_of_a_save_dir_has_mean_sd_and_intervals_per_task(runs, tmp_path, capsys):
    logs = runs["saliency0"].parent.parent
    with pytest.raises(SystemExit) as done:
        evaluate_main(["summary", "--runs", str(logs), "--out", str(tmp_path), "--resamples", "200"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "saliency: emeasure_mean" in printed and "categories: categories_miou" in printed
    with (tmp_path / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    agent = next(r for r in rows if r["task"] == "saliency" and r["metric"] == "emeasure_mean" and r["strategy"] == "agent")
    per_seed = [float(read_csv(runs[k] / "evaluation" / "test.csv")["agent"]["emeasure_mean"]) for k in ("saliency0", "saliency1")]
    assert int(agent["seeds"]) == 2 and float(agent["mean"]) == pytest.approx(np.mean(per_seed))
    assert float(agent["sd"]) == pytest.approx(np.std(per_seed, ddof=1))
    for row in rows:
        if row["strategy"] != "agent":
            assert float(row["ci_low"]) <= float(row["ci_high"]) and row["verdict"] in ("", "win", "loss")
    assert {r["metric"] for r in rows} == {"emeasure_mean", "mae", "categories_miou"}
    assert "| **AlignSAM agent** |" in (tmp_path / "summary.md").read_text()


def test_labelled_variants_compare_their_agents_on_the_same_episodes(runs, tmp_path):
    with pytest.raises(SystemExit) as done:
        evaluate_main(["summary", "--runs", f"first={runs['saliency0']}", f"second={runs['saliency1']}",
                       "--out", str(tmp_path), "--resamples", "100"])
    assert done.value.code == 0
    with (tmp_path / "summary.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "mae"]
    cross = next(r for r in rows if r["agent_variant"] == "first" and r["variant"] == "second")
    assert cross["strategy"] == "agent" and cross["difference"]
    own = [r for r in rows if r["agent_variant"] == "first" and r["variant"] == "first"]
    assert len(own) == len(EpisodeStatistics.load(runs["saliency0"] / "evaluation" / "test_episodes.npz").strategies)


def test_a_run_without_episode_statistics_is_one_line_naming_the_command(runs, tmp_path, capsys):
    bare = tmp_path / "logs" / "shadow" / "version_0"
    (bare / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as failure:
        evaluate_main(["summary", "--runs", str(tmp_path / "logs"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert failure.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bare) in lines[0]
    assert f"python evaluate.py --ckpt_path {bare / 'checkpoints' / 'last.ckpt'}" in lines[0]


# -- random_srm, and units a strategy could not score -------------------------------------------------
@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    L.seed_everything(0)
    return tiny_model("saliency", tmp_path_factory.mktemp("random-srm") / "cache")


def context(model, batch, seed=0):
    episodes, embedded = model.agent.prepare(batch)
    return BatchContext(model.agent, batch, episodes, embedded, torch.Generator().manual_seed(seed))


def test_random_srm_clicks_distinct_random_patches_labelled_as_grid_srm_labels_them(untrained):
    data = tiny_data("saliency")
    batch = [data.test_dataset[i] for i in range(4)]
    ctx = context(untrained, batch)
    state = ctx.generator.get_state()
    outcome = STRATEGIES["random_srm"].run(ctx)
    assert torch.equal(ctx.generator.get_state(), state), "the batch generator (random's clicks) is not advanced"
    seeds, seed_labels = ctx.seed_prompts()
    clicks = outcome.points[:, 2:]
    assert clicks.shape[1] == ctx.steps and torch.equal(outcome.points[:, :2], seeds)
    assert torch.equal(outcome.labels[:, 2:], srm_labels(ctx, clicks))  # grid_srm's labelling rule
    assert all(len({tuple(p) for p in row.tolist()}) == ctx.steps for row in clicks)
    # the same episode gets the same clicks in another batch and position
    again = STRATEGIES["random_srm"].run(context(untrained, batch[::-1]))
    assert torch.equal(again.points.flip(0), outcome.points)


@pytest.mark.parametrize("name", ["grid_srm", "random_srm"])
def test_patch_baselines_label_by_the_agents_label_rule(untrained, name):
    """model.srm.label_rule reaches the strategies that label patches by the SRM, as it reaches the
    agent's clicks: with 'confident' and negative_threshold 0 nothing is labelled negative; with
    'drop' and the thresholds either side of every probability every click is dropped (-1)."""
    data = tiny_data("saliency")
    ctx = context(untrained, [data.test_dataset[i] for i in range(3)])
    config = untrained.agent.srm_config
    saved = (config.label_rule, config.threshold, config.negative_threshold)
    try:
        config.label_rule, config.negative_threshold = "confident", 0.0
        assert (STRATEGIES[name].run(ctx).labels[:, 2:] == 1).all()
        config.label_rule, config.threshold, config.negative_threshold = "drop", 1.01, 0.0
        assert (STRATEGIES[name].run(ctx).labels[:, 2:] == -1).all()
    finally:
        config.label_rule, config.threshold, config.negative_threshold = saved


def test_units_a_strategy_could_not_score_are_marked_and_left_out(tmp_path):
    L.seed_everything(0)
    model = tiny_model("categories", tmp_path / "cache")
    data = tiny_data("categories")
    test = [data.test_dataset[i] for i in range(len(data.test_dataset))]
    missing = test[0]["class_id"]
    train = [s for s in (data.train_dataset[i] for i in range(len(data.train_dataset))) if s["class_id"] != missing]
    evaluator = Evaluator(model.agent, ["agent", "persam"], seed=1, train_samples=train)
    for start in range(0, len(test), 4):
        evaluator.add_batch(test[start:start + 4])
    table = evaluator.compute()
    stats = evaluator.episodes
    excluded = {s["image_id"] for s in test if s["class_id"] == missing}
    persam = stats.strategies.index("persam")
    assert {u for u, ok in zip(stats.ids.tolist(), stats.scored[persam]) if not ok} == excluded
    assert stats.scored[stats.strategies.index("agent")].all()
    for i, name in enumerate(stats.strategies):
        assert stats.values("categories_miou")[i] == pytest.approx(table[name]["categories_miou"], abs=1e-6)
