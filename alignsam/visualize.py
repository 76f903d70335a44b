"""Pictures of episodes: the validation images shown in TensorBoard and the PNG prediction overlays.

Everything here works on numpy ``uint8`` RGB images ``(H, W, 3)``; grey ``(H, W)`` (or
``(H, W, 1)``) images are accepted wherever an image is and converted to RGB. Masks are bool
``(H, W)`` of the same size as their image. Clicks are ``(x, y)`` in the image's pixel frame, the
**original frame** of :mod:`alignsam.geometry` (x to the right, y down, origin at the top-left
corner): a click at ``(x, y)`` is drawn on pixel ``(row, col) = (floor(y), floor(x))``, so integer
pixel indices (as from :mod:`alignsam.clicks`) and continuous patch centres (as from
:func:`alignsam.geometry.patch_centres`) both land on the pixel that holds them.

Inputs are checked; a wrong dtype or shape raises ``ValueError`` naming the argument.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from alignsam.atomic import write_bytes_atomic

Colour = Tuple[int, int, int]

# Colours (RGB), in one place so every picture reads the same way.
POSITIVE_COLOUR: Colour = (0, 200, 0)  # clicks labelled 1 (foreground)
NEGATIVE_COLOUR: Colour = (220, 0, 0)  # clicks labelled 0 (background)
GT_COLOUR: Colour = (255, 190, 0)  # ground-truth overlay
PREDICTION_COLOUR: Colour = (40, 110, 255)  # predicted-mask overlay
OUTLINE_COLOUR: Colour = (255, 255, 255)  # ring around each click disc
TEXT_COLOUR: Colour = (255, 255, 255)  # click numbers and titles ...
TEXT_SHADOW_COLOUR: Colour = (0, 0, 0)  # ... drawn over a dark shadow, readable on any background
TITLE_BACKGROUND: Colour = (32, 32, 32)  # the title strip above a panel
PAD_COLOUR: Colour = (255, 255, 255)  # the gaps between stacked panels

_FONT = cv2.FONT_HERSHEY_SIMPLEX


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _check_image(image, name: str = "image") -> np.ndarray:
    """A contiguous uint8 ``(H, W, 3)`` copy of ``image`` (grey ``(H, W)``/``(H, W, 1)`` -> RGB)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3) or (H, W), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return np.ascontiguousarray(arr).copy()


def _check_mask(mask, hw: Tuple[int, int], name: str) -> np.ndarray:
    """``mask`` as bool ``(H, W)`` matching ``hw``."""
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be a bool mask, got dtype {arr.dtype}")
    if arr.shape != tuple(hw):
        raise ValueError(f"{name} must have the image's shape {tuple(hw)}, got {arr.shape}")
    return arr


def _check_colour(colour, name: str = "colour") -> Colour:
    values = tuple(np.asarray(colour).reshape(-1).tolist())
    if len(values) != 3 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 255 for v in values
    ):
        raise ValueError(f"{name} must be three numbers in [0, 255], got {colour!r}")
    return tuple(int(round(v)) for v in values)


def _check_clicks(points, labels) -> Tuple[np.ndarray, np.ndarray]:
    """``points`` as float64 ``(T, 2)`` and ``labels`` as int64 ``(T,)`` in {0, 1}."""
    pts = np.asarray(points)
    real = np.issubdtype(pts.dtype, np.floating) or np.issubdtype(pts.dtype, np.integer)
    if pts.dtype == np.bool_ or not real:
        raise ValueError(f"points must be real numbers, got dtype {pts.dtype}")
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (T, 2), got {pts.shape}")
    pts = pts.astype(np.float64)
    if not np.isfinite(pts).all():
        raise ValueError("points must be finite")
    lab = np.asarray(labels)
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.shape != (pts.shape[0],):
        raise ValueError(f"labels must have shape ({pts.shape[0]},) to match points, got {lab.shape}")
    lab = lab.astype(np.int64)
    if not np.isin(lab, (0, 1)).all():
        raise ValueError(f"labels must be 0 (negative) or 1 (positive), got {np.unique(lab).tolist()}")
    return pts, lab


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def overlay_mask(image: np.ndarray, mask: np.ndarray, colour: Colour, alpha: float = 0.5) -> np.ndarray:
    """Tint the pixels of ``mask`` with ``colour`` and outline it.

    Args:
        image: uint8 ``(H, W, 3)`` RGB (or grey ``(H, W)``).
        mask: bool ``(H, W)``.
        colour: RGB triple in [0, 255].
        alpha: weight of ``colour`` in the tint, in [0, 1].
    Returns:
        uint8 ``(H, W, 3)``: outside the mask equal to ``image``; inside it
        ``(1 - alpha) * image + alpha * colour``, except the mask's own 1-px border (its pixels
        with a 4-neighbour outside the mask or on the image edge), which is ``colour`` itself so
        that thin masks stay visible.
    """
    out = _check_image(image)
    mask = _check_mask(mask, out.shape[:2], "mask")
    colour = _check_colour(colour)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not mask.any():
        return out
    tint = np.asarray(colour, np.float32)
    out[mask] = np.round((1.0 - alpha) * out[mask].astype(np.float32) + alpha * tint).astype(np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    inner = cv2.erode(
        mask.astype(np.uint8), cross, borderType=cv2.BORDER_CONSTANT, borderValue=0
    ).astype(bool)
    out[mask & ~inner] = colour
    return out


def click_radius(hw: Tuple[int, int]) -> int:
    """Default click radius in pixels for an ``(H, W)`` image: ``max(3, round(0.015 * max(H, W)))``."""
    return max(3, int(round(0.015 * max(hw))))


def _put_text(image: np.ndarray, text: str, origin: Tuple[int, int], scale: float, thickness: int) -> None:
    """White text with a dark shadow, bottom-left corner at ``origin`` (in place)."""
    cv2.putText(image, text, origin, _FONT, scale, TEXT_SHADOW_COLOUR, thickness + 2, cv2.LINE_AA)
    cv2.putText(image, text, origin, _FONT, scale, TEXT_COLOUR, thickness, cv2.LINE_AA)


def draw_clicks(
    image: np.ndarray, points: np.ndarray, labels: np.ndarray, radius: Optional[int] = None
) -> np.ndarray:
    """Draw clicks as numbered discs coloured by label.

    Args:
        image: uint8 ``(H, W, 3)`` RGB (or grey ``(H, W)``).
        points: float ``(T, 2)`` ``(x, y)`` in the image's pixel frame (the original frame, see the
            module docstring); click ``t`` is drawn on pixel ``(floor(y), floor(x))``. Clicks
            outside the image are clipped to its nearest edge pixel (drawn there, no error).
        labels: int ``(T,)``: 1 positive (:data:`POSITIVE_COLOUR`), 0 negative
            (:data:`NEGATIVE_COLOUR`).
        radius: disc radius in pixels; ``None`` scales it with the image (:func:`click_radius`).
    Returns:
        uint8 ``(H, W, 3)``: a filled disc per click with a 1-px :data:`OUTLINE_COLOUR` ring, and
        its number ``1..T`` (click order) in small text at its upper right (moved to stay inside
        the image). All discs are drawn before the numbers, so no disc hides a number.
    """
    out = _check_image(image)
    pts, lab = _check_clicks(points, labels)
    h, w = out.shape[:2]
    if radius is None:
        radius = click_radius((h, w))
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 1:
        raise ValueError(f"radius must be a positive integer or None, got {radius!r}")
    radius = int(radius)
    cols = np.clip(np.floor(pts[:, 0]), 0, w - 1).astype(int)
    rows = np.clip(np.floor(pts[:, 1]), 0, h - 1).astype(int)

    for col, row, label in zip(cols, rows, lab):
        fill = POSITIVE_COLOUR if label == 1 else NEGATIVE_COLOUR
        cv2.circle(out, (int(col), int(row)), radius + 1, OUTLINE_COLOUR, -1, cv2.LINE_8)
        cv2.circle(out, (int(col), int(row)), radius, fill, -1, cv2.LINE_8)

    scale = max(0.35, radius / 10.0)
    thickness = max(1, int(round(scale)))
    for t, (col, row) in enumerate(zip(cols, rows), start=1):
        text = str(t)
        (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        x = int(col) + radius + 2
        if x + tw > w:  # no room on the right: put the number on the left of the disc
            x = int(col) - radius - 2 - tw
        y = int(row) - radius // 2
        x = int(np.clip(x, 0, max(0, w - tw)))
        y = int(np.clip(y, th, max(th, h - baseline)))
        _put_text(out, text, (x, y), scale, thickness)
    return out


def title_height(width: int) -> int:
    """Height of the title strip above a panel ``width`` pixels wide: ``max(16, round(0.02 * width))``."""
    return max(16, int(round(0.02 * width)))


def _title_strip(title: str, width: int) -> np.ndarray:
    """uint8 ``(title_height(width), width, 3)``: ``title`` on :data:`TITLE_BACKGROUND`."""
    height = title_height(width)
    strip = np.empty((height, width, 3), np.uint8)
    strip[:] = TITLE_BACKGROUND
    (_, unit_h), _ = cv2.getTextSize("Ag", _FONT, 1.0, 1)
    scale = 0.6 * height / unit_h
    (tw, _), _ = cv2.getTextSize(title, _FONT, scale, 1)
    if tw > width - 8:  # shrink long titles to fit (they are clipped below a legible size)
        scale = max(0.3, scale * (width - 8) / tw)
    thickness = max(1, int(round(scale)))
    (_, th), _ = cv2.getTextSize(title, _FONT, scale, thickness)
    _put_text(strip, title, (4, (height + th) // 2), scale, thickness)
    return strip


def episode_panel(
    image: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    title: Optional[str] = None,
) -> np.ndarray:
    """One episode side by side: ``[image | image + GT | image + prediction + numbered clicks]``.

    Args:
        image: uint8 ``(H, W, 3)`` RGB (or grey ``(H, W)``).
        gt: bool ``(H, W)`` ground truth, drawn with :data:`GT_COLOUR`.
        mask: bool ``(H, W)`` predicted mask, drawn with :data:`PREDICTION_COLOUR`.
        points: float ``(T, 2)`` ``(x, y)`` clicks in the image's pixel frame (original frame).
        labels: int ``(T,)``, 1 positive / 0 negative.
        title: optional text for a strip above the three images.
    Returns:
        uint8 ``(H, 3W, 3)``; with a title ``(title_height(3W) + H, 3W, 3)``, the strip on top
        (see :func:`title_height`).
    """
    rgb = _check_image(image)
    hw = rgb.shape[:2]
    gt = _check_mask(gt, hw, "gt")
    mask = _check_mask(mask, hw, "mask")
    _check_clicks(points, labels)
    if title is not None and not isinstance(title, str):
        raise ValueError(f"title must be a str or None, got {type(title).__name__}")
    predicted = draw_clicks(overlay_mask(rgb, mask, PREDICTION_COLOUR), points, labels)
    panel = np.concatenate([rgb, overlay_mask(rgb, gt, GT_COLOUR), predicted], axis=1)
    if title is not None:
        panel = np.concatenate([_title_strip(title, panel.shape[1]), panel], axis=0)
    return panel


EPISODE_MIN_SIDE = 384  # small images are enlarged for pictures, so click numbers stay legible


def episode_picture(
    image: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    title: str,
    iou: Optional[float] = None,
    min_side: int = EPISODE_MIN_SIDE,
) -> np.ndarray:
    """One episode as one picture, as TensorBoard shows it: a title strip (``title`` and the IoU),
    a strip naming the three columns, and :func:`episode_panel` below.

    Images whose longer side is below ``min_side`` are enlarged (nearest neighbour, clicks scaled
    with them) so that the numbers of nearby clicks (1 and 6) do not merge into one ("16").

    Returns:
        uint8 ``(title_height(3W') + title_height(W') + H', 3W', 3)`` with ``(H', W')`` the (enlarged)
        image size.
    """
    rgb = _check_image(image)
    h, w = rgb.shape[:2]
    factor = max(1, int(np.ceil(min_side / max(h, w))))
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, 0), factor, 1)
        gt = np.repeat(np.repeat(_check_mask(gt, (h, w), "gt"), factor, 0), factor, 1)
        mask = np.repeat(np.repeat(_check_mask(mask, (h, w), "mask"), factor, 0), factor, 1)
        points = np.asarray(points, np.float64).reshape(-1, 2) * factor
    panel = episode_panel(rgb, gt, mask, points, labels)
    width = panel.shape[1]
    column = width // 3
    columns = [_title_strip(name, column) for name in ("image", "ground truth", "prediction + clicks")]
    if width > 3 * column:  # the panel's width is not a multiple of 3: pad the last column's strip
        columns[-1] = np.pad(columns[-1], ((0, 0), (0, width - 3 * column), (0, 0)), mode="edge")
    heading = title if iou is None else f"{title}   IoU {iou:.3f}"
    return np.concatenate([_title_strip(heading, width), np.concatenate(columns, axis=1), panel], axis=0)


def stack_panels(panels: Sequence[np.ndarray], pad: int = 4, width: Optional[int] = None) -> np.ndarray:
    """Stack panels vertically into one image, all resized to one width.

    Args:
        panels: non-empty list of uint8 ``(H_i, W_i, 3)`` (or grey ``(H_i, W_i)``).
        pad: rows of :data:`PAD_COLOUR` between consecutive panels (none above or below).
        width: common width; ``None`` takes the widest panel's. Each panel keeps its aspect:
            its height becomes ``max(1, round(H_i * width / W_i))``.
    Returns:
        uint8 ``(sum_i H_i' + pad * (n - 1), width, 3)``.
    """
    if isinstance(panels, np.ndarray) or len(panels) == 0:
        raise ValueError("panels must be a non-empty list of images")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
    checked = [_check_image(p, f"panels[{i}]") for i, p in enumerate(panels)]
    if width is None:
        width = max(p.shape[1] for p in checked)
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"width must be a positive integer or None, got {width!r}")
    width = int(width)
    parts = []
    for i, p in enumerate(checked):
        h, w = p.shape[:2]
        if w != width:
            new_h = max(1, int(round(h * width / w)))
            interp = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
            p = cv2.resize(p, (width, new_h), interpolation=interp)
        if i > 0 and pad > 0:
            gap = np.empty((pad, width, 3), np.uint8)
            gap[:] = PAD_COLOUR
            parts.append(gap)
        parts.append(p)
    return np.concatenate(parts, axis=0)


def save_png(path: Union[str, os.PathLike], image: np.ndarray) -> Path:
    """Write an RGB image to ``path`` as PNG, atomically.

    The PNG is written to a temporary file in the destination directory, flushed to disk and moved
    onto ``path`` with ``os.replace``, so readers never see a half-written file. Parent directories
    are created.

    Args:
        path: destination file.
        image: uint8 ``(H, W, 3)`` RGB (or grey ``(H, W)``); converted to OpenCV's BGR order here.
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    rgb = _check_image(image)
    path = Path(path)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode a PNG for {path}")
    write_bytes_atomic(path, encoded.tobytes())
    return path
