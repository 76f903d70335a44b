"""Scoring prompting strategies: the task's metrics, the IoU after each click, and NoC.

Every number is computed at the ground truth's (original) resolution: SAM's low-res logits are
resized by :meth:`~alignsam.foundation.segmenter.Segmenter.logits_to_original` and thresholded at
:data:`~alignsam.geometry.MASK_LOGIT_THRESHOLD`. Per-click IoU is the per-episode foreground IoU
(:func:`alignsam.losses.mask_iou`, an empty union counts as 1), averaged over episodes.

NoC@x (number of clicks to reach IoU x, the interactive-segmentation measure) counts the prompts
SAM has received when the episode's IoU first reaches x, the strategy's seed prompts included (the
agent's P_0); an episode that never reaches x counts as the strategy's largest prompt count, and
the share of such episodes is reported as ``fail@x``.

Episodes a strategy could not score (:attr:`~alignsam.evaluation.strategies.Outcome.unscored`, e.g.
PerSAM-style on a class that no few-shot training episode shows) are left out of that strategy's
numbers only, never of the other strategies':

* binary tasks: the episode (= the image) leaves its metrics, click curve and NoC;
* semantic tasks (``voc``, ``categories``): the metric is over per-image label maps, and a label
  map without one of its classes' predictions would score that class as missed, which is not
  what the strategy would have done. So an image with an unscored episode leaves the strategy's
  label maps whole (its other episodes are not used either); the click curve and NoC, which are
  per episode, leave out only the unscored episodes.

The strategy's mIoU is then over fewer images than the other rows'; the table says so.

Beside the table, :meth:`StrategyScores.compute` keeps the per-unit sufficient statistics of the
headline metrics (:mod:`alignsam.evaluation.episodes`: per episode for the binary tasks, per label
map for the semantic ones; unscored units are marked) in :attr:`StrategyScores.last_episodes`. When any
strategy left episodes out, every row gets ``episodes`` (scored) and ``episodes_total``, the
semantic tasks also ``images`` (label maps in the metric) and ``images_total``, and the strategy's
row ``unscored@<class id>`` (episodes of that class left out); the Markdown table shows
``scored/total`` and a footnote per such strategy (:mod:`alignsam.evaluation.tables`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set

import torch
import torch.distributed as dist
from torchmetrics import MetricCollection

from alignsam.evaluation.episodes import EpisodeRecorder, EpisodeStatistics, binary_unit_fields, label_map_fields
from alignsam.foundation.segmenter import EmbeddedImages, Segmenter
from alignsam.geometry import MASK_LOGIT_THRESHOLD
from alignsam.losses import mask_iou
from alignsam.metrics.assembly import LabelMapAssembler

NOC_THRESHOLDS = (0.85, 0.90)


def original_logits(segmenter: Segmenter, low_res: torch.Tensor, embedded: EmbeddedImages) -> List[torch.Tensor]:
    """``(B, 1, 4h, 4w)`` low-res logits -> B float ``(H_b, W_b)`` logits at original size."""
    return [segmenter.logits_to_original(low_res[i], embedded, i)[0].float() for i in range(len(low_res))]


def episode_ious(logits: Sequence[torch.Tensor], gts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Foreground IoU of each original-size prediction with its ground truth -> ``(B,)``."""
    return torch.stack([mask_iou((l > MASK_LOGIT_THRESHOLD)[None], g[None].to(l.device))[0].cpu()
                        for l, g in zip(logits, gts)])


@dataclass
class ClickCurve:
    """IoU after each click of a sequential strategy.

    ious ``(R, B)`` per-episode IoU at original size; clicks ``(R,)`` the strategy's own clicks at
    each row (0 = after its seed prompts only); prompts ``(R,)`` what SAM had received (seeds + clicks).
    """

    ious: torch.Tensor
    clicks: torch.Tensor
    prompts: torch.Tensor


def no_clicks(curve: ClickCurve, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NoC per episode ``(B,)`` float and whether it failed ``(B,)`` bool (see the module docstring)."""
    reached = curve.ious >= threshold  # (R, B)
    first = torch.where(reached.any(0), reached.float().argmax(0), torch.full_like(reached[0], len(curve.ious) - 1, dtype=torch.long))
    failed = ~reached.any(0)
    prompts = curve.prompts.float()[first]
    return torch.where(failed, curve.prompts.max().float().expand_as(prompts), prompts), failed


def _gathered(value) -> list:
    """``value`` of every rank (``[value]`` outside distributed runs), for Python-side counts."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def _unit_id(sample: Dict, index: int) -> str:
    """A binary episode's id (its sample ``id``; the test scenes' and datasets' ids are stable)."""
    return str(sample.get("id", sample.get("image_id", index)))


class StrategyScores:
    """Accumulates, per strategy, the task metrics, the click curves and NoC over a split.

    Args:
        names: the strategies scored.
        new_metrics: builds a fresh task metric collection.
        semantic: whether episodes are assembled into label maps (``voc``, ``categories``) before
            the metrics; per-click IoU and NoC stay per episode.
        device: where the metric states live.
        keep_episodes: keep the per-unit statistics (:attr:`last_episodes`).

    Episodes a strategy could not score are left out of its numbers (see the module docstring).
    """

    def __init__(self, names: Sequence[str], new_metrics: Callable[[], MetricCollection], semantic: bool,
                 device: torch.device, keep_episodes: bool = True) -> None:
        self.names = list(names)
        self.recorder = EpisodeRecorder(self.names) if keep_episodes else None
        self.last_episodes: Optional[EpisodeStatistics] = None  # what the last compute() saw, per unit
        self.semantic = semantic
        self.metrics = {name: new_metrics().to(device) for name in self.names}
        self.assemblers = {name: LabelMapAssembler() for name in self.names}
        self.curve_sums: Dict[str, torch.Tensor] = {}
        self.curve_counts: Dict[str, int] = {}
        self.curve_clicks: Dict[str, torch.Tensor] = {}
        self.noc: Dict[str, Dict[float, List[torch.Tensor]]] = {}
        self.device = device
        self.scored = {name: 0 for name in self.names}  # episodes
        self.total = {name: 0 for name in self.names}
        self.unscored: Dict[str, Counter] = {name: Counter() for name in self.names}  # class id -> episodes
        self.images: Dict[str, Set[str]] = {name: set() for name in self.names}  # semantic: every image seen
        self.excluded_images: Dict[str, Set[str]] = {name: set() for name in self.names}
        self.last_coverage: Dict[str, Dict[str, object]] = {}  # what the last compute() used

    def add(self, name: str, batch: Sequence[Dict], logits: Sequence[torch.Tensor],
            gts: Sequence[torch.Tensor], unscored: Optional[torch.Tensor] = None) -> None:
        """Final original-size logits ``(H_b, W_b)`` of one batch of episodes, with their bool
        ground truth ``(H_b, W_b)`` (the binary tasks' targets; label maps come from ``batch``).

        ``unscored`` ``(B,)`` bool: episodes the strategy could not score (their logits are ignored).
        """
        skip = [False] * len(batch) if unscored is None else [bool(u) for u in unscored.tolist()]
        self.total[name] += len(batch)
        self.scored[name] += skip.count(False)
        for sample, left_out in zip(batch, skip):
            if left_out:
                self.unscored[name][int(sample.get("class_id", 0))] += 1
        if self.semantic:
            for sample, logit, left_out in zip(batch, logits, skip):
                image_id = str(sample["image_id"])
                self.images[name].add(image_id)
                if left_out:
                    self.excluded_images[name].add(image_id)
                else:
                    self.assemblers[name].add(image_id, int(sample["class_id"]), logit, sample["label_map"])
            return
        kept = [i for i, left_out in enumerate(skip) if not left_out]
        if kept:
            probs = [torch.sigmoid(logits[i]).clamp(0, 1).to(self.device) for i in kept]
            targets = [gts[i].to(self.device) for i in kept]
            self.metrics[name].update(probs, targets)
            if self.recorder is not None:
                for i, prob, target in zip(kept, probs, targets):
                    self.recorder.add(name, _unit_id(batch[i], i), binary_unit_fields(prob, target))
        if self.recorder is not None:
            for i, left_out in enumerate(skip):
                if left_out:
                    self.recorder.skip(name, _unit_id(batch[i], i))

    def add_curve(self, name: str, curve: ClickCurve, unscored: Optional[torch.Tensor] = None) -> None:
        """The click curve of one batch (every batch of a strategy must have the same rows);
        ``unscored`` ``(B,)`` bool episodes are left out."""
        if unscored is not None:
            keep = ~unscored.to(curve.ious.device, torch.bool)
            if not keep.any():
                return
            curve = ClickCurve(curve.ious[:, keep], curve.clicks, curve.prompts)
        sums = curve.ious.sum(1)
        if name in self.curve_sums:
            self.curve_sums[name] = self.curve_sums[name] + sums
            self.curve_counts[name] += curve.ious.shape[1]
        else:
            self.curve_sums[name], self.curve_counts[name] = sums, curve.ious.shape[1]
            self.curve_clicks[name] = curve.clicks
            self.noc[name] = {t: [] for t in NOC_THRESHOLDS}
        for threshold in NOC_THRESHOLDS:
            self.noc[name][threshold].append(torch.stack(no_clicks(curve, threshold)))

    def coverage(self) -> Dict[str, Dict[str, object]]:
        """Per strategy, over every rank: ``scored`` / ``total`` episodes, ``unscored`` (a Counter of
        class ids), and for the semantic tasks ``images`` (ids seen) and ``excluded_images``."""
        local = {name: {"scored": self.scored[name], "total": self.total[name],
                        "unscored": dict(self.unscored[name]), "images": sorted(self.images[name]),
                        "excluded_images": sorted(self.excluded_images[name])} for name in self.names}
        merged: Dict[str, Dict[str, object]] = {
            name: {"scored": 0, "total": 0, "unscored": Counter(), "images": set(), "excluded_images": set()}
            for name in self.names}
        for part in _gathered(local):
            for name, values in part.items():
                into = merged[name]
                into["scored"] += values["scored"]
                into["total"] += values["total"]
                into["unscored"].update(values["unscored"])
                into["images"].update(values["images"])
                into["excluded_images"].update(values["excluded_images"])
        return merged

    def compute(self) -> Dict[str, Dict[str, float]]:
        """One row per strategy: the task metrics, then ``noc@85``, ``fail@85``, ..., ``iou@k``.

        When some strategy left episodes unscored, every row also gets the coverage columns of the
        module docstring; a strategy that scored nothing has no metric columns.
        """
        coverage = self.last_coverage = self.coverage()
        partial = any(c["scored"] < c["total"] for c in coverage.values())
        table: Dict[str, Dict[str, float]] = {}
        for name in self.names:
            metrics, cover = self.metrics[name], coverage[name]
            used = cover["scored"]
            if self.semantic:
                preds, targets = self.assemblers[name].label_maps()
                kept = [i for i, image_id in enumerate(self.assemblers[name].image_ids())
                        if image_id not in cover["excluded_images"]]
                metrics.update([preds[i].to(self.device) for i in kept], [targets[i].to(self.device) for i in kept])
                used = len(cover["images"]) - len(cover["excluded_images"])
                self._record_label_maps(name, preds, targets)
            row = {k: float(v) for k, v in metrics.compute().items()} if used > 0 else {}
            if partial:
                row["episodes"], row["episodes_total"] = float(cover["scored"]), float(cover["total"])
                if self.semantic:
                    row["images"] = float(len(cover["images"]) - len(cover["excluded_images"]))
                    row["images_total"] = float(len(cover["images"]))
                for class_id, count in sorted(cover["unscored"].items()):
                    row[f"unscored@{class_id}"] = float(count)
            if name in self.curve_sums:
                for threshold, parts in self.noc[name].items():
                    noc, failed = torch.cat(parts, 1)
                    row[f"noc@{round(threshold * 100)}"] = float(noc.mean())
                    row[f"fail@{round(threshold * 100)}"] = float(failed.float().mean())
                means = self.curve_sums[name] / max(self.curve_counts[name], 1)
                for clicks, value in zip(self.curve_clicks[name].tolist(), means.tolist()):
                    row[f"iou@{clicks}"] = value
            table[name] = row
        self.last_episodes = self._episode_statistics()
        return table

    def _semantic_metric(self, name: str):
        return next(iter(self.metrics[name].values()))  # the collection's one SemanticMeanIoU

    def _record_label_maps(self, name: str, preds: List[torch.Tensor], targets: List[torch.Tensor]) -> None:
        """Per-image fields of this rank's label maps (an image with an unscored episode: skipped)."""
        if self.recorder is None:
            return
        metric = self._semantic_metric(name)
        for image_id, pred, target in zip(self.assemblers[name].image_ids(), preds, targets):
            if image_id in self.excluded_images[name]:
                self.recorder.skip(name, image_id)
            else:
                self.recorder.add(name, image_id, label_map_fields(pred, target, metric.num_classes, metric.ignore_index))
        for image_id in self.excluded_images[name] - set(self.assemblers[name].image_ids()):
            self.recorder.skip(name, image_id)

    def _episode_statistics(self) -> Optional[EpisodeStatistics]:
        """Every rank's per-unit fields as one :class:`EpisodeStatistics` (a collective call under DDP)."""
        if self.recorder is None:
            return None
        merged = EpisodeRecorder.merge(_gathered(self.recorder.units), summed=self.semantic)
        meta: Dict[str, object] = {"unit": "image" if self.semantic else "episode"}
        if self.semantic:
            metric = self._semantic_metric(self.names[0])
            meta.update(num_classes=int(metric.num_classes), ignore_index=metric.ignore_index)
        return EpisodeRecorder.build(merged, meta)

    def label_maps(self, name: str):
        """The assembled label maps of a semantic task (for saving predictions)."""
        return self.assemblers[name]
