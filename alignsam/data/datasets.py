"""Binary-mask folder datasets (blur, shadow, glass, mirror, saliency) with a preset per layout.

Each preset names the folders of each split *as the archive extracts them* under ``data.root``
(see ``data/README.md``); every folder can be overridden in YAML:

.. code-block:: yaml

    data:
      root: data/sbu
      preset: sbu
      splits:                       # field-by-field overrides of the preset, or new splits
        train: {image_dir: SBU-Train/ShadowImages, mask_dir: SBU-Train/ShadowMasks}

Images and masks are paired **by file stem**, never by sorted order. A split may also list the
stems it keeps in an ``ids_file`` (one stem a line, ``#`` comments), e.g. to split the raw CUHK
release. Samples follow :mod:`alignsam.data.sample`. The VOC 2012 dataset lives in
:mod:`alignsam.data.voc` and is re-exported here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Literal, Mapping, Optional, Sequence

from torch.utils.data import Dataset

from alignsam.data.files import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    DataConfigError,
    MaskRule,
    check_binary_mask,
    check_complete,
    list_by_stem,
    read_grey_mask,
    read_rgb,
    read_size,
    require_dir,
    require_file,
)
from alignsam.data.sample import Sample
from alignsam.data.voc import VOC_CLASS_NAMES, VOCEpisodes, VOCSegmentation  # noqa: F401 (re-export)
from alignsam.geometry import GT_FOREGROUND_THRESHOLD

log = logging.getLogger(__name__)

OnUnpaired = Literal["error", "skip"]


@dataclass(frozen=True)
class SplitFolders:
    """Folders of one split, relative to ``data.root``.

    Attributes:
        image_dir: folder of RGB images.
        mask_dir: folder of 0/255 masks with the same stems.
        ids_file: optional text file (relative to ``data.root``) listing the stems this split keeps.
    """

    image_dir: str
    mask_dir: str
    ids_file: Optional[str] = None


@dataclass(frozen=True)
class LayoutPreset:
    """A dataset's layout as extracted: its task word, its splits, and the default mask check."""

    text: str
    splits: Mapping[str, SplitFolders]
    mask_check: Literal["binary", "off"] = "binary"
    note: str = ""


_DBD_TRAIN = SplitFolders("train_data/1204source", "train_data/1204gt")
_DBD_CUHK = SplitFolders("test_data/CUHK/xu100-source", "test_data/CUHK/xu100-gt")
_DBD_DUT = SplitFolders("test_data/DUT/dut500-source", "test_data/DUT/dut500-gt")


def _train_test(train_image: str, train_mask: str, test_image: str, test_mask: str
                ) -> Dict[str, SplitFolders]:
    return {"train": SplitFolders(train_image, train_mask), "test": SplitFolders(test_image, test_mask)}


PRESETS: Dict[str, LayoutPreset] = {
    # blur: the raw CUHK release has one folder and no split; give ids files (see data/README.md)
    "cuhk": LayoutPreset("blur", {"all": SplitFolders("image", "gt")},
                         note="raw CUHK release (704 images, no split): add ids_file per split"),
    # blur: the common DBD tree (1204 = 604 CUHK + 600 DUT train images)
    "cuhk_dbd": LayoutPreset("blur", {"train": _DBD_TRAIN, "test": _DBD_CUHK, "test_dut": _DBD_DUT}),
    "dut_dbd": LayoutPreset("blur", {"train": _DBD_TRAIN, "test": _DBD_DUT, "test_cuhk": _DBD_CUHK}),
    "sbu": LayoutPreset("shadow", _train_test(
        "SBUTrain4KRecoveredSmall/ShadowImages", "SBUTrain4KRecoveredSmall/ShadowMasks",
        "SBU-Test/ShadowImages", "SBU-Test/ShadowMasks")),
    "istd": LayoutPreset("shadow", _train_test("train/train_A", "train/train_B",
                                               "test/test_A", "test/test_B")),
    "gdd": LayoutPreset("glass", _train_test("train/image", "train/mask", "test/image", "test/mask")),
    "msd": LayoutPreset("mirror", _train_test("train/image", "train/mask", "test/image", "test/mask")),
    "duts": LayoutPreset("salient object", _train_test(
        "DUTS-TR/DUTS-TR-Image", "DUTS-TR/DUTS-TR-Mask", "DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask")),
    # saliency test sets: folder names vary by mirror; defaults are the official archives
    "ecssd": LayoutPreset("salient object", {"test": SplitFolders("images", "ground_truth_mask")}),
    "hku_is": LayoutPreset("salient object", {"test": SplitFolders("imgs", "gt")}),
    "dut_omron": LayoutPreset("salient object",
                              {"test": SplitFolders("DUT-OMRON-image", "pixelwiseGT-new-PNG")}),
    "pascal_s": LayoutPreset("salient object",
                             {"test": SplitFolders("datasets/imgs/pascal", "datasets/masks/pascal")},
                             mask_check="off",
                             note="the official PASCAL-S masks are graded; foreground is > 127"),
    # any other binary dataset: train/{image,mask}, test/{image,mask}, all overridable
    "folder": LayoutPreset("object", _train_test("train/image", "train/mask", "test/image", "test/mask")),
}


@dataclass(frozen=True)
class ResolvedSplit:
    """A split's absolute folders and the config keys that set each of them."""

    name: str
    image_dir: Path
    mask_dir: Path
    ids_file: Optional[Path]
    image_key: str
    mask_key: str
    ids_key: str


def get_preset(preset: str) -> LayoutPreset:
    """The preset called ``preset``; an unknown name is an error naming ``data.preset``."""
    if preset not in PRESETS:
        raise DataConfigError("data.preset", f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


def resolve_split(
    root: Path | str,
    preset: str,
    split: str,
    image_dir: Optional[str] = None,
    mask_dir: Optional[str] = None,
    splits: Optional[Mapping[str, Mapping[str, Optional[str]]]] = None,
) -> ResolvedSplit:
    """Folders of ``split``: the preset's, then ``splits[split]`` fields, then ``image_dir``/``mask_dir``.

    ``image_dir``/``mask_dir`` (top level) replace the folders of *every* split: meant for
    single-split datasets whose folder names vary by mirror (ECSSD, HKU-IS, ...).
    """
    root = require_dir(Path(root), "data.root", "dataset root")
    layout = get_preset(preset)
    overrides = dict((splits or {}).get(split) or {})
    unknown = set(overrides) - {"image_dir", "mask_dir", "ids_file"}
    if unknown:
        raise DataConfigError(f"data.splits.{split}", f"unknown fields {sorted(unknown)}; "
                              "allowed: image_dir, mask_dir, ids_file")
    base = layout.splits.get(split)
    keys = {f: f"data.splits.{split}.{f}" for f in ("image_dir", "mask_dir", "ids_file")}
    if base is None:
        if not ((overrides.get("image_dir") or image_dir) and (overrides.get("mask_dir") or mask_dir)):
            known = sorted(set(layout.splits) | set(splits or {}))
            raise DataConfigError(f"data.splits.{split}", f"preset {preset!r} has no split {split!r} "
                                  f"(known: {', '.join(known)}); define its image_dir and mask_dir")
        base = SplitFolders(overrides.get("image_dir") or image_dir, overrides.get("mask_dir") or mask_dir)
    folders = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if image_dir is not None:
        folders, keys["image_dir"] = replace(folders, image_dir=image_dir), "data.image_dir"
    if mask_dir is not None:
        folders, keys["mask_dir"] = replace(folders, mask_dir=mask_dir), "data.mask_dir"
    return ResolvedSplit(
        name=split,
        image_dir=root / folders.image_dir,
        mask_dir=root / folders.mask_dir,
        ids_file=root / folders.ids_file if folders.ids_file else None,
        image_key=keys["image_dir"],
        mask_key=keys["mask_dir"],
        ids_key=keys["ids_file"],
    )


@dataclass(frozen=True)
class PairedFile:
    """An image and its mask, paired by stem ``id``."""

    id: str
    image_path: Path
    mask_path: Path


def read_ids_file(path: Path, key: str) -> List[str]:
    """Stems listed in ``path``, one a line; blank lines and ``#`` comments are skipped."""
    require_file(path, key, "ids file")
    ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise DataConfigError(key, "ids file lists no ids", path)
    return ids


def _describe(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def pair_by_stem(
    split: ResolvedSplit,
    on_unpaired: OnUnpaired = "error",
    mask_stem_suffix: str = "",
) -> List[PairedFile]:
    """Pair the images and masks of ``split`` by stem (sorted by id).

    Args:
        split: the resolved folders.
        on_unpaired: ``"error"``: an image without mask or a mask without image raises, naming
            the file; ``"skip"``: such files are dropped and their count logged as a warning.
        mask_stem_suffix: masks are named ``<image stem><suffix>.<ext>`` (e.g. ``"_mask"``).
    """
    images = list_by_stem(split.image_dir, IMAGE_EXTENSIONS, split.image_key)
    masks_raw = list_by_stem(split.mask_dir, MASK_EXTENSIONS, split.mask_key)
    masks: Dict[str, Path] = {}
    stray_masks: List[Path] = []
    for stem, path in masks_raw.items():
        if mask_stem_suffix and not stem.endswith(mask_stem_suffix):
            stray_masks.append(path)
            continue
        masks[stem[: len(stem) - len(mask_stem_suffix)] if mask_stem_suffix else stem] = path
    lonely_images = [p for s, p in images.items() if s not in masks]
    stray_masks += [p for s, p in masks.items() if s not in images]
    if lonely_images or stray_masks:
        if on_unpaired == "error":
            if lonely_images:
                raise DataConfigError(split.mask_key, f"image has no mask in {split.mask_dir} "
                                      "(pairing is by file stem; data.on_unpaired: skip drops it)",
                                      _describe(lonely_images))
            raise DataConfigError(split.image_key, f"mask has no image in {split.image_dir} "
                                  "(pairing is by file stem; data.on_unpaired: skip drops it)",
                                  _describe(stray_masks))
        log.warning("split %s: skipped %d images without mask and %d masks without image "
                    "(data.on_unpaired=skip); e.g. %s", split.name, len(lonely_images),
                    len(stray_masks), _describe(lonely_images + stray_masks, 3))
    pairs = [PairedFile(s, images[s], masks[s]) for s in sorted(images) if s in masks]
    if split.ids_file is not None:
        wanted = read_ids_file(split.ids_file, split.ids_key)
        by_id = {p.id: p for p in pairs}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise DataConfigError(split.ids_key, f"ids file names {len(missing)} ids with no image/mask "
                                  f"pair in {split.image_dir} (first: {missing[:5]})", split.ids_file)
        pairs = [by_id[i] for i in sorted(set(wanted))]
    if not pairs:
        raise DataConfigError(split.image_key, "no image/mask pairs left in the split", split.image_dir)
    return pairs


class BinaryMaskFolder(Dataset):
    """Image/mask pairs of one split; item ``i`` is a :class:`~alignsam.data.sample.Sample`.

    Args:
        pairs: the paired files (from :func:`pair_by_stem`).
        text: the task word every sample carries (``"shadow"``).
        mask_rule: how loaded masks are checked (:class:`~alignsam.data.files.MaskRule`).
        image_key, mask_key: config keys named by errors about these files.
    """

    def __init__(self, pairs: Sequence[PairedFile], text: str, mask_rule: MaskRule = MaskRule(),
                 image_key: str = "data.image_dir", mask_key: str = "data.mask_dir"):
        self.pairs = list(pairs)
        self.text = text
        self.mask_rule = mask_rule
        self.image_key = image_key
        self.mask_key = mask_key

    @classmethod
    def from_layout(cls, root: Path | str, preset: str, split: str, *, text: Optional[str] = None,
                    image_dir: Optional[str] = None, mask_dir: Optional[str] = None,
                    splits: Optional[Mapping[str, Mapping[str, Optional[str]]]] = None,
                    on_unpaired: OnUnpaired = "error", mask_stem_suffix: str = "",
                    mask_rule: Optional[MaskRule] = None) -> "BinaryMaskFolder":
        """Resolve, list and pair a split of a preset layout (no file is decoded here)."""
        resolved = resolve_split(root, preset, split, image_dir, mask_dir, splits)
        layout = get_preset(preset)
        pairs = pair_by_stem(resolved, on_unpaired, mask_stem_suffix)
        rule = mask_rule if mask_rule is not None else MaskRule(check=layout.mask_check)
        return cls(pairs, text or layout.text, rule, resolved.image_key, resolved.mask_key)

    @property
    def ids(self) -> List[str]:
        """Sample ids (file stems) in item order."""
        return [p.id for p in self.pairs]

    @property
    def image_paths(self) -> List[Path]:
        return [p.image_path for p in self.pairs]

    def subset(self, ids: Sequence[str]) -> "BinaryMaskFolder":
        """The same dataset restricted to ``ids`` (in the given order)."""
        by_id = {p.id: p for p in self.pairs}
        return BinaryMaskFolder([by_id[i] for i in ids], self.text, self.mask_rule,
                                self.image_key, self.mask_key)

    def check_files(self, decode: bool = False) -> None:
        """Check every pair before training: readable, complete, mask size == image size.

        With ``decode`` every image and mask is decoded in full and masks are checked against
        :attr:`mask_rule`; otherwise only headers and end markers are read (milliseconds a file).
        """
        for pair in self.pairs:
            image_hw = read_size(pair.image_path, self.image_key)
            mask_hw = read_size(pair.mask_path, self.mask_key)
            if mask_hw != image_hw:
                raise DataConfigError(self.mask_key, f"mask size {mask_hw} differs from its image "
                                      f"{pair.image_path.name} {image_hw} (h, w)", pair.mask_path)
            check_complete(pair.image_path, self.image_key)
            check_complete(pair.mask_path, self.mask_key)
            if decode:
                self._load(pair)

    def _load(self, pair: PairedFile) -> Sample:
        image = read_rgb(pair.image_path, self.image_key)
        grey = read_grey_mask(pair.mask_path, self.mask_key)
        if grey.shape != image.shape[:2]:
            raise DataConfigError(self.mask_key, f"mask size {grey.shape} differs from its image "
                                  f"{pair.image_path.name} {image.shape[:2]} (h, w)", pair.mask_path)
        check_binary_mask(grey, pair.mask_path, self.mask_key, self.mask_rule)
        return Sample(image=image, mask=grey > GT_FOREGROUND_THRESHOLD, text=self.text,
                      id=pair.id, image_id=pair.id)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        return self._load(self.pairs[index])
