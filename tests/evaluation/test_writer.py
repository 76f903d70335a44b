"""Writing predictions: binary masks and overlays, VOC palette label maps, atomic files."""
import numpy as np
import pytest
import torch
from PIL import Image

from alignsam.evaluation import writer
from alignsam.evaluation.writer import (
    VOC_COLOUR_MAP,
    save_binary_prediction,
    save_label_map_prediction,
    voc_colour_map,
)
from alignsam.geometry import MASK_LOGIT_THRESHOLD
from alignsam.visualize import POSITIVE_COLOUR, PREDICTION_COLOUR

H, W = 48, 64


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 200, (H, W, 3), dtype=np.uint8)


def _logits() -> np.ndarray:
    """float32 ``(H, W)``: positive in a rectangle, a few values exactly at the threshold."""
    logits = np.full((H, W), -3.0, np.float32)
    logits[10:30, 20:50] = 2.5
    logits[0, :4] = MASK_LOGIT_THRESHOLD  # on the threshold: background (mask is logits > 0)
    return logits


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_binary_prediction_files(tmp_path):
    image, logits = _image(), _logits()
    points = np.array([[35.0, 20.0], [5.5, 40.2]])
    labels = np.array([1, 0])

    paths = save_binary_prediction(tmp_path, "img_01", image, logits, points, labels)

    assert paths == {"mask": tmp_path / "masks" / "img_01.png", "overlay": tmp_path / "overlays" / "img_01.png"}
    assert _files(tmp_path) == ["masks/img_01.png", "overlays/img_01.png"]  # no temporary files left
    mask_png = Image.open(paths["mask"])
    assert mask_png.mode == "L" and mask_png.size == (W, H)
    np.testing.assert_array_equal(np.asarray(mask_png), np.where(logits > 0, 255, 0))

    overlay = Image.open(paths["overlay"])
    assert overlay.mode == "RGB" and overlay.size == (W, H)
    overlay = np.asarray(overlay)
    inside = logits > 0
    assert (overlay[inside] != image[inside]).any(axis=1).all()  # every mask pixel is tinted
    far_from_clicks = np.ones((H, W), bool)
    far_from_clicks[28:, :22] = far_from_clicks[8:28, 28:50] = False  # discs and numbers
    np.testing.assert_array_equal(overlay[~inside & far_from_clicks], image[~inside & far_from_clicks])
    assert (overlay == PREDICTION_COLOUR).all(axis=-1).any()  # the mask outline
    assert (overlay == POSITIVE_COLOUR).all(axis=-1)[20, 35]  # the positive click's disc


def test_binary_prediction_accepts_torch_and_no_clicks(tmp_path):
    image, logits = _image(), _logits()
    paths = save_binary_prediction(
        tmp_path, "t", torch.from_numpy(image), torch.from_numpy(logits).to(torch.bfloat16),
        torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    np.testing.assert_array_equal(np.asarray(Image.open(paths["mask"])) > 0, logits > 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"logits": np.zeros((H, W + 1), np.float32)}, r"logits has shape \(48, 65\) but image has shape \(48, 64, 3\)"),
    ({"logits": np.zeros((1, H, W), np.float32)}, r"logits has shape \(1, 48, 64\)"),
    ({"logits": np.zeros((H, W), bool)}, "logits must be float"),
    ({"logits": np.full((H, W), np.nan, np.float32)}, "NaN"),
    ({"image": np.zeros((H, W, 3), np.float32)}, "image must be uint8"),
    ({"image": np.zeros((H, W), np.uint8)}, r"image must be uint8 \(H, W, 3\)"),
    ({"labels": np.array([2])}, "labels"),
    ({"stem": "../escape"}, "stem"),
    ({"stem": ".hidden"}, "stem"),
])
def test_binary_prediction_rejects_bad_inputs_and_writes_nothing(tmp_path, kwargs, message):
    args = {"image": _image(), "logits": _logits(), "points": np.array([[1.0, 2.0]]),
            "labels": np.array([1]), "stem": "s"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        save_binary_prediction(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_voc_colour_map_known_entries():
    colours = voc_colour_map()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [0, 0, 0]
    assert colours[1].tolist() == [128, 0, 0]
    assert colours[2].tolist() == [0, 128, 0]
    assert colours[3].tolist() == [128, 128, 0]
    assert colours[8].tolist() == [64, 0, 0]
    assert colours[15].tolist() == [192, 128, 128]  # person
    assert colours[20].tolist() == [0, 64, 128]  # tv/monitor
    assert colours[255].tolist() == [224, 224, 192]  # void
    assert len({tuple(c) for c in colours.tolist()}) == 256
    np.testing.assert_array_equal(VOC_COLOUR_MAP, colours)


def test_label_map_prediction_files(tmp_path):
    image = _image()
    label_map = np.zeros((H, W), np.int64)
    label_map[5:20, 5:25] = 15
    label_map[25:40, 30:60] = 1
    label_map[0, :] = 255  # void row

    paths = save_label_map_prediction(tmp_path, "voc", image, label_map)

    assert _files(tmp_path) == ["masks/voc.png", "overlays/voc.png"]
    png = Image.open(paths["mask"])
    assert png.mode == "P" and png.size == (W, H)
    np.testing.assert_array_equal(np.asarray(png), label_map)  # indices are the class ids
    palette = np.asarray(png.getpalette()[:768]).reshape(256, 3)
    np.testing.assert_array_equal(palette, VOC_COLOUR_MAP)
    np.testing.assert_array_equal(np.asarray(png.convert("RGB"))[10, 10], VOC_COLOUR_MAP[15])

    overlay = np.asarray(Image.open(paths["overlay"]))
    assert overlay.shape == (H, W, 3)
    classes = (label_map == 1) | (label_map == 15)
    assert (overlay[classes] != image[classes]).any(axis=1).all()
    np.testing.assert_array_equal(overlay[~classes], image[~classes])  # background and void untouched
    assert overlay[5, 5].tolist() == VOC_COLOUR_MAP[15].tolist()  # class outline in its colour
    assert overlay[25, 30].tolist() == VOC_COLOUR_MAP[1].tolist()


def test_label_map_prediction_rejects_bad_maps(tmp_path):
    image = _image()
    with pytest.raises(ValueError, match=r"label_map has shape \(48, 63\) but image has shape \(48, 64, 3\)"):
        save_label_map_prediction(tmp_path, "a", image, np.zeros((H, W - 1), np.uint8))
    with pytest.raises(ValueError, match="integer class ids"):
        save_label_map_prediction(tmp_path, "a", image, np.zeros((H, W), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        save_label_map_prediction(tmp_path, "a", image, np.full((H, W), 256))
    assert not any(tmp_path.iterdir())


def test_label_map_prediction_accepts_torch(tmp_path):
    label_map = torch.zeros(H, W, dtype=torch.long)
    label_map[3:9, 3:9] = 7
    paths = save_label_map_prediction(tmp_path, "t", torch.from_numpy(_image()), label_map)
    np.testing.assert_array_equal(np.asarray(Image.open(paths["mask"])), label_map.numpy())


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A crash during the move leaves neither the PNG nor the temporary file."""
    save_binary_prediction(tmp_path, "s", _image(), _logits(), np.zeros((0, 2)), np.zeros(0, int))
    before = (tmp_path / "masks" / "s.png").read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(writer.os, "replace", crash)
    flipped = -_logits()
    with pytest.raises(OSError, match="disk full"):
        save_binary_prediction(tmp_path, "s", _image(), flipped, np.zeros((0, 2)), np.zeros(0, int))
    assert _files(tmp_path) == ["masks/s.png", "overlays/s.png"]
    assert (tmp_path / "masks" / "s.png").read_bytes() == before  # the old file is intact
