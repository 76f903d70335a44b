"""File-level checks: binary tolerance, truncated files, palette label maps, folder listing."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alignsam.data.files import (
    DataConfigError,
    MaskRule,
    check_binary_mask,
    check_complete,
    list_by_stem,
    read_grey_mask,
    read_label_map,
    read_size,
)
from fixture_trees import mask_for, truncate, voc_label_map, write_image, write_mask, write_palette_png


def test_jpeg_saved_mask_passes_and_thresholds_back(tmp_path):
    """A 0/255 mask re-saved as a lossy JPEG has ringing and grey edges but still counts as binary."""
    mask = np.zeros((48, 64), bool)
    mask[10:40, 12:50] = True
    mask[20:30, 25:35] = False
    path = tmp_path / "m.jpg"
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, quality=60)
    grey = read_grey_mask(path, "data.mask_dir")
    assert len(np.unique(grey)) > 2  # the JPEG really did add intermediate values
    check_binary_mask(grey, path, "data.mask_dir", MaskRule())
    assert ((grey > 127) == mask).mean() > 0.99


def test_graded_mask_is_rejected_unless_check_is_off(tmp_path):
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))  # a soft saliency map
    path = tmp_path / "soft.png"
    with pytest.raises(DataConfigError) as err:
        check_binary_mask(grey, path, "data.splits.test.mask_dir", MaskRule())
    assert err.value.key == "data.splits.test.mask_dir"
    assert str(path) in str(err.value) and "data.mask_check" in str(err.value)
    check_binary_mask(grey, path, "k", MaskRule(check="off"))


@pytest.mark.parametrize("fraction, allowed, ok", [(0.05, 0.10, True), (0.15, 0.10, False),
                                                   (0.15, 0.20, True)])
def test_intermediate_fraction_tolerance(fraction, allowed, ok):
    grey = np.zeros(1000, np.uint8)
    grey[:500] = 255
    grey[500: 500 + int(fraction * 1000)] = 128  # mid-grey pixels
    grey[-5:] = 30  # within the margin: not counted
    rule = MaskRule(max_intermediate_fraction=allowed)
    if ok:
        check_binary_mask(grey.reshape(20, 50), None, "k", rule)
    else:
        with pytest.raises(DataConfigError, match="not binary"):
            check_binary_mask(grey.reshape(20, 50), None, "k", rule)


def test_zero_one_mask_is_rejected():
    grey = mask_for("x").astype(np.uint8)  # values 0/1: all background under > 127
    with pytest.raises(DataConfigError, match="0/1"):
        check_binary_mask(grey, None, "data.mask_dir", MaskRule())


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file_is_caught_by_the_quick_check(tmp_path, suffix):
    rng = np.random.default_rng(0)
    path = write_image(tmp_path / f"a{suffix}", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    check_complete(path, "data.image_dir")
    truncate(path, 0.6)
    read_size(path, "data.image_dir")  # the header alone still looks fine
    with pytest.raises(DataConfigError) as err:
        check_complete(path, "data.image_dir")
    assert err.value.path == path and err.value.key == "data.image_dir"


def test_jpeg_with_padding_after_end_marker_is_complete(tmp_path):
    path = write_image(tmp_path / "padded.jpg", np.full((24, 32, 3), 90, np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00" * 500)  # some cameras pad files
    check_complete(path, "data.image_dir")


def test_non_image_with_image_extension_is_unreadable(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(DataConfigError, match="unreadable") as err:
        read_size(path, "data.image_dir")
    assert err.value.path == path


def test_palette_label_map_reads_indices_not_colours(tmp_path):
    label_map = voc_label_map("2007_000001", [3, 15])
    path = write_palette_png(tmp_path / "l.png", label_map)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_label_map(path, "data.label_dir"), label_map)
    rgb = tmp_path / "rgb.png"
    Image.open(path).convert("RGB").save(rgb)
    with pytest.raises(DataConfigError, match="RGB"):
        read_label_map(rgb, "data.label_dir")


def test_listing_ignores_stray_non_images_and_rejects_duplicate_stems(tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "a.jpg", np.zeros((4, 4, 3), np.uint8))
    write_mask(folder / "b.png", np.zeros((4, 4), bool))
    (folder / "Thumbs.db").write_bytes(b"\x00")
    (folder / ".DS_Store").write_bytes(b"\x00")
    (folder / "README.txt").write_text("x")
    assert sorted(list_by_stem(folder, (".jpg", ".png"), "k")) == ["a", "b"]
    write_image(folder / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataConfigError, match="share the stem 'a'"):
        list_by_stem(folder, (".jpg", ".png"), "k")


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("only this")
    with pytest.raises(DataConfigError, match="holds no files") as err:
        list_by_stem(tmp_path / "empty", (".jpg",), "data.splits.train.image_dir")
    assert err.value.key == "data.splits.train.image_dir" and err.value.path == tmp_path / "empty"
    with pytest.raises(DataConfigError, match="does not exist") as err:
        list_by_stem(tmp_path / "nope", (".jpg",), "data.image_dir")
    assert err.value.path == tmp_path / "nope"
