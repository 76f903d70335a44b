"""The procedural scenes as datasets and a LightningDataModule, in the same sample format as real data.

Scene ``i`` of a split is ``render_scene(task, SPLIT_SEED_BASE[split] + i)``: train, val and test use
disjoint seed ranges. Binary tasks yield one :class:`~alignsam.data.sample.Sample` per scene; the
``categories`` task yields one episode per (scene, category present), like PASCAL VOC.

A scene is rendered once per dataset object, not once per epoch: training reads every few-shot
scene each epoch, yet after the first one its SAM embedding and text map come from the feature
cache, and what it still needs of the scene is the cache key (the image's digest, which
:func:`~alignsam.data.features.image_digest` remembers for a read-only image object) and the ground
truth. So :class:`SceneImages` keeps what it rendered (image and target, up to
:data:`RENDERED_MEMO_BYTES`) and returns the same read-only image object each time, with a fresh
copy of the target.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from alignsam.data.datamodule import CheckFiles, _FewShotDataModule, check_data_args
from alignsam.data.augment import AugmentConfig
from alignsam.data.files import DataConfigError
from alignsam.data.sample import Sample
from alignsam.data.scenes import CATEGORY_NAMES, SPLIT_SEED_BASE, TASK_TEXT, TASKS, WORLDS, SceneConfig, render_scene
from alignsam.data.voc import VOCEpisodes

# Rendered scenes a SceneImages keeps (least recently used dropped first): ~0.26 MB a 256 px scene,
# so every scene of the bundled configs (50 train, 64 val, 200 test) fits many times over.
RENDERED_MEMO_BYTES = 256 << 20


class SceneImages(Dataset):
    """Scenes ``seeds`` of one task. Binary tasks: samples; ``categories``: image-level items with a
    ``label_map`` (expand them with :class:`~alignsam.data.voc.VOCEpisodes`).

    Args:
        task: one of ``TASKS``.
        seeds: the scene seeds (absolute, i.e. already offset into the split's range).
        text: episode text of binary tasks (default ``TASK_TEXT[task]``).
        scene_config: generator knobs (``scene_config.world``: which world's scenes).
    """

    def __init__(self, task: str, seeds: Sequence[int], text: Optional[str] = None,
                 scene_config: SceneConfig = SceneConfig()) -> None:
        if task not in TASKS:
            raise DataConfigError("data.task", f"unknown scene task '{task}'; known: {', '.join(TASKS)}")
        self.task = task
        self.seeds = list(seeds)
        self.text = text or TASK_TEXT.get(task, task)
        self.scene_config = scene_config

    @property
    def ids(self) -> List[str]:
        """``<task>-<seed>`` in the standard world, ``<world>-<task>-<seed>`` in another (a few-shot
        ids file of one world names no scene of the other)."""
        prefix = "" if self.scene_config.world == "standard" else f"{self.scene_config.world}-"
        return [f"{prefix}{self.task}-{seed}" for seed in self.seeds]

    @property
    def image_paths(self) -> List:
        return []  # nothing on disk: splits are disjoint by construction

    def subset(self, ids: Sequence[str]) -> "SceneImages":
        by_id = dict(zip(self.ids, self.seeds))
        return SceneImages(self.task, [by_id[i] for i in ids], self.text, self.scene_config)

    def check_files(self, decode: bool = False) -> None:
        """Nothing to check: scenes are rendered."""

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> Dict:
        image, target = self._rendered(index)
        scene_id = self.ids[index]
        if self.task == "categories":
            return {"image": image, "label_map": target.copy(), "id": scene_id, "image_id": scene_id}
        return Sample(image=image, mask=target.copy(), text=self.text, id=scene_id, image_id=scene_id)

    def read_label_map(self, index: int) -> np.ndarray:
        """Class ids of scene ``index`` (``categories``): 0 background, 1.. ``CATEGORY_NAMES``."""
        return self._rendered(index)[1].copy()

    def _rendered(self, index: int):
        """Scene ``index``'s read-only image and its target (mask, or label map for ``categories``),
        rendered on first use and kept while they fit :data:`RENDERED_MEMO_BYTES`."""
        memo: "OrderedDict[int, tuple]" = self.__dict__.setdefault("_memo", OrderedDict())
        seed = self.seeds[index]
        if seed in memo:
            memo.move_to_end(seed)
            return memo[seed]
        scene = render_scene(self.task, seed, self.scene_config)
        image = scene.image
        image.flags.writeable = False  # shared by every call: image_digest remembers read-only images
        target = scene.label_map() if self.task == "categories" else scene.target()
        target.flags.writeable = False  # callers get copies
        memo[seed] = (image, target)
        size = image.nbytes + target.nbytes
        while len(memo) > 1 and len(memo) * size > RENDERED_MEMO_BYTES:
            memo.popitem(last=False)
        return memo[seed]


class SceneDataModule(_FewShotDataModule):
    """A bundled-world task: few-shot training scenes, validation and test scenes.

    Args:
        task: ``blur``, ``shadow``, ``glass``, ``saliency`` or ``categories``.
        train_pool: scenes in the train range the few-shot set is drawn from.
        train_size: few-shot training scenes (paper protocol: 50), drawn with ``subset_seed``.
        val_size, test_size: scenes of the val and test ranges (the first ones, so fixed).
        test_split: the scenes ``trainer.test`` / ``evaluate.py`` score: ``test`` (default) or ``val``
            (the ``val_size`` validation scenes: every strategy on validation, for choosing a config
            before the test split is looked at).
        text: episode text of binary tasks (default the task word, e.g. ``shadow``).
        world: ``standard`` (default; the scenes of every result so far) or ``hard`` (distractors that
            share the target's look, targets in more and smaller pieces, lower contrast, occlusion:
            :mod:`alignsam.data.hard_scenes`, docs/bundled-world.md "The hard world").
        Others as in :class:`~alignsam.data.datamodule.BinaryMaskDataModule`.
    """

    def __init__(
        self,
        task: str,
        train_pool: int = 1000,
        train_size: Optional[int] = 50,
        subset_seed: int = 0,
        train_ids_file: Optional[str] = None,
        val_size: int = 64,
        test_size: int = 200,
        test_split: str = "test",
        text: Optional[str] = None,
        world: str = "standard",
        augment_views: int = 0,
        augment: AugmentConfig = AugmentConfig(),
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        fewshot_ids_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if test_split not in ("test", "val"):
            raise DataConfigError("data.test_split", f"'{test_split}' is not a split to score; use test or val")
        if world not in WORLDS:
            raise DataConfigError("data.world", f"unknown scene world '{world}'; known: {', '.join(WORLDS)}")
        check_data_args(train_pool=train_pool, train_size=train_size, val_size=val_size, test_size=test_size,
                        subset_seed=subset_seed, augment_views=augment_views, batch_size=batch_size,
                        eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.save_hyperparameters(ignore=["augment"])
        self.augment = augment
        scenes = SceneConfig(world=world)
        self._pools = {
            split: SceneImages(task, range(SPLIT_SEED_BASE[split], SPLIT_SEED_BASE[split] + size), text, scenes)
            for split, size in (("train", train_pool), ("val", val_size), ("test", test_size))
        }
        if test_split == "val":
            self._pools["test"] = self._pools["val"]
        check: CheckFiles = "none"
        self._prepare(train_size=train_size, subset_seed=subset_seed, train_ids_file=train_ids_file,
                      val_size=None, augment_views=augment_views, augment=augment, check_files=check,
                      allow_split_overlap=True)

    def _ids_header(self) -> List[str]:
        h = self.hparams
        world = "" if h.world == "standard" else f" world={h.world}"
        return [f"SceneDataModule task={h.task}{world} train_pool={h.train_pool} train_size={h.train_size} "
                f"subset_seed={h.subset_seed} train_ids_file={h.train_ids_file}",
                "scene ids of the few-shot training set; data.train_ids_file reads this file back"]

    @property
    def num_classes(self) -> Optional[int]:
        """Classes of the ``categories`` label map (background included); None for binary tasks."""
        return 1 + len(CATEGORY_NAMES) if self.hparams.task == "categories" else None

    def _check_masks(self, pool: Dataset, headers: bool) -> None:
        """Nothing to check: scenes are rendered, not read, so ``check_files`` is a no-op here."""

    def _episodes(self, images: Dataset) -> Dataset:
        if self.hparams.task == "categories":
            return VOCEpisodes(images, CATEGORY_NAMES, CATEGORY_NAMES)
        return images
