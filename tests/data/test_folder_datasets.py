"""Binary-mask folder datasets: every real layout, stem pairing, and every kind of bad input."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from alignsam.data.datasets import PRESETS, BinaryMaskFolder
from alignsam.data.files import DataConfigError, MaskRule
from alignsam.data.sample import check_sample
from fixture_trees import (
    H,
    REAL_LAYOUTS,
    TASK_TEXT,
    W,
    build_layout,
    image_for,
    mask_for,
    red_mask,
    truncate,
    write_image,
    write_mask,
    write_pair,
)

LAYOUT_SPLITS = [(preset, split) for preset, splits in REAL_LAYOUTS.items() for split in splits]


def test_every_documented_layout_has_a_preset():
    assert set(REAL_LAYOUTS) <= set(PRESETS)


@pytest.mark.parametrize("preset, split", LAYOUT_SPLITS)
def test_layout_loads_each_image_with_its_own_mask(tmp_path, preset, split):
    written = build_layout(tmp_path, preset, n=3)[split]
    dataset = BinaryMaskFolder.from_layout(tmp_path, preset, split)
    dataset.check_files(decode=True)
    assert dataset.ids == sorted(written)
    for sample in dataset:
        check_sample(sample)
        assert sample["text"] == TASK_TEXT[preset]
        assert sample["image"].shape == (H, W, 3)
        np.testing.assert_array_equal(sample["mask"], written[sample["id"]])
        np.testing.assert_array_equal(red_mask(sample["image"]), sample["mask"])
        assert sample["image_id"] == sample["id"]


def test_raw_cuhk_is_split_by_ids_files(tmp_path):
    build_layout(tmp_path, "cuhk", n=5)
    stems = sorted(p.stem for p in (tmp_path / "image").iterdir())
    (tmp_path / "train.txt").write_text("# CUHK train\n" + "\n".join(stems[:3]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(stems[3:]) + "\n")
    splits = {"train": {"image_dir": "image", "mask_dir": "gt", "ids_file": "train.txt"},
              "test": {"image_dir": "image", "mask_dir": "gt", "ids_file": "test.txt"}}
    train = BinaryMaskFolder.from_layout(tmp_path, "cuhk", "train", splits=splits)
    test = BinaryMaskFolder.from_layout(tmp_path, "cuhk", "test", splits=splits)
    assert train.ids == stems[:3] and test.ids == stems[3:]
    with pytest.raises(DataConfigError, match="no split 'train'") as err:
        BinaryMaskFolder.from_layout(tmp_path, "cuhk", "train")
    assert err.value.key == "data.splits.train"
    (tmp_path / "bad.txt").write_text("out_of_focus9999\n")
    with pytest.raises(DataConfigError, match="out_of_focus9999") as err:
        BinaryMaskFolder.from_layout(tmp_path, "cuhk", "all", splits={"all": {"ids_file": "bad.txt"}})
    assert err.value.key == "data.splits.all.ids_file"


def test_folder_names_are_overridable(tmp_path):
    """A mirror of ECSSD with other folder names, and an SBU archive with a renamed train folder."""
    masks = {s: write_pair(tmp_path / "ecssd", "Imgs", "GT", s) for s in ("0001", "0002")}
    dataset = BinaryMaskFolder.from_layout(tmp_path / "ecssd", "ecssd", "test", image_dir="Imgs",
                                           mask_dir="GT")
    assert dataset.ids == ["0001", "0002"] and dataset.image_key == "data.image_dir"
    np.testing.assert_array_equal(dataset[1]["mask"], masks["0002"])
    write_pair(tmp_path / "sbu", "SBU-Train/ShadowImages", "SBU-Train/ShadowMasks", "lssd1")
    renamed = {"train": {"image_dir": "SBU-Train/ShadowImages", "mask_dir": "SBU-Train/ShadowMasks"}}
    dataset = BinaryMaskFolder.from_layout(tmp_path / "sbu", "sbu", "train", splits=renamed)
    assert dataset.ids == ["lssd1"] and dataset.text == "shadow"
    assert dataset.image_key == "data.splits.train.image_dir"
    dataset = BinaryMaskFolder.from_layout(tmp_path / "sbu", "sbu", "train", text="dark area",
                                           splits=renamed)
    assert dataset.text == "dark area" and dataset[0]["text"] == "dark area"


def test_masks_with_a_stem_suffix(tmp_path):
    mask = mask_for("a")
    write_image(tmp_path / "train/image/a.jpg", image_for(mask, "a"))
    write_mask(tmp_path / "train/mask/a_mask.png", mask)
    dataset = BinaryMaskFolder.from_layout(tmp_path, "folder", "train", mask_stem_suffix="_mask")
    assert dataset.ids == ["a"]
    np.testing.assert_array_equal(dataset[0]["mask"], mask)


def test_image_without_mask_is_an_error_naming_it(tmp_path):
    build_layout(tmp_path, "gdd", n=3)
    lonely = write_image(tmp_path / "train/image/zz_lonely.jpg", image_for(mask_for("z"), "z"))
    with pytest.raises(DataConfigError, match="image has no mask") as err:
        BinaryMaskFolder.from_layout(tmp_path, "gdd", "train")
    assert str(lonely) in str(err.value) and err.value.key == "data.splits.train.mask_dir"


def test_mask_without_image_is_an_error_naming_it(tmp_path):
    build_layout(tmp_path, "duts", n=3)
    stray = write_mask(tmp_path / "DUTS-TE/DUTS-TE-Mask/ILSVRC_extra.png", mask_for("x"))
    with pytest.raises(DataConfigError, match="mask has no image") as err:
        BinaryMaskFolder.from_layout(tmp_path, "duts", "test")
    assert str(stray) in str(err.value) and err.value.key == "data.splits.test.image_dir"


def test_stray_file_does_not_shift_labels(tmp_path, caplog):
    """A mask that sorts first would shift every label under sorted-order pairing; stem pairing
    with on_unpaired=skip drops it, logs the count, and keeps each image with its own mask."""
    written = build_layout(tmp_path, "sbu", n=4)["train"]
    write_mask(tmp_path / "SBUTrain4KRecoveredSmall/ShadowMasks/0000_stray.png", mask_for("stray"))
    write_image(tmp_path / "SBUTrain4KRecoveredSmall/ShadowImages/zzzz_no_mask.jpg",
                image_for(mask_for("q"), "q"))
    image_files = sorted((tmp_path / "SBUTrain4KRecoveredSmall/ShadowImages").iterdir())
    mask_files = sorted((tmp_path / "SBUTrain4KRecoveredSmall/ShadowMasks").iterdir())
    by_order = [np.asarray(Image.open(m)) > 127 for _, m in zip(image_files, mask_files)]
    assert not np.array_equal(by_order[0], written[image_files[0].stem])  # order pairing is wrong

    with caplog.at_level(logging.WARNING, logger="alignsam.data.datasets"):
        dataset = BinaryMaskFolder.from_layout(tmp_path, "sbu", "train", on_unpaired="skip")
    assert "skipped 1 images without mask and 1 masks without image" in caplog.text
    assert dataset.ids == sorted(written)
    for sample in dataset:
        np.testing.assert_array_equal(sample["mask"], written[sample["id"]])
        np.testing.assert_array_equal(red_mask(sample["image"]), sample["mask"])


def test_truncated_image_names_file_and_key(tmp_path):
    build_layout(tmp_path, "istd", n=3)
    broken = truncate(tmp_path / "train/train_A/train_istd_0001.png", 0.5)
    dataset = BinaryMaskFolder.from_layout(tmp_path, "istd", "train")
    with pytest.raises(DataConfigError) as err:
        dataset.check_files()
    assert err.value.path == broken and err.value.key == "data.splits.train.image_dir"
    with pytest.raises(DataConfigError):  # and never a silently half-decoded image when loaded
        dataset[1]


def test_mask_size_differs_from_image(tmp_path):
    build_layout(tmp_path, "msd", n=3)
    wrong = write_mask(tmp_path / "test/mask/test_msd_0002.png", np.zeros((H + 2, W), bool))
    dataset = BinaryMaskFolder.from_layout(tmp_path, "msd", "test")
    with pytest.raises(DataConfigError, match="differs from its image") as err:
        dataset.check_files()
    assert err.value.path == wrong and err.value.key == "data.splits.test.mask_dir"


def test_non_binary_mask(tmp_path):
    build_layout(tmp_path, "hku_is", n=3)
    soft = write_mask(tmp_path / "gt/test_hku_is_0000.png",
                      np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1)))
    dataset = BinaryMaskFolder.from_layout(tmp_path, "hku_is", "test")
    dataset.check_files(decode=False)  # the quick check reads headers only ...
    with pytest.raises(DataConfigError, match="not binary") as err:  # ... full check decodes
        dataset.check_files(decode=True)
    assert err.value.path == soft and err.value.key == "data.splits.test.mask_dir"
    with pytest.raises(DataConfigError, match="not binary"):  # and loading checks too
        dataset[0]
    graded = BinaryMaskFolder.from_layout(tmp_path, "hku_is", "test", mask_rule=MaskRule(check="off"))
    np.testing.assert_array_equal(graded[0]["mask"], np.tile(np.linspace(0, 255, W) > 127, (H, 1)))


def test_pascal_s_accepts_graded_masks_by_default(tmp_path):
    write_image(tmp_path / "datasets/imgs/pascal/1.jpg", np.zeros((H, W, 3), np.uint8))
    graded = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
    write_mask(tmp_path / "datasets/masks/pascal/1.png", graded)
    dataset = BinaryMaskFolder.from_layout(tmp_path, "pascal_s", "test")
    assert dataset[0]["mask"].sum() == H * (np.linspace(0, 255, W) > 127).sum()


def test_empty_missing_folders_and_root(tmp_path):
    build_layout(tmp_path, "dut_omron", n=2)
    for f in (tmp_path / "pixelwiseGT-new-PNG").iterdir():
        f.unlink()
    with pytest.raises(DataConfigError, match="holds no files") as err:
        BinaryMaskFolder.from_layout(tmp_path, "dut_omron", "test")
    assert err.value.key == "data.splits.test.mask_dir"
    assert err.value.path == tmp_path / "pixelwiseGT-new-PNG"

    with pytest.raises(DataConfigError, match="does not exist") as err:
        BinaryMaskFolder.from_layout(tmp_path, "sbu", "train")
    assert err.value.key == "data.splits.train.image_dir"
    assert err.value.path == tmp_path / "SBUTrain4KRecoveredSmall/ShadowImages"

    with pytest.raises(DataConfigError, match="dataset root does not exist") as err:
        BinaryMaskFolder.from_layout(tmp_path / "nowhere", "sbu", "train")
    assert err.value.key == "data.root"

    with pytest.raises(DataConfigError, match="unknown preset") as err:
        BinaryMaskFolder.from_layout(tmp_path, "sbu2", "train")
    assert err.value.key == "data.preset"
