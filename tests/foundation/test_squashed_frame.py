"""SAM 2's frame in alignsam.geometry (the whole image resized to a square), and what runs without
the sam2 package: the registry names and the one-line error when it is missing.

The reference for the frame is sam2's ``SAM2Transforms`` (points ``x * S / W``, ``y * S / H``;
masks one bilinear resize of the square to the original size), written out here so that these
tests need no sam2 install. SAM's frame (a plain ``int`` img_size) is covered, unchanged, by
tests/foundation/test_segmenter.py and tests/rl.
"""
from __future__ import annotations

import copy
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F

from alignsam.errors import UserError
from alignsam.geometry import (
    SquashedSquare,
    actions_to_sam_points,
    image_region_on_grid,
    input_frame_description,
    input_size_for,
    is_squashed_square,
    low_res_to_original,
    original_masks_to_sam_grid,
    original_to_sam_points,
    patch_centres,
    patch_pool_matrix,
    resize_image_for_sam,
    resize_whole_image_maps,
    sam_to_original_points,
    whole_image_maps_to_sam_grid,
)

S = SquashedSquare(1024)
HW = torch.tensor([[480, 640], [701, 389], [97, 211]])


def test_squashed_square_is_an_int_that_keeps_its_frame():
    assert S == 1024 and isinstance(S, int) and is_squashed_square(S) and not is_squashed_square(1024)
    assert repr(S) == "SquashedSquare(1024)" and int(S) == 1024
    assert isinstance(pickle.loads(pickle.dumps(S)), SquashedSquare) and isinstance(copy.deepcopy(S), SquashedSquare)
    assert not is_squashed_square(S + 0)  # arithmetic gives SAM's plain int: pass img_size itself
    assert input_frame_description(1024) == {"resize": "longest_side", "pad": "bottom_right"}  # SAM's cache key
    assert input_frame_description(S)["resize"] == "whole_image_to_square"


def test_points_go_to_the_square_as_sam2_transforms_puts_them():
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(3, 5, 2, generator=gen) * HW.flip(-1)[:, None, :].float()
    ours = original_to_sam_points(points, HW, S)
    h, w = HW[:, 0, None].float(), HW[:, 1, None].float()
    reference = torch.stack([points[..., 0] / w * 1024, points[..., 1] / h * 1024], -1)  # transform_coords
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(sam_to_original_points(ours, HW, S), points)
    assert input_size_for((480, 640), S) == (1024, 1024) and input_size_for((480, 640), 1024) == (768, 1024)


def test_actions_click_patch_centres_in_the_square():
    grid = 4
    actions = torch.arange(grid * grid).expand(3, -1)
    points = actions_to_sam_points(actions, grid, HW, S)
    # patch (r, c) of a G x G grid over the whole image: its centre is at ((c + 0.5) S / G, (r + 0.5) S / G)
    steps = (torch.arange(grid) + 0.5) * 1024 / grid
    ys, xs = torch.meshgrid(steps, steps, indexing="ij")
    torch.testing.assert_close(points, torch.stack([xs.flatten(), ys.flatten()], -1).expand(3, -1, -1))
    torch.testing.assert_close(sam_to_original_points(points, HW, S), patch_centres(grid, HW))


def test_low_res_to_original_is_one_resize_of_the_square():
    low_res = torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(1))
    ours = low_res_to_original(low_res, (1024, 1024), (701, 389), S)
    reference = F.interpolate(low_res[None], (701, 389), mode="bilinear", align_corners=False)[0]  # postprocess_masks
    assert torch.equal(ours, reference)
    assert not torch.equal(low_res_to_original(low_res, (1024, 564), (701, 389), 1024), reference)  # SAM's differs


def test_grids_over_the_square_see_the_whole_image():
    """With input_hw = (S, S) the image region is the whole square, patches tile it evenly, and
    whole-image maps and masks are resized onto it with no padding."""
    input_hw = torch.full((3, 2), 1024)
    assert torch.equal(image_region_on_grid(input_hw, S, (64, 64)), torch.ones(3, 1, 64, 64))
    pool = patch_pool_matrix(4, input_hw, S, (64, 64)).reshape(3, 4, 4, 64, 64)
    block = torch.zeros(64, 64)
    block[16:32, 32:48] = 1 / 256
    assert torch.allclose(pool[:, 1, 2], block.expand(3, -1, -1))
    maps = torch.rand(3, 1, 7, 9, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(whole_image_maps_to_sam_grid(maps, input_hw, S, (64, 64)),
                               resize_whole_image_maps(resize_whole_image_maps(maps, (1024, 1024)), (64, 64)))
    mask = torch.zeros(97, 211, dtype=torch.bool)
    mask[:, :50] = True
    on_grid = original_masks_to_sam_grid([mask], input_hw[:1], S, (64, 64))
    assert abs(on_grid.mean().item() - 50 / 211) < 1e-3


def test_resize_image_for_sam_refuses_the_square_frame():
    import numpy as np

    with pytest.raises(ValueError, match="SAM 2"):
        resize_image_for_sam(np.zeros((10, 20, 3), np.uint8), S)


def test_sam2_names_are_registered_without_the_package():
    from alignsam.foundation.registry import SEGMENTER_BUILDERS

    assert {"sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l",
            "sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l"} <= set(SEGMENTER_BUILDERS)


def test_missing_sam2_package_is_one_user_error_with_the_install_line(monkeypatch, tmp_path):
    from alignsam.foundation.registry import build_segmenter

    monkeypatch.setitem(sys.modules, "sam2", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)
    for checkpoint in (None, str(tmp_path / "sam2.1_hiera_tiny.pt")):
        with pytest.raises(UserError) as error:
            build_segmenter("sam2.1_hiera_t", checkpoint)
        message = str(error.value)
        assert "pip install" in message and ".[sam2]" in message and "SAM2_BUILD_CUDA=0" in message
        assert "--no-build-isolation" in message
