"""Tiny dataset trees in the real layouts, written under pytest's ``tmp_path``.

The layouts are typed here from ``data/README.md`` (not imported from the presets), so
a typo in a preset fails the tests. Every image encodes its own mask: the red channel is bright
(230) on foreground and dark (20) elsewhere, so a test can tell that an image got *its* mask.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

H, W = 24, 32  # fixture image size (h, w)

# preset -> split -> (image folder, mask folder), as each archive extracts
REAL_LAYOUTS: Dict[str, Dict[str, Tuple[str, str]]] = {
    "cuhk": {"all": ("image", "gt")},
    "cuhk_dbd": {"train": ("train_data/1204source", "train_data/1204gt"),
                 "test": ("test_data/CUHK/xu100-source", "test_data/CUHK/xu100-gt"),
                 "test_dut": ("test_data/DUT/dut500-source", "test_data/DUT/dut500-gt")},
    "dut_dbd": {"train": ("train_data/1204source", "train_data/1204gt"),
                "test": ("test_data/DUT/dut500-source", "test_data/DUT/dut500-gt"),
                "test_cuhk": ("test_data/CUHK/xu100-source", "test_data/CUHK/xu100-gt")},
    "sbu": {"train": ("SBUTrain4KRecoveredSmall/ShadowImages", "SBUTrain4KRecoveredSmall/ShadowMasks"),
            "test": ("SBU-Test/ShadowImages", "SBU-Test/ShadowMasks")},
    "istd": {"train": ("train/train_A", "train/train_B"), "test": ("test/test_A", "test/test_B")},
    "gdd": {"train": ("train/image", "train/mask"), "test": ("test/image", "test/mask")},
    "msd": {"train": ("train/image", "train/mask"), "test": ("test/image", "test/mask")},
    "duts": {"train": ("DUTS-TR/DUTS-TR-Image", "DUTS-TR/DUTS-TR-Mask"),
             "test": ("DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask")},
    "ecssd": {"test": ("images", "ground_truth_mask")},
    "hku_is": {"test": ("imgs", "gt")},
    "dut_omron": {"test": ("DUT-OMRON-image", "pixelwiseGT-new-PNG")},
    "pascal_s": {"test": ("datasets/imgs/pascal", "datasets/masks/pascal")},
}
TASK_TEXT = {"cuhk": "blur", "cuhk_dbd": "blur", "dut_dbd": "blur", "sbu": "shadow", "istd": "shadow",
             "gdd": "glass", "msd": "mirror", "duts": "salient object", "ecssd": "salient object",
             "hku_is": "salient object", "dut_omron": "salient object", "pascal_s": "salient object"}
# images of the ISTD archive are PNGs; the others are JPEGs
IMAGE_EXT = {"istd": ".png"}


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little"))


def mask_for(stem: str, hw: Tuple[int, int] = (H, W)) -> np.ndarray:
    """A bool ``(h, w)`` rectangle whose place and size depend on ``stem`` (differs between stems)."""
    rng = _rng("mask" + stem)
    h, w = hw
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    y1, x1 = y0 + int(rng.integers(3, h // 2)), x0 + int(rng.integers(3, w // 2))
    mask = np.zeros(hw, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def image_for(mask: np.ndarray, key: str) -> np.ndarray:
    """uint8 ``(h, w, 3)``: red 230 on ``mask``, 20 elsewhere; green/blue vary with ``key``."""
    rng = _rng("image" + key)
    image = np.empty(mask.shape + (3,), np.uint8)
    image[..., 0] = np.where(mask, 230, 20)
    image[..., 1] = rng.integers(60, 200)
    image[..., 2] = rng.integers(0, 255)
    return image


def red_mask(image: np.ndarray) -> np.ndarray:
    """Recover the mask an image was drawn with (bright red)."""
    return image[..., 0] > 127


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": 95, "subsampling": 0} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(array).save(path, **kwargs)
    return path


def write_mask(path: Path, mask: np.ndarray) -> Path:
    """Save a bool mask as 0/255 (or a uint8 array as is)."""
    values = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask
    return write_image(path, values)


def write_pair(root: Path, image_dir: str, mask_dir: str, stem: str, image_ext: str = ".jpg",
               mask_ext: str = ".png", hw: Tuple[int, int] = (H, W)) -> np.ndarray:
    """Write ``<image_dir>/<stem><image_ext>`` and its mask; returns the mask (bool)."""
    mask = mask_for(stem, hw)
    write_image(root / image_dir / f"{stem}{image_ext}", image_for(mask, stem))
    write_mask(root / mask_dir / f"{stem}{mask_ext}", mask)
    return mask


def build_layout(root: Path, preset: str, n: int = 3, image_ext: Optional[str] = None
                 ) -> Dict[str, Dict[str, np.ndarray]]:
    """Write ``n`` pairs per split of ``REAL_LAYOUTS[preset]``; returns ``{split: {stem: mask}}``.

    Stems look like the datasets' own (``out_of_focus0003``, ``sun_abc``...) and differ between
    splits, since the data module refuses train images inside the test split.
    """
    ext = image_ext or IMAGE_EXT.get(preset, ".jpg")
    written: Dict[str, Dict[str, np.ndarray]] = {}
    for split, (image_dir, mask_dir) in REAL_LAYOUTS[preset].items():
        if (root / image_dir).exists():  # cuhk_dbd / dut_dbd share folders
            stems = sorted(p.stem for p in (root / image_dir).iterdir())
            written[split] = {s: mask_for(s) for s in stems}
            continue
        stems = [f"{split}_{preset}_{i:04d}" for i in range(n)]
        written[split] = {s: write_pair(root, image_dir, mask_dir, s, ext) for s in stems}
    return written


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to a fraction of its bytes (a broken download)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(16, int(len(data) * keep))])
    return path


# --- PASCAL VOC -------------------------------------------------------------------------------

def voc_palette() -> List[int]:
    """The VOC colour map (bit-interleaved class ids), flattened for ``Image.putpalette``."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_label_map(image_id: str, classes: Sequence[int], hw: Tuple[int, int] = (H, W)) -> np.ndarray:
    """uint8 class ids: class ``j`` of ``n`` is a rectangle in the ``j``-th vertical strip, ringed
    by a band of void (255) pixels; the rest is background (0)."""
    label_map = np.zeros(hw, np.uint8)
    strip = hw[1] // len(classes)
    for j, c in enumerate(classes):
        mask = np.zeros(hw, bool)
        mask[:, j * strip:(j + 1) * strip] = mask_for(f"{image_id}/{c}", (hw[0], strip))
        ys, xs = np.nonzero(mask)
        band = np.zeros(hw, bool)
        band[max(ys.min() - 1, 0): ys.max() + 2, max(xs.min() - 1, 0): xs.max() + 2] = True
        label_map[band & (label_map == 0)] = 255
        label_map[mask] = c
    return label_map


def write_palette_png(path: Path, label_map: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label_map, mode="P")
    im.putpalette(voc_palette())
    im.save(path)
    return path


def build_voc(root: Path, splits: Mapping[str, Iterable[str]],
              classes: Optional[Mapping[str, Sequence[int]]] = None, aug: bool = False,
              voc_dir: str = "VOCdevkit/VOC2012") -> Dict[str, np.ndarray]:
    """Write a VOC tree with the given split files; returns ``{image_id: label_map}``.

    Image ``k`` (in order of first appearance) shows class ``k % 20 + 1`` and, for even ``k``,
    also class ``(k + 7) % 20 + 1``, unless ``classes`` says otherwise. With ``aug`` the labels go
    to ``SegmentationClassAug`` as grey PNGs as well (SBD's format).
    """
    base = root / voc_dir
    label_maps: Dict[str, np.ndarray] = {}
    for split, ids in splits.items():
        ids = list(ids)
        for image_id in ids:
            if image_id in label_maps:
                continue
            k = len(label_maps)
            present = (classes or {}).get(image_id) or ([k % 20 + 1, (k + 7) % 20 + 1] if k % 2 == 0
                                                         else [k % 20 + 1])
            label_map = voc_label_map(image_id, present)
            label_maps[image_id] = label_map
            red = np.isin(label_map, list(present))
            write_image(base / "JPEGImages" / f"{image_id}.jpg", image_for(red, image_id))
            write_palette_png(base / "SegmentationClass" / f"{image_id}.png", label_map)
            if aug:
                write_image(base / "SegmentationClassAug" / f"{image_id}.png", label_map)
        split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("\n".join(ids) + "\n")
    return label_maps
