"""PASCAL VOC 2012 semantic segmentation as AlignSAM episodes: one episode per (image, class present).

Layout under ``data.root`` (as extracted from ``VOCtrainval_11-May-2012.tar``)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png          palette PNG: index = class id
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png       optional (SBD): grey PNG of class ids
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt   (train_aug.txt with SBD)

Class ids: 0 background, 1..20 the classes of :data:`VOC_CLASS_NAMES`, 255 void (ignored).
:class:`VOCSegmentation` yields image-level items ``{image, label_map, id, image_id}``;
:class:`VOCEpisodes` expands them into :class:`~alignsam.data.sample.Sample` episodes whose
``mask`` is ``label_map == class_id`` and whose ``text`` is the class name.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from alignsam.data.files import (
    DataConfigError,
    check_complete,
    read_label_map,
    read_rgb,
    read_size,
    require_dir,
    require_file,
)
from alignsam.data.sample import Sample

log = logging.getLogger(__name__)

# VOC's own class keys (index i is class id i + 1); used in episode ids.
VOC_CLASS_NAMES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# The episode text given to the text matcher (plain words; config: data.class_texts).
VOC_CLASS_TEXTS: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)
NUM_VOC_CLASSES = 21  # background + 20
VOID_LABEL = 255


class VOCSegmentation(Dataset):
    """Image-level VOC split: item ``i`` is ``{image (H,W,3) uint8, label_map (H,W) uint8, id, image_id}``.

    Args:
        root: ``data.root`` (holds ``voc_dir``).
        split: name of ``<split_dir>/<split>.txt``.
        voc_dir, image_dir, label_dir, split_dir: folders (``image_dir``, ``label_dir`` and
            ``split_dir`` relative to ``voc_dir``).
        split_key, label_key: config keys named by errors about the split file and label files.
    """

    def __init__(self, root: Path | str, split: str, voc_dir: str = "VOCdevkit/VOC2012",
                 image_dir: str = "JPEGImages", label_dir: str = "SegmentationClass",
                 split_dir: str = "ImageSets/Segmentation", split_key: str = "data.train_split",
                 label_key: str = "data.label_dir", ids: Optional[Sequence[str]] = None):
        root = require_dir(Path(root), "data.root", "dataset root")
        self.voc_root = require_dir(root / voc_dir, "data.voc_dir", "VOC folder")
        self.image_dir = require_dir(self.voc_root / image_dir, "data.image_dir", "image folder")
        self.label_dir = require_dir(self.voc_root / label_dir, label_key, "label folder")
        self.split_file = require_file(self.voc_root / split_dir / f"{split}.txt", split_key,
                                       "split file")
        self.split = split
        self.image_key, self.label_key, self.split_key = "data.image_dir", label_key, split_key
        self.ids = list(ids) if ids is not None else self._read_split()

    def _read_split(self) -> List[str]:
        ids: List[str] = []
        for line_no, line in enumerate(self.split_file.read_text().splitlines(), start=1):
            image_id = line.strip()
            if not image_id:
                continue
            for path, key in ((self.image_path(image_id), self.image_key),
                              (self.label_path(image_id), self.label_key)):
                if not path.is_file():
                    raise DataConfigError(self.split_key, f"split file {self.split_file} line {line_no} "
                                          f"names {image_id!r}, but its file is missing "
                                          f"(folder set by {key})", path)
            ids.append(image_id)
        if not ids:
            raise DataConfigError(self.split_key, "split file lists no images", self.split_file)
        if len(set(ids)) != len(ids):
            raise DataConfigError(self.split_key, "split file lists an image twice", self.split_file)
        return ids

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.label_dir / f"{image_id}.png"

    @property
    def image_paths(self) -> List[Path]:
        return [self.image_path(i) for i in self.ids]

    def subset(self, ids: Sequence[str]) -> "VOCSegmentation":
        """The same split restricted to ``ids`` (in the given order)."""
        known = set(self.ids)
        bad = [i for i in ids if i not in known]
        if bad:
            raise KeyError(f"ids not in split {self.split}: {bad[:5]}")
        out = object.__new__(VOCSegmentation)
        out.__dict__.update(self.__dict__)
        out.ids = list(ids)
        return out

    def check_files(self, decode: bool = False) -> None:
        """Readable, complete files whose label map has its image's size (and, with ``decode``, valid ids)."""
        for index, image_id in enumerate(self.ids):
            image_hw = read_size(self.image_path(image_id), self.image_key)
            label_hw = read_size(self.label_path(image_id), self.label_key)
            if label_hw != image_hw:
                raise DataConfigError(self.label_key, f"label map size {label_hw} differs from its "
                                      f"image {image_id}.jpg {image_hw} (h, w)", self.label_path(image_id))
            check_complete(self.image_path(image_id), self.image_key)
            check_complete(self.label_path(image_id), self.label_key)
            if decode:
                self[index]

    def read_label_map(self, index: int) -> np.ndarray:
        """uint8 ``(H, W)`` class ids of item ``index``; values outside 0..20 and 255 raise."""
        path = self.label_path(self.ids[index])
        label_map = read_label_map(path, self.label_key)
        bad = np.setdiff1d(np.unique(label_map), np.r_[np.arange(NUM_VOC_CLASSES), VOID_LABEL])
        if bad.size:
            raise DataConfigError(self.label_key, f"label map holds values {bad.tolist()[:5]} outside "
                                  "0..20 and 255 (is it a colour image saved as grey?)", path)
        return label_map

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image_id = self.ids[index]
        image = read_rgb(self.image_path(image_id), self.image_key)
        label_map = self.read_label_map(index)
        if label_map.shape != image.shape[:2]:
            raise DataConfigError(self.label_key, f"label map size {label_map.shape} differs from "
                                  f"its image {image.shape[:2]} (h, w)", self.label_path(image_id))
        return {"image": image, "label_map": label_map, "id": image_id, "image_id": image_id}


class VOCEpisodes(Dataset):
    """One :class:`Sample` per (image, class present) of an image-level dataset.

    Args:
        images: image-level items with ``label_map`` (a :class:`VOCSegmentation`, possibly wrapped
            in :class:`~alignsam.data.augment.AugmentedViews`); it must offer ``read_label_map(i)``.
        class_texts: the episode texts, class id ``c`` reads ``class_texts[c - 1]``.
        class_names: the class keys used in episode ids (default VOC's 20).

    The class lists are read once here (label maps only). Episodes of one image are adjacent,
    ordered by class id; an episode's ``id`` is ``"<image_id>:<class key>"``. The procedural
    ``categories`` scenes use the same class with their own names.
    """

    def __init__(self, images: Dataset, class_texts: Sequence[str] = VOC_CLASS_TEXTS,
                 class_names: Sequence[str] = VOC_CLASS_NAMES):
        if len(class_texts) != len(class_names):
            raise DataConfigError("data.class_texts", f"needs {len(class_names)} class names, "
                                  f"got {len(class_texts)}")
        self.images = images
        self.class_texts = tuple(class_texts)
        self.class_names = tuple(class_names)
        self.episodes: List[Tuple[int, int]] = []  # (image index, class id)
        without = 0
        for index in range(len(images)):
            present = np.unique(images.read_label_map(index))
            classes = [int(c) for c in present if 0 < c <= len(self.class_names)]
            without += not classes
            self.episodes += [(index, c) for c in classes]
        if without:
            log.info("%d of %d images show no class and yield no episode", without, len(images))

    def episode_id(self, k: int) -> str:
        index, class_id = self.episodes[k]
        return f"{self.images.ids[index]}:{self.class_names[class_id - 1]}"

    @property
    def ids(self) -> List[str]:
        return [self.episode_id(k) for k in range(len(self))]

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, k: int) -> Sample:
        index, class_id = self.episodes[k]
        item = self.images[index]
        return Sample(image=item["image"], mask=item["label_map"] == class_id,
                      text=self.class_texts[class_id - 1], id=self.episode_id(k),
                      image_id=item["image_id"], label_map=item["label_map"], class_id=class_id)
