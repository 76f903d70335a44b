"""Writing predictions as PNGs (``evaluate.py --save_predictions`` and predictions on new images).

Each prediction gives two files under ``out_dir``:

* ``masks/<stem>.png``: the prediction at the image's original resolution; a single-channel
  0 / 255 PNG for binary tasks, a palette PNG of class ids with the PASCAL VOC colour map for
  label maps (the format of VOC's own ``SegmentationClass`` files);
* ``overlays/<stem>.png``: the RGB image with the prediction drawn over it
  (:mod:`alignsam.visualize`).

Every file is written atomically (a temporary file in the destination folder, then ``os.replace``),
so a crash never leaves a half-written PNG. Inputs may be numpy arrays or torch tensors; wrong
dtypes or shapes raise ``ValueError`` naming the argument and the shapes.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
from PIL import Image

from alignsam.atomic import write_bytes_atomic
from alignsam.geometry import MASK_LOGIT_THRESHOLD
from alignsam.visualize import PREDICTION_COLOUR, draw_clicks, overlay_mask, save_png

PathLike = Union[str, os.PathLike]

MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
BACKGROUND_CLASS = 0  # label-map class left uncoloured in overlays (VOC background)


def voc_colour_map(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: uint8 ``(n, 3)`` RGB, entry ``i`` for class id ``i``.

    Bits ``0, 1, 2`` of the id set the top bit of R, G, B; bits ``3, 4, 5`` the next bit, and so
    on (so 1 -> (128, 0, 0), 2 -> (0, 128, 0), 15 -> (192, 128, 128), 255 -> (224, 224, 192)).
    """
    colours = np.zeros((n, 3), np.uint8)
    for class_id in range(n):
        bits, shift = class_id, 7
        while bits:
            for channel in range(3):
                colours[class_id, channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
            shift -= 1
    return colours


VOC_COLOUR_MAP = voc_colour_map()  # (256, 3), read-only
VOC_COLOUR_MAP.setflags(write=False)


def save_binary_prediction(
    out_dir: PathLike, stem: str, image, logits, points, labels
) -> Dict[str, Path]:
    """Write a binary prediction's mask and overlay.

    Args:
        out_dir: output folder (created with its sub-folders).
        stem: output file stem (e.g. from :func:`alignsam.evaluation.images.output_stems`).
        image: uint8 ``(H, W, 3)`` RGB at original resolution.
        logits: float ``(H, W)`` SAM logits at original resolution; the mask is
            ``logits > MASK_LOGIT_THRESHOLD``.
        points: float ``(n, 2)`` clicks ``(x, y)`` in the original frame (``n`` may be 0).
        labels: int ``(n,)``, 1 positive / 0 negative.
    Returns:
        ``{"mask": out_dir/masks/<stem>.png, "overlay": out_dir/overlays/<stem>.png}``; the mask
        is an ``L`` PNG ``(H, W)`` of 0 / 255, the overlay an RGB PNG ``(H, W, 3)`` with the mask
        tinted in ``PREDICTION_COLOUR`` and the numbered clicks coloured by label.
    """
    image = _check_image(image)
    logits = _as_numpy(logits)
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be float SAM logits, got dtype {logits.dtype}")
    _check_same_size("logits", logits.shape, image.shape)
    if np.isnan(logits).any():
        raise ValueError("logits hold NaN values")
    mask = logits > MASK_LOGIT_THRESHOLD
    overlay = draw_clicks(overlay_mask(image, mask, PREDICTION_COLOUR), _as_numpy(points), _as_numpy(labels))
    paths = _output_paths(out_dir, stem)
    _write_png(paths["mask"], Image.fromarray(mask.astype(np.uint8) * 255))
    save_png(paths["overlay"], overlay)
    return paths


def save_label_map_prediction(
    out_dir: PathLike, stem: str, image, label_map, ignore_index: Optional[int] = 255
) -> Dict[str, Path]:
    """Write a label-map (semantic segmentation) prediction's mask and overlay.

    Args:
        out_dir: output folder (created with its sub-folders).
        stem: output file stem.
        image: uint8 ``(H, W, 3)`` RGB at original resolution.
        label_map: integer ``(H, W)`` class ids in ``[0, 255]``.
        ignore_index: id of void pixels (left uncoloured in the overlay), or ``None``.
    Returns:
        ``{"mask": ..., "overlay": ...}`` as :func:`save_binary_prediction`; the mask is a ``P``
        PNG whose indices are ``label_map`` and whose palette is :data:`VOC_COLOUR_MAP`; the overlay
        tints every class other than ``BACKGROUND_CLASS`` and ``ignore_index`` in its palette colour.
    """
    image = _check_image(image)
    label_map = _as_numpy(label_map)
    if label_map.dtype == np.bool_ or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must hold integer class ids, got dtype {label_map.dtype}")
    _check_same_size("label_map", label_map.shape, image.shape)
    if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        raise ValueError(f"label_map ids must lie in [0, 255] (a palette PNG holds 8-bit indices), "
                         f"got [{label_map.min()}, {label_map.max()}]")
    if ignore_index is not None and not 0 <= int(ignore_index) <= 255:
        raise ValueError(f"ignore_index must lie in [0, 255] or be None, got {ignore_index}")
    colours = VOC_COLOUR_MAP
    overlay = image
    for class_id in np.unique(label_map):
        if class_id in (BACKGROUND_CLASS, ignore_index):
            continue
        overlay = overlay_mask(overlay, label_map == class_id, tuple(colours[class_id].tolist()))
    indexed = Image.fromarray(label_map.astype(np.uint8))
    indexed.putpalette(colours.reshape(-1).tolist())  # L -> P, indices unchanged
    paths = _output_paths(out_dir, stem)
    _write_png(paths["mask"], indexed)
    save_png(paths["overlay"], overlay)
    return paths


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _as_numpy(x) -> np.ndarray:
    """numpy view of an array or tensor (tensors detached, moved to the CPU; float tensors -> float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _check_image(image) -> np.ndarray:
    image = _as_numpy(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got dtype {image.dtype} shape {image.shape}")
    return image


def _check_same_size(name: str, shape, image_shape) -> None:
    if tuple(shape) != tuple(image_shape[:2]):
        raise ValueError(f"{name} has shape {tuple(shape)} but image has shape {tuple(image_shape)}; "
                         f"{name} must be (H, W) = {tuple(image_shape[:2])} at the image's resolution")


def _output_paths(out_dir: PathLike, stem: str) -> Dict[str, Path]:
    """``{"mask": out_dir/masks/<stem>.png, "overlay": out_dir/overlays/<stem>.png}``."""
    if not isinstance(stem, str) or stem in ("", ".", "..") or stem.startswith(".") or any(
        sep in stem for sep in ("/", "\\", "\0")
    ):
        raise ValueError(f"stem must be a plain, non-hidden file name without separators, got {stem!r}")
    out_dir = Path(out_dir)
    return {"mask": out_dir / MASKS_DIR / f"{stem}.png", "overlay": out_dir / OVERLAYS_DIR / f"{stem}.png"}


def _write_png(path: Path, im: Image.Image) -> None:
    """Encode ``im`` (any PIL mode: grey, palette, RGB) as PNG and write it atomically."""
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
