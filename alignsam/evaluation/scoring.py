"""Scoring prompting strategies: the task's metrics, the IoU after each click, and NoC.

Every number is computed at the ground truth's (original) resolution: SAM's low-res logits are
resized by :meth:`~alignsam.foundation.segmenter.Segmenter.logits_to_original` and thresholded at
:data:`~alignsam.geometry.MASK_LOGIT_THRESHOLD`. Per-click IoU is the per-episode foreground IoU
(:func:`alignsam.losses.mask_iou`, an empty union counts as 1), averaged over episodes.

NoC@x (number of clicks to reach IoU x, the interactive-segmentation measure) counts the prompts
SAM has received when the episode's IoU first reaches x, the strategy's seed prompts included (the
agent's P_0); an episode that never reaches x counts as the strategy's largest prompt count, and
the share of such episodes is reported as ``fail@x``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torchmetrics import MetricCollection

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


class StrategyScores:
    """Accumulates, per strategy, the task metrics, the click curves and NoC over a split.

    Args:
        names: the strategies scored.
        new_metrics: builds a fresh task metric collection.
        semantic: whether episodes are assembled into label maps (``voc``, ``categories``) before
            the metrics; per-click IoU and NoC stay per episode.
        device: where the metric states live.
    """

    def __init__(self, names: Sequence[str], new_metrics: Callable[[], MetricCollection], semantic: bool,
                 device: torch.device) -> None:
        self.names = list(names)
        self.semantic = semantic
        self.metrics = {name: new_metrics().to(device) for name in self.names}
        self.assemblers = {name: LabelMapAssembler() for name in self.names}
        self.curve_sums: Dict[str, torch.Tensor] = {}
        self.curve_counts: Dict[str, int] = {}
        self.curve_clicks: Dict[str, torch.Tensor] = {}
        self.noc: Dict[str, Dict[float, List[torch.Tensor]]] = {}
        self.device = device

    def add(self, name: str, batch: Sequence[Dict], logits: Sequence[torch.Tensor],
            gts: Sequence[torch.Tensor]) -> None:
        """Final original-size logits ``(H_b, W_b)`` of one batch of episodes, with their bool
        ground truth ``(H_b, W_b)`` (the binary tasks' targets; label maps come from ``batch``)."""
        if self.semantic:
            for sample, logit in zip(batch, logits):
                self.assemblers[name].add(str(sample["image_id"]), int(sample["class_id"]), logit, sample["label_map"])
            return
        probs = [torch.sigmoid(logit).clamp(0, 1).to(self.device) for logit in logits]
        self.metrics[name].update(probs, [gt.to(self.device) for gt in gts])

    def add_curve(self, name: str, curve: ClickCurve) -> None:
        """The click curve of one batch (every batch of a strategy must have the same rows)."""
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

    def compute(self) -> Dict[str, Dict[str, float]]:
        """One row per strategy: the task metrics, then ``noc@85``, ``fail@85``, ..., ``iou@k``."""
        table: Dict[str, Dict[str, float]] = {}
        for name in self.names:
            metrics = self.metrics[name]
            if self.semantic:
                preds, targets = self.assemblers[name].label_maps()
                metrics.update([p.to(self.device) for p in preds], [t.to(self.device) for t in targets])
            row = {k: float(v) for k, v in metrics.compute().items()}
            if name in self.curve_sums:
                for threshold, parts in self.noc[name].items():
                    noc, failed = torch.cat(parts, 1)
                    row[f"noc@{round(threshold * 100)}"] = float(noc.mean())
                    row[f"fail@{round(threshold * 100)}"] = float(failed.float().mean())
                means = self.curve_sums[name] / max(self.curve_counts[name], 1)
                for clicks, value in zip(self.curve_clicks[name].tolist(), means.tolist()):
                    row[f"iou@{clicks}"] = value
            table[name] = row
        return table

    def label_maps(self, name: str):
        """The assembled label maps of a semantic task (for saving predictions)."""
        return self.assemblers[name]
