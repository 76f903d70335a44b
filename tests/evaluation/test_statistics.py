"""alignsam.evaluation.statistics: the paired two-level bootstrap on synthetic runs with known answers,
and the dataset-level metrics recomputed from per-unit sums (alignsam.evaluation.episodes)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from alignsam.evaluation.episodes import DATASET_METRICS, EpisodeStatistics, label_map_fields, metric_values
from alignsam.evaluation.statistics import summarise_task, verdict
from alignsam.metrics.semantic import SemanticMeanIoU


def mean_runs(values_per_seed, strategies=("agent", "other")) -> list:
    """Runs whose per-episode ``mae`` fields are ``values_per_seed[k]`` ``(S, N)``."""
    runs = []
    for values in values_per_seed:
        values = np.asarray(values, np.float64)
        ids = np.array([f"e{i}" for i in range(values.shape[1])])
        runs.append(EpisodeStatistics(ids, list(strategies), np.ones(values.shape, bool), {"mae": values},
                                      {"task": "saliency"}))
    return runs


def test_a_constant_shift_gives_an_interval_at_that_shift():
    rng = np.random.default_rng(0)
    seeds = []
    for _ in range(3):
        other = rng.random(50)
        seeds.append([other - 0.1, other])  # the agent's mae is 0.1 lower on every episode
    summary = summarise_task({"": mean_runs(seeds)}, "mae", resamples=500)
    d = summary.difference("", "other")
    assert d.estimate == pytest.approx(-0.1) and d.low == pytest.approx(-0.1) and d.high == pytest.approx(-0.1)
    assert d.verdict == "win"  # lower is better: -0.1 is the agent's lead


def test_identical_strategies_give_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(1)
    seeds = [[x, x] for x in rng.random((3, 40))]
    d = summarise_task({"": mean_runs(seeds)}, "mae", resamples=300).difference("", "other")
    assert d.estimate == 0 and abs(d.low) < 1e-12 and abs(d.high) < 1e-12 and d.verdict == ""


def test_a_noisy_null_covers_zero_and_the_interval_shrinks_with_more_episodes():
    rng = np.random.default_rng(2)

    def interval(n):
        seeds = [rng.normal(0.5, 0.2, (2, n)) for _ in range(4)]
        d = summarise_task({"": mean_runs(seeds)}, "mae", resamples=1000, seed=3).difference("", "other")
        return d.low, d.high

    small, large = interval(30), interval(600)
    assert small[0] < 0 < small[1] and large[0] < 0 < large[1]
    assert (large[1] - large[0]) < 0.5 * (small[1] - small[0])


def test_mean_and_sd_are_over_seeds_and_the_bootstrap_is_reproducible():
    seeds = [[np.full(10, 0.2 + 0.1 * k), np.full(10, 0.5)] for k in range(3)]
    a = summarise_task({"": mean_runs(seeds)}, "mae", resamples=200, seed=5)
    b = summarise_task({"": mean_runs(seeds)}, "mae", resamples=200, seed=5)
    agent = a.strategy("", "agent")
    assert agent.seeds == 3 and agent.mean == pytest.approx(0.3) and agent.sd == pytest.approx(0.1)
    assert a.difference("", "other") == b.difference("", "other")
    d = a.difference("", "other")  # only the seeds vary: the interval spans the seed means' spread
    assert d.low == pytest.approx(-0.3) and d.high == pytest.approx(-0.1) and d.verdict == "win"


def test_variants_are_paired_on_episodes_and_compared_agent_to_agent():
    rng = np.random.default_rng(4)
    scenes = rng.random(80)  # hard and easy scenes, the same for every seed; seeds differ a little
    base = scenes + rng.normal(0, 0.002, (3, 80))
    paper = mean_runs([[b, b + 0.05] for b in base])
    better = mean_runs([[b - 0.02, b + 0.05] for b in base])  # the same episodes, 0.02 lower mae
    summary = summarise_task({"paper": paper, "better": better}, "mae", resamples=400)
    d = summary.difference("better", "agent", "paper")
    assert d.estimate == pytest.approx(-0.02) and d.verdict == "win"
    assert summary.difference("paper", "agent", "better").verdict == "loss"
    assert summary.difference("paper", "other").estimate == pytest.approx(-0.05)


def test_verdict_respects_the_metrics_direction():
    assert verdict(0.1, 0.2, lower_is_better=False) == "win" and verdict(0.1, 0.2, lower_is_better=True) == "loss"
    assert verdict(-0.1, 0.2, lower_is_better=False) == "" and verdict(float("nan"), 1, False) == ""


def test_the_paper_sized_case_takes_seconds():
    rng = np.random.default_rng(5)
    n, strategies = 200, [f"s{i}" for i in range(11)]
    runs = [EpisodeStatistics(np.array([f"e{i}" for i in range(n)]), ["agent"] + strategies, np.ones((12, n), bool),
                              {"fbeta_curve": rng.random((12, n, 256))}, {"task": "glass"}) for _ in range(5)]
    start = time.perf_counter()
    summarise_task({"": runs}, "fbeta_max", resamples=2000)
    assert time.perf_counter() - start < 20


# -- the dataset-level metrics from unit sums ---------------------------------------------------------
def random_label_maps(rng, images=6, classes=5, size=(12, 10)):
    preds, targets = [], []
    for _ in range(images):
        target = torch.from_numpy(rng.integers(0, classes - 1, size))  # class classes-1 never in the truth
        target[0, :3] = 255  # void pixels
        pred = torch.from_numpy(rng.integers(0, classes, size))
        preds.append(pred)
        targets.append(target)
    return preds, targets


def test_semantic_miou_from_per_image_sums_is_torchmetrics_on_any_resample():
    rng = np.random.default_rng(6)
    preds, targets = random_label_maps(rng)
    fields = [label_map_fields(p, t, 5, 255) for p, t in zip(preds, targets)]
    stacked = {k: np.stack([f[k] for f in fields])[None] for k in ("intersection", "union")}
    draws = np.array([[1, 1, 1, 1, 1, 1], [2, 0, 1, 0, 3, 0], [0, 0, 0, 0, 0, 6]])
    ours = metric_values(DATASET_METRICS["categories_miou"], stacked, np.ones((1, 6), bool), draws,
                         {"ignore_index": 255})[:, 0]
    for row, value in zip(draws, ours):
        metric = SemanticMeanIoU(num_classes=5)
        chosen = [i for i, c in enumerate(row) for _ in range(c)]
        metric.update([preds[i] for i in chosen], [targets[i] for i in chosen])
        assert value == pytest.approx(float(metric.compute()), abs=1e-6)


def test_categories_style_bootstrap_detects_a_better_agent():
    rng = np.random.default_rng(7)
    runs = []
    for _ in range(3):
        preds, targets = random_label_maps(rng, images=40)
        good = [torch.where(torch.from_numpy(rng.random(t.shape) < 0.8), t.clamp(max=4), p) for p, t in zip(preds, targets)]
        agent = [label_map_fields(g, t, 5, 255) for g, t in zip(good, targets)]
        other = [label_map_fields(p, t, 5, 255) for p, t in zip(preds, targets)]
        fields = {k: np.stack([np.stack([f[k] for f in agent]), np.stack([f[k] for f in other])])
                  for k in ("intersection", "union")}
        runs.append(EpisodeStatistics(np.array([f"img{i}" for i in range(40)]), ["agent", "other"],
                                      np.ones((2, 40), bool), fields, {"task": "categories", "ignore_index": 255}))
    summary = summarise_task({"": runs}, "categories_miou", resamples=300)
    d = summary.difference("", "other")
    assert d.low > 0 and d.verdict == "win" and d.low <= d.estimate <= d.high


def test_unscored_units_leave_only_that_strategys_sums():
    values = np.array([[0.1, 0.2, 0.3], [0.5, 0.0, 0.7]])
    scored = np.array([[True, True, True], [True, False, True]])
    out = metric_values(DATASET_METRICS["mae"], {"mae": values}, scored, np.ones((1, 3)))
    assert out[0].tolist() == pytest.approx([0.2, 0.6])


def test_the_file_round_trips(tmp_path):
    runs = mean_runs([np.random.default_rng(8).random((2, 5))])
    path = runs[0].save(tmp_path / "test_episodes.npz")
    back = EpisodeStatistics.load(path)
    assert back.strategies == ["agent", "other"] and back.ids.tolist() == runs[0].ids.tolist()
    assert np.array_equal(back.fields["mae"], runs[0].fields["mae"]) and back.meta["task"] == "saliency"
