"""Click simulators: where each click lands and how it is labelled, on hand-built masks."""
import numpy as np
import torch

from alignsam.clicks import (
    interior_point,
    largest_error_clicks,
    oracle_next_click,
    random_clicks_in,
    random_error_clicks,
)


def _box(h, w, top, left, bottom, right):
    mask = np.zeros((h, w), bool)
    mask[top:bottom, left:right] = True
    return mask


def test_interior_point_is_the_centre_of_a_box_and_none_for_empty():
    x, y = interior_point(_box(20, 30, 5, 10, 16, 21))  # rows 5..15, cols 10..20
    assert (x, y) == (15.0, 10.0)
    assert interior_point(np.zeros((4, 4), bool)) is None


def test_oracle_click_goes_to_the_largest_error_with_its_label():
    gt = _box(40, 40, 0, 0, 20, 40)  # top half
    pred = _box(40, 40, 0, 0, 20, 30) | _box(40, 40, 26, 0, 40, 40)
    # missed: cols 30..39 of the top half (10 px wide); false positive: rows 26..39 (14 px tall, so
    # its interior is farther from its border: the simulator ranks regions by that depth)
    x, y, label = oracle_next_click(pred, gt)
    assert label == 0 and 26 <= y < 40
    x, y, label = oracle_next_click(pred & gt, gt)  # only the miss is left
    assert label == 1 and x >= 30 and y < 20
    assert oracle_next_click(gt, gt) is None


def test_random_clicks_land_inside_their_masks():
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 2:4, 5:9] = True
    masks[1, 10, 1] = True
    points = random_clicks_in(masks, torch.Generator().manual_seed(0))
    for mask, (x, y) in zip(masks[:2], points[:2].long()):
        assert mask[y, x]
    assert 0 <= points[2, 0] < 16 and 0 <= points[2, 1] < 16  # empty mask: anywhere


def test_random_error_clicks_are_in_the_error_and_labelled_by_it():
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[:, :4] = True
    pred = torch.zeros_like(gt)
    pred[0] = gt[0]
    pred[0, 6, 6] = True  # sample 0: one false-positive pixel
    pred[1, :2] = True  # sample 1: rows 2..3 missed
    points, labels = random_error_clicks(pred, gt, torch.Generator().manual_seed(1))
    assert points[0].tolist() == [6.0, 6.0] and labels[0] == 0
    assert 2 <= points[1, 1] < 4 and labels[1] == 1


def test_largest_error_clicks_match_the_oracle_per_sample():
    gt = torch.from_numpy(np.stack([_box(32, 32, 4, 4, 28, 28), _box(32, 32, 0, 0, 10, 10), _box(32, 32, 8, 8, 12, 12)]))
    pred = torch.from_numpy(np.stack([_box(32, 32, 4, 4, 28, 12), _box(32, 32, 0, 0, 32, 32), _box(32, 32, 8, 8, 12, 12)]))
    points, labels = largest_error_clicks(pred, gt)
    for i in range(2):
        x, y, label = oracle_next_click(pred[i].numpy(), gt[i].numpy())
        assert points[i].tolist() == [x, y] and labels[i] == label
    assert labels[1] == 0  # a false positive everywhere outside the top-left box
    assert labels[2] == 1 and gt[2, int(points[2, 1]), int(points[2, 0])]  # no error: inside gt
