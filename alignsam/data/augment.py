"""Training augmentation as a fixed set of deterministic views, so cached embeddings stay valid.

Each training image yields itself (view 0, its own id) and ``views`` augmented copies. View ``v``
of image ``stem`` has id and image_id ``"stem#aug<v>"`` and is a pure function of
``(subset_seed, stem, v)``: the feature cache can embed it once and read it back by id, in any
worker, in any epoch. The augmentation (albumentations) is applied to image and target together
before embedding: horizontal/vertical flips, a zoom (``Affine`` scale, output size unchanged;
uncovered borders are black with background / void targets), and colour jitter.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
from torch.utils.data import Dataset

from alignsam.data.voc import VOID_LABEL


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of the training views (``data.augment`` in YAML).

    Attributes:
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip (off by default: shadows and skies have an up).
        scale: zoom range of ``Affine`` (``<1`` zooms out and pads, ``>1`` zooms in and crops).
        brightness, contrast, saturation: colour jitter factors, sampled in ``[1 - x, 1 + x]``.
        hue: hue shift, sampled in ``[-hue, hue]`` (fraction of the colour circle).
    """

    hflip: float = 0.5
    vflip: float = 0.0
    scale: Tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02


def view_seed(subset_seed: int, image_id: str, view: int) -> int:
    """A 32-bit seed that depends only on ``(subset_seed, image_id, view)`` (not on Python's hash salt)."""
    digest = hashlib.sha256(f"{subset_seed}|{image_id}|{view}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def build_augmentation(config: AugmentConfig, target_fill: int):
    """The albumentations pipeline; ``target_fill`` labels pixels the zoom uncovers."""
    import albumentations as A

    steps: List[Any] = []
    if config.hflip > 0:
        steps.append(A.HorizontalFlip(p=config.hflip))
    if config.vflip > 0:
        steps.append(A.VerticalFlip(p=config.vflip))
    if tuple(config.scale) != (1.0, 1.0):
        steps.append(A.Affine(scale=tuple(config.scale), keep_ratio=True, fill=0,
                              fill_mask=target_fill, p=1.0))
    if max(config.brightness, config.contrast, config.saturation, config.hue) > 0:
        steps.append(A.ColorJitter(brightness=config.brightness, contrast=config.contrast,
                                   saturation=config.saturation, hue=config.hue, p=1.0))
    return A.Compose(steps)


class AugmentedViews(Dataset):
    """Each item of ``base`` followed by ``views`` deterministic augmented copies.

    Args:
        base: image-level dataset with ``ids`` and dict items holding ``image`` (uint8 (H,W,3))
            and a target: ``mask`` (bool (H,W)) or ``label_map`` (uint8 (H,W), VOC).
        views: augmented copies per image (0: ``base`` unchanged).
        subset_seed: seeds every view together with its image id and view index.
        config: what the augmentation does.

    Item ``k`` is view ``k % (views + 1)`` of base item ``k // (views + 1)``.
    """

    def __init__(self, base: Dataset, views: int, subset_seed: int,
                 config: AugmentConfig = AugmentConfig()):
        if views < 0:
            raise ValueError(f"data.augment_views must be >= 0, got {views}")
        self.base = base
        self.views = views
        self.subset_seed = subset_seed
        self.config = config
        self._pipelines: Dict[int, Any] = {}

    def _locate(self, k: int) -> Tuple[int, int]:
        return divmod(k, self.views + 1)

    @property
    def ids(self) -> List[str]:
        return [self.view_id(base_id, v) for base_id in self.base.ids for v in range(self.views + 1)]

    @staticmethod
    def view_id(base_id: str, view: int) -> str:
        return base_id if view == 0 else f"{base_id}#aug{view}"

    def __len__(self) -> int:
        return len(self.base) * (self.views + 1)

    def _pipeline(self, target_fill: int):
        if target_fill not in self._pipelines:
            self._pipelines[target_fill] = build_augmentation(self.config, target_fill)
        return self._pipelines[target_fill]

    def __getitem__(self, k: int) -> Dict[str, Any]:
        index, view = self._locate(k)
        item = dict(self.base[index])
        if view == 0:
            return item
        base_id = self.base.ids[index]
        is_label_map = "label_map" in item
        target = item["label_map"] if is_label_map else item["mask"].astype(np.uint8)
        pipeline = self._pipeline(VOID_LABEL if is_label_map else 0)
        pipeline.set_random_seed(view_seed(self.subset_seed, base_id, view))
        out = pipeline(image=item["image"], mask=target)
        item["image"] = np.ascontiguousarray(out["image"], dtype=np.uint8)
        if is_label_map:
            item["label_map"] = np.ascontiguousarray(out["mask"], dtype=np.uint8)
        else:
            item["mask"] = np.ascontiguousarray(out["mask"]).astype(bool)
        item["id"] = item["image_id"] = self.view_id(base_id, view)
        return item

    def read_label_map(self, k: int) -> np.ndarray:
        """Label map of item ``k`` (VOC); augmented views are computed in full."""
        index, view = self._locate(k)
        if view == 0:
            return self.base.read_label_map(index)
        return self[k]["label_map"]
