"""Clickable regions of procedural scenes, for class-agnostic tiny-SAM pretraining and evaluation.

A region is one connected component (of at least ``min_area`` pixels) of any scene region: an object,
a shadow, a glass pane, a blurred area or the background. Region kinds are sampled evenly, so that the
rarer kinds (shadows, panes) are learnt as well as objects.

A *union* target is what the scene tasks ask for when it falls apart into pieces: all shadows of a
scene, all its blurred areas, all its panes, or all instances of one category (``Scene.target``).
Only unions with at least two components of ``min_area`` pixels count (a one-piece union is an
ordinary region); the mask keeps every pixel of the union, small pieces included, as the tasks do.
Union targets carry kind ids ``UNION_OFFSET + REGION_KINDS.index(kind)`` ("object" = one category).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from alignsam.data.scenes import REGION_KINDS, SPLIT_SEED_BASE, TASKS, SceneConfig, render_scene


def region_components(scene, min_area: int) -> List[Tuple[str, np.ndarray]]:
    """``(kind, bool mask (S, S))`` for every connected component of every region of a scene."""
    out = []
    for region in scene.regions:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(region.mask.astype(np.uint8), connectivity=8)
        for c in range(1, count):
            if stats[c, cv2.CC_STAT_AREA] >= min_area:
                out.append((region.kind, labels == c))
    return out


UNION_OFFSET = len(REGION_KINDS)  # kind id of a union target = UNION_OFFSET + index of its region kind
UNION_KINDS = tuple(f"union_{k}" for k in REGION_KINDS)  # names of those ids, for logs


def union_targets(scene, min_area: int) -> List[Tuple[str, np.ndarray]]:
    """``(kind, bool mask (S, S))`` for every multi-component union of a scene (see the module doc):
    the shadows, the blurred areas, the panes, and the instances of each category."""
    groups: Dict[Tuple[str, Optional[str]], List[np.ndarray]] = {}
    for region in scene.regions:
        if region.kind in ("shadow", "blur", "pane"):
            groups.setdefault((region.kind, None), []).append(region.mask)
        elif region.kind == "object" and region.category is not None:
            groups.setdefault(("object", region.category), []).append(region.mask)
    out = []
    for (kind, _), masks in groups.items():
        union = np.logical_or.reduce(masks)
        _, _, stats, _ = cv2.connectedComponentsWithStats(union.astype(np.uint8), connectivity=8)
        if (stats[1:, cv2.CC_STAT_AREA] >= min_area).sum() >= 2:
            out.append((kind, union))
    return out


def sample_regions(
    components: Sequence[Tuple[str, np.ndarray]], count: int, rng: np.random.Generator,
    kind_weights: Optional[Dict[str, float]] = None,
) -> List[Tuple[str, np.ndarray]]:
    """Draw ``count`` components: a kind among those present (uniformly, or by ``kind_weights``),
    then one of its components not drawn yet (repeats only once every component of that kind has
    been drawn)."""
    by_kind: Dict[str, List[np.ndarray]] = {}
    for kind, mask in components:
        by_kind.setdefault(kind, []).append(mask)
    kinds = sorted(by_kind)
    weights = np.array([(kind_weights or {}).get(kind, 1.0) for kind in kinds], float)
    unused = {kind: list(rng.permutation(len(masks))) for kind, masks in by_kind.items()}
    picked = []
    for _ in range(count):
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        if not unused[kind]:  # every component of this kind drawn: start over
            unused[kind] = list(rng.permutation(len(by_kind[kind])))
        picked.append((kind, by_kind[kind][unused[kind].pop()]))
    return picked


class SceneRegionStream(IterableDataset):
    """Endless ``(image uint8 (3,S,S), masks bool (R,S,S), kinds long (R,))`` from training scenes
    (kind ids index ``REGION_KINDS``, or ``UNION_OFFSET +`` that for union targets).

    Args:
        regions_per_image: R.
        split: seed range to draw scenes from (``train`` for pretraining).
        seed: base seed of the stream (workers and ranks get disjoint sub-streams).
        min_area: smallest component, in pixels.
        tasks: scene tasks to mix (all five by default).
        kind_weights: relative odds of drawing each region kind (default 1 each).
        union_share: odds that each of the R targets is a union target (:func:`union_targets`,
            kinds drawn evenly) instead of one component, in scenes that have one; 0 (default)
            draws the very stream of before, random state included.
    """

    def __init__(
        self,
        regions_per_image: int = 4,
        split: str = "train",
        seed: int = 0,
        min_area: int = 150,
        tasks: Sequence[str] = TASKS,
        scene_config: SceneConfig = SceneConfig(),
        kind_weights: Optional[Dict[str, float]] = None,
        union_share: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= union_share <= 1.0:
            raise ValueError(f"union_share (config key data.union_share) must be in [0, 1], got {union_share}")
        self.union_share = union_share
        self.kind_weights = dict(kind_weights or {})
        self.regions_per_image = regions_per_image
        self.base = SPLIT_SEED_BASE[split]
        self.seed = seed
        self.min_area = min_area
        self.tasks = tuple(tasks)
        self.scene_config = scene_config

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:  # each worker renders on one core (OpenCV would start a thread per core)
            cv2.setNumThreads(1)
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        stream = rank * workers + worker
        rng = np.random.default_rng([self.seed, stream])
        while True:
            scene_seed = self.base + int(rng.integers(1_000_000))
            task = self.tasks[rng.integers(len(self.tasks))]
            scene = render_scene(task, scene_seed, self.scene_config)
            components = region_components(scene, self.min_area)
            if not components:
                continue
            picked = sample_regions(components, self.regions_per_image, rng, self.kind_weights)
            kinds = [REGION_KINDS.index(k) for k, _ in picked]
            if self.union_share > 0:
                unions = union_targets(scene, self.min_area)
                count = int(rng.binomial(self.regions_per_image, self.union_share)) if unions else 0
                for slot, (kind, mask) in enumerate(sample_regions(unions, count, rng)):
                    picked[slot] = (kind, mask)
                    kinds[slot] = UNION_OFFSET + REGION_KINDS.index(kind)
            masks = torch.from_numpy(np.stack([m for _, m in picked]))
            kinds = torch.tensor(kinds)
            yield torch.from_numpy(scene.image).permute(2, 0, 1).contiguous(), masks, kinds
