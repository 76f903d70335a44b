"""Pure parts of the evaluation: the baselines' prompt generators, NoC, the tables, atomic writes."""
from __future__ import annotations

import csv
import io
import os

import pytest
import torch

from alignsam import baselines
from alignsam.atomic import write_text_atomic
from alignsam.evaluation.scoring import ClickCurve, no_clicks
from alignsam.evaluation.tables import columns, to_csv, to_markdown


def test_spread_patches_start_at_the_centre_stay_distinct_and_spread():
    chosen = baselines.spread_patches(10, 5)
    cells = torch.stack([chosen // 10, chosen % 10], 1).float()
    assert tuple(cells[0].tolist()) in {(4.0, 4.0), (4.0, 5.0), (5.0, 4.0), (5.0, 5.0)}
    assert len(set(chosen.tolist())) == 5
    gaps = torch.cdist(cells, cells) + torch.eye(5) * 100
    assert gaps.min() >= 4.0  # five clicks on a 10 x 10 grid, none crowded
    assert torch.equal(baselines.spread_patches(10, 3), chosen[:3])  # a prefix of a spread is spread
    with pytest.raises(ValueError, match="count"):
        baselines.spread_patches(3, 10)


def test_ranked_patch_prompts_take_the_top_as_positive_and_the_bottom_as_negative():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.0, 0.7, 0.3]])
    action_points = torch.arange(6, dtype=torch.float32)[None, :, None].expand(1, 6, 2)
    points, labels = baselines.ranked_patch_prompts(scores, action_points, 5)
    assert points[0, :, 0].tolist() == [1.0, 4.0, 2.0, 0.0, 3.0]  # 0.9, 0.7, 0.5 | 0.1, 0.0
    assert labels[0].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="clicks"):
        baselines.ranked_patch_prompts(scores, action_points, 7)


def test_best_and_worst_cells_ignore_the_padding():
    scores = torch.zeros(1, 1, 4, 4)
    scores[0, 0, 3, 3] = 5.0  # in the padding: must not be chosen
    scores[0, 0, 0, 1] = 2.0
    scores[0, 0, 3, 0] = -9.0  # padding too
    scores[0, 0, 1, 1] = -1.0
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :] = 1.0  # the image covers the top half of the padded square
    points, labels = baselines.best_and_worst_cells(scores, region, img_size=64)
    assert points[0].tolist() == [[24.0, 8.0], [24.0, 24.0]]  # cell centres of (0, 1) and (1, 1)
    assert labels[0].tolist() == [1, 0]


def test_cosine_prior_of_a_masked_mean_points_at_the_matching_cells():
    embeddings = torch.randn(1, 8, 4, 4)
    target = torch.randn(8)
    embeddings[0, :, 2, 1] = target
    embeddings[0, :, 2, 2] = 3 * target  # same direction, other scale
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 2, 1:3] = 1.0
    proto = baselines.masked_mean_feature(embeddings, mask)
    assert torch.allclose(proto[0], 2 * target)
    prior = baselines.cosine_location_prior(embeddings, proto)
    assert prior.shape == (1, 1, 4, 4)
    assert torch.allclose(prior[0, 0, 2, 1:3], torch.ones(2), atol=1e-5)
    assert prior.max() <= 1 + 1e-5


def test_noc_counts_prompts_until_the_threshold_and_caps_failures():
    ious = torch.tensor([[0.50, 0.70, 0.10], [0.86, 0.80, 0.20], [0.95, 0.91, 0.30]])  # (R=3, B=3)
    curve = ClickCurve(ious, clicks=torch.arange(3), prompts=torch.arange(3) + 2)  # 2 seed prompts
    noc, failed = no_clicks(curve, 0.85)
    assert noc.tolist() == [3.0, 4.0, 4.0]  # 2nd row = 3 prompts; 3rd = 4; never -> cap 4
    assert failed.tolist() == [False, False, True]
    noc90, failed90 = no_clicks(curve, 0.90)
    assert noc90.tolist() == [4.0, 4.0, 4.0] and failed90.tolist() == [False, False, True]


TABLE = {
    "agent": {"iou_fg": 0.5, "miou_fgbg": 0.6, "fbeta_max": 0.7, "noc@85": 3.0, "iou@10": 0.4, "iou@2": 0.3, "iou@0": 0.2},
    "centre": {"iou_fg": 0.1, "miou_fgbg": 0.2, "fbeta_max": 0.3},
    "oracle": {"iou_fg": 0.9, "miou_fgbg": 0.95, "fbeta_max": 0.97, "noc@85": 2.0, "iou@1": 0.8, "iou@20": 0.99},
}


def test_table_columns_put_headline_metrics_first_and_clicks_in_numeric_order():
    assert columns(TABLE, "blur") == ["miou_fgbg", "fbeta_max", "iou_fg", "noc@85",
                                      "iou@0", "iou@1", "iou@2", "iou@10", "iou@20"]
    assert columns(TABLE, "blur", max_click=2)[-3:] == ["iou@0", "iou@1", "iou@2"]


def test_markdown_uses_readable_labels_and_dashes_where_a_column_does_not_apply():
    md = to_markdown(TABLE, ["miou_fgbg", "noc@85"])
    lines = md.splitlines()
    assert lines[0] == "| strategy | miou_fgbg | noc@85 |"
    assert lines[2] == "| AlignSAM agent | 0.6000 | 3.0000 |"
    assert lines[3] == "| centre click | 0.2000 | - |"


def test_csv_round_trips_every_value_at_full_precision():
    table = {"agent": {"miou_fgbg": 1 / 3}, "centre": {}}
    rows = list(csv.DictReader(io.StringIO(to_csv(table, ["miou_fgbg"]))))
    assert rows[0]["strategy"] == "agent" and float(rows[0]["miou_fgbg"]) == 1 / 3
    assert rows[1]["miou_fgbg"] == ""


def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "table.md"
    write_text_atomic(path, "old")
    assert path.read_text() == "old"

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["table.md"]  # no temporary file left behind
