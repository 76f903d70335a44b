"""Reading and checking dataset files; every error names the file and the config key to change.

Images are decoded with PIL without EXIF rotation (masks are stored in the same raw pixel
orientation) and converted to RGB uint8 ``(H, W, 3)``. Binary masks are decoded to uint8 ``(H, W)``
grey values; foreground is ``value > GT_FOREGROUND_THRESHOLD`` (127).

What "binary" means (:class:`MaskRule`): 0/255 PNGs re-saved as JPEG, or drawn with anti-aliased
edges, carry a few intermediate grey values along object boundaries. A mask counts as binary when
at most ``max_intermediate_fraction`` (default 10 %) of its pixels lie strictly inside
``(margin, 255 - margin)`` (default margin 32, so JPEG ringing such as 12 or 240 is not
"intermediate"). A boundary band is a few percent of the pixels of a real mask, while a graded
(soft) saliency map puts most of its foreground there. A mask whose values are only 0 and 1 is
also rejected: it would be all background under the 127 threshold.

16-bit masks (0/65535 PNGs or TIFFs, PIL mode ``I;16`` or ``I``) are scaled to 0..255 by the
16-bit maximum (``value * 255 / 65535``, rounded) before any check, so "binary" means the same
at both depths; a 16-bit mask whose largest value is at most 255 (8-bit values in a 16-bit file)
is rejected, since scaled it would be all background. VOC label maps stay 8-bit (class ids).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Literal, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from alignsam.errors import UserError
from alignsam.geometry import GT_FOREGROUND_THRESHOLD

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS: Tuple[str, ...] = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif")
# Bytes at the tail of a complete file (checked in the last TAIL_BYTES; anything else is decoded
# in full before it is called truncated, since some writers append padding after the end marker).
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
TAIL_BYTES = 64


class DataConfigError(UserError, ValueError):
    """Bad dataset input. ``key`` is the config key to change, ``path`` the offending file."""

    def __init__(self, key: str, message: str, path: Optional[Path | str] = None):
        self.key = key
        self.path = Path(path) if path is not None else None
        where = f": {path}" if path is not None else ""
        super().__init__(f"[{key}] {message}{where} (layouts and keys: data/README.md)")


@dataclass(frozen=True)
class MaskRule:
    """How strictly binary-task masks are checked (see the module docstring).

    Attributes:
        check: ``"binary"`` rejects non-binary masks; ``"off"`` accepts any grey mask (it is still
            thresholded at ``> 127``), e.g. for graded saliency ground truth.
        margin: grey values ``<= margin`` or ``>= 255 - margin`` count as binary.
        max_intermediate_fraction: largest accepted fraction of pixels outside those bands.
    """

    check: Literal["binary", "off"] = "binary"
    margin: int = 32
    max_intermediate_fraction: float = 0.10


def require_dir(path: Path, key: str, what: str = "folder") -> Path:
    """Return ``path`` if it is an existing directory, else raise naming ``key``."""
    if not path.exists():
        raise DataConfigError(key, f"{what} does not exist", path)
    if not path.is_dir():
        raise DataConfigError(key, f"{what} is not a directory", path)
    return path


def require_file(path: Path, key: str, what: str = "file") -> Path:
    """Return ``path`` if it is an existing regular file, else raise naming ``key``."""
    if not path.is_file():
        raise DataConfigError(key, f"{what} does not exist", path)
    return path


def list_by_stem(folder: Path, extensions: Iterable[str], key: str) -> Dict[str, Path]:
    """Map file stem -> path for the files of ``folder`` with one of ``extensions`` (any case).

    Hidden files and files with other extensions (``Thumbs.db``, ``README.txt``) are ignored
    and counted in a debug log line. Two files with the same stem are an error (which one is the
    image would be a guess); so is a folder with no matching file at all.
    """
    require_dir(folder, key)
    extensions = tuple(e.lower() for e in extensions)
    by_stem: Dict[str, Path] = {}
    ignored = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in extensions:
            ignored += 1
            continue
        if path.stem in by_stem:
            raise DataConfigError(
                key, f"two files share the stem {path.stem!r} ({by_stem[path.stem].name} and "
                f"{path.name}); pairing by stem needs one file per stem", path)
        by_stem[path.stem] = path
    if not by_stem:
        raise DataConfigError(key, f"folder holds no files with extensions {', '.join(extensions)}",
                              folder)
    if ignored:
        log.debug("%s: ignored %d entries that are not %s files", folder, ignored, extensions)
    return by_stem


def read_size(path: Path, key: str) -> Tuple[int, int]:
    """``(h, w)`` from the file header; raises if the file is not a readable image."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataConfigError(key, f"unreadable or truncated image file "
                              f"({err.__class__.__name__}: {err})", path) from None
    return h, w


def check_complete(path: Path, key: str) -> None:
    """Raise if ``path`` is a truncated image.

    Fast path: JPEG and PNG files whose tail holds their end marker are complete. Any other file
    (other formats, or a missing marker) is decoded in full, and a decode error is raised.
    """
    try:
        with Image.open(path) as im:
            marker = _END_MARKERS.get(im.format or "")
        if marker is not None:
            with open(path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - TAIL_BYTES))
                if marker in f.read():
                    return
        _decode(path, key)
    except DataConfigError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataConfigError(key, f"unreadable or truncated image file "
                              f"({err.__class__.__name__}: {err})", path) from None


def _decode(path: Path, key: str) -> Image.Image:
    """Open and fully decode ``path`` (truncated files raise here, not later)."""
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataConfigError(key, f"unreadable or truncated image file "
                              f"({err.__class__.__name__}: {err})", path) from None
    return im


def read_rgb(path: Path, key: str) -> np.ndarray:
    """Decode an image to uint8 ``(H, W, 3)`` RGB (grey, palette and CMYK files are converted)."""
    im = _decode(path, key)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
UINT16_MAX = 65535


def read_grey_mask(path: Path, key: str) -> np.ndarray:
    """Decode a binary-task mask to uint8 ``(H, W)`` grey values (0..255).

    8-bit files are converted to grey as they are; 16-bit ones (mode ``I;16*``, or ``I`` with
    values in 0..65535) are scaled by 255 / 65535 (see the module docstring).
    """
    im = _decode(path, key)
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        return _scale_16bit(np.asarray(im), im.mode, path, key)
    if im.mode == "F":
        raise DataConfigError(key, "mask has floating-point (F) pixels; expected 8-bit 0/255 or "
                              "16-bit 0/65535 masks", path)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def _scale_16bit(values: np.ndarray, mode: str, path: Path, key: str) -> np.ndarray:
    """16-bit grey values -> uint8 0..255 (rounded); refuses what the scale would misread."""
    values = values.astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > UINT16_MAX:
        raise DataConfigError(key, f"mask has {mode} pixels in [{low}, {high}]; expected 8-bit 0/255 "
                              f"or 16-bit 0/{UINT16_MAX} masks", path)
    if 0 < high <= 255:
        raise DataConfigError(key, f"16-bit ({mode}) mask whose largest value is {high}: a 16-bit mask "
                              f"must be 0/{UINT16_MAX} (foreground is > {GT_FOREGROUND_THRESHOLD} on the "
                              "0..255 scale), so every pixel would be background; save it as 8-bit 0/255", path)
    return np.rint(values * (255.0 / UINT16_MAX)).astype(np.uint8)


def read_label_map(path: Path, key: str) -> np.ndarray:
    """Decode a VOC class-id map to uint8 ``(H, W)`` without any colour conversion.

    ``SegmentationClass`` files are palette (``P``) PNGs whose indices are the class ids;
    ``SegmentationClassAug`` files are grey (``L``) PNGs holding the ids directly. An RGB file
    holds palette *colours*, not ids, and is rejected.
    """
    im = _decode(path, key)
    if im.mode in SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        raise DataConfigError(key, f"label map has {im.mode} pixels (16- or 32-bit); VOC label maps must "
                              "be 8-bit palette (P) or grey (L) PNGs of class ids 0..20 and 255 (void), as "
                              "VOC and SBD ship them", path)
    if im.mode not in ("P", "L"):
        raise DataConfigError(key, f"label map has mode {im.mode}; VOC labels must be palette (P) "
                              "or grey (L) PNGs of class ids (do not convert them to RGB)", path)
    return np.asarray(im, dtype=np.uint8)


def check_binary_mask(grey: np.ndarray, path: Path, key: str, rule: MaskRule) -> None:
    """Raise if ``grey`` (uint8 ``(H, W)``) is not binary under ``rule``; no-op if ``rule.check == "off"``."""
    if rule.check == "off":
        return
    values_max = int(grey.max()) if grey.size else 0
    if values_max == 1:
        raise DataConfigError(key, "mask holds values 0/1; masks must be 0/255 (foreground is > "
                              f"{GT_FOREGROUND_THRESHOLD}), so every pixel would be background", path)
    intermediate = (grey > rule.margin) & (grey < 255 - rule.margin)
    fraction = float(intermediate.mean()) if grey.size else 0.0
    if fraction > rule.max_intermediate_fraction:
        raise DataConfigError(
            key, f"mask is not binary: {fraction:.1%} of its pixels lie in ({rule.margin}, "
            f"{255 - rule.margin}) (allowed {rule.max_intermediate_fraction:.1%}: "
            "data.max_intermediate_fraction; data.mask_check: off accepts graded masks)", path)
