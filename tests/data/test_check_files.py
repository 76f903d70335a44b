"""``check_files``: every mask of the splits a stage reads is decoded and checked before any model is
built; 16-bit masks are read on the 0..255 scale (VOC label maps stay 8-bit)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import alignsam.data.datamodule as datamodule_module
from alignsam.data.datamodule import BinaryMaskDataModule, VOCDataModule
from alignsam.data.files import DataConfigError, MaskRule, check_binary_mask, read_grey_mask, read_label_map
from alignsam.data.scene_data import SceneDataModule
from fixture_trees import H, W, build_layout, build_voc, mask_for, truncate, write_mask

TEST_MASKS = "SBU-Test/ShadowMasks"
GRADED = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))


@pytest.fixture()
def sbu(tmp_path):
    root = tmp_path / "sbu"
    return root, build_layout(root, "sbu", n=6)


def write_16bit_png(path, values: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"  # what PIL writes and reads back for uint16 grey
    return path


def test_a_bad_test_mask_is_reported_by_check_files_alone(sbu):
    root, written = sbu
    bad = write_mask(root / TEST_MASKS / f"{sorted(written['test'])[3]}.png", GRADED)
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=2, check_files="none")  # nothing read in __init__
    with pytest.raises(DataConfigError, match="not binary") as err:
        dm.check_files()
    assert err.value.path == bad and err.value.key == "data.splits.test.mask_dir"
    assert str(bad) in str(err.value) and "data.splits.test.mask_dir" in str(err.value)


def test_a_bad_test_mask_stops_the_data_module_itself(sbu):
    """The command line builds the data module before the models: its own check (the default
    ``data.check_files: quick``) decodes every val/test mask, so the error comes before SAM is built."""
    root, written = sbu
    bad = write_mask(root / TEST_MASKS / f"{sorted(written['test'])[1]}.png", GRADED)
    with pytest.raises(DataConfigError, match="not binary") as err:
        BinaryMaskDataModule(str(root), "sbu", train_size=2)
    assert err.value.path == bad


def test_stages_choose_the_splits(sbu):
    root, written = sbu
    write_mask(root / TEST_MASKS / f"{sorted(written['test'])[0]}.png", mask_for("x").astype(np.uint8))  # 0/1
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=2, val_split=None, check_files="none")
    dm.check_files(stages=("fit",))  # train only: fine
    with pytest.raises(DataConfigError, match="0/1") as err:
        dm.check_files(stages=("test",))
    assert err.value.key == "data.splits.test.mask_dir"
    with pytest.raises(ValueError, match="unknown stage"):
        dm.check_files(stages=("validate",))


def test_each_mask_is_decoded_once(sbu, monkeypatch):
    root, written = sbu
    decoded = []
    real = datamodule_module.read_grey_mask

    def counting(path, key):
        decoded.append(path)
        return real(path, key)

    monkeypatch.setattr(datamodule_module, "read_grey_mask", counting)
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=2)  # val and test are one split
    # __init__ decoded the test split once (shared by val and test); the few-shot train masks were
    # decoded by the quick check itself, not here
    assert sorted(p.stem for p in decoded) == sorted(written["test"])
    dm.check_files()
    assert len(decoded) == len(written["test"])  # nothing is read twice


def test_without_the_quick_check_images_are_checked_too(sbu):
    root, written = sbu
    broken = truncate(root / "SBU-Test/ShadowImages" / f"{sorted(written['test'])[2]}.jpg", 0.6)
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=2, check_files="none")
    with pytest.raises(DataConfigError, match="truncated") as err:
        dm.check_files()
    assert err.value.path == broken and err.value.key == "data.splits.test.image_dir"


def test_voc_check_files_finds_what_init_did_not_read(tmp_path):
    build_voc(tmp_path, {"train": [f"2007_{i:06d}" for i in range(4)], "val": ["2008_000001", "2008_000002"]})
    image = tmp_path / "VOCdevkit/VOC2012/JPEGImages/2008_000002.jpg"
    Image.fromarray(np.zeros((H + 6, W, 3), np.uint8)).save(image)  # label map no longer fits
    dm = VOCDataModule(str(tmp_path), train_size=2, check_files="none")
    with pytest.raises(DataConfigError, match="differs from its image") as err:
        dm.check_files()
    assert err.value.key == "data.label_dir"
    VOCDataModule(str(tmp_path), train_size=2, val_split=None, test_split=None, check_files="none").check_files()


def test_scene_module_has_nothing_to_check():
    SceneDataModule(task="categories", train_pool=6, train_size=2, val_size=2, test_size=2).check_files()


# -- 16-bit masks -----------------------------------------------------------------------------------
def test_a_16bit_png_mask_is_read_on_the_8bit_scale(tmp_path):
    mask = mask_for("m")
    path = write_16bit_png(tmp_path / "m.png", mask * 65535)
    grey = read_grey_mask(path, "data.mask_dir")
    assert grey.dtype == np.uint8 and set(np.unique(grey)) == {0, 255}
    np.testing.assert_array_equal(grey > 127, mask)
    check_binary_mask(grey, path, "data.mask_dir", MaskRule())


def test_a_graded_16bit_mask_is_still_not_binary(tmp_path):
    path = write_16bit_png(tmp_path / "g.png", GRADED.astype(np.uint16) * 257)
    grey = read_grey_mask(path, "data.mask_dir")
    np.testing.assert_array_equal(grey, GRADED)  # 257 * v scales back to v exactly
    with pytest.raises(DataConfigError, match="not binary"):
        check_binary_mask(grey, path, "data.mask_dir", MaskRule())


@pytest.mark.parametrize("high", [1, 255])
def test_8bit_values_in_a_16bit_file_are_refused(tmp_path, high):
    path = write_16bit_png(tmp_path / "low.png", mask_for("m") * high)
    with pytest.raises(DataConfigError, match="16-bit") as err:
        read_grey_mask(path, "data.mask_dir")
    assert err.value.path == path and "65535" in str(err.value)


def test_a_32bit_mode_I_mask_with_16bit_values_is_read(tmp_path):
    path = tmp_path / "m.tif"
    Image.fromarray((mask_for("m") * 65535).astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(read_grey_mask(path, "data.mask_dir") > 127, mask_for("m"))
    Image.fromarray((mask_for("m") * 70000).astype(np.int32)).save(path)
    with pytest.raises(DataConfigError, match="65535"):
        read_grey_mask(path, "data.mask_dir")


def test_a_dataset_of_16bit_masks_loads_and_passes_check_files(sbu):
    root, written = sbu
    for split, folder in (("train", "SBUTrain4KRecoveredSmall/ShadowMasks"), ("test", TEST_MASKS)):
        for stem, mask in written[split].items():
            (root / folder / f"{stem}.png").unlink()
            write_16bit_png(root / folder / f"{stem}.png", mask * 65535)
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=2)
    dm.check_files()
    sample = dm.test_dataset[0]
    np.testing.assert_array_equal(sample["mask"], written["test"][sample["id"]])


def test_16bit_voc_label_maps_are_refused_clearly(tmp_path):
    path = write_16bit_png(tmp_path / "l.png", np.full((H, W), 15, np.uint16))
    with pytest.raises(DataConfigError, match="8-bit palette") as err:
        read_label_map(path, "data.label_dir")
    assert "I;16" in str(err.value) and err.value.key == "data.label_dir"
