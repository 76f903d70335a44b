"""Per-episode sufficient statistics of the headline metrics: computing, storing, recomputing.

``evaluate.py`` writes ``<results dir>/test_episodes.npz`` beside ``test.csv``: for every strategy
and every scored unit, the numbers from which each task's headline metrics
(:data:`alignsam.metrics.HEADLINE_METRICS`) are recomputed on any resampling of the units, exactly
as :mod:`alignsam.metrics` computes them on the whole split. A *unit* is what the metric sums over:

* binary tasks: an episode (= an image), id ``sample["id"]`` (``"shadow-100123"``);
* ``voc`` / ``categories``: an image, id ``sample["image_id"]``: its label map is assembled from all
  its class episodes (:mod:`alignsam.metrics.assembly`), so its episodes are resampled together.

Ids name test scenes / dataset images, so they are the same for every run (seed) of a task and
pair runs episode by episode.

Every headline metric is a function of sums over units (:class:`DatasetMetric`):

===================  ==========================  ===================================================
metric               per-unit fields             from the weighted sums S and the unit count n
===================  ==========================  ===================================================
``miou_fgbg``        ``counts`` (4,) TP FP FN TN  (TP / (TP+FP+FN) + TN / (TN+FN+FP)) / 2, pooled
                                                 pixels; an empty union counts 1
``ber``              ``counts``                   100 (1 - (TP / (TP+FN) + TN / (TN+FP)) / 2), pooled;
                                                 an empty denominator gives accuracy 0
``fbeta_max``        ``fbeta_curve`` (256,)       max over thresholds of S / n (the per-image curve
                                                 averaged over images, then its maximum)
``emeasure_mean``    ``emeasure_mean`` ()         S / n (the mean of the image-averaged curve = the
                                                 image mean of each image's curve mean)
``mae``              ``mae`` ()                   S / n
``voc_miou``,        ``intersection``, ``union``  mean over classes with pooled union > 0 of
``categories_miou``  (K,) pixels per class        I_c / U_c (torchmetrics' macro Jaccard index)
===================  ==========================  ===================================================

A resample is a vector of unit weights ``w`` (how often each unit is drawn): S = sum_i w_i x_i over
the units the strategy scored, n = sum_i w_i over them. With all weights 1 the value equals the
one in ``test.csv`` (to float rounding; the semantic mIoU is float32 in torchmetrics).

Every binary task stores the fields of every binary headline metric (shadow's file can give
``fbeta_max`` too), the semantic ones ``intersection`` and ``union``.

File format (``numpy.savez_compressed``): ``ids`` (N,) str, ``strategies`` (S,) str, ``scored``
(S, N) bool (False where the strategy left the unit out: its fields are 0 there), ``field/<name>``
(S, N, ...) per field, and ``meta`` a JSON string: ``format``, ``task``, ``unit``, ``split``,
``seed``, ``checkpoint``, ``num_classes``, ``ignore_index``.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from alignsam.atomic import write_bytes_atomic
from alignsam.errors import UserError
from alignsam.geometry import PROB_THRESHOLD
from alignsam.metrics.saliency import emeasure_from_counts, fmeasure_from_counts, threshold_counts
from alignsam.tasks import LOWER_IS_BETTER

FORMAT_VERSION = 1
EPISODES_FILE_SUFFIX = "_episodes.npz"  # <stem>_episodes.npz beside <stem>.csv

Fields = Dict[str, np.ndarray]


# -- per-unit statistics -------------------------------------------------------------------------
def binary_unit_fields(prob: torch.Tensor, target: torch.Tensor) -> Fields:
    """One binary episode's fields from its probability map ``(H, W)`` float in [0, 1] (the
    sigmoid of SAM's logits, as the metrics get it) and its ground truth ``(H, W)`` bool.

    Returns ``counts`` (4,) int64 (TP, FP, FN, TN at ``prob > 0.5``), ``fbeta_curve`` (256,)
    float64, ``emeasure_mean`` and ``mae`` () float64, computed as :mod:`alignsam.metrics` does.
    """
    p = prob.to(torch.float64)
    t = target.to(p.device, torch.bool)
    binary = p > PROB_THRESHOLD
    counts = torch.stack([(binary & t).sum(), (binary & ~t).sum(), (~binary & t).sum(), (~binary & ~t).sum()])
    gt_fg = t.sum()
    tp, pred_fg = threshold_counts(p, t)
    fbeta = fmeasure_from_counts(tp, pred_fg, gt_fg.to(torch.float64))
    emeasure = emeasure_from_counts(tp, pred_fg, int(gt_fg), t.numel()).mean()
    mae = (p - t.to(torch.float64)).abs().mean()
    return {"counts": counts.cpu().numpy().astype(np.int64), "fbeta_curve": fbeta.cpu().numpy(),
            "emeasure_mean": np.float64(emeasure.item()), "mae": np.float64(mae.item())}


def label_map_fields(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: Optional[int]) -> Fields:
    """One image's fields from its predicted and true label maps ``(H, W)`` long: ``intersection``
    and ``union`` (K,) int64, pixels per class over the pixels whose truth is not ``ignore_index``
    (the confusion matrix of :class:`~alignsam.metrics.SemanticMeanIoU`, reduced per class)."""
    pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    inter = torch.bincount(target[pred == target], minlength=num_classes)[:num_classes]
    truth = torch.bincount(target, minlength=num_classes)[:num_classes]
    predicted = torch.bincount(pred, minlength=num_classes)[:num_classes]
    return {"intersection": inter.numpy().astype(np.int64), "union": (truth + predicted - inter).numpy().astype(np.int64)}


# -- metrics from sums ----------------------------------------------------------------------------
def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def _mean_over_units(name: str) -> Callable[[Fields, np.ndarray, dict], np.ndarray]:
    def reduce(sums: Fields, count: np.ndarray, meta: dict) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return sums[name] / count
    return reduce


def _miou_fgbg(sums: Fields, count: np.ndarray, meta: dict) -> np.ndarray:
    tp, fp, fn, tn = np.moveaxis(sums["counts"].astype(np.float64), -1, 0)
    return (_ratio(tp, tp + fp + fn, 1.0) + _ratio(tn, tn + fn + fp, 1.0)) / 2


def _ber(sums: Fields, count: np.ndarray, meta: dict) -> np.ndarray:
    tp, fp, fn, tn = np.moveaxis(sums["counts"].astype(np.float64), -1, 0)
    return 100 * (1 - (_ratio(tp, tp + fn, 0.0) + _ratio(tn, tn + fp, 0.0)) / 2)


def _fbeta_max(sums: Fields, count: np.ndarray, meta: dict) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (sums["fbeta_curve"] / count[..., None]).max(-1)


def _semantic_miou(sums: Fields, count: np.ndarray, meta: dict) -> np.ndarray:
    inter, union = sums["intersection"].astype(np.float64), sums["union"].astype(np.float64)
    present = union > 0
    ignore = meta.get("ignore_index")
    if ignore is not None and 0 <= ignore < union.shape[-1]:
        present[..., ignore] = False
    iou = _ratio(inter, union, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (iou * present).sum(-1) / present.sum(-1)


@dataclass(frozen=True)
class DatasetMetric:
    """A headline metric as a function of unit sums.

    fields: the per-unit fields it reads; reduce(sums, count, meta): ``sums[field]`` ``(..., *F)``
    the weighted sums over scored units, ``count`` ``(...)`` their weighted number, ``meta`` the
    file's metadata -> the metric ``(...)`` (NaN where ``count`` is 0).
    """

    name: str
    fields: tuple
    reduce: Callable[[Fields, np.ndarray, dict], np.ndarray]

    @property
    def lower_is_better(self) -> bool:
        return self.name in LOWER_IS_BETTER


DATASET_METRICS: Dict[str, DatasetMetric] = {m.name: m for m in (
    DatasetMetric("miou_fgbg", ("counts",), _miou_fgbg),
    DatasetMetric("ber", ("counts",), _ber),
    DatasetMetric("fbeta_max", ("fbeta_curve",), _fbeta_max),
    DatasetMetric("emeasure_mean", ("emeasure_mean",), _mean_over_units("emeasure_mean")),
    DatasetMetric("mae", ("mae",), _mean_over_units("mae")),
    DatasetMetric("voc_miou", ("intersection", "union"), _semantic_miou),
    DatasetMetric("categories_miou", ("intersection", "union"), _semantic_miou),
)}


def metric_values(metric: DatasetMetric, fields: Mapping[str, np.ndarray], scored: np.ndarray,
                  weights: np.ndarray, meta: Optional[dict] = None) -> np.ndarray:
    """``metric`` of M score sets under R unit weightings.

    Args:
        fields: ``{field: (M, N, *F)}`` per-unit fields (0 where unscored).
        scored: ``(M, N)`` bool.
        weights: ``(R, N)`` how often each unit is drawn (all ones: the full split).
    Returns:
        ``(R, M)`` float64.
    """
    w = np.asarray(weights, np.float64)
    kept = np.asarray(scored, bool)
    count = w @ kept.T.astype(np.float64)  # (R, M)
    sums = {}
    for name in metric.fields:
        x = np.asarray(fields[name])
        m, n, tail = x.shape[0], x.shape[1], x.shape[2:]
        flat = np.where(kept.reshape(m, n, *(1,) * len(tail)), x, 0).astype(np.float64).reshape(m, n, -1)
        s = w @ flat.transpose(1, 0, 2).reshape(n, -1)  # one GEMM: (R, N) @ (N, M * F)
        sums[name] = s.reshape((len(w), m) + tail)
    return metric.reduce(sums, count, meta or {})


# -- the file -------------------------------------------------------------------------------------
@dataclass
class EpisodeStatistics:
    """Per-unit fields of every strategy of one run (see the module docstring).

    ids ``(N,)`` unit ids; strategies: S names; scored ``(S, N)`` bool; fields ``{name: (S, N, *F)}``;
    meta: ``task``, ``unit``, ``split``, ``seed``, ``checkpoint``, ``num_classes``, ``ignore_index``.
    """

    ids: np.ndarray
    strategies: List[str]
    scored: np.ndarray
    fields: Dict[str, np.ndarray]
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return str(self.meta.get("task", ""))

    def metrics(self) -> List[str]:
        """The headline metrics of the run's task that its fields give."""
        from alignsam.metrics import HEADLINE_METRICS

        return [m for m in HEADLINE_METRICS.get(self.task, []) if m in DATASET_METRICS
                and all(f in self.fields for f in DATASET_METRICS[m].fields)]

    def values(self, metric: str, weights: Optional[np.ndarray] = None) -> np.ndarray:
        """``metric`` per strategy ``(S,)`` on the whole split, or ``(R, S)`` under ``weights`` ``(R, N)``."""
        w = np.ones((1, len(self.ids))) if weights is None else weights
        out = metric_values(DATASET_METRICS[metric], self.fields, self.scored, w, self.meta)
        return out[0] if weights is None else out

    def table(self) -> Dict[str, Dict[str, float]]:
        """``{strategy: {headline metric: value}}`` on the whole split (what ``test.csv`` shows)."""
        columns = {m: self.values(m) for m in self.metrics()}
        return {s: {m: float(v[i]) for m, v in columns.items()} for i, s in enumerate(self.strategies)}

    def aligned(self, ids: Sequence[str]) -> "EpisodeStatistics":
        """The same statistics with units in the order of ``ids`` (the same set of ids)."""
        position = {u: i for i, u in enumerate(self.ids.tolist())}
        order = np.array([position[u] for u in ids], dtype=np.int64)
        return EpisodeStatistics(self.ids[order], list(self.strategies), self.scored[:, order],
                                 {k: v[:, order] for k, v in self.fields.items()}, dict(self.meta))

    def save(self, path) -> Path:
        """Write the ``.npz`` atomically."""
        buffer = io.BytesIO()
        arrays = {"ids": np.asarray(self.ids, dtype=str), "strategies": np.asarray(self.strategies, dtype=str),
                  "scored": self.scored.astype(bool), "meta": np.asarray(json.dumps({"format": FORMAT_VERSION, **self.meta}))}
        arrays.update({f"field/{k}": v for k, v in self.fields.items()})
        np.savez_compressed(buffer, **arrays)
        return write_bytes_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path) -> "EpisodeStatistics":
        """Read a file written by :meth:`save`; a file that is not one is a one-line :class:`UserError`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                fields = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("field/")}
                stats = cls(data["ids"].astype(str), data["strategies"].astype(str).tolist(), data["scored"], fields, meta)
        except (OSError, KeyError, ValueError) as error:
            raise UserError(f"{path}: not a per-episode statistics file of evaluate.py ({error})") from None
        if meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{path}: per-episode file format {meta.get('format')}, this code reads "
                            f"{FORMAT_VERSION}; run evaluate.py on the run again")
        return stats


class EpisodeRecorder:
    """Collects the per-unit fields of each strategy during evaluation.

    ``add(strategy, unit_id, fields)`` for a scored unit, ``skip(strategy, unit_id)`` for one the
    strategy left out; a unit id seen again (DDP padding repeats episodes) keeps its first fields,
    except that :meth:`add_partial` sums them (a label map split over processes).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.units: Dict[str, Dict[str, Optional[Fields]]] = {n: {} for n in self.names}

    def add(self, name: str, unit: str, fields: Fields) -> None:
        self.units[name].setdefault(unit, fields)

    def skip(self, name: str, unit: str) -> None:
        self.units[name].setdefault(unit, None)

    @staticmethod
    def merge(parts: Sequence[Dict[str, Dict[str, Optional[Fields]]]], summed: bool) -> Dict[str, Dict[str, Optional[Fields]]]:
        """Every rank's ``units``: the first rank's fields of a repeated unit, or their sum when
        ``summed`` (skipped anywhere = skipped)."""
        merged: Dict[str, Dict[str, Optional[Fields]]] = {}
        for part in parts:
            for name, units in part.items():
                into = merged.setdefault(name, {})
                for unit, fields in units.items():
                    if unit not in into:
                        into[unit] = fields
                    elif summed and into[unit] is not None:
                        into[unit] = None if fields is None else {k: into[unit][k] + fields[k] for k in fields}
        return merged

    @staticmethod
    def build(units: Dict[str, Dict[str, Optional[Fields]]], meta: Dict[str, object]) -> Optional[EpisodeStatistics]:
        """The :class:`EpisodeStatistics` of merged ``units`` (None when no strategy scored anything)."""
        names = list(units)
        ids = sorted({u for per in units.values() for u in per})
        example = next((f for per in units.values() for f in per.values() if f is not None), None)
        if example is None:
            return None
        scored = np.zeros((len(names), len(ids)), bool)
        fields = {k: np.zeros((len(names), len(ids)) + np.shape(v), np.asarray(v).dtype) for k, v in example.items()}
        for s, name in enumerate(names):
            for n, unit in enumerate(ids):
                values = units[name].get(unit)
                if values is not None:
                    scored[s, n] = True
                    for k, v in values.items():
                        fields[k][s, n] = v
        return EpisodeStatistics(np.asarray(ids, dtype=str), names, scored, fields, dict(meta))


def episodes_path(directory, stem: str = "test") -> Path:
    """``<directory>/<stem>_episodes.npz``."""
    return Path(directory) / f"{stem}{EPISODES_FILE_SUFFIX}"
