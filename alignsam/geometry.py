"""The one place for the project's spatial conventions.

Frames
------
* **original frame**: pixel coordinates of the image as loaded, ``(x, y)`` with x to the right,
  y down, origin at the top-left pixel's corner. Ground truth and final predictions live here.
* **SAM input frame**: the image after SAM's longest-side resize to ``img_size`` (1024 for the
  official models, 256 for the tiny one) and bottom/right zero padding to a square. Points fed to
  the prompt encoder are in this frame (the prompt encoder itself adds the half-pixel shift).
* **low-res frame**: the mask decoder's output grid (``4 x`` the embedding grid: 256 x 256 for the
  official models), covering the whole padded square.
* **action grid**: ``G x G`` patches tiling the *original* image; action ``a`` is patch
  ``(row, col) = divmod(a, G)``; its click is the patch centre.
* **whole-image grid**: any ``h x w`` grid of cells tiling the *whole original image* (no padding):
  cell ``(r, c)`` covers ``x in [c W / w, (c + 1) W / w)``, ``y in [r H / h, (r + 1) H / h)``. The
  action grid is the whole-image grid with ``h = w = G``. Text-matcher (CLIP Surgery) maps live
  here: CLIP sees the image squashed to its square input, so its patch grid tiles the whole image.
  :func:`resize_whole_image_maps` changes the grid; :func:`whole_image_maps_to_sam_grid` puts such
  maps into the padded square of SAM's frames (e.g. onto the embedding grid).

SAM 2's frame
-------------
SAM 2 (:mod:`alignsam.foundation.sam2_segmenter`) resizes the *whole* image to its square input
(aspect not kept, no padding) and puts points there by ``x * S / W``, ``y * S / H``, as
``SAM2ImagePredictor`` does. A segmenter with that frame reports its ``img_size`` as a
:class:`SquashedSquare` (an ``int``, the side ``S``) and every image's ``input_hw`` as ``(S, S)``:
the image region is then the whole square, so the functions that read ``input_hw`` (patch pooling,
image regions, whole-image maps and masks on a grid) need nothing else, and the ones that only see
``original_hw`` and ``img_size`` (the point maps, :func:`input_size_for`, :func:`low_res_to_original`)
read the frame from the type of ``img_size``. A plain ``int`` is SAM's frame, computed exactly as before.

Masks
-----
SAM's logits are thresholded at ``MASK_LOGIT_THRESHOLD`` (0.0, SAM's own ``mask_threshold``);
probability maps are ``sigmoid(logits)`` and are thresholded at ``PROB_THRESHOLD`` (0.5: the
same decision as ``logits > 0`` up to float rounding of tiny logits). Ground-truth binary masks are
foreground where the stored value is ``> GT_FOREGROUND_THRESHOLD`` (127 for 0/255 PNGs).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

MASK_LOGIT_THRESHOLD = 0.0
PROB_THRESHOLD = 0.5
GT_FOREGROUND_THRESHOLD = 127


class SquashedSquare(int):
    """The input side ``S`` of a segmenter whose frame is the whole image resized to ``S x S``
    (SAM 2: aspect not kept, no padding), as opposed to SAM's longest-side resize plus padding.

    It is an ``int`` so that every ``img_size`` argument takes it; the functions of this module
    that depend on the frame check its type (:func:`is_squashed_square`). Arithmetic on it gives a
    plain ``int`` (SAM's frame): pass the segmenter's ``img_size`` itself.
    """

    def __repr__(self) -> str:
        return f"SquashedSquare({int(self)})"

    def __reduce__(self):  # pickles as itself, not as a plain int
        return SquashedSquare, (int(self),)


def is_squashed_square(img_size: int) -> bool:
    """Whether ``img_size`` is SAM 2's frame (:class:`SquashedSquare`) rather than SAM's."""
    return isinstance(img_size, SquashedSquare)


def input_frame_description(img_size: int) -> dict:
    """How images enter the frame of ``img_size``, for cache keys: SAM's ``{"resize": "longest_side",
    "pad": "bottom_right"}`` or SAM 2's whole-image square resize."""
    if is_squashed_square(img_size):
        return {"resize": "whole_image_to_square", "pad": "none", "interpolation": "bilinear_antialias"}
    return {"resize": "longest_side", "pad": "bottom_right"}


def input_size_for(original_hw: Tuple[int, int], img_size: int) -> Tuple[int, int]:
    """Size ``(h, w)`` of an ``original_hw`` image after SAM's longest-side resize to ``img_size``
    (``(S, S)`` in SAM 2's frame, :class:`SquashedSquare`)."""
    if is_squashed_square(img_size):
        return int(img_size), int(img_size)
    h, w = original_hw
    scale = img_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image_for_sam(image: np.ndarray, img_size: int) -> np.ndarray:
    """Longest-side resize of a ``(H, W, 3)`` uint8 image, exactly as ``SamPredictor`` does it."""
    if is_squashed_square(img_size):
        raise ValueError("resize_image_for_sam is SAM's longest-side resize; SAM 2 segmenters preprocess their own images")
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(img_size).apply_image(image)


def original_to_sam_points(
    points_xy: torch.Tensor, original_hw: torch.Tensor, img_size: int
) -> torch.Tensor:
    """Map points from the original frame to SAM's input frame.

    Args:
        points_xy: ``(B, N, 2)`` float, ``(x, y)`` in each image's original frame.
        original_hw: ``(B, 2)`` original ``(h, w)`` of each image.
        img_size: SAM's square input side.
    Returns:
        ``(B, N, 2)`` float points in SAM's input frame.
    """
    original_hw = original_hw.to(points_xy.device, torch.float32)
    ratio_xy = (_resized_hw(original_hw, img_size) / original_hw).flip(-1)  # (B, 2) as (w ratio, h ratio)
    return points_xy * ratio_xy[:, None, :]


def _resized_hw(original_hw: torch.Tensor, img_size: int) -> torch.Tensor:
    """``(B, 2)`` float sizes after SAM's longest-side resize, as :func:`input_size_for` rounds them
    (``S`` on both sides in SAM 2's frame)."""
    if is_squashed_square(img_size):
        return torch.full_like(original_hw, float(img_size))
    scale = img_size / original_hw.max(dim=1).values  # (B,)
    return torch.floor(original_hw * scale[:, None] + 0.5)


def patch_centres(grid: int, original_hw: torch.Tensor) -> torch.Tensor:
    """Centres of the ``grid x grid`` action patches in each image's original frame.

    Args:
        grid: G, patches per side.
        original_hw: ``(B, 2)`` original ``(h, w)``.
    Returns:
        ``(B, G*G, 2)`` float ``(x, y)``, action ``a`` at index ``a`` (row-major).
    """
    steps = (torch.arange(grid, dtype=torch.float32, device=original_hw.device) + 0.5) / grid
    ys, xs = torch.meshgrid(steps, steps, indexing="ij")
    unit = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (G*G, 2) in [0, 1]
    wh = original_hw.to(torch.float32).flip(-1)  # (B, 2) as (w, h)
    return unit[None] * wh[:, None, :]


def actions_to_sam_points(
    actions: torch.Tensor, grid: int, original_hw: torch.Tensor, img_size: int
) -> torch.Tensor:
    """The single conversion from action indices to SAM input-frame click coordinates.

    Args:
        actions: ``(B, K)`` long action indices in ``[0, G*G)``.
        grid: G.
        original_hw: ``(B, 2)``.
        img_size: SAM's square input side.
    Returns:
        ``(B, K, 2)`` float points in SAM's input frame.
    """
    centres = patch_centres(grid, original_hw)  # (B, G*G, 2)
    picked = torch.gather(centres, 1, actions[..., None].expand(-1, -1, 2))
    return original_to_sam_points(picked, original_hw, img_size)


def low_res_to_original(
    low_res: torch.Tensor, input_hw: Tuple[int, int], original_hw: Tuple[int, int], img_size: int
) -> torch.Tensor:
    """Upsample low-res logits of one image back to its original frame (as ``Sam.postprocess_masks``;
    in SAM 2's frame one bilinear resize of the whole square, as ``SAM2Transforms.postprocess_masks``).

    Args:
        low_res: ``(C, h, w)`` or ``(1, C, h, w)`` logits in the low-res frame.
    Returns:
        ``(C, H, W)`` logits at original resolution.
    """
    x = low_res if low_res.dim() == 4 else low_res[None]
    if is_squashed_square(img_size):
        return F.interpolate(x.float(), tuple(int(v) for v in original_hw), mode="bilinear", align_corners=False)[0]
    x = F.interpolate(x.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    x = F.interpolate(x, tuple(int(v) for v in original_hw), mode="bilinear", align_corners=False)
    return x[0]


def low_res_to_grid(
    low_res: torch.Tensor, grid_hw: Sequence[int]
) -> torch.Tensor:
    """Resize ``(B, C, h, w)`` low-res maps to another grid of the padded square (e.g. the embedding)."""
    return F.interpolate(low_res.float(), tuple(grid_hw), mode="bilinear", align_corners=False)


def resize_whole_image_maps(maps: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
    """Resample ``(B, C, h, w)`` maps on one whole-image grid to another, ``(B, C, *out_hw)``.

    Shrinking both sides: area averaging (each output cell is the mean of the input area it
    covers). Otherwise bilinear with ``align_corners=False`` (cell centres keep their image
    positions), antialiased along a side that shrinks. Weights are non-negative and sum to one, so
    values stay within the input's range.
    """
    out_hw = tuple(int(v) for v in out_hw)
    if maps.dim() != 4:
        raise ValueError(f"expected (B, C, h, w) maps, got shape {tuple(maps.shape)}")
    in_hw = tuple(maps.shape[-2:])
    if in_hw == out_hw:
        return maps.float()
    if out_hw[0] <= in_hw[0] and out_hw[1] <= in_hw[1]:
        return F.interpolate(maps.float(), out_hw, mode="area")
    shrinking = out_hw[0] < in_hw[0] or out_hw[1] < in_hw[1]
    return F.interpolate(maps.float(), out_hw, mode="bilinear", align_corners=False, antialias=shrinking)


def whole_image_maps_to_sam_grid(
    maps: torch.Tensor, input_hw: torch.Tensor, img_size: int, grid_hw: Sequence[int]
) -> torch.Tensor:
    """Place whole-image maps into SAM's padded square and resample them to ``grid_hw``.

    Args:
        maps: ``(B, C, h, w)`` maps on a whole-image grid of each image.
        input_hw: ``(B, 2)`` each image's size after SAM's longest-side resize (before padding).
        img_size: SAM's square input side.
        grid_hw: target grid of the padded square, e.g. the embedding grid ``(64, 64)``.
    Returns:
        ``(B, C, *grid_hw)``; the padding (bottom/right) is 0.
    """
    out = []
    for b in range(maps.shape[0]):
        in_h, in_w = (int(v) for v in input_hw[b])
        placed = maps.new_zeros((1, maps.shape[1], img_size, img_size), dtype=torch.float32)
        placed[..., :in_h, :in_w] = resize_whole_image_maps(maps[b : b + 1], (in_h, in_w))
        out.append(resize_whole_image_maps(placed, grid_hw))
    return torch.cat(out)


def _interval_overlaps(starts: torch.Tensor, ends: torch.Tensor, cells: int, cell: float) -> torch.Tensor:
    """Overlap lengths of intervals ``[starts, ends)`` ``(B, G)`` with ``cells`` cells of size ``cell``
    tiling ``[0, cells * cell)`` -> ``(B, G, cells)``."""
    lo = torch.arange(cells, dtype=torch.float32, device=starts.device) * cell
    left = torch.maximum(starts[..., None], lo)
    right = torch.minimum(ends[..., None], lo + cell)
    return (right - left).clamp(min=0)


def patch_pool_matrix(grid: int, input_hw: torch.Tensor, img_size: int, grid_hw: Sequence[int]) -> torch.Tensor:
    """Area weights of every action patch over the cells of a grid of SAM's padded square.

    Action patches tile the image region ``[0, w_in) x [0, h_in)`` of SAM's input frame (the
    original image after the longest-side resize); the grid (e.g. the embedding grid) tiles the
    whole padded square. ``pool @ cell_values`` averages per-cell values over each patch.

    Args:
        grid: G.
        input_hw: ``(B, 2)`` each image's ``(h_in, w_in)`` after the longest-side resize.
        img_size: SAM's square input side.
        grid_hw: ``(h, w)`` of the cell grid.
    Returns:
        ``(B, G*G, h*w)`` float; each row sums to 1, cells outside the image region weigh 0.
    """
    h, w = (int(v) for v in grid_hw)
    size = input_hw.to(torch.float32)
    steps = torch.arange(grid + 1, dtype=torch.float32, device=input_hw.device) / grid  # (G+1,)
    edges_y, edges_x = size[:, :1] * steps, size[:, 1:] * steps  # (B, G+1)
    over_y = _interval_overlaps(edges_y[:, :-1], edges_y[:, 1:], h, img_size / h)  # (B, G, h)
    over_x = _interval_overlaps(edges_x[:, :-1], edges_x[:, 1:], w, img_size / w)  # (B, G, w)
    weights = over_y[:, :, None, :, None] * over_x[:, None, :, None, :]  # (B, G, G, h, w)
    weights = weights.reshape(len(input_hw), grid * grid, h * w)
    return weights / weights.sum(-1, keepdim=True)


def image_region_on_grid(input_hw: torch.Tensor, img_size: int, grid_hw: Sequence[int]) -> torch.Tensor:
    """Fraction of each cell of a padded-square grid that lies inside the image: ``(B, 1, h, w)``."""
    h, w = (int(v) for v in grid_hw)
    size = input_hw.to(torch.float32)
    zeros = torch.zeros_like(size[:, :1])
    in_y = _interval_overlaps(zeros, size[:, :1], h, img_size / h)[:, 0] / (img_size / h)  # (B, h)
    in_x = _interval_overlaps(zeros, size[:, 1:], w, img_size / w)[:, 0] / (img_size / w)  # (B, w)
    return (in_y[:, :, None] * in_x[:, None, :])[:, None]


def grid_cell_centres(grid_hw: Sequence[int], img_size: int, device=None) -> torch.Tensor:
    """Centres of the cells of a padded-square grid in SAM's input frame: ``(h*w, 2)`` ``(x, y)``, row-major."""
    h, w = (int(v) for v in grid_hw)
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * (img_size / h)
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * (img_size / w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=-1)


def sample_at_sam_points(maps: torch.Tensor, points: torch.Tensor, img_size: int) -> torch.Tensor:
    """Bilinear values of padded-square maps at SAM input-frame points.

    A point ``(x, y)`` is the pixel SAM's prompt encoder reads as ``(x + 0.5, y + 0.5)``.

    Args:
        maps: ``(B, 1, h, w)`` over SAM's padded square (e.g. SRM probabilities on the embedding grid).
        points: ``(B, N, 2)`` float ``(x, y)`` in SAM's input frame.
    Returns:
        ``(B, N)``.
    """
    normalised = (points.to(maps.dtype) + 0.5) / img_size * 2 - 1
    sampled = F.grid_sample(maps, normalised[:, :, None, :], mode="bilinear", align_corners=False, padding_mode="border")
    return sampled[:, 0, :, 0]


def original_masks_to_sam_grid(
    masks: Sequence[torch.Tensor], input_hw: torch.Tensor, img_size: int, grid_hw: Sequence[int]
) -> torch.Tensor:
    """Foreground fraction of original-frame masks on a grid of SAM's padded square.

    Args:
        masks: B bool or float ``(H_b, W_b)`` masks in each image's original frame.
        input_hw: ``(B, 2)``; img_size, grid_hw as in :func:`whole_image_maps_to_sam_grid`.
    Returns:
        ``(B, 1, h, w)`` float in [0, 1] (0 in the padding).
    """
    placed = [
        whole_image_maps_to_sam_grid(m.float()[None, None], input_hw[b : b + 1], img_size, grid_hw)
        for b, m in enumerate(masks)
    ]
    return torch.cat(placed)


def sam_to_original_points(points_xy: torch.Tensor, original_hw: torch.Tensor, img_size: int) -> torch.Tensor:
    """Inverse of :func:`original_to_sam_points`: ``(B, N, 2)`` SAM input frame -> original frame."""
    original_hw = original_hw.to(points_xy.device, torch.float32)
    return points_xy * (original_hw / _resized_hw(original_hw, img_size)).flip(-1)[:, None, :]
