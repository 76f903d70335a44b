"""IoU definitions and BER on hand-computed examples, VOC mIoU against a direct confusion matrix,
the per-task collections, and input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alignsam.metrics import (
    HEADLINE_METRICS,
    LOWER_IS_BETTER,
    BalancedErrorRate,
    FgBgMeanIoU,
    ForegroundIoU,
    SemanticMeanIoU,
    task_metrics,
)
from metric_cases import random_cases, structured_cases, to_torch

# image A: pred > 0.5 is [[1,0,1],[0,1,0]] (0.5 itself is background); GT [[1,1,0],[0,1,0]]
PRED_A = torch.tensor([[0.9, 0.2, 0.6], [0.5, 0.51, 0.1]], dtype=torch.float64)
GT_A = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)  # TP 2, FP 1, FN 1, TN 2: IoU 2/4
# image B: nothing predicted, nothing to find (empty union)
PRED_B = torch.full((2, 2), 0.3, dtype=torch.float64)
GT_B = torch.zeros(2, 2, dtype=torch.bool)


def _compute(metric, preds, gts):
    metric.update(preds, gts)
    return metric.compute()


def test_iou_fg_averages_images_and_scores_empty_union_by_convention():
    preds, gts = [PRED_A, PRED_B], [GT_A, GT_B]
    assert float(_compute(ForegroundIoU(), preds, gts)) == pytest.approx((0.5 + 1.0) / 2)
    assert float(_compute(ForegroundIoU(empty_union_value=0.0), preds, gts)) == pytest.approx((0.5 + 0.0) / 2)
    assert float(_compute(ForegroundIoU(), [PRED_A], [GT_A])) == pytest.approx(0.5)


def test_miou_fgbg_pools_pixel_counts_over_the_set():
    # TP 2, FP 1, FN 1, TN 2 + 4: IoU_fg = 2/4, IoU_bg = 6/8
    assert float(_compute(FgBgMeanIoU(), [PRED_A, PRED_B], [GT_A, GT_B])) == pytest.approx((0.5 + 0.75) / 2)
    # a set without any foreground at all: the fg class has no union
    assert float(_compute(FgBgMeanIoU(), [PRED_B], [GT_B])) == pytest.approx(1.0)
    assert float(_compute(FgBgMeanIoU(empty_union_value=0.0), [PRED_B], [GT_B])) == pytest.approx(0.5)


def test_iou_threshold_is_strict_and_configurable():
    pred = torch.full((3, 3), 0.5, dtype=torch.float64)
    gt = torch.ones(3, 3, dtype=torch.bool)
    assert float(_compute(ForegroundIoU(), pred, gt)) == 0.0
    assert float(_compute(ForegroundIoU(threshold=0.4), pred, gt)) == 1.0


def _numpy_ber(preds, gts):
    tp = tn = positives = negatives = 0
    for p, g in zip(preds, gts):
        p, g = p.numpy() > 0.5, g.numpy()
        tp += np.sum(p & g)
        tn += np.sum(~p & ~g)
        positives += np.sum(g)
        negatives += np.sum(~g)
    shadow, nonshadow = tp / positives, tn / negatives
    return 100 * (1 - (shadow + nonshadow) / 2), 100 * (1 - shadow), 100 * (1 - nonshadow)


def test_ber_matches_a_direct_numpy_computation():
    preds, gts = to_torch(random_cases(3) + structured_cases(3))
    ber = _compute(BalancedErrorRate(), preds, gts)
    expected = _numpy_ber(preds, gts)
    got = (float(ber["ber"]), float(ber["ber_shadow"]), float(ber["ber_nonshadow"]))
    assert got == pytest.approx(expected, abs=1e-10)
    # dataset-level, not per-image: differs from the mean of per-image BERs on these maps
    per_image = np.mean([_numpy_ber([p], [g])[0] for p, g in zip(preds, gts) if g.any() and (~g).any()])
    assert abs(per_image - got[0]) > 0.1


def test_ber_on_a_set_without_shadow_counts_the_missing_rate_as_zero_accuracy():
    ber = _compute(BalancedErrorRate(), [PRED_B], [GT_B])  # all non-shadow, all correct
    assert float(ber["ber_nonshadow"]) == 0.0
    assert float(ber["ber_shadow"]) == 100.0
    assert float(ber["ber"]) == 50.0


def test_batch_tensor_and_list_give_the_same_numbers():
    preds, gts = to_torch(random_cases(4))
    pred, gt = preds[0][:10, :12], gts[0][:10, :12]
    as_batch, as_list = task_metrics("glass"), task_metrics("glass")
    as_batch.update(torch.stack([pred, pred.flip(0)]), torch.stack([gt, gt]))
    as_list.update([pred, pred.flip(0)], [gt, gt])
    batch_values, list_values = as_batch.compute(), as_list.compute()
    assert batch_values.keys() == list_values.keys()
    for name in batch_values:
        assert float(batch_values[name]) == pytest.approx(float(list_values[name]), abs=1e-12), name


def _direct_voc_miou(preds, gts, num_classes, ignore_index):
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for p, g in zip(preds, gts):
        p, g = p.numpy().ravel(), g.numpy().ravel()
        keep = g != ignore_index
        np.add.at(confusion, (g[keep], p[keep]), 1)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    return float(np.mean(inter[present] / union[present])), int(present.sum())


def _label_maps(seed):
    """Label maps of three sizes using only some VOC classes, with void (255) borders and blobs."""
    gen = torch.Generator().manual_seed(seed)
    used = torch.tensor([0, 3, 7, 12, 15])
    preds, gts = [], []
    for h, w in [(20, 30), (17, 11), (25, 25)]:
        gt = used[torch.randint(0, len(used), (h, w), generator=gen)]
        gt[0, :] = 255
        gt[:, -1] = 255
        gt[5:9, 3:6] = 255
        pred = gt.clone()
        flip = torch.rand(h, w, generator=gen) < 0.35
        pred[flip] = used[torch.randint(0, len(used), (int(flip.sum()),), generator=gen)]
        pred[pred == 255] = 9  # whatever the model says on void pixels is not scored ...
        pred[-1, :3] = 18  # ... but a wrong class on a scored pixel is
        preds.append(pred)
        gts.append(gt)
    return preds, gts


def test_voc_miou_matches_a_confusion_matrix_computed_here():
    preds, gts = _label_maps(0)
    expected, num_present = _direct_voc_miou(preds, gts, 21, 255)
    assert 5 < num_present < 21  # absent classes are left out of the mean
    metric = SemanticMeanIoU(num_classes=21, ignore_index=255)
    metric.update(preds[:1], gts[:1])
    metric.update(torch.stack([preds[2], preds[2]]), torch.stack([gts[2], gts[2]]))
    metric.update(preds[1], gts[1])
    expected_with_repeat, _ = _direct_voc_miou(preds + [preds[2]], gts + [gts[2]], 21, 255)
    assert float(metric.compute()) == pytest.approx(expected_with_repeat, abs=1e-6)
    assert float(_compute(task_metrics("voc")["voc_miou"], preds, gts)) == pytest.approx(expected, abs=1e-6)


def test_semantic_label_errors_name_the_image():
    preds, gts = _label_maps(1)
    bad = preds[1].clone()
    bad[0, 0] = 21
    with pytest.raises(ValueError, match=r"image 1: pred ids must be in \[0, 21\)"):
        SemanticMeanIoU().update([preds[0], bad], gts[:2])
    bad_gt = gts[0].clone()
    bad_gt[3, 3] = 40
    with pytest.raises(ValueError, match="image 0: target ids"):
        SemanticMeanIoU().update(preds[0], bad_gt)
    with pytest.raises(TypeError, match="integer class ids"):
        SemanticMeanIoU().update(preds[0].float(), gts[0])


def test_categories_takes_the_scene_category_count():
    with pytest.raises(ValueError, match="num_classes"):
        task_metrics("categories")
    metrics = task_metrics("categories", num_classes=4)
    pred = torch.tensor([[0, 1], [2, 3]])
    gt = torch.tensor([[0, 1], [2, 2]])
    metrics.update(pred, gt)
    # IoU: class 0 1/1, class 1 1/1, class 2 1/2, class 3 0/1
    assert float(metrics.compute()["categories_miou"]) == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    with pytest.raises(ValueError, match="unknown task"):
        task_metrics("depth")


@pytest.mark.parametrize("task", sorted(HEADLINE_METRICS))
def test_every_task_computes_its_headline_metrics(task):
    metrics = task_metrics(task, num_classes=5 if task == "categories" else None)
    if task in ("voc", "categories"):
        preds, gts = _label_maps(2)
        preds = [p.clamp(max=4) for p in preds]
        gts = [torch.where(g == 255, g, g.clamp(max=4)) for g in gts]
    else:
        preds, gts = to_torch(structured_cases(5))
    metrics.update(preds, gts)
    values = metrics.compute()
    assert set(HEADLINE_METRICS[task]) <= set(values)
    for name, value in values.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    if task not in ("voc", "categories"):
        expected = {"iou_fg", "miou_fgbg", "fbeta_max", "fbeta_mean", "fbeta_adaptive", "fbeta_blur", "mae",
                    "ber", "ber_shadow", "ber_nonshadow", "emeasure_mean", "emeasure_max",
                    "emeasure_adaptive", "smeasure"}
        assert expected <= set(values)
        assert LOWER_IS_BETTER <= set(values)


@pytest.mark.parametrize(
    "pred, target, error, message",
    [
        (torch.rand(4, 5, dtype=torch.float64) + 1, torch.zeros(4, 5, dtype=torch.bool), ValueError, r"\[0, 1\]"),
        (torch.rand(4, 5), torch.zeros(4, 5, dtype=torch.uint8), TypeError, "target must be bool"),
        (torch.rand(4, 5), torch.zeros(4, 6, dtype=torch.bool), ValueError, "shape"),
        (torch.randint(0, 2, (4, 5)), torch.zeros(4, 5, dtype=torch.bool), TypeError, "float probability"),
        ([torch.rand(4, 5)], [torch.zeros(4, 5, dtype=torch.bool)] * 2, ValueError, "1 maps but target has 2"),
        (torch.rand(1, 1, 4, 5), torch.zeros(1, 1, 4, 5, dtype=torch.bool), ValueError, r"\(B, H, W\)"),
    ],
)
def test_binary_input_errors_are_clear(pred, target, error, message):
    for metric in task_metrics("blur").values():
        with pytest.raises(error, match=message):
            metric.update(pred, target)
