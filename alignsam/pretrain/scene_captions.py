"""Captioned images for tiny-CLIP pretraining: whole procedural scenes and object crops, with dense labels.

Every item is an RGB image (a whole scene, or a square crop around one object, resized to
``out_size``), a caption built from the scene's own description (category names, colours, shapes,
task words), and a *dense label map*: per pixel, the index into :data:`DENSE_TEXTS` of the text that
names what covers it (a category, the task's target word such as ``"shadow"``, or ``"background"``).
The label map is what the dense patch-text loss reads; :data:`TASK_DENSE_TEXTS` says which texts
compete in a scene of each task (a ``categories`` scene: the six category names and ``"background"``;
a ``blur`` scene: ``"blur"`` and ``"background"``), which are also the texts a matcher scores there.

Frames: images and label maps are row-major ``(y, x)`` arrays of the item's own square; a crop is
given by its box ``(x0, y0, x1, y1)`` in scene pixels (end-exclusive).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from alignsam.data.scenes import CATEGORY_NAMES, COLOURS, SPLIT_SEED_BASE, TASK_TEXT, TASKS, Region, Scene, SceneConfig, render_scene

BACKGROUND_TEXT = "background"
# The texts of the dense loss, in label-id order: categories, task targets, background (last).
DENSE_TEXTS: Tuple[str, ...] = CATEGORY_NAMES + tuple(TASK_TEXT[t] for t in TASKS if t in TASK_TEXT) + (BACKGROUND_TEXT,)
BACKGROUND_ID = len(DENSE_TEXTS) - 1
TASK_DENSE_TEXTS: Dict[str, Tuple[str, ...]] = {
    task: (CATEGORY_NAMES if task == "categories" else (TASK_TEXT[task],)) + (BACKGROUND_TEXT,) for task in TASKS
}
# Colour word for low-contrast ("dull") saliency distractors.
DULL_WORD = "pale"

_CATEGORY_CROP_TEMPLATES = (
    "{name}", "a {name}", "a photo of the {name}", "the {colour} {name}", "a {name} {shape}", "a {colour} {shape}",
)
_OBJECT_CROP_TEMPLATES = ("a {colour} {shape}", "the {colour} {shape}", "a photo of a {colour} {shape}", "a {shape}")
_TASK_SCENE_CAPTIONS = {
    "blur": ("a blurred image", "a photo with blur", "a blurry scene", "defocus blur", "blur"),
    "shadow": ("objects with shadows", "a photo of shadows", "a scene with shadow", "shadow", "shadows"),
    "glass": ("a glass pane", "a scene with glass panes", "transparent glass", "glass", "a photo of the glass"),
    "saliency": ("a salient object", "one salient {colour} {shape}", "salient", "a photo of the salient object"),
}


def dense_label_map(scene: Scene) -> np.ndarray:
    """uint8 ``(S, S)``: per pixel, the index into :data:`DENSE_TEXTS` of what covers it."""
    if scene.task == "categories":
        label = scene.label_map()  # 0 background, 1 + category index
        out = np.full(label.shape, BACKGROUND_ID, np.uint8)
        objects = label > 0
        out[objects] = label[objects] - 1
        return out
    out = np.full(scene.image.shape[:2], BACKGROUND_ID, np.uint8)
    out[scene.target()] = DENSE_TEXTS.index(TASK_TEXT[scene.task])
    return out


def task_text_mask(tasks: Sequence[str]) -> torch.Tensor:
    """bool ``(len(tasks), len(DENSE_TEXTS))``: which dense texts compete in a scene of each task."""
    return torch.tensor([[t in TASK_DENSE_TEXTS[task] for t in DENSE_TEXTS] for task in tasks])


def object_crop_box(mask: np.ndarray, margin: float) -> Tuple[int, int, int, int]:
    """Square box ``(x0, y0, x1, y1)`` around a mask's bounding box, grown by ``margin`` x its side.

    The box is shifted (not cut) to stay inside the image where it fits, else clipped.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("object_crop_box: empty mask")
    h, w = mask.shape
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) * (1 + 2 * margin)
    side = int(round(min(side, h, w)))
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return x0, y0, x0 + side, y0 + side


def crop_and_resize(image: np.ndarray, label: Optional[np.ndarray], box: Tuple[int, int, int, int], out_size: int):
    """Crop ``image`` (and its label map, nearest) to ``box`` and resize to ``out_size`` square."""
    x0, y0, x1, y1 = box
    crop = cv2.resize(image[y0:y1, x0:x1], (out_size, out_size), interpolation=cv2.INTER_LINEAR)
    if label is None:
        return crop, None
    return crop, cv2.resize(label[y0:y1, x0:x1], (out_size, out_size), interpolation=cv2.INTER_NEAREST)


def crop_objects(scene: Scene, min_area: int) -> List[Region]:
    """Object regions with at least ``min_area`` visible pixels (the crops' subjects)."""
    return [r for r in scene.regions if r.kind == "object" and int(r.mask.sum()) >= min_area]


def _colour_word(region: Region) -> str:
    return region.colour if region.colour in COLOURS else DULL_WORD


def crop_caption(region: Region, rng: np.random.Generator) -> str:
    """Caption of a crop centred on ``region``: its category name and/or colour and shape."""
    fields = {"colour": _colour_word(region), "shape": region.shape, "name": region.category}
    templates = _CATEGORY_CROP_TEMPLATES if region.category else _OBJECT_CROP_TEMPLATES
    return templates[rng.integers(len(templates))].format(**fields)


def scene_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Caption of a whole scene: the categories present (categories task) or the task's words."""
    if scene.task == "categories":
        names = list(scene.categories_present())
        if not names:
            return BACKGROUND_TEXT
        rng.shuffle(names)
        style = rng.integers(3)
        if style == 0:
            return " and ".join(names)
        if style == 1:
            return "a photo of the " + " and the ".join(names)
        return "a scene with " + " and ".join(names)
    salient = scene.regions[scene.target_regions[0]] if scene.task == "saliency" else None
    captions = _TASK_SCENE_CAPTIONS[scene.task]
    caption = captions[rng.integers(len(captions))]
    if salient is not None:
        caption = caption.format(colour=_colour_word(salient), shape=salient.shape)
    return caption


class SceneCaptionStream(IterableDataset):
    """Endless captioned items from the scenes of a split.

    Per scene: the whole scene (with probability ``whole_scene_prob``) and up to ``crops_per_scene``
    crops around distinct objects of at least ``min_area`` visible pixels, each with a margin drawn
    from ``crop_margin``. Yields ``(image uint8 (3, out_size, out_size), labels uint8 (out_size,
    out_size) ids into DENSE_TEXTS, task id (index into TASKS), caption str)``.

    Args:
        tasks, task_weights: scene tasks to draw and their relative frequencies (default: even).
        split: seed range of the scenes (``train`` for pretraining).
        seed: base seed (DataLoader workers and ranks get disjoint sub-streams).
        out_size: side of the yielded images (the scene size keeps whole scenes unresampled).
    """

    def __init__(
        self,
        tasks: Sequence[str] = TASKS,
        task_weights: Optional[Sequence[float]] = None,
        split: str = "train",
        seed: int = 0,
        crops_per_scene: int = 2,
        whole_scene_prob: float = 1.0,
        crop_margin: Tuple[float, float] = (0.1, 0.5),
        min_area: int = 200,
        out_size: int = 256,
        scene_config: SceneConfig = SceneConfig(),
    ) -> None:
        super().__init__()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown or no scene tasks {list(tasks)} (config key data.tasks); known: {TASKS}")
        weights = np.ones(len(tasks)) if task_weights is None else np.asarray(task_weights, float)
        if weights.shape != (len(tasks),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"data.task_weights must be {len(tasks)} non-negative numbers, got {task_weights}")
        if split not in SPLIT_SEED_BASE:
            raise ValueError(f"unknown split '{split}' (config key data.split); known: {list(SPLIT_SEED_BASE)}")
        self.tasks = tuple(tasks)
        self.task_probs = weights / weights.sum()
        self.base = SPLIT_SEED_BASE[split]
        self.seed = seed
        self.crops_per_scene = crops_per_scene
        self.whole_scene_prob = whole_scene_prob
        self.crop_margin = tuple(crop_margin)
        self.min_area = min_area
        self.out_size = out_size
        self.scene_config = scene_config

    def items_of_scene(self, scene: Scene, rng: np.random.Generator) -> Iterator[Tuple[np.ndarray, np.ndarray, str]]:
        """``(image (S', S', 3), labels (S', S'), caption)`` items of one scene, at ``out_size``."""
        labels = dense_label_map(scene)
        if rng.random() < self.whole_scene_prob:
            image, label = scene.image, labels
            if image.shape[0] != self.out_size:
                image, label = crop_and_resize(image, label, (0, 0, image.shape[1], image.shape[0]), self.out_size)
            yield image, label, scene_caption(scene, rng)
        objects = crop_objects(scene, self.min_area)
        for i in rng.permutation(len(objects))[: self.crops_per_scene]:
            box = object_crop_box(objects[i].mask, rng.uniform(*self.crop_margin))
            image, label = crop_and_resize(scene.image, labels, box, self.out_size)
            yield image, label, crop_caption(objects[i], rng)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        rng = np.random.default_rng([self.seed, rank * workers + worker])
        while True:
            task = self.tasks[rng.choice(len(self.tasks), p=self.task_probs)]
            scene = render_scene(task, self.base + int(rng.integers(1_000_000)), self.scene_config)
            for image, label, caption in self.items_of_scene(scene, rng):
                yield (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous(),
                       torch.from_numpy(np.ascontiguousarray(label)), TASKS.index(task), caption)
