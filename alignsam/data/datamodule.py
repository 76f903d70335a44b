"""LightningDataModules for the binary-mask tasks and for PASCAL VOC 2012.

Every path, pairing and file check runs in ``__init__`` (LightningCLI builds the data module from
the ``data:`` section), so a bad path or a broken file is reported before any model is built:
paths and pairing are a directory listing; file checks read headers and end markers (plus a full
decode of the few-shot training images), see the ``check_files`` argument. The masks of the
val/test splits are decoded by the public method :meth:`~_FewShotDataModule.check_files`, which
the command line calls after building the data module and before building any model. ``setup``
only writes the few-shot ids into the run's log directory.

Batches are ``list[Sample]`` (:func:`~alignsam.data.sample.collate_samples`); validation and test
samples carry their ground truth at original resolution and their id.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Literal, Optional, Sequence, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from alignsam.data.augment import AugmentConfig, AugmentedViews
from alignsam.data.datasets import BinaryMaskFolder, get_preset
from alignsam.data.fewshot import draw_subset, read_fewshot_ids, write_fewshot_ids
from alignsam.data.files import (
    DataConfigError,
    MaskRule,
    check_binary_mask,
    check_complete,
    read_grey_mask,
    read_size,
)
from alignsam.data.sample import collate_samples
from alignsam.data.voc import VOC_CLASS_TEXTS, VOCEpisodes, VOCSegmentation
from alignsam.errors import ConfigError, check_range

log = logging.getLogger(__name__)

CheckFiles = Literal["quick", "full", "none"]
CHECK_FILES = ("quick", "full", "none")
# The splits each Lightning stage reads: ``test`` also reads the few-shot training images
# (PerSAM's prototypes in evaluate.py).
STAGE_SPLITS: Dict[str, Tuple[str, ...]] = {"fit": ("train", "val"), "test": ("train", "test")}
# data.<argument>: (lowest, highest) accepted value; None arguments mean "default" / "all" and pass.
ARG_RANGES: Dict[str, Tuple[Optional[float], Optional[float]]] = {
    "train_pool": (1, None), "train_size": (1, None), "val_size": (1, None), "test_size": (1, None),
    "subset_seed": (0, None), "augment_views": (0, None), "batch_size": (1, None),
    "eval_batch_size": (1, None), "num_workers": (0, None), "binary_margin": (0, 127),
    "max_intermediate_fraction": (0.0, 1.0),
}


def check_data_args(**values) -> None:
    """Range-check numeric data-module arguments (:data:`ARG_RANGES`); errors name ``data.<arg>``.

    ``None`` passes (``train_size: null`` means the whole split, ``eval_batch_size: null`` the
    training batch size).
    """
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"data.{name}", f"{value!r} is not a number")
        low, high = ARG_RANGES[name]
        check_range(f"data.{name}", value, low, high)


class EpochShuffle(Sampler):
    """A random order per epoch that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every training epoch, so a run resumed from a checkpoint at
    an epoch boundary sees the same orders as an uninterrupted one (a plain ``shuffle=True`` draws
    from the global RNG, whose state checkpoints do not keep).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _FewShotDataModule(L.LightningDataModule):
    """What both data modules share: few-shot draw, file checks, ids file, loaders.

    Subclasses set ``self._pools`` (image-level datasets per stage: ``train``, ``val``, ``test``;
    absent when the split is ``None``) and call :meth:`_prepare`, then define :meth:`_episodes`.
    """

    def _prepare(self, *, train_size: Optional[int], subset_seed: int, train_ids_file: Optional[str],
                 val_size: Optional[int], augment_views: int, augment: AugmentConfig,
                 check_files: CheckFiles, allow_split_overlap: bool) -> None:
        if check_files not in CHECK_FILES:
            raise ConfigError("data.check_files", f"{check_files!r} is not one of {', '.join(CHECK_FILES)}")
        pools = self._pools
        self.train_ids: List[str] = []
        if "train" in pools:
            if train_ids_file:
                self.train_ids = read_fewshot_ids(train_ids_file, pools["train"].ids)
            else:
                self.train_ids = draw_subset(pools["train"].ids, train_size, subset_seed)
            pools["train"] = pools["train"].subset(self.train_ids)
        if "val" in pools and val_size is not None:
            pools["val"] = pools["val"].subset(draw_subset(pools["val"].ids, val_size, subset_seed,
                                                           "data.val_size"))
        if "train" in pools and not allow_split_overlap:
            train_files = {p.resolve() for p in pools["train"].image_paths}
            for stage in ("val", "test"):
                if stage in pools:
                    shared = sorted(p for p in pools[stage].image_paths if p.resolve() in train_files)
                    if shared:
                        raise DataConfigError(
                            f"data.{stage}_split", f"{len(shared)} training images are also in the "
                            f"{stage} split (set data.allow_split_overlap: true if intended)", shared[0])
        # What check_files() still has to do per image-level pool: the masks of a decoded pool are
        # checked already; the headers and end markers of a quick-checked one too.
        self._image_pools: Dict[str, Dataset] = dict(pools)
        self._masks_checked: set = set()
        self._headers_checked: set = set()
        if check_files != "none":
            for stage, pool in pools.items():
                few_shot_train = stage == "train" and (train_size is not None or train_ids_file)
                decode = check_files == "full" or bool(few_shot_train)
                pool.check_files(decode=decode)
                self._headers_checked.add(id(pool))
                if decode:
                    self._masks_checked.add(id(pool))
        if augment_views and "train" in pools:
            pools["train"] = AugmentedViews(pools["train"], augment_views, subset_seed, augment)
        episodes: Dict[int, Dataset] = {}  # val and test often share one split: build it once
        for pool in pools.values():
            if id(pool) not in episodes:
                episodes[id(pool)] = self._episodes(pool)
        self.train_dataset: Optional[Dataset] = episodes[id(pools["train"])] if "train" in pools else None
        self.val_dataset: Optional[Dataset] = episodes[id(pools["val"])] if "val" in pools else None
        self.test_dataset: Optional[Dataset] = episodes[id(pools["test"])] if "test" in pools else None
        if check_files != "none":
            # every mask that train.py or evaluate.py will read, decoded once now: a bad val or test
            # mask stops the command here, before any model is built or image embedded
            self.check_files(("fit", "test"))

    def _episodes(self, images: Dataset) -> Dataset:
        return images

    def check_files(self, stages: Iterable[str] = ("fit", "test")) -> None:
        """Check every file of the splits ``stages`` read, decoding each mask once, before any model.

        ``fit`` reads the train and val splits, ``test`` the train split (PerSAM's prototypes) and
        the test split. Every image's header and end marker is read (images are not decoded) and
        every mask is decoded and checked: readable and complete, of its image's size, binary
        under ``data.mask_check`` (VOC: class ids 0..20 and 255). The first bad file raises
        :class:`~alignsam.data.files.DataConfigError` naming the file and the config key. Splits
        shared by several stages are checked once; files already decoded in ``__init__`` (the
        few-shot training images) and splits checked by an earlier call are not read again.
        Builds nothing and loads no model.
        """
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        unknown = [s for s in stages if s not in STAGE_SPLITS]
        if unknown:
            raise ValueError(f"check_files: unknown stage(s) {unknown}; choose from {list(STAGE_SPLITS)}")
        for stage in stages:
            for split in STAGE_SPLITS[stage]:
                pool = self._image_pools.get(split)
                if pool is None or id(pool) in self._masks_checked:
                    continue
                self._check_masks(pool, headers=id(pool) not in self._headers_checked)
                self._masks_checked.add(id(pool))
                self._headers_checked.add(id(pool))

    def _check_masks(self, pool: Dataset, headers: bool) -> None:
        """Decode and check every mask of the image-level ``pool`` (and, with ``headers``, read its
        images' headers and end markers). Subclasses say how their masks are checked."""
        raise NotImplementedError

    def _ids_header(self) -> List[str]:
        h = self.hparams
        return [f"{self.__class__.__name__} root={h.root} train_split={h.train_split} "
                f"train_size={h.train_size} subset_seed={h.subset_seed} "
                f"train_ids_file={h.train_ids_file}",
                "image ids of the few-shot training set; data.train_ids_file reads this file back"]

    def setup(self, stage: Optional[str] = None) -> None:
        """Write the few-shot ids to ``<trainer.log_dir>/fewshot_ids.txt`` (else ``fewshot_ids_dir``)."""
        if stage not in (None, "fit") or self.train_dataset is None:
            return
        directory, rank_zero = self.hparams.fewshot_ids_dir, True
        if self.trainer is not None:
            log_dir = self.trainer.log_dir  # every rank calls it: it broadcasts under DDP
            rank_zero = self.trainer.is_global_zero
            directory = log_dir if log_dir is not None else directory
        if directory is None:
            log.info("no trainer log_dir and no data.fewshot_ids_dir: few-shot ids not written")
            return
        if rank_zero:
            path = write_fewshot_ids(directory, self.train_ids, self._ids_header())
            log.info("few-shot ids (%d images) written to %s", len(self.train_ids), path)

    def _loader(self, dataset: Optional[Dataset], stage: str, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise DataConfigError(f"data.{stage}_split", f"no {stage} split configured (it is null)")
        workers = self.hparams.num_workers
        # the seed of seed_everything (torch.initial_seed() is what it set, however far the RNG has run)
        sampler = EpochShuffle(len(dataset), torch.initial_seed() % 2**31) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate_samples, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return self._loader(self.val_dataset, "val", h.eval_batch_size or h.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        h = self.hparams
        return self._loader(self.test_dataset, "test", h.eval_batch_size or h.batch_size, shuffle=False)


class BinaryMaskDataModule(_FewShotDataModule):
    """Binary-mask tasks (blur, shadow, glass, mirror, saliency) from a preset folder layout.

    Args:
        root: dataset folder (``data/sbu``); preset folders are relative to it.
        preset: layout name (``cuhk``, ``cuhk_dbd``, ``dut_dbd``, ``sbu``, ``istd``, ``gdd``, ``msd``,
            ``duts``, ``ecssd``, ``hku_is``, ``dut_omron``, ``pascal_s``, ``folder``); see
            :data:`alignsam.data.datasets.PRESETS` and ``data/README.md``.
        text: task word of every sample; default the preset's (``"shadow"``).
        image_dir, mask_dir: replace the image / mask folder of every split (single-split datasets
            whose folder names vary by mirror).
        splits: per-split overrides or new splits, ``{split: {image_dir, mask_dir, ids_file}}``.
        train_split, val_split, test_split: split names used for each stage (null: none).
            Validation defaults to the test split (these datasets have no official val split);
            ``val_size`` keeps it cheap.
        train_size: few-shot training images (paper: 50); null for the whole split.
        subset_seed: seeds the few-shot draw, the val subset and the augmented views.
        train_ids_file: read the training ids from this file (a ``fewshot_ids.txt``) instead.
        val_size: validate on this many images of the val split (drawn with ``subset_seed``).
        augment_views: augmented copies per training image (0: none), see ``augment``.
        augment: what an augmented view does (:class:`~alignsam.data.augment.AugmentConfig`).
        batch_size: images (episodes) per training batch.
        eval_batch_size: per validation/test batch; default ``batch_size``.
        num_workers: DataLoader worker processes.
        on_unpaired: ``error`` on an image without mask or a mask without image; ``skip`` drops
            them with a logged count.
        mask_stem_suffix: masks are named ``<image stem><suffix>`` (e.g. ``_mask``); default equal stems.
        mask_check: ``binary`` rejects non-binary masks, ``off`` accepts graded ones (still
            foreground > 127); default the preset's.
        binary_margin, max_intermediate_fraction: what counts as binary (see
            :class:`~alignsam.data.files.MaskRule`).
        check_files: ``quick``: every used file's header, size and end marker, and a full decode
            of the few-shot training images; ``full``: decode every used file; ``none``: paths and
            pairing only (broken files then fail when loaded).
        allow_split_overlap: allow training images to appear in the val/test split.
        fewshot_ids_dir: where ``fewshot_ids.txt`` goes when no trainer is attached.
    """

    def __init__(
        self,
        root: str,
        preset: str = "folder",
        text: Optional[str] = None,
        image_dir: Optional[str] = None,
        mask_dir: Optional[str] = None,
        splits: Optional[Dict[str, Dict[str, Optional[str]]]] = None,
        train_split: Optional[str] = "train",
        val_split: Optional[str] = "test",
        test_split: Optional[str] = "test",
        train_size: Optional[int] = 50,
        subset_seed: int = 0,
        train_ids_file: Optional[str] = None,
        val_size: Optional[int] = None,
        augment_views: int = 0,
        augment: AugmentConfig = AugmentConfig(),
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        on_unpaired: Literal["error", "skip"] = "error",
        mask_stem_suffix: str = "",
        mask_check: Optional[Literal["binary", "off"]] = None,
        binary_margin: int = 32,
        max_intermediate_fraction: float = 0.10,
        check_files: CheckFiles = "quick",
        allow_split_overlap: bool = False,
        fewshot_ids_dir: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["augment"])
        self.augment = augment
        check_data_args(train_size=train_size, val_size=val_size, subset_seed=subset_seed,
                        augment_views=augment_views, batch_size=batch_size, eval_batch_size=eval_batch_size,
                        num_workers=num_workers, binary_margin=binary_margin,
                        max_intermediate_fraction=max_intermediate_fraction)
        rule = MaskRule(check=mask_check or get_preset(preset).mask_check, margin=binary_margin,
                        max_intermediate_fraction=max_intermediate_fraction)
        self._pools: Dict[str, BinaryMaskFolder] = {}
        built: Dict[str, BinaryMaskFolder] = {}
        for stage, split in (("train", train_split), ("val", val_split), ("test", test_split)):
            if split is None:
                continue
            if split not in built:
                built[split] = BinaryMaskFolder.from_layout(
                    root, preset, split, text=text, image_dir=image_dir, mask_dir=mask_dir,
                    splits=splits, on_unpaired=on_unpaired, mask_stem_suffix=mask_stem_suffix,
                    mask_rule=rule)
            self._pools[stage] = built[split]
        self._prepare(train_size=train_size, subset_seed=subset_seed, train_ids_file=train_ids_file,
                      val_size=val_size, augment_views=augment_views, augment=augment,
                      check_files=check_files, allow_split_overlap=allow_split_overlap)

    def _check_masks(self, pool: BinaryMaskFolder, headers: bool) -> None:
        """Each mask decoded once and checked with the pool's :class:`~alignsam.data.files.MaskRule`
        (the checks of ``BinaryMaskFolder``; the image is not decoded, only its header and tail)."""
        for pair in pool.pairs:
            image_hw = read_size(pair.image_path, pool.image_key)
            if headers:
                check_complete(pair.image_path, pool.image_key)
            grey = read_grey_mask(pair.mask_path, pool.mask_key)  # a full decode: truncation raises
            if grey.shape != image_hw:
                raise DataConfigError(pool.mask_key, f"mask size {grey.shape} differs from its image "
                                      f"{pair.image_path.name} {image_hw} (h, w)", pair.mask_path)
            check_binary_mask(grey, pair.mask_path, pool.mask_key, pool.mask_rule)


class VOCDataModule(_FewShotDataModule):
    """PASCAL VOC 2012 as episodes: one per (image, class present), text = class name.

    Args:
        root: folder holding ``voc_dir`` (``data/voc``).
        voc_dir: ``VOCdevkit/VOC2012`` as extracted.
        image_dir, label_dir, split_dir: folders inside ``voc_dir``.
        train_label_dir: label folder for training (``SegmentationClassAug`` with SBD, together
            with ``train_split: train_aug``); default ``label_dir``.
        train_split, val_split, test_split: split file names in ``split_dir`` (null: none); VOC's
            test labels are not public, so test defaults to ``val``.
        class_texts: the 20 episode texts in class-id order; default plain names
            (``"dining table"``, ``"potted plant"``, ``"tv monitor"``).
        train_size: few-shot training *images* (all their classes become episodes).
        val_size: validate on this many val images (drawn with ``subset_seed``).
        Others as in :class:`BinaryMaskDataModule`.
    """

    def __init__(
        self,
        root: str,
        voc_dir: str = "VOCdevkit/VOC2012",
        image_dir: str = "JPEGImages",
        label_dir: str = "SegmentationClass",
        train_label_dir: Optional[str] = None,
        split_dir: str = "ImageSets/Segmentation",
        train_split: Optional[str] = "train",
        val_split: Optional[str] = "val",
        test_split: Optional[str] = "val",
        class_texts: Optional[List[str]] = None,
        train_size: Optional[int] = 50,
        subset_seed: int = 0,
        train_ids_file: Optional[str] = None,
        val_size: Optional[int] = None,
        augment_views: int = 0,
        augment: AugmentConfig = AugmentConfig(),
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        check_files: CheckFiles = "quick",
        allow_split_overlap: bool = False,
        fewshot_ids_dir: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["augment"])
        self.augment = augment
        check_data_args(train_size=train_size, val_size=val_size, subset_seed=subset_seed,
                        augment_views=augment_views, batch_size=batch_size, eval_batch_size=eval_batch_size,
                        num_workers=num_workers)
        self.class_texts: Sequence[str] = tuple(class_texts) if class_texts else VOC_CLASS_TEXTS
        self._pools: Dict[str, VOCSegmentation] = {}
        built: Dict[tuple, VOCSegmentation] = {}
        for stage, split in (("train", train_split), ("val", val_split), ("test", test_split)):
            if split is None:
                continue
            labels, label_key = ((train_label_dir, "data.train_label_dir")
                                 if stage == "train" and train_label_dir else (label_dir, "data.label_dir"))
            if (split, labels) not in built:
                built[(split, labels)] = VOCSegmentation(
                    root, split, voc_dir, image_dir, labels, split_dir,
                    split_key=f"data.{stage}_split", label_key=label_key)
            self._pools[stage] = built[(split, labels)]
        self._prepare(train_size=train_size, subset_seed=subset_seed, train_ids_file=train_ids_file,
                      val_size=val_size, augment_views=augment_views, augment=augment,
                      check_files=check_files, allow_split_overlap=allow_split_overlap)

    def _episodes(self, images: Dataset) -> Dataset:
        return VOCEpisodes(images, self.class_texts)

    def _check_masks(self, pool: VOCSegmentation, headers: bool) -> None:
        """Every label map was decoded and its ids checked in ``__init__`` (listing each image's
        classes, :class:`~alignsam.data.voc.VOCEpisodes`); what is left is the quick check (headers,
        sizes, end markers) when ``data.check_files: none`` skipped it."""
        if headers:
            pool.check_files(decode=False)
