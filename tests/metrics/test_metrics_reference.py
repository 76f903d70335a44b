"""Our saliency / shadow metrics against pysodmetrics (import name ``py_sod_metrics``).

Both sides get the same maps: float64 probabilities (``u8 / 255`` for uint8 maps) and boolean
GT, passed to pysodmetrics with ``normalize=False`` (so it neither rescales nor re-thresholds
them). A second test uses the toolkit's own input path (uint8 maps, ``normalize=True``: min-max
stretch, GT > 128) against ours with ``minmax_normalize=True``.

Tolerance: ``ATOL = 1e-10``. Both sides compute in float64 from identical inputs; only the order of
floating-point sums differs (torch vs numpy reductions), which moves results by ~1e-15.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

py_sod_metrics = pytest.importorskip("py_sod_metrics")

from alignsam.metrics import (  # noqa: E402
    AdaptiveFMeasure,
    BalancedErrorRate,
    EMeasure,
    FMeasure,
    ForegroundIoU,
    MeanAbsoluteError,
    SMeasure,
)
from metric_cases import as_probability, continuous_cases, random_cases, structured_cases, to_torch  # noqa: E402

ATOL = 1e-10
CASE_SETS = {"random": random_cases(0), "structured": structured_cases(0), "continuous": continuous_cases(0)}


def _reference(cases, normalize: bool):
    """pysodmetrics' numbers for ``cases`` (list of (pred uint8 or float64, gt bool)).

    ``normalize=True`` takes the toolkit's own input path and needs uint8 maps.
    """
    fm = py_sod_metrics.FmeasureV2(
        metric_handlers={
            "fm": py_sod_metrics.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3),
            "ber": py_sod_metrics.BERHandler(
                with_dynamic=False, with_adaptive=False, with_binary=True, sample_based=False
            ),
            "iou": py_sod_metrics.IOUHandler(
                with_dynamic=False, with_adaptive=False, with_binary=True, sample_based=True
            ),
        }
    )
    mae, em, sm = py_sod_metrics.MAE(), py_sod_metrics.Emeasure(), py_sod_metrics.Smeasure(alpha=0.5)
    for pred_map, gt in cases:
        if normalize:
            assert pred_map.dtype == np.uint8
            pred, gt_in = pred_map, gt.astype(np.uint8) * 255
        else:
            pred, gt_in = as_probability(pred_map), gt
        for evaluator in (fm, mae, em, sm):
            evaluator.step(pred=pred, gt=gt_in, normalize=normalize)
    fm_res, em_res = fm.get_results(), em.get_results()["em"]
    return {
        "fbeta_max": fm_res["fm"]["dynamic"].max(),
        "fbeta_mean": fm_res["fm"]["dynamic"].mean(),
        "fbeta_adaptive": fm_res["fm"]["adaptive"],
        "mae": mae.get_results()["mae"],
        "emeasure_mean": em_res["curve"].mean(),
        "emeasure_max": em_res["curve"].max(),
        "emeasure_adaptive": em_res["adp"],
        "smeasure": sm.get_results()["sm"],
        "ber": 100 * fm_res["ber"]["binary"],
        "iou_fg_empty0": fm_res["iou"]["binary"],
    }


def _ours(preds, gts, minmax_normalize: bool = False):
    saliency = dict(minmax_normalize=minmax_normalize)
    metrics = {
        "fmeasure": FMeasure(**saliency),
        "mae": MeanAbsoluteError(**saliency),
        "emeasure": EMeasure(**saliency),
        "smeasure": SMeasure(**saliency),
        "ber": BalancedErrorRate(),
        "iou_fg_empty0": ForegroundIoU(empty_union_value=0.0),
    }
    out = {}
    for name, metric in metrics.items():
        metric.update(preds[:2], gts[:2])  # two updates: states must accumulate across calls
        metric.update(preds[2:], gts[2:])
        value = metric.compute()
        out.update({k: float(v) for k, v in value.items()} if isinstance(value, dict) else {name: float(value)})
    return out


@pytest.mark.parametrize("case_set", sorted(CASE_SETS))
def test_saliency_and_shadow_metrics_match_pysodmetrics(case_set):
    cases = CASE_SETS[case_set]
    reference = _reference(cases, normalize=False)
    ours = _ours(*to_torch(cases))
    for name, expected in reference.items():
        assert ours[name] == pytest.approx(float(expected), abs=ATOL), name


def test_minmax_normalize_matches_pysodmetrics_uint8_input_path():
    cases = structured_cases(1) + random_cases(1)
    # stretch matters only where a map does not already span 0..255
    assert any(p.max() - p.min() < 255 for p, _ in cases)
    reference = _reference(cases, normalize=True)
    ours = _ours(*to_torch(cases), minmax_normalize=True)
    for name in ("fbeta_max", "fbeta_mean", "fbeta_adaptive", "mae", "emeasure_mean", "emeasure_max",
                 "emeasure_adaptive", "smeasure"):
        assert ours[name] == pytest.approx(float(reference[name]), abs=ATOL), name


def _numpy_adaptive_f(pred, gt, scale, beta_sq=0.3):
    mask = pred >= min(scale * pred.mean(), 1.0)
    tp = np.count_nonzero(mask & gt)
    if tp == 0:
        return 0.0
    precision, recall = tp / np.count_nonzero(mask), tp / np.count_nonzero(gt)
    return (1 + beta_sq) * precision * recall / (beta_sq * precision + recall)


def test_fbeta_blur_uses_one_and_a_half_times_the_mean():
    cases = structured_cases(2) + random_cases(2)
    preds, gts = to_torch(cases)
    expected = np.mean([_numpy_adaptive_f(p.numpy(), g.numpy(), 1.5) for p, g in zip(preds, gts)])
    blur = AdaptiveFMeasure(scale=1.5)
    blur.update(preds, gts)
    assert float(blur.compute()) == pytest.approx(expected, abs=ATOL)
    # the scale matters on these maps, and scale 2 is the toolkit's adaptive F
    double = AdaptiveFMeasure(scale=2.0)
    double.update(preds, gts)
    assert abs(float(double.compute()) - expected) > 1e-3
    assert float(double.compute()) == pytest.approx(float(_reference(cases, False)["fbeta_adaptive"]), abs=ATOL)


def test_smeasure_is_finite_when_the_gt_centroid_is_on_the_last_row():
    # The centroid split leaves an empty quadrant; pysodmetrics turns that into NaN, we give it weight 0.
    gt = torch.zeros(10, 12, dtype=torch.bool)
    gt[-1, 3:9] = True
    pred = torch.zeros(10, 12, dtype=torch.float64)
    pred[-1, 2:9] = 0.9
    metric = SMeasure()
    metric.update(pred, gt)
    value = float(metric.compute())
    assert 0.5 < value <= 1.0
