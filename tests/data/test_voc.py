"""PASCAL VOC 2012: palette labels, episodes per class present, split files, SBD labels, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alignsam.data.files import DataConfigError
from alignsam.data.sample import check_sample
from alignsam.data.voc import VOC_CLASS_NAMES, VOC_CLASS_TEXTS, VOCEpisodes, VOCSegmentation
from fixture_trees import build_voc, red_mask, truncate, write_image

VOC = "VOCdevkit/VOC2012"


def test_one_episode_per_class_present_with_full_label_map(tmp_path):
    ids = ["2007_000032", "2007_000039", "2007_000063"]
    classes = {"2007_000032": [1, 15], "2007_000039": [20], "2007_000063": [11, 12, 16]}
    label_maps = build_voc(tmp_path, {"val": ids}, classes)
    assert (label_maps["2007_000032"] == 255).any()  # the fixture has void pixels
    episodes = VOCEpisodes(VOCSegmentation(tmp_path, "val"))
    assert episodes.ids == ["2007_000032:aeroplane", "2007_000032:person", "2007_000039:tvmonitor",
                            "2007_000063:diningtable", "2007_000063:dog", "2007_000063:pottedplant"]
    for sample in episodes:
        check_sample(sample)
        label_map = label_maps[sample["image_id"]]
        np.testing.assert_array_equal(sample["label_map"], label_map)
        np.testing.assert_array_equal(sample["mask"], label_map == sample["class_id"])
        assert sample["mask"].any() and not sample["mask"][label_map == 255].any()
        assert sample["text"] == VOC_CLASS_TEXTS[sample["class_id"] - 1]
        assert sample["id"] == f"{sample['image_id']}:{VOC_CLASS_NAMES[sample['class_id'] - 1]}"
        assert np.array_equal(red_mask(sample["image"]), np.isin(label_map, classes[sample["image_id"]]))
    assert [s["text"] for s in episodes][3:] == ["dining table", "dog", "potted plant"]


def test_segmentation_class_aug_grey_labels(tmp_path):
    ids = ["2008_000002", "2008_000003"]
    label_maps = build_voc(tmp_path, {"train_aug": ids}, aug=True)
    assert Image.open(tmp_path / VOC / "SegmentationClassAug/2008_000002.png").mode == "L"
    images = VOCSegmentation(tmp_path, "train_aug", label_dir="SegmentationClassAug")
    for index, image_id in enumerate(ids):
        np.testing.assert_array_equal(images.read_label_map(index), label_maps[image_id])


def test_split_file_naming_a_missing_image(tmp_path):
    build_voc(tmp_path, {"train": ["2007_000001", "2007_000002"]})
    split_file = tmp_path / VOC / "ImageSets/Segmentation/train.txt"
    split_file.write_text("2007_000001\n2007_000002\n2007_009999\n")
    with pytest.raises(DataConfigError, match="line 3 names '2007_009999'") as err:
        VOCSegmentation(tmp_path, "train", split_key="data.train_split")
    assert err.value.key == "data.train_split"
    assert err.value.path == tmp_path / VOC / "JPEGImages/2007_009999.jpg"
    assert str(split_file) in str(err.value)


def test_split_file_naming_an_image_without_label(tmp_path):
    build_voc(tmp_path, {"val": ["2007_000001", "2007_000002"]})
    (tmp_path / VOC / "SegmentationClass/2007_000002.png").unlink()
    with pytest.raises(DataConfigError, match="2007_000002") as err:
        VOCSegmentation(tmp_path, "val", split_key="data.val_split")
    assert err.value.path == tmp_path / VOC / "SegmentationClass/2007_000002.png"


def test_missing_split_file_and_folders(tmp_path):
    build_voc(tmp_path, {"train": ["2007_000001"]})
    with pytest.raises(DataConfigError, match="split file does not exist") as err:
        VOCSegmentation(tmp_path, "trainval", split_key="data.train_split")
    assert err.value.key == "data.train_split"
    with pytest.raises(DataConfigError, match="VOC folder does not exist") as err:
        VOCSegmentation(tmp_path, "train", voc_dir="VOC2012")
    assert err.value.key == "data.voc_dir"
    with pytest.raises(DataConfigError, match="label folder does not exist") as err:
        VOCSegmentation(tmp_path, "train", label_dir="SegmentationClassAug", label_key="data.train_label_dir")
    assert err.value.key == "data.train_label_dir"


def test_rgb_converted_or_out_of_range_labels_are_rejected(tmp_path):
    build_voc(tmp_path, {"train": ["2007_000001", "2007_000002"]})
    path = tmp_path / VOC / "SegmentationClass/2007_000001.png"
    Image.open(path).convert("RGB").save(path)
    images = VOCSegmentation(tmp_path, "train")
    with pytest.raises(DataConfigError, match="do not convert them to RGB") as err:
        images.read_label_map(0)
    assert err.value.path == path and err.value.key == "data.label_dir"
    grey = tmp_path / VOC / "SegmentationClass/2007_000002.png"
    write_image(grey, np.full((24, 32), 40, np.uint8))  # 40 is no VOC class
    with pytest.raises(DataConfigError, match=r"values \[40\]"):
        images.read_label_map(1)


def test_quick_check_finds_size_mismatch_and_truncation(tmp_path):
    build_voc(tmp_path, {"val": ["2007_000001", "2007_000002"]})
    images = VOCSegmentation(tmp_path, "val")
    images.check_files(decode=True)
    truncate(tmp_path / VOC / "JPEGImages/2007_000002.jpg")
    with pytest.raises(DataConfigError, match="truncated") as err:
        images.check_files()
    assert err.value.key == "data.image_dir"
    write_image(tmp_path / VOC / "JPEGImages/2007_000002.jpg", np.zeros((30, 32, 3), np.uint8))
    with pytest.raises(DataConfigError, match="differs from its image") as err:
        images.check_files()
    assert err.value.path == tmp_path / VOC / "SegmentationClass/2007_000002.png"
