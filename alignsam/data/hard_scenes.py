"""The bundled world's ``hard`` setting: the same five tasks, made hard the way real data is hard.

The standard scenes (:mod:`alignsam.data.scenes`) let a colour or a local look give the target
away. Here every task adds what makes the paper's datasets hard, each to the task's own kind:

* **distractors that share the target's look**: dark stains on the ground that are no shadow, as
  large as the shadows, and dark objects; tinted panels that tint like glass but do not refract;
  rivals of the salient object's colour at nearly its size, and smaller same-hue accents; objects
  of a category's colour but another shape; sharp twins of the blurred objects.
  A detector of colour or darkness alone (the text side, a per-patch classifier) is then wrong.
* **targets in more and smaller pieces**: more, smaller instances and blurred objects; window
  frames across the panes (shadow is the exception: fewer, smaller casters with whole shadows,
  since slivers cost the oracle as much as the baselines).
* **lower contrast** between target and background: lighter shadows, weaker refraction and tint,
  a less saturated salient object, gentler defocus, duller category colours.
* **occlusion**: bars and objects lying over the targets, cutting them into pieces, and bars over
  the look-alikes too (stains, panels, rivals, non-category objects, sharp twins), so that a bar
  marks nothing.

What stays fixed: a task's target is still what a click on it should segment (the tiny SAM's
one-click IoU on the target is the check; docs/bundled-world.md, "The hard world").

Scene ``seed`` of the hard world draws from its own random stream (:func:`~alignsam.data.scenes.scene_rng`),
so it is no hard version of the standard scene with that seed, and the standard world's streams
are untouched. The knobs are :class:`HardKnobs` (defaults: the calibrated world).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Tuple

import cv2
import numpy as np

from alignsam.data import scenes as base
from alignsam.data.scenes import (CATEGORIES, CATEGORY_NAMES, COLOURS, SHAPES, Region, Scene, SceneConfig, _Object,
                                  _background, _finish, _hsv_to_rgb, _object_regions, _off_centre, _paint_objects,
                                  _cast_shadow, _dull_distractors, _place_objects, _random_specs, _shape_mask, _texture, _union)

@dataclass(frozen=True)
class HardKnobs:
    """What the hard world changes, task by task (ranges are uniform draws)."""

    # shadow
    shadow_casters: Tuple[int, int] = (2, 3)
    shadow_caster_scale: float = 0.75  # object radius relative to the standard range
    shadow_offset: Tuple[float, float] = (0.15, 0.24)  # standard (0.09, 0.16): a lower sun, whole shadows
    shadow_darkness: Tuple[float, float] = (0.4, 0.58)  # standard (0.35, 0.55): lighter, lower contrast
    shadow_softness: Tuple[float, float] = (1.0, 2.5)  # standard (1.0, 2.5)
    shadow_stains: Tuple[int, int] = (7, 9)  # dark stains, darkened like a shadow
    shadow_stain_radius: Tuple[float, float] = (0.05, 0.13)  # fraction of the side, as the casters (and their shadows)
    shadow_dark_casters: float = 0.35  # share of casters painted the colour of the shadowed ground
    shadow_ground_texture: float = 1.5  # ground texture amplitude relative to the standard one
    # glass
    glass_panes: Tuple[int, int] = (2, 3)
    glass_pane_side: Tuple[float, float] = (0.2, 0.4)  # standard (0.22, 0.5)
    glass_zoom: Tuple[float, float] = (1.1, 1.25)  # standard (1.15, 1.35)
    glass_ripple: Tuple[float, float] = (1.5, 3.0)  # standard (2.5, 5.0)
    glass_tint: float = 0.18  # share of the tint (standard 0.22)
    glass_edge: float = 0.3  # share of white on a pane's edge (standard 0.4)
    glass_panels: Tuple[int, int] = (3, 4)  # tinted panels that do not refract
    glass_frame_share: float = 0.3  # panes and panels with a frame bar across them
    # saliency
    salient_hue_offset: float = 70.0  # salient hue = background + 180 +- this (standard 40)
    salient_saturation: Tuple[float, float] = (0.5, 0.8)  # standard (0.8, 1.0)
    salient_accents: Tuple[int, int] = (3, 4)  # smaller objects of the salient object's colour
    salient_rivals: Tuple[int, int] = (1, 2)  # objects of the salient object's colour and nearly its size
    salient_rival_size: Tuple[float, float] = (0.8, 1.0)  # rival radius relative to the salient object's
    salient_rival_gap: int = 12  # pixels between a rival and the salient object (or another rival)
    # categories
    category_instances: Tuple[int, int] = (4, 7)
    category_scale: float = 0.7
    category_saturation: Tuple[float, float] = (0.5, 0.85)  # standard (0.7, 1.0)
    category_lookalikes: Tuple[int, int] = (2, 4)  # a present category's colour, another shape
    # blur
    blur_objects: Tuple[int, int] = (5, 8)
    blur_object_scale: float = 0.75
    blur_sigma: Tuple[float, float] = (1.8, 3.2)  # standard (3, 6)
    blur_twins: Tuple[int, int] = (2, 3)  # sharp objects of a blurred object's colour
    # every task: bars lying over the target (and over its look-alikes)
    occluders: Tuple[int, int] = (1, 1)
    occluder_width: Tuple[float, float] = (0.02, 0.04)  # fraction of the side


HARD = HardKnobs()


# -- pieces shared by the tasks ----------------------------------------------------------------------
def _draw(rng, low_high: Tuple[int, int]) -> int:
    return int(rng.integers(low_high[0], low_high[1] + 1))


def _bar_mask(size: int, cx: float, cy: float, length: float, width: float, angle_deg: float) -> np.ndarray:
    box = cv2.boxPoints(((float(cx), float(cy)), (float(length), float(width)), float(angle_deg)))
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
    return canvas.astype(bool)


def _point_in(rng, mask: np.ndarray) -> Tuple[float, float]:
    """A uniform pixel ``(x, y)`` of ``mask`` (the image centre when it is empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask.shape[1] / 2, mask.shape[0] / 2
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def _occluding_bars(rng, cfg: SceneConfig, target: np.ndarray, knobs: HardKnobs) -> List[_Object]:
    """Bars (poles, frames, branches) across the target: each passes through a pixel of it."""
    bars = []
    for _ in range(_draw(rng, knobs.occluders)):
        cx, cy = _point_in(rng, target)
        width = rng.uniform(*knobs.occluder_width) * cfg.size
        mask = _bar_mask(cfg.size, cx, cy, cfg.size * rng.uniform(0.3, 0.7), width, rng.uniform(0, 180))
        colour, rgb = base._random_colour(rng, saturated=bool(rng.random() < 0.5))
        bars.append(_Object("bar", colour, rgb, mask))
    return bars


def _paint_over(rng, canvas: np.ndarray, cover: List[_Object], cfg: SceneConfig, regions: List[Region]) -> None:
    """Paint ``cover`` on top of ``canvas``; every region loses what they hide, and they become
    object regions themselves (added in front of the background)."""
    _paint_objects(rng, canvas, cover, cfg)
    hidden = _union([o.mask for o in cover], canvas.shape[:2])
    for region in regions:
        region.mask = region.mask & ~hidden
    regions[:] = [r for r in regions if r.mask.any()]
    regions.extend(_object_regions(cover))


def _finish_binary(task: str, seed: int, canvas: np.ndarray, regions: List[Region], target_kind: str) -> Scene:
    """The scene with every region of ``target_kind`` as its target (after occlusion)."""
    targets = [i for i, r in enumerate(regions) if r.kind == target_kind]
    return _finish(task, seed, canvas, regions, targets)


# -- tasks ---------------------------------------------------------------------------------------------
def _shadow_scene(rng, cfg: SceneConfig, seed: int, knobs: HardKnobs) -> Scene:
    size = cfg.size
    canvas = _background(rng, replace(cfg, texture_amplitude=cfg.texture_amplitude * knobs.shadow_ground_texture),
                         low_saturation=False)
    count = _draw(rng, knobs.shadow_casters)
    darkness = rng.uniform(*knobs.shadow_darkness)
    specs = _random_specs(rng, count)
    ground = canvas.mean((0, 1))
    ground_hue = float(cv2.cvtColor(np.clip(ground, 0, 255).astype(np.uint8)[None, None],
                                    cv2.COLOR_RGB2HSV_FULL)[0, 0, 0]) * 360 / 256
    for i, (shape, _, _, category) in enumerate(specs):  # dark objects: the colour of shadowed ground
        if rng.random() < knobs.shadow_dark_casters:
            specs[i] = (shape, base._colour_name(ground_hue), ground * darkness * rng.uniform(0.9, 1.1), category)
    objects = _place_objects(rng, cfg, count, specs, radius_scale=knobs.shadow_caster_scale)
    angle = rng.uniform(0, 2 * np.pi)
    dist = rng.uniform(*knobs.shadow_offset) * size
    cast = _cast_shadow(objects, angle, dist, size)
    softness = rng.uniform(*knobs.shadow_softness)
    soft = cv2.GaussianBlur(cast, (0, 0), softness)
    # stains: blobs of the ground darkened exactly as a shadow darkens it, cast by nothing
    stains = np.zeros((size, size), np.float32)
    for _ in range(_draw(rng, knobs.shadow_stains)):
        blob = _shape_mask(size, SHAPES[rng.integers(len(SHAPES))], *rng.uniform(0.1, 0.9, 2) * size,
                           rng.uniform(*knobs.shadow_stain_radius) * size, rng.uniform(0, 2 * np.pi),
                           rng.uniform(0.45, 0.8))
        stains = np.maximum(stains, blob.astype(np.float32))
    apart = cv2.dilate((cast > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) == 0  # stains do not touch shadows
    stains = cv2.GaussianBlur(stains * apart, (0, 0), softness) * (1 - soft)
    canvas = canvas * (1 - (1 - darkness) * np.maximum(soft, stains)[..., None])
    _paint_objects(rng, canvas, objects, cfg)
    objects_union = _union([obj.mask for obj in objects], (size, size))
    shadow = (soft > 0.5) & ~objects_union
    stain = (stains > 0.5) & ~shadow & ~objects_union
    regions = _object_regions(objects)
    if stain.any():
        regions.append(Region("object", stain, "stain"))
    regions.append(Region("shadow", shadow))
    bars = _occluding_bars(rng, cfg, shadow, knobs)
    if stain.any():  # and over the stains: a bar across a dark patch must not mark it as the shadow
        bars += _occluding_bars(rng, cfg, stain, knobs)
    _paint_over(rng, canvas, bars, cfg, regions)
    return _finish_binary("shadow", seed, canvas, regions, "shadow")


def _tinted(canvas: np.ndarray, rgb_tint: np.ndarray, knobs: HardKnobs) -> np.ndarray:
    return (1 - knobs.glass_tint) * canvas + knobs.glass_tint * rgb_tint[None, None, :] + 8.0


def _brighten_edge(canvas: np.ndarray, area: np.ndarray, knobs: HardKnobs) -> None:
    edge = cv2.morphologyEx(area.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    canvas[edge] = canvas[edge] * (1 - knobs.glass_edge) + 255 * knobs.glass_edge


def _glass_scene(rng, cfg: SceneConfig, seed: int, knobs: HardKnobs) -> Scene:
    size = cfg.size
    canvas = _background(rng, cfg, low_saturation=False)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects = _place_objects(rng, cfg, count, _random_specs(rng, count))
    _paint_objects(rng, canvas, objects, cfg)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tint = _hsv_to_rgb(rng.uniform(160, 220), 0.5, 1.0)  # one glazing per scene: panels copy it
    panes, panels, frames = [], [], []
    for index in range(_draw(rng, knobs.glass_panes) + _draw(rng, knobs.glass_panels)):
        is_pane = index < knobs.glass_panes[0] or (index < knobs.glass_panes[1] and rng.random() < 0.5)
        w, h = rng.uniform(*knobs.glass_pane_side, 2) * size
        cx, cy = _off_centre(rng, 0.15, 0.85) * size
        tilt = float(rng.uniform(-20, 20))
        box = cv2.boxPoints(((float(cx), float(cy)), (float(w), float(h)), tilt))
        area = np.zeros((size, size), np.uint8)
        cv2.fillPoly(area, [np.round(box).astype(np.int32)], 1)
        area = area.astype(bool) & ~_union(panes + panels, (size, size))
        if not area.any():
            continue
        if is_pane:  # refraction: magnify around the pane centre and ripple, then tint
            zoom, amp, period = rng.uniform(*knobs.glass_zoom), rng.uniform(*knobs.glass_ripple), rng.uniform(18, 34)
            map_x = (cx + (xx - cx) / zoom + amp * np.sin(2 * np.pi * yy / period)).astype(np.float32)
            map_y = (cy + (yy - cy) / zoom + amp * np.cos(2 * np.pi * xx / period)).astype(np.float32)
            seen = cv2.remap(canvas, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        else:  # a tinted panel: the same glazing colour, nothing bent behind it
            seen = canvas.copy()
        canvas[area] = _tinted(seen, tint, knobs)[area]
        _brighten_edge(canvas, area, knobs)
        (panes if is_pane else panels).append(area)
        if rng.random() < knobs.glass_frame_share:  # a frame bar across the pane (or panel: no give-away)
            along = tilt + (90.0 if rng.random() < 0.5 else 0.0)
            frames.append(_bar_mask(size, cx, cy, 1.2 * max(w, h), rng.uniform(0.025, 0.045) * size, along))
    regions = _object_regions(objects)
    covered = _union(panes + panels, (size, size))
    for r in regions:  # objects seen through glass or a panel are not visible as themselves there
        r.mask = r.mask & ~covered
    regions = [r for r in regions if r.mask.any()]
    regions += [Region("object", p, "panel") for p in panels] + [Region("pane", p) for p in panes]
    frame_rgb = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.2), rng.uniform(0.2, 0.9))
    pane_union = _union(panes, (size, size))
    cover = [_Object("frame", "frame", frame_rgb, m & covered) for m in frames if (m & covered).any()]
    cover += _occluding_bars(rng, cfg, pane_union, knobs)
    if panels:  # and over the panels: a bar across glazing must not mark it as a pane
        cover += _occluding_bars(rng, cfg, _union(panels, (size, size)), knobs)
    _paint_over(rng, canvas, cover, cfg, regions)
    return _finish_binary("glass", seed, canvas, regions, "pane")


def _saliency_scene(rng, cfg: SceneConfig, seed: int, knobs: HardKnobs) -> Scene:
    size = cfg.size
    hue, sat, val = rng.uniform(0, 360), rng.uniform(0.1, 0.35), rng.uniform(0.4, 0.7)
    canvas = _hsv_to_rgb(hue, sat, val)[None, None, :] + _texture(rng, size, cfg.texture_amplitude * 0.8)[..., None]
    canvas = canvas.astype(np.float32)
    objects = _dull_distractors(rng, cfg, hue, sat, val)
    salient_hue = hue + 180 + rng.uniform(-knobs.salient_hue_offset, knobs.salient_hue_offset)
    salient_sat, salient_val = rng.uniform(*knobs.salient_saturation), rng.uniform(0.75, 0.95)
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = rng.uniform(0.12, 0.2) * size
    mask = _shape_mask(size, shape, *_off_centre(rng) * size, radius, rng.uniform(0, 2 * np.pi), 0.6)
    salient = _Object(shape, base._colour_name(salient_hue), _hsv_to_rgb(salient_hue, salient_sat, salient_val), mask)
    accents = []  # small objects of the salient colour, away from it: salient is the one that stands out as a whole
    for _ in range(_draw(rng, knobs.salient_accents)):
        accent = _shape_mask(size, SHAPES[rng.integers(len(SHAPES))], *rng.uniform(0.08, 0.92, 2) * size,
                             rng.uniform(0.06, 0.11) * size, rng.uniform(0, 2 * np.pi), 0.6)
        accent &= ~cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        if accent.any():
            rgb = _hsv_to_rgb(salient_hue + rng.uniform(-10, 10), salient_sat, salient_val)
            accents.append(_Object("accent", salient.colour_name, rgb, accent))
    # rivals: the salient object's colour at nearly its size, not annotated. Which of the striking objects
    # is "the salient one" (here the largest) is then a judgement the few-shot labels teach, as in the
    # real datasets, not a colour a per-patch detector can find.
    rivals = []
    apart = np.ones((2 * knobs.salient_rival_gap + 1,) * 2, np.uint8)
    taken = cv2.dilate((mask | _union([o.mask for o in accents], mask.shape)).astype(np.uint8), apart).astype(bool)
    for _ in range(_draw(rng, knobs.salient_rivals)):
        shape, scale = SHAPES[rng.integers(len(SHAPES))], rng.uniform(*knobs.salient_rival_size)
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(100):  # a whole rival, apart from the others (else none)
            rival = _shape_mask(size, shape, *rng.uniform(0.15, 0.85, 2) * size, radius * scale, angle, 0.6)
            if not (rival & taken).any():
                break
        else:
            continue
        if rival.any():
            rgb = _hsv_to_rgb(salient_hue + rng.uniform(-10, 10), salient_sat, salient_val)
            rivals.append(_Object("rival", salient.colour_name, rgb, rival))
            taken |= cv2.dilate(rival.astype(np.uint8), apart).astype(bool)
    objects += rivals + [salient] + accents
    _paint_objects(rng, canvas, objects, cfg)
    regions = [Region("object", o.mask, o.shape, o.colour_name) for o in objects if o is not salient and o.mask.any()]
    regions.append(Region("salient", salient.mask, salient.shape, salient.colour_name))
    bars = _occluding_bars(rng, cfg, salient.mask, knobs)
    for rival in rivals:  # bars lie over the rivals too: a bar across it must not mark the salient object
        bars += [bar for bar in _occluding_bars(rng, cfg, rival.mask, knobs) if not (bar.mask & mask).any()]
    _paint_over(rng, canvas, bars, cfg, regions)
    scene = _finish_binary("saliency", seed, canvas, regions, "salient")
    for r in scene.regions:  # the salient object is an object like the others (REGION_KINDS)
        if r.kind == "salient":
            r.kind = "object"
    return scene


def _categories_scene(rng, cfg: SceneConfig, seed: int, knobs: HardKnobs) -> Scene:
    chosen = base._pick_categories(rng, cfg)
    canvas = _background(rng, cfg, low_saturation=True)
    count = max(_draw(rng, knobs.category_instances), len(chosen))
    names = chosen + [chosen[i] for i in rng.integers(len(chosen), size=count - len(chosen))]
    specs = []
    for name in names:
        cat = CATEGORIES[CATEGORY_NAMES.index(name)]
        lo, hi = COLOURS[cat.colour]
        rgb = _hsv_to_rgb(rng.uniform(lo, hi), rng.uniform(*knobs.category_saturation), rng.uniform(0.65, 0.95))
        specs.append((cat.shape, cat.colour, rgb, name))
    for _ in range(_draw(rng, knobs.category_lookalikes)):  # a present category's colour, another shape
        cat = CATEGORIES[CATEGORY_NAMES.index(chosen[rng.integers(len(chosen))])]
        lo, hi = COLOURS[cat.colour]
        shape = [s for s in SHAPES if s != cat.shape][rng.integers(len(SHAPES) - 1)]
        rgb = _hsv_to_rgb(rng.uniform(lo, hi), rng.uniform(*knobs.category_saturation), rng.uniform(0.65, 0.95))
        specs.append((shape, cat.colour, rgb, None))
    order = rng.permutation(len(specs))
    specs = [specs[i] for i in order]
    objects = _place_objects(rng, cfg, len(specs), specs, radius_scale=knobs.category_scale)
    _paint_objects(rng, canvas, objects, cfg)
    regions = _object_regions(objects)
    instances = _union([o.mask for o in objects if o.category], canvas.shape[:2])
    bars = _occluding_bars(rng, cfg, instances, knobs)
    others = _union([o.mask for o in objects if not o.category], canvas.shape[:2])
    if others.any():  # and over the look-alikes: a bar across an object must not mark it as an instance
        bars += _occluding_bars(rng, cfg, others, knobs)
    _paint_over(rng, canvas, bars, cfg, regions)
    return _finish("categories", seed, canvas, regions, [])


def _blur_scene(rng, cfg: SceneConfig, seed: int, knobs: HardKnobs) -> Scene:
    size = cfg.size
    canvas = _background(rng, cfg, low_saturation=False)
    count = _draw(rng, knobs.blur_objects)
    objects = _place_objects(rng, cfg, count, _random_specs(rng, count), radius_scale=knobs.blur_object_scale)
    _paint_objects(rng, canvas, objects, cfg)
    blurred = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(*knobs.blur_sigma))
    sharp = np.zeros((size, size), bool)
    for obj in objects[::-1]:  # the front-most objects, until they cover a fifth of the image
        if sharp.mean() >= 0.2:
            break
        sharp |= obj.mask
    defocused: List[_Object] = []
    if rng.random() < 0.3 and sharp.mean() >= 0.2:  # defocused background behind sharp objects
        blur_mask = ~sharp
    else:  # two to four defocused objects, and sometimes a defocused blob of background
        defocused = objects[: int(rng.integers(2, 5))]
        blur_mask = _union([o.mask for o in defocused], (size, size))
        if rng.random() < 0.4:
            blur_mask |= _shape_mask(size, "ellipse", *rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0.08, 0.15) * size,
                                     rng.uniform(0, np.pi), rng.uniform(0.5, 0.9))
    alpha = cv2.GaussianBlur(blur_mask.astype(np.float32), (0, 0), 1.5)[..., None]
    canvas = alpha * blurred + (1 - alpha) * canvas
    regions = _object_regions(objects)
    regions.append(Region("blur", blur_mask))
    # sharp twins: in-focus objects of a defocused object's colour, partly in front of the blur
    twins_of = defocused or objects[:1]
    twin_specs = []
    for _ in range(_draw(rng, knobs.blur_twins)):
        source = twins_of[rng.integers(len(twins_of))]
        twin_specs.append((SHAPES[rng.integers(len(SHAPES))], source.colour_name, source.rgb.copy(), None))
    twins = _place_objects(rng, cfg, len(twin_specs), twin_specs, radius_scale=knobs.blur_object_scale * 0.8)
    bars = _occluding_bars(rng, cfg, blur_mask, knobs)
    # and over the sharp twins: a bar across an object must not mark it as defocused
    bars += _occluding_bars(rng, cfg, _union([t.mask for t in twins], (size, size)), knobs)
    _paint_over(rng, canvas, twins + bars, cfg, regions)
    return _finish_binary("blur", seed, canvas, regions, "blur")


GENERATORS = {
    "blur": _blur_scene,
    "shadow": _shadow_scene,
    "glass": _glass_scene,
    "saliency": _saliency_scene,
    "categories": _categories_scene,
}


def render_hard_scene(task: str, seed: int, cfg: SceneConfig = SceneConfig(), knobs: HardKnobs = HARD) -> Scene:
    """The hard world's scene of ``task`` for ``seed`` (same inputs, same pixels)."""
    rng = base.scene_rng(task, seed, "hard")
    return GENERATORS[task](rng, cfg, seed, knobs)
