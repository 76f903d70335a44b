"""Quality of a tiny CLIP on held-out scenes: zero-shot crop classification and the pointing game.

* **Zero-shot classification**: square crops around single category objects (margin 0.2, at least
  ``min_area`` visible pixels) of ``categories`` scenes, classified among the category names by
  the cosine of the global image embedding with the matcher's template-ensembled text embeddings.
* **Pointing game**: for every (scene, category present) pair of ``categories`` scenes, the CLIP
  Surgery map of the category name at the scene's resolution; a hit when its maximum (first in
  raster order on ties) lies inside an object of that category. Printed beside a uniform random
  point (the expected hit rate: the category's area fraction) and the largest-object heuristic
  (the innermost pixel of the largest visible object, whatever is asked), and for each matcher
  variant (feature surgery on/off; the query against nothing, the background text, or the
  background text and the other category names; softmax or subtract), so the config's choice
  is measured. The other tasks' target words (blur, shadow, glass, salient) get the same game on
  their scenes (variants without feature surgery), for information.

Run::

    python -m alignsam.pretrain.evaluate_tiny_clip --checkpoint checkpoints/tiny_clip.pt \\
        --matcher-config conf/scenes/matcher_tiny.yaml
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from alignsam.data.scenes import CATEGORY_NAMES, SPLIT_SEED_BASE, TASK_TEXT, Scene, render_scene
from alignsam.foundation.clip_surgery import TextMatcher
from alignsam.foundation.registry import build_text_matcher
from alignsam.pretrain.scene_captions import BACKGROUND_TEXT, crop_objects, object_crop_box

DEFAULT_MATCHER_CONFIG = "conf/scenes/matcher_tiny.yaml"
EVAL_CROP_MARGIN = 0.2
# Matcher variants compared beside the configured one: feature surgery off / on (with the category
# names as context texts), and what the query competes against: nothing, the "background" text, or
# "background" and the other category names (the dense loss's own softmax), in softmax or subtract mode.
COMPETITORS = {
    "no background": {"background_texts": []},
    "background softmax": {"background_texts": [BACKGROUND_TEXT], "background_mode": "softmax"},
    "background subtract": {"background_texts": [BACKGROUND_TEXT], "background_mode": "subtract"},
    "background+classes softmax": {"background_texts": [*CATEGORY_NAMES, BACKGROUND_TEXT], "background_mode": "softmax"},
    "background+classes subtract": {"background_texts": [*CATEGORY_NAMES, BACKGROUND_TEXT], "background_mode": "subtract"},
}
SURGERY_VARIANTS: Dict[str, dict] = {
    **{f"fs off, {name}": {"feature_surgery": False, **opts} for name, opts in COMPETITORS.items()},
    **{f"fs on, {name}": {"feature_surgery": True, "context_texts": list(CATEGORY_NAMES), **opts}
       for name, opts in COMPETITORS.items()},
}


# -- held-out data -------------------------------------------------------------------------------
def held_out_scenes(task: str, count: int, split: str = "test", start: int = 0) -> List[Scene]:
    """``count`` scenes of ``task`` with seeds ``SPLIT_SEED_BASE[split] + start + i``."""
    base = SPLIT_SEED_BASE[split] + start
    return [render_scene(task, base + i) for i in range(count)]


def held_out_crops(
    count: int, split: str = "test", start: int = 0, min_area: int = 300, margin: float = EVAL_CROP_MARGIN
) -> Tuple[List[np.ndarray], List[str]]:
    """``count`` crops (uint8 ``(s, s, 3)``) around single category objects, with their category names.

    Objects are taken in order from ``categories`` scenes ``start, start + 1, ...`` of the split.
    """
    crops, names = [], []
    seed = SPLIT_SEED_BASE[split] + start
    while len(crops) < count:
        scene = render_scene("categories", seed)
        seed += 1
        for region in crop_objects(scene, min_area):
            x0, y0, x1, y1 = object_crop_box(region.mask, margin)
            crops.append(scene.image[y0:y1, x0:x1].copy())
            names.append(region.category)
            if len(crops) == count:
                break
    return crops, names


# -- measures ------------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot_accuracy(
    matcher: TextMatcher, crops: Sequence[np.ndarray], labels: Sequence[str],
    class_names: Sequence[str] = CATEGORY_NAMES, batch_size: int = 64,
) -> float:
    """Fraction of crops whose most similar class name (global embedding) is their label."""
    text = matcher.text_embeddings(list(class_names))  # (K, D)
    correct = 0
    for i in range(0, len(crops), batch_size):
        _, global_ = matcher.image_features(list(crops[i : i + batch_size]))
        predicted = (global_ @ text.T).argmax(1).tolist()
        correct += sum(class_names[p] == label for p, label in zip(predicted, labels[i : i + batch_size]))
    return correct / max(1, len(crops))


def map_maximum(map_: torch.Tensor) -> Tuple[int, int]:
    """``(y, x)`` of a ``(h, w)`` map's maximum (the first in raster order on ties)."""
    flat = int(torch.argmax(map_.flatten()))
    return flat // map_.shape[1], flat % map_.shape[1]


def innermost_pixel(mask: np.ndarray) -> Tuple[int, int]:
    """``(y, x)`` of the pixel of a bool mask farthest from its border."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    flat = int(np.argmax(dist))
    return flat // mask.shape[1], flat % mask.shape[1]


def scene_queries(scene: Scene) -> List[Tuple[str, np.ndarray]]:
    """``(text, target mask)`` pairs a scene is queried with: each category present, or the task word."""
    if scene.task == "categories":
        return [(name, scene.target(name)) for name in scene.categories_present()]
    return [(TASK_TEXT[scene.task], scene.target())]


def largest_object_point(scene: Scene) -> Tuple[Tuple[int, int], Optional[str]]:
    """The innermost pixel of the largest visible object of a scene, and that object's category."""
    objects = [r for r in scene.regions if r.kind == "object" and r.mask.any()]
    largest = max(objects, key=lambda r: int(r.mask.sum()))
    return innermost_pixel(largest.mask), largest.category


@torch.no_grad()
def pointing_game(
    matchers: Mapping[str, TextMatcher], scenes: Sequence[Scene], batch_size: int = 16
) -> Dict[str, float]:
    """Pointing-game hit rates of several matchers (and the baselines) on the same scenes.

    Matchers sharing a model and ``vv_start_block`` share one image encoding per scene. Returns
    ``{name: hit rate}`` for every matcher, plus ``"random point"`` (the mean target area
    fraction: the expected hit rate of a uniform point), ``"largest object"`` (categories scenes)
    and ``"pairs"`` (the number of (scene, text) pairs).
    """
    hits = {name: 0 for name in matchers}
    random_hits, largest_hits, pairs = 0.0, 0, 0
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i : i + batch_size]
        queries = [scene_queries(s) for s in chunk]
        texts = [[t for t, _ in q] for q in queries]
        features: Dict[tuple, tuple] = {}
        for name, matcher in matchers.items():
            key = (id(matcher.model), matcher.vv_start_block)
            if key not in features:
                features[key] = matcher.image_features([s.image for s in chunk])
            patches, global_ = features[key]
            maps = matcher.maps_from_features(patches, global_, texts, out_hw=chunk[0].image.shape[:2])
            for scene_maps, scene_queries_ in zip(maps, queries):
                for map_, (_, target) in zip(scene_maps, scene_queries_):
                    hits[name] += bool(target[map_maximum(map_)])
        for scene, scene_queries_ in zip(chunk, queries):
            point, category = largest_object_point(scene)
            for text, target in scene_queries_:
                pairs += 1
                random_hits += float(target.mean())
                largest_hits += int(category == text)
    out = {name: h / max(1, pairs) for name, h in hits.items()}
    out["random point"] = random_hits / max(1, pairs)
    if scenes and scenes[0].task == "categories":
        out["largest object"] = largest_hits / max(1, pairs)
    out["pairs"] = pairs
    return out


def matcher_variants(base: TextMatcher, selected: Mapping[str, object]) -> Dict[str, TextMatcher]:
    """The configured matcher and the :data:`SURGERY_VARIANTS`, all on ``base``'s model."""
    common = {"templates": base.templates, "vv_start_block": base.vv_start_block}

    def make(options: Mapping[str, object]) -> TextMatcher:
        return TextMatcher(base.model, base.tokenizer, name=base.name, weights_fingerprint=base.weights_fingerprint,
                           **{**common, **options})

    return {"selected (config)": make(selected), **{name: make(opts) for name, opts in SURGERY_VARIANTS.items()}}


def load_matcher_config(path: Optional[str]) -> Tuple[Optional[str], dict]:
    """``(checkpoint_path, matcher options)`` from a matcher config (keys: model_name, checkpoint_path, options)."""
    if path is None:
        return None, {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping of text matcher options")
    if cfg.get("model_name", "tiny") != "tiny":
        raise ValueError(f"{path}: model_name must be 'tiny' for this evaluation, got '{cfg['model_name']}' (config key model_name)")
    cfg.pop("model_name", None)
    return cfg.pop("checkpoint_path", None), cfg


def evaluate(
    checkpoint: str, options: Mapping[str, object], crops: int = 600, scenes: int = 300, task_scenes: int = 100,
    split: str = "test", variants: bool = True,
) -> dict:
    """All figures of one checkpoint (see the module docstring)."""
    started = time.time()
    raw = torch.load(checkpoint, map_location="cpu", weights_only=False) if Path(checkpoint).is_file() else {}
    trained_for = raw.get("meta", {}).get("matcher_options", {})
    if "vv_start_block" not in options and "vv_start_block" in trained_for:  # the v-v path the dense loss trained
        options = {**options, "vv_start_block": trained_for["vv_start_block"]}
    base = build_text_matcher("tiny", checkpoint, **options)
    crop_images, crop_labels = held_out_crops(crops, split)
    result = {"checkpoint": str(checkpoint), "options": dict(options), "split": split,
              "zero_shot_crop_accuracy": zero_shot_accuracy(base, crop_images, crop_labels), "crops": crops}
    matchers = matcher_variants(base, options) if variants else {"selected (config)": base}
    result["pointing_categories"] = pointing_game(matchers, held_out_scenes("categories", scenes, split))
    task_matchers = {name: m for name, m in matchers.items() if not m.feature_surgery or name == "selected (config)"}
    result["pointing_tasks"] = {
        task: pointing_game(task_matchers, held_out_scenes(task, task_scenes, split)) for task in TASK_TEXT
    } if task_scenes else {}
    result["meta"] = {k: v for k, v in raw.get("meta", {}).items() if k != "hparams"}
    result["seconds"] = round(time.time() - started, 1)
    return result


def format_report(result: dict) -> str:
    """The printed table of :func:`evaluate`'s result."""
    meta = result.get("meta", {})
    lines = [
        f"tiny CLIP {result['checkpoint']} (step {meta.get('step')}, {meta.get('minutes')} min, "
        f"{meta.get('images_seen')} images), {result['split']} seeds",
        f"matcher options: {json.dumps(result['options'])}",
        f"zero-shot crop classification ({result['crops']} crops, {len(CATEGORY_NAMES)} names): "
        f"{result['zero_shot_crop_accuracy']:.3f}   (target >= 0.90, chance {1 / len(CATEGORY_NAMES):.3f})",
        f"pointing game, categories ({result['pointing_categories']['pairs']} scene-category pairs; target >= 0.75):",
    ]
    for name, value in result["pointing_categories"].items():
        if name != "pairs":
            lines.append(f"  {name:<38s} {value:.3f}")
    if result["pointing_tasks"]:
        lines.append("pointing game, the other tasks' target words (not gated):")
        tasks = list(result["pointing_tasks"])
        lines.append(f"  {'':<38s} " + " ".join(f"{TASK_TEXT[t]:>8s}" for t in tasks))
        for name in result["pointing_tasks"][tasks[0]]:
            row = [result["pointing_tasks"][t][name] for t in tasks]
            lines.append(f"  {name:<38s} " + " ".join(f"{v:8.3f}" if name != "pairs" else f"{v:8d}" for v in row))
    lines.append(f"({result['seconds']} s)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="tiny CLIP file (default: the matcher config's checkpoint_path)")
    parser.add_argument("--matcher-config", default=DEFAULT_MATCHER_CONFIG, help="YAML of text matcher options")
    parser.add_argument("--crops", type=int, default=600)
    parser.add_argument("--scenes", type=int, default=300, help="categories scenes of the pointing game")
    parser.add_argument("--task-scenes", type=int, default=100, help="scenes per other task (0: skip)")
    parser.add_argument("--split", default="test", choices=sorted(SPLIT_SEED_BASE))
    parser.add_argument("--no-variants", action="store_true", help="only the configured matcher options")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.matcher_config != DEFAULT_MATCHER_CONFIG and not Path(args.matcher_config).is_file():
        parser.error(f"--matcher-config {args.matcher_config}: no such file")
    config_checkpoint, options = load_matcher_config(args.matcher_config if Path(args.matcher_config).is_file() else None)
    checkpoint = args.checkpoint or config_checkpoint or "checkpoints/tiny_clip.pt"
    result = evaluate(checkpoint, options, args.crops, args.scenes, args.task_scenes, args.split, not args.no_variants)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
