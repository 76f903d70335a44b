"""Semantic-segmentation mIoU (PASCAL VOC and the bundled world's ``categories`` task)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torchmetrics.classification import MulticlassJaccardIndex

VOC_NUM_CLASSES = 21  # background + 20 object classes
VOC_IGNORE_INDEX = 255  # "void": object borders and difficult regions

LabelMaps = Union[torch.Tensor, Sequence[torch.Tensor]]


def _flatten_label_maps(maps: LabelMaps, what: str) -> list:
    if isinstance(maps, torch.Tensor):
        if maps.dim() not in (2, 3):
            raise ValueError(f"{what} must be (H, W), (B, H, W) or a list of (H, W); got {tuple(maps.shape)}")
        return [maps] if maps.dim() == 2 else list(maps.unbind(0))
    return list(maps)


class SemanticMeanIoU(MulticlassJaccardIndex):
    """``voc_miou``: class-mean IoU from one confusion matrix over the whole split.

    ``IoU_c = C[c, c] / (row_c + col_c - C[c, c])`` from the confusion matrix ``C`` summed over every
    non-ignored pixel of the split; the result is the mean over the classes that occur in the
    prediction or the GT (a class absent from both has no IoU and is left out of the mean, which
    only matters on subsets: every VOC class occurs in the val split). Pixels whose GT is
    ``ignore_index`` are dropped whatever the prediction. This is torchmetrics'
    ``MulticlassJaccardIndex(average="macro")``, extended to lists of label maps of different sizes
    and to checking the label ranges (torchmetrics skips that check for this metric).

    ``update(pred, target)``: ``pred`` one ``(H, W)`` long label map, a batch ``(B, H, W)``, or a
    list of ``(H_i, W_i)`` maps with ids in ``[0, num_classes)``; ``target`` the same structure with
    ids in ``[0, num_classes)`` or ``ignore_index``.

    Args:
        num_classes: classes including background (21 for VOC; 1 + the scene categories for the
            bundled world).
        ignore_index: GT value that is not scored.
        validate_args: check shapes, dtypes and label ranges.
    """

    def __init__(
        self,
        num_classes: int = VOC_NUM_CLASSES,
        ignore_index: int = VOC_IGNORE_INDEX,
        validate_args: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            average="macro",
            ignore_index=ignore_index,
            validate_args=validate_args,
            **kwargs,
        )

    def update(self, pred: LabelMaps, target: LabelMaps) -> None:
        preds, targets = _flatten_label_maps(pred, "pred"), _flatten_label_maps(target, "target")
        if len(preds) != len(targets):
            raise ValueError(f"pred has {len(preds)} label maps but target has {len(targets)}")
        if not preds:
            return
        if self.validate_args:
            for i, (p, t) in enumerate(zip(preds, targets)):
                self._check_image(i, p, t)
        super().update(
            torch.cat([p.reshape(-1) for p in preds]).long(), torch.cat([t.reshape(-1) for t in targets]).long()
        )

    def _check_image(self, i: int, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.dim() != 2:
            raise ValueError(
                f"image {i}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal (H, W)"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(
                f"image {i}: label maps must be integer class ids; got {pred.dtype}, {target.dtype}"
            )
        if pred.numel() == 0:
            return
        if pred.min() < 0 or pred.max() >= self.num_classes:
            raise ValueError(
                f"image {i}: pred ids must be in [0, {self.num_classes}); got [{int(pred.min())}, {int(pred.max())}]"
            )
        scored = target[target != self.ignore_index]
        if scored.numel() and (scored.min() < 0 or scored.max() >= self.num_classes):
            raise ValueError(
                f"image {i}: target ids must be in [0, {self.num_classes}) or {self.ignore_index}; "
                f"got [{int(scored.min())}, {int(scored.max())}]"
            )
