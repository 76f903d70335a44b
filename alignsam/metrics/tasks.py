"""One metric collection per task, and the headline metrics each paper reports.

``task_metrics(task)`` returns a ``torchmetrics.MetricCollection`` whose ``compute()`` gives a flat
dict of float scalars named after their definition (``iou_fg``, ``miou_fgbg``, ``fbeta_max``, ...):
log it with ``LightningModule.log_dict(collection.compute())``. Binary tasks share one full set;
the semantic tasks have the class-mean IoU.
"""
from __future__ import annotations

from typing import Optional

from torchmetrics import MetricCollection

from alignsam.tasks import LOWER_IS_BETTER, TASKS  # noqa: F401  (LOWER_IS_BETTER re-exported)
from alignsam.metrics.binary import BalancedErrorRate, FgBgMeanIoU, ForegroundIoU
from alignsam.metrics.saliency import (
    BLUR_ADAPTIVE_THRESHOLD_SCALE,
    AdaptiveFMeasure,
    EMeasure,
    FMeasure,
    MeanAbsoluteError,
    SMeasure,
)
from alignsam.metrics.semantic import VOC_IGNORE_INDEX, VOC_NUM_CLASSES, SemanticMeanIoU

# Views of the task records (alignsam/tasks.py), for the metric code and its users.
BINARY_TASKS = tuple(name for name, task in TASKS.items() if not task.semantic)
SEMANTIC_TASKS = tuple(name for name, task in TASKS.items() if task.semantic)
HEADLINE_METRICS: dict[str, list[str]] = {name: list(task.headline) for name, task in TASKS.items()}


def binary_metrics(minmax_normalize: bool = False, validate_args: bool = True) -> dict:
    """The full set for probability maps vs boolean GT; keys are the collection's entries.

    ``fmeasure``, ``emeasure`` and ``balanced_error_rate`` each return several named values.
    """
    per_image = dict(minmax_normalize=minmax_normalize, validate_args=validate_args)
    return {
        "iou_fg": ForegroundIoU(validate_args=validate_args),
        "miou_fgbg": FgBgMeanIoU(validate_args=validate_args),
        "fmeasure": FMeasure(**per_image),  # fbeta_max, fbeta_mean, fbeta_adaptive
        "fbeta_blur": AdaptiveFMeasure(scale=BLUR_ADAPTIVE_THRESHOLD_SCALE, **per_image),
        "mae": MeanAbsoluteError(**per_image),
        "balanced_error_rate": BalancedErrorRate(validate_args=validate_args),  # ber, ber_shadow, ber_nonshadow
        "emeasure": EMeasure(**per_image),  # emeasure_mean, emeasure_max, emeasure_adaptive
        "smeasure": SMeasure(**per_image),
    }


def task_metrics(
    task: str,
    num_classes: Optional[int] = None,
    ignore_index: int = VOC_IGNORE_INDEX,
    minmax_normalize: bool = False,
    validate_args: bool = True,
) -> MetricCollection:
    """The metric collection of one task.

    Args:
        task: ``blur``, ``shadow``, ``glass``, ``saliency`` (binary: ``update(prob_maps, bool_masks)``)
            or ``voc``, ``categories`` (semantic: ``update(label_maps, label_maps)``).
        num_classes: classes including background for the semantic tasks (default 21 for ``voc``;
            required for ``categories``: 1 + the scene's category count).
        ignore_index: GT id that is not scored (semantic tasks).
        minmax_normalize: stretch every map to [0, 1] before the per-image saliency measures, as
            the saliency toolkits do.
        validate_args: check input dtypes and ranges on every update.
    Returns:
        A ``MetricCollection`` without compute groups (states must never be shared between, e.g.,
        two adaptive F-measures whose first batch happened to give equal sums).
    Raises:
        ValueError: unknown task, or ``categories`` without ``num_classes``.
    """
    if task in BINARY_TASKS:
        metrics = binary_metrics(minmax_normalize, validate_args)
        if task == "glass":  # GDNet's IoU: an image with empty union scores 0
            metrics["iou_fg_gdnet"] = ForegroundIoU(empty_union_value=0.0, validate_args=validate_args)
    elif task in SEMANTIC_TASKS:
        if num_classes is None:
            if task == "categories":
                raise ValueError("task 'categories' needs num_classes (1 + the number of scene categories)")
            num_classes = VOC_NUM_CLASSES
        metrics = {f"{task}_miou": SemanticMeanIoU(num_classes, ignore_index, validate_args=validate_args)}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {BINARY_TASKS + SEMANTIC_TASKS}")
    return MetricCollection(metrics, compute_groups=False)
