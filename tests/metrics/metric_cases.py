"""Prediction / GT pairs for the metric tests: random maps and real-looking ones of several sizes.

Predictions are uint8 (0..255) as the saliency toolkits read them, or float64 maps off the uint8
grid; the tests feed the same float64 probabilities (``u8 / 255`` for uint8) to both our metrics
and pysodmetrics, so both see identical maps.
"""
from __future__ import annotations

import numpy as np
import torch


def soft_disc(hw, centre, radius, softness):
    """``(H, W)`` float map, ~1 inside the disc and falling off over ``softness`` pixels."""
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    dist = np.hypot(yy - centre[0], xx - centre[1])
    return 1.0 / (1.0 + np.exp((dist - radius) / softness))


def disc(hw, centre, radius):
    """``(H, W)`` bool disc."""
    return soft_disc(hw, centre, radius, 1.0) > 0.5


def _u8(prob):
    return np.round(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8)


def random_cases(seed: int = 0):
    """Uniform-noise maps against sparse and dense random GT."""
    rng = np.random.default_rng(seed)
    cases = []
    for (h, w), density in [((23, 31), 0.3), ((40, 17), 0.6), ((12, 12), 0.1)]:
        cases.append((_u8(rng.random((h, w))), rng.random((h, w)) < density))
    return cases


def structured_cases(seed: int = 0):
    """Blobs with soft edges, partial detections, empty and full GT, constant and perfect maps."""
    rng = np.random.default_rng(seed)
    cases = []
    # one object; the prediction is a shifted soft disc plus noise
    gt = disc((48, 64), (20, 30), 12)
    pred = soft_disc((48, 64), (23, 33), 11, 3.0) + 0.08 * rng.standard_normal((48, 64))
    cases.append((_u8(pred), gt))
    # two objects, only one found, with a low-confidence false positive elsewhere
    gt = disc((57, 41), (15, 12), 7) | disc((57, 41), (40, 30), 9)
    pred = soft_disc((57, 41), (15, 12), 8, 1.5) + 0.35 * soft_disc((57, 41), (45, 8), 5, 2.0)
    cases.append((_u8(pred), gt))
    # empty GT with a faint prediction
    cases.append((_u8(0.2 * rng.random((30, 36))), np.zeros((30, 36), bool)))
    # full GT with a mostly confident prediction
    cases.append((_u8(0.6 + 0.4 * rng.random((25, 20))), np.ones((25, 20), bool)))
    # all-zero prediction of a real object
    gt = disc((33, 50), (16, 20), 8)
    cases.append((np.zeros((33, 50), np.uint8), gt))
    # perfect binary prediction (rectangle)
    gt = np.zeros((40, 40), bool)
    gt[10:25, 5:30] = True
    cases.append((_u8(gt.astype(float)), gt))
    # two diagonal objects, found exactly: two quadrants of the S-measure split hold no object at all
    gt = disc((44, 52), (10, 10), 6) | disc((44, 52), (33, 41), 6)
    cases.append((_u8(gt.astype(float)), gt))
    return cases


def continuous_cases(seed: int = 0):
    """Float64 maps off the uint8 grid (exercise the ``floor(255 * p)`` quantisation itself)."""
    rng = np.random.default_rng(seed)
    gt = disc((37, 45), (18, 20), 10)
    return [
        (rng.random((21, 26)), rng.random((21, 26)) < 0.4),
        (np.clip(soft_disc((37, 45), (16, 22), 9, 2.5) + 0.1 * rng.standard_normal((37, 45)), 0, 1), gt),
        (rng.random((16, 30)) ** 3, np.zeros((16, 30), bool)),
    ]


def as_probability(pred: np.ndarray) -> np.ndarray:
    """uint8 maps become ``u8 / 255`` float64; float maps are returned as float64."""
    return pred.astype(np.float64) / 255 if pred.dtype == np.uint8 else pred.astype(np.float64)


def to_torch(cases):
    """``(list of (H, W) float64 probabilities, list of (H, W) bool)`` tensors."""
    preds = [torch.from_numpy(as_probability(p)) for p, _ in cases]
    gts = [torch.from_numpy(g) for _, g in cases]
    return preds, gts
