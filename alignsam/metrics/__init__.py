"""Evaluation metrics of every task, as torchmetrics ``Metric`` classes with sum-reduced states.

* :mod:`.binary`: ``iou_fg``, ``miou_fgbg``, ``ber`` (thresholded masks);
* :mod:`.saliency`: ``mae``, F-measure, E-measure, S-measure (pysodmetrics protocols);
* :mod:`.semantic`: class-mean IoU (VOC, scene categories);
* :mod:`.tasks`: ``task_metrics(task)`` and ``HEADLINE_METRICS``.
"""
from alignsam.metrics.binary import BalancedErrorRate, FgBgMeanIoU, ForegroundIoU
from alignsam.metrics.saliency import AdaptiveFMeasure, EMeasure, FMeasure, MeanAbsoluteError, SMeasure
from alignsam.metrics.semantic import SemanticMeanIoU
from alignsam.metrics.tasks import HEADLINE_METRICS, LOWER_IS_BETTER, task_metrics

__all__ = [
    "AdaptiveFMeasure",
    "BalancedErrorRate",
    "EMeasure",
    "FMeasure",
    "FgBgMeanIoU",
    "ForegroundIoU",
    "HEADLINE_METRICS",
    "LOWER_IS_BETTER",
    "MeanAbsoluteError",
    "SMeasure",
    "SemanticMeanIoU",
    "task_metrics",
]
