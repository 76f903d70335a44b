"""Reading user images: pixel modes, EXIF orientation, broken files, folders, output stems."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignsam.evaluation.images import (
    ALPHA_BACKGROUND,
    ImageFolderError,
    ImageReadError,
    iter_images,
    list_images,
    output_stems,
    read_folder,
    read_image,
)

ORIENTATION_TAG = 0x0112


def _quadrants(h: int = 40, w: int = 60) -> np.ndarray:
    """uint8 ``(h, w, 3)``: red, green / blue, white quadrants (survives JPEG at the block centres)."""
    image = np.zeros((h, w, 3), np.uint8)
    image[: h // 2, : w // 2] = (255, 0, 0)
    image[: h // 2, w // 2:] = (0, 255, 0)
    image[h // 2:, : w // 2] = (0, 0, 255)
    image[h // 2:, w // 2:] = (255, 255, 255)
    return image


def _block_centres(image: np.ndarray) -> np.ndarray:
    """The colours at the centres of the four quadrants, ``(4, 3)`` int (TL, TR, BL, BR)."""
    h, w = image.shape[:2]
    rows, cols = (h // 4, h // 4, 3 * h // 4, 3 * h // 4), (w // 4, 3 * w // 4, w // 4, 3 * w // 4)
    return image[list(rows), list(cols)].astype(int)


def _noise_jpeg(path: Path, size: int = 128) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=95)
    return path


# ---------------------------------------------------------------------------------------------
# read_image
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation, expected", [
    (1, lambda a: a),
    (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, -1)),  # stored rotated: displayed turned 90 degrees clockwise
    (8, lambda a: np.rot90(a, 1)),
])
def test_exif_orientation_is_applied(tmp_path, orientation, expected):
    stored = _quadrants()
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    out = read_image(path)

    want = expected(stored)
    assert out.dtype == np.uint8 and out.shape == want.shape
    np.testing.assert_allclose(_block_centres(out), _block_centres(want), atol=12)


def test_rgb_png_is_read_exactly(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)


def test_grey_8_bit_png(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_grey_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")

    out = read_image(tmp_path / "g16.png")

    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_32_bit_int_and_float_tiffs(tmp_path):
    Image.fromarray(np.array([[0, 65535]], np.int32)).save(tmp_path / "i16.tif")
    Image.fromarray(np.array([[-1000, 0, 1000]], np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "unit.tif")
    Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I" and Image.open(tmp_path / "f.tif").mode == "F"

    np.testing.assert_array_equal(read_image(tmp_path / "i16.tif")[0, :, 0], [0, 255])
    np.testing.assert_array_equal(read_image(tmp_path / "i.tif")[0, :, 1], [0, 128, 255])  # stretched
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tif")[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif")[0, :, 2], [0, 128, 255])
    with pytest.raises(ImageReadError, match="nan.tif.*NaN"):
        read_image(tmp_path / "nan.tif")


def test_one_bit_image(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[..., 1], bits * 255)


def test_rgba_png_is_composited_over_the_background(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :3, 3] = 255  # left half opaque
    rgba[:, 3:, 3] = 0  # right half transparent
    rgba[0, 3, 3] = 128  # one half-transparent pixel
    Image.fromarray(rgba).save(tmp_path / "t.png")

    out = read_image(tmp_path / "t.png")

    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out[:, :3], np.broadcast_to([10, 20, 30], (4, 3, 3)))
    np.testing.assert_array_equal(out[1:, 3:], np.broadcast_to(ALPHA_BACKGROUND, (3, 3, 3)))
    half = 128 / 255
    want = np.round(np.array([10, 20, 30]) * half + np.array(ALPHA_BACKGROUND) * (1 - half))
    np.testing.assert_array_equal(out[0, 3], want)


def test_grey_with_alpha(tmp_path):
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0], [[50, 50, 50], list(ALPHA_BACKGROUND)])


def _palette_image(indices: np.ndarray) -> Image.Image:
    im = Image.fromarray(indices.astype(np.uint8)).convert("L")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (3 * 253))
    return im


def test_palette_png_with_and_without_transparency(tmp_path):
    indices = np.array([[0, 1, 2]])
    _palette_image(indices).save(tmp_path / "p.png")
    _palette_image(indices).save(tmp_path / "pt.png", transparency=0)  # index 0 transparent
    assert Image.open(tmp_path / "p.png").mode == "P"

    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0], [[0, 0, 0], [255, 0, 0], [0, 0, 255]])
    np.testing.assert_array_equal(read_image(tmp_path / "pt.png")[0],
                                  [list(ALPHA_BACKGROUND), [255, 0, 0], [0, 0, 255]])


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out[4, 4], [255, 0, 0], atol=8)


def test_truncated_jpeg_fails_naming_the_file(tmp_path):
    path = _noise_jpeg(tmp_path / "cut.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg.*truncated") as info:
        read_image(path)
    assert info.value.path == path and isinstance(info.value, ValueError)


def test_empty_file_and_text_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "x.jpg").write_text("not a picture\n")
    with pytest.raises(ImageReadError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match=r"x\.jpg: not an image"):
        read_image(tmp_path / "x.jpg")
    with pytest.raises(ImageReadError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
def test_list_images_sorted_regular_visible_files(tmp_path):
    for name in ("b.png", "a.jpg", "C.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["C.txt", "a.jpg", "b.png"]


def test_list_images_folder_errors(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist: .*nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ImageFolderError, match="not a folder: .*file.png"):
        list_images(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    with pytest.raises(ImageFolderError, match="no files in .*empty"):
        list_images(empty)
    with pytest.raises(ImageFolderError):  # raised when called, before any iteration
        read_folder(empty)


def test_read_folder_yields_good_images_and_reports_bad_ones(tmp_path):
    good_a = np.full((5, 6, 3), 40, np.uint8)
    good_b = np.full((3, 4), 200, np.uint8)
    Image.fromarray(good_a).save(tmp_path / "a.png")
    Image.fromarray(good_b).save(tmp_path / "d.png")
    (tmp_path / "b.jpg").write_text("text, not an image")
    (tmp_path / "c.png").write_bytes(b"")
    cut = _noise_jpeg(tmp_path / "e.jpg")
    cut.write_bytes(cut.read_bytes()[:300])

    results = list(read_folder(tmp_path))

    assert [r.path.name for r in results] == ["a.png", "b.jpg", "c.png", "d.png", "e.jpg"]
    good = {r.path.name: r.image for r in results if r.ok}
    bad = {r.path.name: r.error for r in results if not r.ok}
    assert set(good) == {"a.png", "d.png"} and set(bad) == {"b.jpg", "c.png", "e.jpg"}
    np.testing.assert_array_equal(good["a.png"], good_a)
    np.testing.assert_array_equal(good["d.png"][..., 0], good_b)
    assert bad["b.jpg"].startswith("not an image") and bad["c.png"].startswith("empty file")
    assert bad["e.jpg"].startswith("truncated")
    assert all(r.image is None for r in results if not r.ok)


def test_iter_images_is_lazy(tmp_path):
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "a.png")
    stream = iter_images([tmp_path / "a.png", tmp_path / "later.png"])
    first = next(stream)
    assert first.ok
    (tmp_path / "later.png").write_bytes(b"")  # created after the first image came out
    assert next(stream).error.startswith("empty file")


# ---------------------------------------------------------------------------------------------
# output stems
# ---------------------------------------------------------------------------------------------
def test_output_stems_are_unique_and_safe(tmp_path):
    names = ["a.jpg", "a.png", "A.tif", "b.png", "a_jpg.png", "we ird:na*me.png", ".hidden.jpg",
             "köln.jpg", "x.tar.gz"]
    paths = [tmp_path / n for n in names] + [tmp_path / "other" / "b.png"]

    stems = output_stems(paths)

    assert list(stems) == paths
    assert stems[tmp_path / "a_jpg.png"] == "a_jpg"  # its own stem is unique, so it keeps it
    assert stems[tmp_path / "a.png"] == "a_png" and stems[tmp_path / "A.tif"] == "A_tif"
    assert stems[tmp_path / "a.jpg"] == "a_jpg_2"  # a_jpg is taken by a_jpg.png
    assert stems[tmp_path / "b.png"] == "b_png" and stems[tmp_path / "other" / "b.png"] == "b_png_2"
    assert stems[tmp_path / "we ird:na*me.png"] == "we_ird_na_me"
    assert stems[tmp_path / ".hidden.jpg"] == "hidden"
    assert stems[tmp_path / "köln.jpg"] == "köln" and stems[tmp_path / "x.tar.gz"] == "x.tar"
    folded = [s.casefold() for s in stems.values()]
    assert len(set(folded)) == len(folded)
    for stem in stems.values():
        assert stem and not stem.startswith(".") and "/" not in stem and " " not in stem
        (tmp_path / f"{stem}.png").write_bytes(b"x")  # a valid file name here


def test_output_stems_rejects_repeated_paths(tmp_path):
    with pytest.raises(ValueError, match="repeat"):
        output_stems([tmp_path / "a.png", tmp_path / "a.png"])
