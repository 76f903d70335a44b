"""One record per task: everything the code needs to know about ``model.task``, in one table.

The binary tasks (``blur``, ``shadow``, ``glass``, ``saliency``) score one mask per image against a
binary ground truth; the semantic ones (``voc``, ``categories``) run one episode per (image, class
present) and assemble each image's label map from its episodes (docs/method.md, "VOC as an
open-context task"). Metric definitions live in :mod:`alignsam.metrics`; this table says which of
them each task reports, in which order, and which way is better.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from alignsam.errors import ConfigError

# Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"mae", "ber", "ber_shadow", "ber_nonshadow"})


@dataclass(frozen=True)
class Task:
    """What a task is.

    Attributes:
        name: the ``model.task`` value.
        semantic: label maps of several classes per image (``voc``, ``categories``) rather than one
            binary mask.
        headline: the metrics the paper's table reports, the main one first (the binary tasks'
            "mIoU" is ``miou_fgbg``, the mean of foreground and background IoU).
        shown: the further metrics the terminal table prints after the headline (the CSV keeps all).
        default_text: the episode text when none is given (the binary tasks' own word).
        class_names: names of class ids ``1..K`` of a semantic task (0 is the background).
    """

    name: str
    semantic: bool
    headline: Tuple[str, ...]
    shown: Tuple[str, ...] = ()
    default_text: Optional[str] = None
    class_names: Tuple[str, ...] = ()

    @property
    def num_classes(self) -> Optional[int]:
        """Classes including the background (semantic tasks), else None."""
        return 1 + len(self.class_names) if self.semantic else None

    def lower_is_better(self, metric: str) -> bool:
        return metric in LOWER_IS_BETTER


def _voc_names() -> Tuple[str, ...]:
    from alignsam.data.voc import VOC_CLASS_TEXTS

    return tuple(VOC_CLASS_TEXTS)


def _category_names() -> Tuple[str, ...]:
    from alignsam.data.scenes import CATEGORY_NAMES

    return tuple(CATEGORY_NAMES)


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("blur", False, ("miou_fgbg", "fbeta_max"), ("iou_fg", "fbeta_mean", "mae"), default_text="blur"),
    Task("shadow", False, ("miou_fgbg", "ber"), ("iou_fg", "ber_shadow", "ber_nonshadow"), default_text="shadow"),
    Task("glass", False, ("miou_fgbg", "fbeta_max"), ("iou_fg", "mae", "ber"), default_text="glass"),
    Task("saliency", False, ("emeasure_mean", "mae"), ("fbeta_max", "smeasure", "iou_fg"), default_text="salient"),
    Task("voc", True, ("voc_miou",), class_names=_voc_names()),
    Task("categories", True, ("categories_miou",), class_names=_category_names()),
)}


def task_record(name: str) -> Task:
    """The :class:`Task` called ``name``; an unknown name is a one-line error naming ``model.task``."""
    if name not in TASKS:
        raise ConfigError("model.task", f"unknown task {name!r}; choose one of {list(TASKS)}")
    return TASKS[name]
