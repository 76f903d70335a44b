"""Clickable regions of procedural scenes, for class-agnostic tiny-SAM pretraining and evaluation.

A region is one connected component (of at least ``min_area`` pixels) of any scene region: an object,
a shadow, a glass pane, a blurred area or the background. Region kinds are sampled evenly, so that the
rarer kinds (shadows, panes) are learnt as well as objects.
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
    """Endless ``(image uint8 (3,S,S), masks bool (R,S,S), kinds long (R,))`` from training scenes.

    Args:
        regions_per_image: R.
        split: seed range to draw scenes from (``train`` for pretraining).
        seed: base seed of the stream (workers and ranks get disjoint sub-streams).
        min_area: smallest component, in pixels.
        tasks: scene tasks to mix (all five by default).
        kind_weights: relative odds of drawing each region kind (default 1 each).
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
    ) -> None:
        super().__init__()
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
            masks = torch.from_numpy(np.stack([m for _, m in picked]))
            kinds = torch.tensor([REGION_KINDS.index(k) for k, _ in picked])
            yield torch.from_numpy(scene.image).permute(2, 0, 1).contiguous(), masks, kinds
