"""The one sample format every dataset yields (real folders, VOC episodes, procedural scenes).

A sample is a plain ``dict`` (so it crosses DataLoader worker processes and ``default_collate``-free
batching unchanged) with these keys:

====================  =====================================  ============================================
key                   type                                   meaning
====================  =====================================  ============================================
``image``             ``np.ndarray`` uint8 ``(H, W, 3)``     RGB, original resolution (original frame,
                                                             see :mod:`alignsam.geometry`).
``mask``              ``np.ndarray`` bool ``(H, W)``         target foreground at original resolution.
                                                             Binary tasks: stored value ``>``
                                                             ``GT_FOREGROUND_THRESHOLD``. VOC episodes:
                                                             ``label_map == class_id`` (void is False).
``text``              ``str``                                task word for binary tasks (``"shadow"``),
                                                             the class name for VOC episodes (``"dog"``).
``id``                ``str``                                unique within a split; the key of the
                                                             feature cache. File stem for folder data,
                                                             ``"stem#aug2"`` for augmented view 2,
                                                             ``"stem:dog"`` for a VOC episode.
``image_id``          ``str``                                the source image (the stem, ``"stem#aug2"``
                                                             for an augmented view, since its pixels
                                                             differ). Episodes that share an image share
                                                             it, so embeddings are computed once per image.
``label_map``         ``np.ndarray`` uint8 ``(H, W)``        VOC only: full class-id map (0 background,
                                                             1..20 classes, 255 void) for VOC mIoU.
``class_id``          ``int``                                VOC only: the episode's class (1..20).
====================  =====================================  ============================================

Batches are ``list[Sample]`` (:func:`collate_samples`): images differ in size, so nothing is
stacked; every validation/test sample carries its ground truth at original resolution and its id.
"""

from typing import Any, List, Mapping, Sequence, TypedDict

import numpy as np

try:  # Python >= 3.11
    from typing import NotRequired
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import NotRequired

REQUIRED_KEYS = ("image", "mask", "text", "id", "image_id")


class Sample(TypedDict):
    """One episode's input and target; see the module docstring for each key's meaning."""

    image: np.ndarray  # uint8 (H, W, 3) RGB
    mask: np.ndarray  # bool (H, W)
    text: str
    id: str
    image_id: str
    label_map: NotRequired[np.ndarray]  # uint8 (H, W), VOC only
    class_id: NotRequired[int]  # VOC only


def collate_samples(batch: Sequence[Sample]) -> List[Sample]:
    """DataLoader ``collate_fn`` that keeps a batch as a list of sample dicts (sizes differ)."""
    return list(batch)


def check_sample(sample: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if ``sample`` does not follow the contract above (used by tests)."""
    missing = [k for k in REQUIRED_KEYS if k not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('id', '?')!r} lacks keys {missing}")
    image, mask = sample["image"], sample["mask"]
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise ValueError(f"sample {sample['id']!r}: image must be uint8 (H, W, 3), got "
                         f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    if not (isinstance(mask, np.ndarray) and mask.dtype == np.bool_ and mask.shape == image.shape[:2]):
        raise ValueError(f"sample {sample['id']!r}: mask must be bool {image.shape[:2]}, got "
                         f"{getattr(mask, 'dtype', type(mask))} {getattr(mask, 'shape', '')}")
    for key in ("text", "id", "image_id"):
        if not isinstance(sample[key], str) or not sample[key]:
            raise ValueError(f"sample {sample['id']!r}: {key} must be a non-empty str")
    if "label_map" in sample:
        label_map = sample["label_map"]
        if not (isinstance(label_map, np.ndarray) and label_map.dtype == np.uint8
                and label_map.shape == image.shape[:2]):
            raise ValueError(f"sample {sample['id']!r}: label_map must be uint8 {image.shape[:2]}")
