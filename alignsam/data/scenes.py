"""Procedural scenes: the bundled world's counterpart of the paper's five tasks.

Every scene is deterministic from ``(task, seed)`` and has distractors, so that a click in the wrong
place segments the wrong thing. A scene knows all its regions (objects, shadows, panes, blurred
areas, background), which the tiny-SAM pretraining clicks on, and each task picks its target:

* ``blur``: some areas are defocus-blurred (a few objects, or the whole background behind sharp
  objects); target = the blurred area.
* ``shadow``: objects cast soft dark shadows onto the background; target = the shadows (not the objects).
* ``glass``: transparent panes warp, tint and brighten what lies behind them; target = the panes.
* ``saliency``: one object stands out in colour and contrast, the others blend in; target = that object.
* ``categories``: named categories, each with its own shape and non-overlapping hue range, on a
  low-saturation background; an episode targets every instance of one category (text = its name).

Images are RGB uint8 ``(S, S, 3)``; masks are bool ``(S, S)``.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

TASKS = ("blur", "shadow", "glass", "saliency", "categories")
TASK_TEXT = {"blur": "blur", "shadow": "shadow", "glass": "glass", "saliency": "salient"}
SHAPES = ("circle", "square", "triangle", "star", "ring", "ellipse", "hexagon")
REGION_KINDS = ("object", "shadow", "pane", "blur", "background")
# Hue ranges in degrees; colour names are what captions use.
COLOURS: Dict[str, Tuple[float, float]] = {
    "red": (-12, 10),
    "orange": (22, 36),
    "yellow": (50, 62),
    "green": (100, 140),
    "cyan": (175, 195),
    "blue": (215, 245),
    "purple": (265, 280),
    "magenta": (295, 320),
}


@dataclass(frozen=True)
class Category:
    """A named object category of the ``categories`` task: one shape, one colour range."""

    name: str
    shape: str
    colour: str


CATEGORIES: Tuple[Category, ...] = (
    Category("tomato", "circle", "red"),
    Category("sun", "star", "yellow"),
    Category("leaf", "ellipse", "green"),
    Category("ice", "square", "cyan"),
    Category("kite", "triangle", "blue"),
    Category("flower", "ring", "magenta"),
)
CATEGORY_NAMES: Tuple[str, ...] = tuple(c.name for c in CATEGORIES)

SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000, "test": 2_000_000}


@dataclass
class Region:
    """One segmentable region of a scene.

    kind: one of ``REGION_KINDS``; mask: bool ``(S, S)`` visible pixels; shape/colour/category: for
    objects (None otherwise).
    """

    kind: str
    mask: np.ndarray
    shape: Optional[str] = None
    colour: Optional[str] = None
    category: Optional[str] = None


@dataclass
class Scene:
    """A rendered scene. image: uint8 ``(S, S, 3)``; regions: every region, objects first."""

    task: str
    seed: int
    image: np.ndarray
    regions: List[Region]
    target_regions: List[int] = field(default_factory=list)  # indices into regions (binary tasks)

    def target(self, category: Optional[str] = None) -> np.ndarray:
        """The task's ground truth: bool ``(S, S)``; ``category`` is required for ``categories``."""
        if self.task == "categories":
            if category is None:
                raise ValueError("the categories task needs a category name")
            masks = [r.mask for r in self.regions if r.kind == "object" and r.category == category]
        else:
            masks = [self.regions[i].mask for i in self.target_regions]
        return _union(masks, self.image.shape[:2])

    def categories_present(self) -> List[str]:
        """Category names with at least one visible instance, in ``CATEGORY_NAMES`` order."""
        present = {r.category for r in self.regions if r.kind == "object" and r.category and r.mask.any()}
        return [c for c in CATEGORY_NAMES if c in present]

    def label_map(self) -> np.ndarray:
        """uint8 ``(S, S)`` class ids for ``categories``: 0 background, ``1 + CATEGORY_NAMES.index``."""
        out = np.zeros(self.image.shape[:2], np.uint8)
        for r in self.regions:
            if r.kind == "object" and r.category:
                out[r.mask] = 1 + CATEGORY_NAMES.index(r.category)
        return out


WORLDS = ("standard", "hard")  # the standard world; the hard one (alignsam/data/hard_scenes.py)


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the generator (defaults are the bundled world's).

    world: ``standard`` (the scenes every result so far was measured on) or ``hard`` (distractors
    that share the target's look, targets in more and smaller pieces, lower contrast, occlusion;
    :mod:`alignsam.data.hard_scenes`, which reads the fields below only where it keeps them).
    """

    world: str = "standard"
    size: int = 256
    min_objects: int = 3
    max_objects: int = 6
    min_radius: float = 0.07  # object radius as a fraction of the side
    max_radius: float = 0.17
    texture_amplitude: float = 30.0
    blur_sigma: Tuple[float, float] = (3.0, 6.0)
    shadow_darkness: Tuple[float, float] = (0.35, 0.55)  # multiplicative factor inside shadows
    shadow_offset: Tuple[float, float] = (0.09, 0.16)  # fraction of the side
    pane_count: Tuple[int, int] = (1, 2)
    category_count: Tuple[int, int] = (2, 4)


# -- drawing primitives ---------------------------------------------------------------------------
def _union(masks, shape) -> np.ndarray:
    """Pixel-wise OR of bool masks (an all-False ``shape`` mask when there are none)."""
    out = np.zeros(shape, bool)
    for mask in masks:
        out |= mask
    return out


def _hsv_to_rgb(h_deg: float, s: float, v: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360) / 360.0, s, v)
    return np.array([r, g, b], np.float32) * 255.0


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float, aspect: float) -> np.ndarray:
    """Outline of a shape as an ``(K, 2)`` int32 polygon (x, y)."""
    if shape in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), aspect * np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.85
    elif shape == "triangle":
        t = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        pts = np.stack([np.cos(t), np.sin(t)], 1) * 1.1
    elif shape == "hexagon":
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":
        t = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        rad = np.where(np.arange(10) % 2 == 0, 1.15, 0.5)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    else:
        raise ValueError(f"unknown shape {shape}")
    c, s = np.cos(angle), np.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return np.round(rot * r + [cx, cy]).astype(np.int32)


def _shape_mask(size: int, shape: str, cx: float, cy: float, r: float, angle: float, aspect: float) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [_shape_polygon(shape, cx, cy, r, angle, aspect)], 1)
    if shape == "ring":
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(r * 0.5)), 0, -1)
    return canvas.astype(bool)


def _texture(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """Zero-mean float ``(S, S)`` texture: smooth variation plus a high-frequency pattern."""
    coarse = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # stripes
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
        fine = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == 1:  # checker
        cell = rng.integers(5, 12)
        fine = (((xx // cell) + (yy // cell)) % 2) * 2.0 - 1.0
    elif kind == 2:  # grain
        fine = rng.normal(0, 0.8, (size, size)).astype(np.float32)
    else:  # dots
        period = rng.uniform(8, 14)
        fine = np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period) * 1.5
    return ((0.5 * coarse + fine) * amplitude * 0.5).astype(np.float32)


def _random_colour(rng: np.random.Generator, saturated: bool = True) -> Tuple[str, np.ndarray]:
    name = list(COLOURS)[rng.integers(len(COLOURS))]
    lo, hi = COLOURS[name]
    s = rng.uniform(0.65, 1.0) if saturated else rng.uniform(0.1, 0.3)
    return name, _hsv_to_rgb(rng.uniform(lo, hi), s, rng.uniform(0.65, 1.0))


def _off_centre(rng: np.random.Generator, low: float = 0.2, high: float = 0.8, keep_out: float = 0.15) -> np.ndarray:
    """A target centre ``(x, y)`` as a fraction of the side, at least ``keep_out`` from the image
    centre, so that a click at the centre does not find the target by construction."""
    while True:
        xy = rng.uniform(low, high, 2)
        if np.hypot(*(xy - 0.5)) >= keep_out:
            return xy


def _colour_name(hue_deg: float) -> str:
    """The colour name whose hue range is nearest to ``hue_deg``."""
    def distance(name: str) -> float:
        centre = sum(COLOURS[name]) / 2
        return abs((hue_deg - centre + 180) % 360 - 180)

    return min(COLOURS, key=distance)


def _background(rng: np.random.Generator, cfg: SceneConfig, low_saturation: bool) -> np.ndarray:
    hue = rng.uniform(0, 360)
    sat = rng.uniform(0.0, 0.18) if low_saturation else rng.uniform(0.1, 0.5)
    base = _hsv_to_rgb(hue, sat, rng.uniform(0.45, 0.8))
    tex = _texture(rng, cfg.size, cfg.texture_amplitude)
    return (base[None, None, :] + tex[..., None]).astype(np.float32)


@dataclass
class _Object:
    shape: str
    colour_name: str
    rgb: np.ndarray
    mask: np.ndarray
    category: Optional[str] = None


def _place_objects(
    rng: np.random.Generator, cfg: SceneConfig, count: int, specs: List[Tuple[str, str, np.ndarray, Optional[str]]],
    radius_scale: float = 1.0,
) -> List[_Object]:
    """Place ``count`` objects (shape, colour name, rgb, category) at random, partly overlapping."""
    size = cfg.size
    objects = []
    for i in range(count):
        shape, colour, rgb, category = specs[i]
        r = rng.uniform(cfg.min_radius, cfg.max_radius) * size * radius_scale
        cx, cy = rng.uniform(r * 0.8, size - r * 0.8, 2)
        mask = _shape_mask(size, shape, cx, cy, r, rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.7))
        objects.append(_Object(shape, colour, rgb, mask, category))
    return objects


def _paint_objects(rng: np.random.Generator, canvas: np.ndarray, objects: List[_Object], cfg: SceneConfig) -> None:
    """Draw objects in order (later ones occlude earlier); each object's mask becomes its visible part."""
    for i, obj in enumerate(objects):
        tex = _texture(rng, cfg.size, cfg.texture_amplitude * 0.5)
        canvas[obj.mask] = obj.rgb[None, :] + tex[obj.mask][:, None]
        for earlier in objects[:i]:
            earlier.mask = earlier.mask & ~obj.mask


def _random_specs(rng: np.random.Generator, count: int, saturated: bool = True):
    specs = []
    for _ in range(count):
        colour, rgb = _random_colour(rng, saturated)
        specs.append((SHAPES[rng.integers(len(SHAPES))], colour, rgb, None))
    return specs


def _object_regions(objects: List[_Object]) -> List[Region]:
    return [Region("object", o.mask, o.shape, o.colour_name, o.category) for o in objects if o.mask.any()]


def _finish(task: str, seed: int, canvas: np.ndarray, regions: List[Region], targets: List[int]) -> Scene:
    regions.append(Region("background", ~_union([r.mask for r in regions], canvas.shape[:2])))
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return Scene(task, seed, image, regions, targets)


# -- tasks ------------------------------------------------------------------------------------------
def _blur_scene(rng, cfg, seed) -> Scene:
    size = cfg.size
    canvas = _background(rng, cfg, low_saturation=False)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects = _place_objects(rng, cfg, count, _random_specs(rng, count))
    _paint_objects(rng, canvas, objects, cfg)
    sigma = rng.uniform(*cfg.blur_sigma)
    blurred = cv2.GaussianBlur(canvas, (0, 0), sigma)
    sharp = np.zeros((size, size), bool)
    for obj in objects[::-1]:  # the front-most objects, until they cover a fifth of the image
        if sharp.mean() >= 0.2:
            break
        sharp |= obj.mask
    if rng.random() < 0.35 and sharp.mean() >= 0.2:  # defocused background behind sharp objects
        blur_mask = ~sharp
    else:  # one or two defocused objects, and a defocused blob of background
        blur_mask = np.zeros((size, size), bool)
        for obj in objects[: int(rng.integers(1, 3))]:
            blur_mask |= obj.mask
        if rng.random() < 0.5:
            blob = _shape_mask(size, "ellipse", *rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0.12, 0.22) * size,
                               rng.uniform(0, np.pi), rng.uniform(0.5, 0.9))
            blur_mask |= blob
    alpha = cv2.GaussianBlur(blur_mask.astype(np.float32), (0, 0), 1.5)[..., None]
    canvas = alpha * blurred + (1 - alpha) * canvas
    regions = _object_regions(objects)
    # Objects fully inside the blurred area stay regions (class-agnostic SAM should segment them too).
    regions.append(Region("blur", blur_mask))
    return _finish("blur", seed, canvas, regions, [len(regions) - 1])


def _cast_shadow(objects: List[_Object], angle: float, dist: float, size: int) -> np.ndarray:
    """The union of the objects' masks moved ``dist`` px along ``angle`` (radians): float32
    ``(size, size)`` in [0, 1], the shadow before softening (both worlds' shadow scenes)."""
    shift = np.float32([[1, 0, dist * np.cos(angle)], [0, 1, dist * np.sin(angle)]])
    cast = np.zeros((size, size), np.float32)
    for obj in objects:
        cast = np.maximum(cast, cv2.warpAffine(obj.mask.astype(np.float32), shift, (size, size)))
    return cast


def _shadow_scene(rng, cfg, seed) -> Scene:
    size = cfg.size
    canvas = _background(rng, cfg, low_saturation=False)
    count = int(rng.integers(2, cfg.max_objects))
    objects = _place_objects(rng, cfg, count, _random_specs(rng, count), radius_scale=0.9)
    angle = rng.uniform(0, 2 * np.pi)
    dist = rng.uniform(*cfg.shadow_offset) * size
    cast = _cast_shadow(objects, angle, dist, size)
    soft = cv2.GaussianBlur(cast, (0, 0), rng.uniform(1.0, 2.5))
    darkness = rng.uniform(*cfg.shadow_darkness)
    canvas = canvas * (1 - (1 - darkness) * soft[..., None])
    _paint_objects(rng, canvas, objects, cfg)
    shadow = (soft > 0.5) & ~_union([obj.mask for obj in objects], (size, size))
    regions = _object_regions(objects)
    regions.append(Region("shadow", shadow))
    return _finish("shadow", seed, canvas, regions, [len(regions) - 1])


def _glass_scene(rng, cfg, seed) -> Scene:
    size = cfg.size
    canvas = _background(rng, cfg, low_saturation=False)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects = _place_objects(rng, cfg, count, _random_specs(rng, count))
    _paint_objects(rng, canvas, objects, cfg)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    panes = []
    for _ in range(int(rng.integers(cfg.pane_count[0], cfg.pane_count[1] + 1))):
        w, h = rng.uniform(0.22, 0.5, 2) * size
        cx, cy = _off_centre(rng) * size
        box = cv2.boxPoints(((float(cx), float(cy)), (float(w), float(h)), float(rng.uniform(-30, 30))))
        pane = np.zeros((size, size), np.uint8)
        cv2.fillPoly(pane, [np.round(box).astype(np.int32)], 1)
        pane = pane.astype(bool)
        # refraction: magnify around the pane centre and ripple
        zoom = rng.uniform(1.15, 1.35)
        amp, period = rng.uniform(2.5, 5.0), rng.uniform(18, 34)
        map_x = (cx + (xx - cx) / zoom + amp * np.sin(2 * np.pi * yy / period)).astype(np.float32)
        map_y = (cy + (yy - cy) / zoom + amp * np.cos(2 * np.pi * xx / period)).astype(np.float32)
        warped = cv2.remap(canvas, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        tint = _hsv_to_rgb(rng.uniform(160, 220), 0.5, 1.0)
        inside = 0.78 * warped + 0.22 * tint[None, None, :] + 12.0
        canvas[pane] = inside[pane]
        edge = cv2.morphologyEx(pane.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
        canvas[edge] = canvas[edge] * 0.6 + 255 * 0.4
        panes.append(pane)
    regions = _object_regions(objects)
    pane_union = _union(panes, (size, size))
    for pane in panes:
        regions.append(Region("pane", pane))
    # objects seen through a pane are not visible as themselves there
    for r in regions:
        if r.kind == "object":
            r.mask = r.mask & ~pane_union
    regions = [r for r in regions if r.mask.any()]
    targets = [i for i, r in enumerate(regions) if r.kind == "pane"]
    return _finish("glass", seed, canvas, regions, targets)


def _dull_distractors(rng, cfg, hue: float, sat: float, val: float) -> List[_Object]:
    """The saliency scenes' background objects (both worlds): ``min_objects - 1`` to
    ``max_objects - 1`` low-contrast distractors close to the background colour (hue, sat, val)."""
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    specs = []
    for _ in range(count - 1):
        rgb = _hsv_to_rgb(hue + rng.uniform(-25, 25), min(1.0, sat + rng.uniform(-0.05, 0.12)),
                          float(np.clip(val + rng.uniform(-0.12, 0.12), 0, 1)))
        specs.append((SHAPES[rng.integers(len(SHAPES))], "dull", rgb, None))
    return _place_objects(rng, cfg, count - 1, specs)


def _saliency_scene(rng, cfg, seed) -> Scene:
    size = cfg.size
    hue, sat, val = rng.uniform(0, 360), rng.uniform(0.05, 0.3), rng.uniform(0.4, 0.7)
    canvas = _hsv_to_rgb(hue, sat, val)[None, None, :] + _texture(rng, size, cfg.texture_amplitude * 0.7)[..., None]
    canvas = canvas.astype(np.float32)
    objects = _dull_distractors(rng, cfg, hue, sat, val)
    salient_hue = hue + 180 + rng.uniform(-40, 40)
    shape = SHAPES[rng.integers(len(SHAPES))]
    mask = _shape_mask(size, shape, *_off_centre(rng) * size, rng.uniform(0.12, 0.2) * size,
                       rng.uniform(0, 2 * np.pi), 0.6)
    rgb = _hsv_to_rgb(salient_hue, rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
    objects.append(_Object(shape, _colour_name(salient_hue), rgb, mask))
    _paint_objects(rng, canvas, objects, cfg)
    regions = _object_regions(objects[:-1])
    regions.append(Region("object", objects[-1].mask, objects[-1].shape, objects[-1].colour_name))
    return _finish("saliency", seed, canvas, regions, [len(regions) - 1])


def scene_rng(task: str, seed: int, world: str = "standard") -> np.random.Generator:
    """The random stream a scene is drawn from: ``[seed, task index]`` in the standard world, with a
    third entry in the hard one (its own stream, so no standard scene changes)."""
    entropy = [seed, TASKS.index(task)] + ([WORLDS.index(world)] if world != "standard" else [])
    return np.random.default_rng(entropy)


def scene_categories(seed: int, cfg: SceneConfig = SceneConfig()) -> List[str]:
    """The categories a ``categories`` scene is drawn with (cheap: no rendering).

    A category may still end up fully occluded; :meth:`Scene.categories_present` is the truth.
    """
    return _pick_categories(scene_rng("categories", seed, cfg.world), cfg)


def _pick_categories(rng, cfg) -> List[str]:
    k = int(rng.integers(cfg.category_count[0], cfg.category_count[1] + 1))
    return [CATEGORY_NAMES[i] for i in sorted(rng.choice(len(CATEGORIES), k, replace=False))]


def _categories_scene(rng, cfg, seed) -> Scene:
    chosen = _pick_categories(rng, cfg)
    canvas = _background(rng, cfg, low_saturation=True)
    count = int(rng.integers(max(cfg.min_objects, len(chosen)), cfg.max_objects + 1))
    names = chosen + [chosen[i] for i in rng.integers(len(chosen), size=count - len(chosen))]
    rng.shuffle(names)
    specs = []
    for name in names:
        cat = CATEGORIES[CATEGORY_NAMES.index(name)]
        lo, hi = COLOURS[cat.colour]
        specs.append((cat.shape, cat.colour, _hsv_to_rgb(rng.uniform(lo, hi), rng.uniform(0.7, 1.0),
                                                          rng.uniform(0.7, 1.0)), name))
    objects = _place_objects(rng, cfg, count, specs, radius_scale=0.85)
    _paint_objects(rng, canvas, objects, cfg)
    return _finish("categories", seed, canvas, _object_regions(objects), [])


_GENERATORS = {
    "blur": _blur_scene,
    "shadow": _shadow_scene,
    "glass": _glass_scene,
    "saliency": _saliency_scene,
    "categories": _categories_scene,
}


def render_scene(task: str, seed: int, cfg: SceneConfig = SceneConfig()) -> Scene:
    """Render the scene of ``task`` for ``seed`` in ``cfg.world`` (same inputs, same pixels)."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown scene task '{task}' (config key data.task); known: {TASKS}")
    if cfg.world == "hard":
        from alignsam.data.hard_scenes import render_hard_scene

        return render_hard_scene(task, seed, cfg)
    if cfg.world != "standard":
        raise ValueError(f"unknown scene world '{cfg.world}' (config key data.world); known: {WORLDS}")
    rng = scene_rng(task, seed, cfg.world)
    return _GENERATORS[task](rng, cfg, seed)
