"""Episode pictures: overlays, numbered clicks, panels, stacking and atomic PNG writing."""
import cv2
import numpy as np
import pytest

from alignsam.visualize import (
    GT_COLOUR,
    NEGATIVE_COLOUR,
    POSITIVE_COLOUR,
    PREDICTION_COLOUR,
    click_radius,
    draw_clicks,
    episode_panel,
    overlay_mask,
    save_png,
    stack_panels,
    title_height,
)

GREY = 90


def _image(h=60, w=80, value=GREY):
    return np.full((h, w, 3), value, np.uint8)


def _box(h, w, top, left, bottom, right):
    mask = np.zeros((h, w), bool)
    mask[top:bottom, left:right] = True
    return mask


def _is(pixel, colour):
    return tuple(int(v) for v in pixel) == tuple(colour)


def test_overlay_tints_inside_outlines_the_border_and_leaves_outside_alone():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = _box(40, 50, 10, 15, 30, 35)
    out = overlay_mask(image, mask, (255, 0, 0), alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], image[~mask])
    inner = _box(40, 50, 11, 16, 29, 34)
    expected = np.round(0.5 * image[inner].astype(np.float32) + 0.5 * np.float32([255, 0, 0]))
    assert np.array_equal(out[inner], expected.astype(np.uint8))
    border = mask & ~inner
    assert (out[border] == (255, 0, 0)).all()
    # a one-pixel-wide mask is all border: drawn in the full colour
    line = np.zeros((40, 50), bool)
    line[20, 5:45] = True
    assert (overlay_mask(image, line, (0, 0, 255))[line] == (0, 0, 255)).all()


def test_click_centres_have_their_label_colour_and_each_click_draws_a_disc():
    image = _image(120, 160)
    points = np.array([[20.0, 20.0], [80.0, 60.0], [140.0, 100.0], [30.5, 100.7]], np.float32)
    labels = np.array([1, 0, 1, 0])
    out = draw_clicks(image, points, labels, radius=4)
    assert out.shape == image.shape and out.dtype == np.uint8
    for (x, y), label in zip(points, labels):
        colour = POSITIVE_COLOUR if label == 1 else NEGATIVE_COLOUR
        row, col = int(np.floor(y)), int(np.floor(x))
        assert _is(out[row, col], colour)
        # a filled disc, not a dot: pixels 3 away along both axes carry the same colour
        for dr, dc in ((3, 0), (-3, 0), (0, 3), (0, -3)):
            assert _is(out[row + dr, col + dc], colour)
    # T clicks give T discs: count the connected regions of click colour
    for colour, n in ((POSITIVE_COLOUR, 2), (NEGATIVE_COLOUR, 2)):
        region = np.all(out == colour, axis=-1).astype(np.uint8)
        assert cv2.connectedComponents(region)[0] - 1 == n


def test_clicks_are_numbered_next_to_their_disc():
    image = _image(120, 160)
    points = np.array([[40.0, 60.0], [110.0, 60.0]])
    labels = np.array([1, 1])
    radius = 5
    out = draw_clicks(image, points, labels, radius=radius)
    without_numbers = image.copy()
    for x, y in points:
        cv2.circle(without_numbers, (int(x), int(y)), radius + 1, (255, 255, 255), -1, cv2.LINE_8)
        cv2.circle(without_numbers, (int(x), int(y)), radius, POSITIVE_COLOUR, -1, cv2.LINE_8)
    changed = np.any(out != without_numbers, axis=-1)
    for x, y in points:  # text pixels just right of (and above) each disc, nowhere near the other
        near = np.zeros_like(changed)
        near[int(y) - 3 * radius : int(y) + radius, int(x) + radius + 1 : int(x) + 5 * radius] = True
        assert (changed & near).sum() >= 5
    allowed = _box(120, 160, 40, 40, 70, 75) | _box(120, 160, 40, 110, 70, 145)
    assert not (changed & ~allowed).any()
    # different numbers draw different text
    swapped = draw_clicks(image, points[::-1].copy(), labels, radius=radius)
    assert not np.array_equal(out, swapped)


def test_numbering_counts_from_one_to_t():
    """Ten clicks: numbers 1..10, so only the last carries a two-digit (wider) number."""
    radius, y = 5, 60
    xs = 50 + 90 * np.arange(10)
    image = _image(100, 1000)
    out = draw_clicks(image, np.stack([xs, np.full(10, y)], 1).astype(float), np.ones(10, int), radius=radius)
    discs = image.copy()
    for x in xs:
        cv2.circle(discs, (int(x), y), radius + 1, (255, 255, 255), -1, cv2.LINE_8)
        cv2.circle(discs, (int(x), y), radius, POSITIVE_COLOUR, -1, cv2.LINE_8)
    changed = np.any(out != discs, axis=-1)
    widths = []
    for x in xs:
        cols = np.flatnonzero(changed[y - 4 * radius : y + radius, x + radius + 1 : x + 60].any(0))
        widths.append(cols.max() - cols.min() + 1)
    assert max(widths[:9]) * 1.5 < widths[9]


def test_default_radius_scales_with_the_image():
    assert click_radius((64, 64)) == 3
    assert click_radius((1024, 768)) == 15
    big = draw_clicks(_image(400, 400), np.array([[200.0, 200.0]]), np.array([0]))
    r = click_radius((400, 400))
    assert _is(big[200, 200 + r - 1], NEGATIVE_COLOUR) and not _is(big[200, 200 + r + 3], NEGATIVE_COLOUR)


def test_clicks_outside_the_image_are_clipped_to_its_edge():
    image = _image(50, 60)
    out = draw_clicks(image, np.array([[-10.0, 25.0], [100.0, 400.0]]), np.array([1, 0]))
    assert _is(out[25, 0], POSITIVE_COLOUR)
    assert _is(out[49, 59], NEGATIVE_COLOUR)
    empty = draw_clicks(image, np.zeros((0, 2)), np.zeros((0,), np.int64))
    assert np.array_equal(empty, image)


def test_episode_panel_layout():
    h, w = 48, 64
    image = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt = _box(h, w, 5, 5, 30, 30)
    mask = _box(h, w, 20, 30, 45, 60)
    points = np.array([[10.0, 10.0], [45.0, 40.0]])
    labels = np.array([1, 0])
    panel = episode_panel(image, gt, mask, points, labels)
    assert panel.shape == (h, 3 * w, 3) and panel.dtype == np.uint8
    first, second, third = panel[:, :w], panel[:, w : 2 * w], panel[:, 2 * w :]
    assert np.array_equal(first, image)
    assert np.array_equal(second, overlay_mask(image, gt, GT_COLOUR))
    assert np.array_equal(second[~gt], image[~gt]) and not np.array_equal(second[gt], image[gt])
    assert np.array_equal(third, draw_clicks(overlay_mask(image, mask, PREDICTION_COLOUR), points, labels))
    assert _is(third[10, 10], POSITIVE_COLOUR) and _is(third[40, 45], NEGATIVE_COLOUR)

    titled = episode_panel(image, gt, mask, points, labels, title="blur 0.81")
    strip = title_height(3 * w)
    assert titled.shape == (strip + h, 3 * w, 3)
    assert np.array_equal(titled[strip:], panel)
    assert len(np.unique(titled[:strip].reshape(-1, 3), axis=0)) > 1  # text drawn on the strip


def test_grey_images_become_rgb():
    grey = np.full((30, 40), 77, np.uint8)
    out = overlay_mask(grey, np.zeros((30, 40), bool), (0, 255, 0))
    assert out.shape == (30, 40, 3) and (out == 77).all()
    empty = np.zeros((30, 40), bool)
    panel = episode_panel(grey, empty, empty, np.zeros((0, 2)), np.zeros(0, int))
    assert panel.shape == (30, 120, 3)


def test_stack_panels_resizes_to_one_width_with_padding():
    a, b, c = _image(30, 120, 10), _image(20, 60, 200), _image(15, 240, 50)
    out = stack_panels([a, b, c], pad=4)
    # widest is 240: heights 30*2, 20*4, 15*1
    assert out.shape == (60 + 4 + 80 + 4 + 15, 240, 3) and out.dtype == np.uint8
    assert (out[:60] == 10).all() and (out[64:144] == 200).all() and (out[148:] == 50).all()
    assert not (out[60:64] == 10).all()  # the gap is padding, not panel
    assert stack_panels([a, b], pad=0, width=60).shape == (15 + 20, 60, 3)
    assert stack_panels([a]).shape == a.shape


def test_save_png_round_trips_rgb_and_leaves_no_temp_file(tmp_path):
    image = np.zeros((6, 7, 3), np.uint8)
    image[0, 0] = (255, 0, 0)  # red
    image[5, 6] = (0, 0, 255)  # blue
    image[2:4, 2:4] = (10, 120, 230)
    path = tmp_path / "new" / "dir" / "overlay.png"
    save_png(path, image)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None
    back = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, image)
    assert _is(back[0, 0], (255, 0, 0))
    save_png(path, image[::-1].copy())  # overwriting replaces the file
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), image[::-1])
    assert sorted(p.name for p in path.parent.iterdir()) == ["overlay.png"]


_NO_CLICKS = (np.zeros((0, 2)), np.zeros(0, int))
_DOT = _box(8, 8, 0, 0, 1, 1)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: overlay_mask(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), bool), (1, 2, 3)), "image"),
        (lambda: overlay_mask(np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), bool), (1, 2, 3)), "image"),
        (lambda: overlay_mask(_image(8, 8), np.zeros((8, 8), np.uint8), (1, 2, 3)), "mask"),
        (lambda: overlay_mask(_image(8, 8), np.zeros((8, 9), bool), (1, 2, 3)), "mask"),
        (lambda: overlay_mask(_image(8, 8), np.zeros((8, 8), bool), (1, 2)), "colour"),
        (lambda: overlay_mask(_image(8, 8), np.zeros((8, 8), bool), (1, 2, 3), alpha=1.5), "alpha"),
        (lambda: draw_clicks(_image(8, 8), np.zeros((2, 3)), np.zeros(2, int)), "points"),
        (lambda: draw_clicks(_image(8, 8), np.array([[1.0, np.nan]]), np.zeros(1, int)), "points"),
        (lambda: draw_clicks(_image(8, 8), np.zeros((2, 2)), np.zeros(3, int)), "labels"),
        (lambda: draw_clicks(_image(8, 8), np.zeros((2, 2)), np.zeros(2, np.float32)), "labels"),
        (lambda: draw_clicks(_image(8, 8), np.zeros((1, 2)), np.array([2])), "labels"),
        (lambda: draw_clicks(_image(8, 8), np.zeros((1, 2)), np.array([1]), radius=0), "radius"),
        (lambda: episode_panel(_image(8, 8), _DOT, _box(7, 8, 0, 0, 1, 1), *_NO_CLICKS), "mask"),
        (lambda: episode_panel(_image(8, 8), np.zeros((8, 8), int), _DOT, *_NO_CLICKS), "gt"),
        (lambda: episode_panel(_image(8, 8), _DOT, _DOT, *_NO_CLICKS, title=3), "title"),
        (lambda: stack_panels([]), "panels"),
        (lambda: stack_panels([_image(8, 8), np.zeros((8, 8, 3), np.int32)]), r"panels\[1\]"),
        (lambda: stack_panels([_image(8, 8)], pad=-1), "pad"),
        (lambda: save_png("unused.png", np.zeros((4, 4, 3), np.float64)), "image"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_episode_picture_enlarges_small_images_and_titles_columns():
    """A 64 px episode is drawn at 384 px per column (numbers of nearby clicks stay apart), with a
    title strip carrying the IoU and a strip naming the columns; clicks scale with the image."""
    from alignsam.visualize import EPISODE_MIN_SIDE, episode_picture, title_height

    image = np.zeros((64, 48, 3), np.uint8)
    gt = np.zeros((64, 48), bool)
    gt[10:30, 10:30] = True
    picture = episode_picture(image, gt, gt, np.array([[12.5, 12.5], [14.5, 12.5]]), np.array([1, 0]), "scene-1 (shadow)", 0.875)
    factor = EPISODE_MIN_SIDE // 64
    strips = title_height(3 * 48 * factor) + title_height(48 * factor)  # the title, then the column names
    assert picture.shape == (strips + 64 * factor, 3 * 48 * factor, 3)
    body = picture[strips:]
    third = body[:, 2 * 48 * factor:]
    # the first click's centre, scaled, has the positive colour in the prediction column
    assert tuple(third[int(12.5 * factor), int(12.5 * factor)]) == POSITIVE_COLOUR
    # an image already large enough is not enlarged
    big = episode_picture(np.zeros((400, 300, 3), np.uint8), np.zeros((400, 300), bool), np.zeros((400, 300), bool),
                          np.zeros((0, 2)), np.zeros(0, int), "x")
    assert big.shape[1] == 900
