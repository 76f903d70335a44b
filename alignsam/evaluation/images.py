"""Reading user images for predictions on new images (``evaluate.py predict``).

Unlike the dataset loaders (:mod:`alignsam.data.files`, which keep the raw pixel orientation so
that images and stored masks line up), images here have no ground truth, so they are read the way
a viewer shows them: EXIF orientation is applied. Every image becomes uint8 RGB ``(H, W, 3)``:

* grey ``L`` and 1-bit ``1``: the grey value in all three channels (1-bit: 0 / 255);
* 16-bit grey ``I;16*``: ``round(value * 255 / 65535)``; 32-bit ``I``: the same when every value
  lies in ``[0, 65535]`` (Pillow decodes some 16-bit files to ``I``), else ``[min, max]`` is
  stretched to ``[0, 255]``; float ``F``: ``round(value * 255)`` when every value lies in
  ``[0, 1]``, else stretched the same way (a constant image becomes 0); NaN / inf is an error;
* palette ``P`` and CMYK: Pillow's conversion to RGB;
* with transparency (``RGBA``, ``LA``, ``PA``, a palette or colour key with ``tRNS``): composited
  over :data:`ALPHA_BACKGROUND`.

Multi-frame files (GIF, multi-page TIFF) give their first frame. Files are decoded in full, so a
truncated file fails in :func:`read_image` (this relies on Pillow's default
``ImageFile.LOAD_TRUNCATED_IMAGES = False``). Errors: :class:`ImageReadError` for one file,
:class:`ImageFolderError` for a folder; both are ``ValueError`` and name the path.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PathLike = Union[str, os.PathLike]

# Transparent pixels are composited over white: the background most viewers show for transparent
# PNGs (cut-out objects, logos), so the prediction overlay looks like the picture the user knows.
ALPHA_BACKGROUND: Tuple[int, int, int] = (255, 255, 255)

_SIXTEEN_BIT_MAX = 65535
_MAX_STEM_BYTES = 120  # UTF-8 bytes kept of a file name in an output stem (file names cap at 255)


class ImageReadError(ValueError):
    """One file could not be read as an image. ``path`` is the file, ``reason`` says why."""

    def __init__(self, path: PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class ImageFolderError(ValueError):
    """An input folder is missing, is not a folder, or holds no files. ``path`` is the folder."""

    def __init__(self, path: PathLike, message: str):
        self.path = Path(path)
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------------------------
def read_image(path: PathLike) -> np.ndarray:
    """Decode one image file to uint8 RGB ``(H, W, 3)``, EXIF orientation applied.

    ``H, W`` are the displayed size (swapped from the stored size for EXIF orientations 5 to 8).
    Conversions of each pixel mode are listed in the module docstring.

    Raises:
        ImageReadError: missing or empty file, not an image, truncated or corrupt data, an
            unsupported pixel mode, or non-finite float pixels; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # full decode: truncated data fails here
            im = ImageOps.exif_transpose(im)  # a loaded copy, valid after the file closes
        return _to_rgb(im, path)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"image too large ({err})") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(path, "not an image (no image format recognises its contents)") from err
    except Exception as err:  # decoders of arbitrary files raise OSError, SyntaxError, struct.error, ...
        kind = "truncated image data" if "truncated" in str(err).lower() else "cannot decode"
        raise ImageReadError(path, f"{kind} ({err.__class__.__name__}: {err})") from err


def _to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    """A decoded PIL image of any mode -> uint8 ``(H, W, 3)`` (rules in the module docstring)."""
    if im.mode.startswith("I;16"):
        return _grey_to_rgb(_scale(np.asarray(im).astype(np.float64), _SIXTEEN_BIT_MAX))
    if im.mode == "I":
        values = np.asarray(im).astype(np.float64)
        sixteen_bit = values.min() >= 0 and values.max() <= _SIXTEEN_BIT_MAX
        return _grey_to_rgb(_scale(values, _SIXTEEN_BIT_MAX) if sixteen_bit else _stretch(values))
    if im.mode == "F":
        values = np.asarray(im).astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageReadError(path, "float image holds NaN or infinite pixels")
        unit = values.min() >= 0 and values.max() <= 1
        return _grey_to_rgb(_scale(values, 1.0) if unit else _stretch(values))
    bands = im.getbands()
    if "A" in bands or "a" in bands or "transparency" in im.info:
        return _composite(np.asarray(im.convert("RGBA")))
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as err:
            raise ImageReadError(path, f"unsupported pixel mode {im.mode} ({err})") from err
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def _scale(values: np.ndarray, full_scale: float) -> np.ndarray:
    """float ``(H, W)`` in ``[0, full_scale]`` -> uint8 ``(H, W)`` in ``[0, 255]``."""
    return np.round(values * (255.0 / full_scale)).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """float ``(H, W)``: ``[min, max]`` -> uint8 ``[0, 255]`` (a constant image -> 0)."""
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` -> ``(H, W, 3)``."""
    return np.repeat(grey[..., None], 3, axis=2)


def _composite(rgba: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 4)`` straight alpha -> uint8 ``(H, W, 3)`` over :data:`ALPHA_BACKGROUND`."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    background = np.asarray(ALPHA_BACKGROUND, np.float32)
    out = rgba[..., :3].astype(np.float32) * alpha + background * (1.0 - alpha)
    return np.round(out).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
def list_images(folder: PathLike) -> List[Path]:
    """The regular files directly in ``folder`` (no recursion), sorted by name.

    Hidden files (names starting with ``.``) and sub-folders are skipped; other files are listed
    whatever their extension (whether they are images is :func:`read_image`'s call).

    Raises:
        ImageFolderError: ``folder`` does not exist, is not a folder, cannot be listed, or holds
            no such files.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageFolderError(folder, f"image folder does not exist: {folder}")
    if not folder.is_dir():
        raise ImageFolderError(folder, f"not a folder: {folder} (pass the folder that holds the images)")
    try:
        files = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
    except OSError as err:
        raise ImageFolderError(folder, f"cannot list image folder {folder}: {err}") from err
    if not files:
        raise ImageFolderError(folder, f"no files in {folder} (hidden files are skipped)")
    return sorted(files, key=lambda p: p.name)


@dataclass(frozen=True)
class ReadResult:
    """One file of a folder: either ``image`` (uint8 ``(H, W, 3)``) or ``error`` (the reason it
    could not be read, without the path), never both."""

    path: Path
    image: Optional[np.ndarray] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def iter_images(paths: Iterable[PathLike]) -> Iterator[ReadResult]:
    """Read ``paths`` one at a time (only one decoded image is held), in order.

    Yields a :class:`ReadResult` per path: the image, or the :class:`ImageReadError` reason for a
    file that cannot be read (it is not raised, so the remaining files still come out).
    """
    for path in paths:
        path = Path(path)
        try:
            yield ReadResult(path, image=read_image(path))
        except ImageReadError as err:
            yield ReadResult(path, error=err.reason)


def read_folder(folder: PathLike) -> Iterator[ReadResult]:
    """:func:`iter_images` over :func:`list_images` ``(folder)``.

    The folder is listed when this is called, so folder errors (:class:`ImageFolderError`) are
    raised here, before the first image; unreadable files come out as results with ``error``::

        for result in read_folder(folder):
            if not result.ok:
                print(f"skipped {result.path}: {result.error}")
                continue
            predict(result.image)
    """
    return iter_images(list_images(folder))


# ---------------------------------------------------------------------------------------------
# output names
# ---------------------------------------------------------------------------------------------
def output_stems(paths: Sequence[PathLike]) -> Dict[Path, str]:
    """A unique, file-name-safe output stem per input path (outputs are ``<stem>.png``).

    The stem is the file's stem with every character other than letters, digits, ``-``, ``_``
    and ``.`` replaced by ``_`` (Unicode NFC, leading dots dropped so outputs are not hidden,
    cut to 120 UTF-8 bytes; ``image`` if nothing is left). Stems are compared case-insensitively
    (outputs may land on a case-insensitive file system). A path whose stem no other input shares
    keeps it; inputs that share one get the extension appended (``a.jpg``, ``a.png`` -> ``a_jpg``,
    ``a_png``), then ``_2``, ``_3``, ... (in input order) where that still collides.

    Args:
        paths: the input files, e.g. :func:`list_images`'s result; no path twice.
    Returns:
        ``{path: stem}`` with the keys as :class:`~pathlib.Path` in input order.
    """
    paths = [Path(p) for p in paths]
    if len(set(paths)) != len(paths):
        raise ValueError("paths must not repeat a path (each input gets one output stem)")
    bases = [_safe_name(p.stem) for p in paths]
    counts: Dict[str, int] = {}
    for base in bases:
        counts[base.casefold()] = counts.get(base.casefold(), 0) + 1
    used = {b.casefold() for b in bases if counts[b.casefold()] == 1}
    stems: Dict[Path, str] = {}
    for path, base in zip(paths, bases):
        if counts[base.casefold()] == 1:
            stems[path] = base
            continue
        extension = _safe_name(path.suffix.lstrip("."))
        candidate = f"{base}_{extension}" if path.suffix else base
        n = 1
        while candidate.casefold() in used:
            n += 1
            candidate = f"{base}_{extension}_{n}" if path.suffix else f"{base}_{n}"
        used.add(candidate.casefold())
        stems[path] = candidate
    return stems


def _safe_name(text: str) -> str:
    """``text`` reduced to letters, digits, ``-_.`` (others -> ``_``), no leading dot, <= 120 bytes."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    text = re.sub(r"^\.+", "", text)
    text = text.encode("utf-8")[:_MAX_STEM_BYTES].decode("utf-8", errors="ignore")
    return text or "image"
