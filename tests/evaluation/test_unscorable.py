"""A strategy that cannot score some episodes (PerSAM-style on a class missing from the few-shot
draw) leaves them out of its own numbers, says so in the table and the log, and never stops the
other strategies (issue 12: a 50-image VOC draw often misses a rare class).

The model is the bundled world's tiny agent, untrained: the checks are about the plumbing.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torchmetrics import MetricCollection

from alignsam.evaluation.evaluator import Evaluator
from alignsam.evaluation.scoring import ClickCurve, StrategyScores
from alignsam.evaluation.strategies import STRATEGIES, BatchContext, default_strategies, persam_prototypes
from alignsam.evaluation.tables import columns, coverage_notes, to_csv, to_markdown, write_tables
from alignsam.metrics import HEADLINE_METRICS
from alignsam.metrics.semantic import SemanticMeanIoU

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_module import tiny_data, tiny_model  # noqa: E402


# -- the whole evaluator on a categories batch, one class without a prototype ------------------------
@pytest.fixture(scope="module")
def categories(tmp_path_factory):
    """(model, train episodes without class ``missing``, test episodes, missing class id)."""
    L.seed_everything(0)
    model = tiny_model("categories", tmp_path_factory.mktemp("unscorable") / "cache")
    data = tiny_data("categories")
    test = [data.test_dataset[i] for i in range(len(data.test_dataset))]
    train = [data.train_dataset[i] for i in range(len(data.train_dataset))]
    missing = test[0]["class_id"]
    train = [s for s in train if s["class_id"] != missing]
    assert train and any(s["class_id"] != missing for s in test)
    return model, train, test, missing


def evaluate(model, names, train, test, batch_size=4):
    evaluator = Evaluator(model.agent, names, seed=1, oracle_clicks=2, train_samples=train)
    for start in range(0, len(test), batch_size):
        evaluator.add_batch(test[start:start + batch_size])
    return evaluator


def test_persam_scores_what_it_can_and_every_strategy_keeps_its_row(categories, caplog):
    model, train, test, missing = categories
    names = default_strategies(has_matcher=True)
    caplog.set_level(logging.WARNING, logger="alignsam.evaluation.evaluator")
    evaluator = evaluate(model, names, train, test)
    table = evaluator.compute()

    assert list(table) == names
    for name, row in table.items():
        for metric in HEADLINE_METRICS["categories"]:
            assert math.isfinite(row[metric]), f"{name}/{metric}"
        assert row["episodes_total"] == len(test) and row["images_total"] == len({s["image_id"] for s in test})
    left_out = sum(s["class_id"] == missing for s in test)
    persam = table["persam"]
    assert persam["episodes"] == len(test) - left_out and persam[f"unscored@{missing}"] == left_out
    assert persam["images"] == len({s["image_id"] for s in test} - {s["image_id"] for s in test if s["class_id"] == missing})
    for name in names:
        if name != "persam":
            assert table[name]["episodes"] == len(test) and table[name]["images"] == table[name]["images_total"]
            assert not any(k.startswith("unscored@") for k in table[name])

    # one warning for the run, naming the strategy and the class, not one per batch
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "persam" in warnings[0] and f"class {missing} (" in warnings[0]
    evaluator.compute()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_persams_numbers_are_those_of_the_images_it_could_score(categories):
    """Exclusion is per image for label maps: persam's mIoU equals its mIoU on the images alone."""
    model, train, test, missing = categories
    table = evaluate(model, ["agent", "persam"], train, test).compute()
    without = {s["image_id"] for s in test if s["class_id"] == missing}
    kept = [s for s in test if s["image_id"] not in without]
    alone = evaluate(model, ["agent", "persam"], train, kept).compute()
    assert "episodes" not in alone["persam"]  # every episode scored there: no coverage columns
    assert table["persam"]["categories_miou"] == pytest.approx(alone["persam"]["categories_miou"], abs=1e-6)
    assert table["agent"]["episodes"] == len(test)  # the agent still scores them all


def test_the_markdown_table_shows_scored_over_total_and_a_footnote(categories, tmp_path):
    model, train, test, missing = categories
    table = evaluate(model, ["agent", "centre", "persam"], train, test).compute()
    md, csv_path = write_tables(tmp_path, "test", table, "categories", 2, "# header")
    text = md.read_text()
    total = len(test)
    assert f"| {total}/{total} |" in text  # the agent's row
    assert f"| {total - sum(s['class_id'] == missing for s in test)}/{total} |" in text
    notes = [line for line in text.splitlines() if line.startswith("* PerSAM-style")]
    assert len(notes) == 1 and f"class {missing} (" in notes[0] and "images" in notes[0]
    assert f"unscored@{missing}" in csv_path.read_text().splitlines()[0]


def test_persam_without_any_training_episode_scores_nothing_but_stops_nothing(categories):
    model, _, test, _ = categories
    table = evaluate(model, ["agent", "persam"], [], test[:4]).compute()
    assert table["persam"]["episodes"] == 0 and "categories_miou" not in table["persam"]
    assert math.isfinite(table["agent"]["categories_miou"])


def test_the_persam_runner_marks_the_episodes_of_a_class_without_prototype(categories):
    model, train, test, missing = categories
    batch = test[:4]
    episodes, embedded = model.agent.prepare(batch)
    ctx = BatchContext(model.agent, batch, episodes, embedded, torch.Generator().manual_seed(0),
                       prototypes=persam_prototypes(model.agent, train))
    outcome = STRATEGIES["persam"].run(ctx)
    assert outcome.unscored.tolist() == [s["class_id"] == missing for s in batch]
    assert "few-shot" in outcome.unscored_reason
    assert outcome.logits.shape[0] == len(batch) and torch.isfinite(outcome.logits).all()


# -- StrategyScores alone ----------------------------------------------------------------------------
def test_binary_scores_leave_unscored_episodes_out_of_metrics_and_curves():
    from alignsam.metrics import task_metrics

    gts = [torch.zeros(4, 4, dtype=torch.bool) for _ in range(3)]
    for gt in gts:
        gt[:2] = True
    logits = [torch.where(gts[0], 5.0, -5.0), torch.where(gts[1], 5.0, -5.0), torch.full((4, 4), -5.0)]
    batch = [{"class_id": 0}] * 3
    unscored = torch.tensor([False, False, True])  # the third (a miss) is not scored
    curve = ClickCurve(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1]), torch.tensor([1]))

    scores = StrategyScores(["a", "b"], lambda: task_metrics("shadow"), semantic=False, device=torch.device("cpu"))
    scores.add("a", batch, logits, gts, unscored)
    scores.add_curve("a", curve, unscored)
    scores.add("b", batch, logits, gts)
    scores.add_curve("b", curve)
    table = scores.compute()
    assert table["a"]["iou_fg"] == pytest.approx(1.0) and table["b"]["iou_fg"] < 1.0
    assert table["a"]["iou@1"] == pytest.approx(1.0) and table["b"]["iou@1"] == pytest.approx(2 / 3)
    assert (table["a"]["episodes"], table["a"]["episodes_total"], table["a"]["unscored@0"]) == (2, 3, 1)
    assert (table["b"]["episodes"], table["b"]["episodes_total"]) == (3, 3) and "images" not in table["a"]


def test_semantic_scores_drop_whole_images_with_an_unscored_episode():
    def metrics():
        return MetricCollection({"voc_miou": SemanticMeanIoU(num_classes=3, ignore_index=255)})

    label_map = torch.zeros(4, 4, dtype=torch.long)
    label_map[:2] = 1
    label_map[2:, :2] = 2
    other = torch.ones(4, 4, dtype=torch.long)
    batch = [{"image_id": "x", "class_id": 1, "label_map": label_map.numpy()},
             {"image_id": "x", "class_id": 2, "label_map": label_map.numpy()},
             {"image_id": "y", "class_id": 1, "label_map": other.numpy()}]
    logits = [torch.where(label_map == 1, 5.0, -5.0), torch.where(label_map == 2, 5.0, -5.0), torch.full((4, 4), 5.0)]
    scores = StrategyScores(["a"], metrics, semantic=True, device=torch.device("cpu"))
    scores.add("a", batch, logits, [None] * 3, torch.tensor([False, True, False]))
    row = scores.compute()["a"]
    assert (row["images"], row["images_total"], row["episodes"], row["unscored@2"]) == (1, 2, 2, 1)
    assert row["voc_miou"] == pytest.approx(1.0)  # image y alone, predicted perfectly; x is left out


# -- tables ------------------------------------------------------------------------------------------
TABLE = {
    "agent": {"voc_miou": 0.5, "episodes": 10.0, "episodes_total": 10.0, "images": 6.0, "images_total": 6.0,
              "noc@85": 3.0, "iou@1": 0.4},
    "persam": {"voc_miou": 0.3, "episodes": 7.0, "episodes_total": 10.0, "images": 4.0, "images_total": 6.0,
               "unscored@13": 2.0, "unscored@11": 1.0},
}


def test_coverage_columns_sit_after_the_metrics_and_class_counts_last():
    assert columns(TABLE, "voc") == ["voc_miou", "episodes", "episodes_total", "images", "images_total",
                                     "noc@85", "iou@1", "unscored@11", "unscored@13"]
    md = to_markdown(TABLE, columns(TABLE, "voc")).splitlines()
    assert md[0] == "| strategy | voc_miou | episodes | images | noc@85 | iou@1 |"
    assert md[3] == "| PerSAM-style | 0.3000 | 7/10 | 4/6 | - | - |"
    assert "unscored@11,unscored@13" in to_csv(TABLE, columns(TABLE, "voc")).splitlines()[0]


def test_coverage_notes_name_the_strategy_the_count_and_the_classes():
    (note,) = coverage_notes(TABLE, "voc")
    assert note.startswith("* PerSAM-style: 3 of 10 episodes not scored")
    assert "class 11 (dining table): 1" in note and "class 13 (horse): 2" in note and "4 of 6 images" in note
    assert coverage_notes({"agent": {"voc_miou": 0.5}}, "voc") == []
    binary = {"persam": {"iou_fg": 0.4, "episodes": 9.0, "episodes_total": 10.0, "unscored@0": 1.0}}
    assert coverage_notes(binary, "shadow") == [
        "* PerSAM-style: 1 of 10 episodes not scored; its metrics cover the 9 it scored; the other rows cover all 10."]
