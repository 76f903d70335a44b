"""Augmented views: deterministic per (subset_seed, image id, view), own ids, image and target together."""
from __future__ import annotations

import numpy as np
import pytest

from alignsam.data.augment import AugmentConfig, AugmentedViews, view_seed
from alignsam.data.datasets import BinaryMaskFolder
from alignsam.data.sample import check_sample
from alignsam.data.voc import VOCEpisodes, VOCSegmentation
from fixture_trees import build_layout, build_voc, red_mask


@pytest.fixture()
def gdd_train(tmp_path):
    build_layout(tmp_path, "gdd", n=3)
    return BinaryMaskFolder.from_layout(tmp_path, "gdd", "train")


def test_views_have_their_own_ids_and_view_zero_is_the_image(gdd_train):
    views = AugmentedViews(gdd_train, views=2, subset_seed=0)
    stem = gdd_train.ids[0]
    assert len(views) == 9
    assert views.ids[:3] == [stem, f"{stem}#aug1", f"{stem}#aug2"]
    original = views[0]
    np.testing.assert_array_equal(original["image"], gdd_train[0]["image"])
    for k in range(len(views)):
        sample = views[k]
        check_sample(sample)
        assert sample["id"] == views.ids[k] and sample["image_id"] == sample["id"]
        assert sample["text"] == "glass"


def test_views_are_deterministic_in_any_order_and_any_instance(gdd_train):
    forward = AugmentedViews(gdd_train, views=3, subset_seed=7)
    backward = AugmentedViews(gdd_train, views=3, subset_seed=7)
    first = {forward.ids[k]: forward[k] for k in range(len(forward))}
    second = {backward.ids[k]: backward[k] for k in reversed(range(len(backward)))}
    for key, sample in first.items():
        np.testing.assert_array_equal(sample["image"], second[key]["image"])
        np.testing.assert_array_equal(sample["mask"], second[key]["mask"])
    # the views of one image differ from each other and from the original
    images = [first[i]["image"] for i in forward.ids[:4]]
    assert all(not np.array_equal(images[a], images[b]) for a in range(4) for b in range(a + 1, 4))
    other_seed = AugmentedViews(gdd_train, views=3, subset_seed=8)
    assert not np.array_equal(other_seed[1]["image"], first[forward.ids[1]]["image"])
    assert view_seed(7, "a", 1) == view_seed(7, "a", 1) != view_seed(7, "a", 2)


def test_image_and_mask_move_together(gdd_train):
    flip_only = AugmentConfig(hflip=1.0, scale=(1.0, 1.0), brightness=0, contrast=0, saturation=0, hue=0)
    views = AugmentedViews(gdd_train, views=1, subset_seed=0, config=flip_only)
    np.testing.assert_array_equal(views[1]["mask"], gdd_train[0]["mask"][:, ::-1])
    np.testing.assert_array_equal(red_mask(views[1]["image"]), views[1]["mask"])
    full = AugmentedViews(gdd_train, views=4, subset_seed=0)
    for k in range(len(full)):
        sample = full[k]
        assert sample["mask"].dtype == bool and sample["image"].shape[:2] == sample["mask"].shape
        # the zoom interpolates image edges bilinearly and the mask by nearest neighbour: allow
        # a few boundary pixels, while a mask that did not follow its image disagrees by far more
        assert (red_mask(sample["image"]) == sample["mask"]).mean() > 0.97, sample["id"]


def test_zoom_out_fills_background_for_masks_and_void_for_label_maps(tmp_path, gdd_train):
    zoom_out = AugmentConfig(hflip=0, scale=(0.5, 0.5), brightness=0, contrast=0, saturation=0, hue=0)
    binary = AugmentedViews(gdd_train, views=1, subset_seed=0, config=zoom_out)[1]
    assert not binary["mask"][0].any() and not binary["mask"][:, 0].any()
    assert (binary["image"][0] == 0).all()
    build_voc(tmp_path / "voc", {"train": ["2007_000001", "2007_000002"]})
    images = AugmentedViews(VOCSegmentation(tmp_path / "voc", "train"), 1, 0, zoom_out)
    label_map = images[1]["label_map"]
    assert (label_map[0] == 255).all() and (label_map[:, 0] == 255).all()
    np.testing.assert_array_equal(images.read_label_map(1), label_map)
    episodes = VOCEpisodes(images)
    assert episodes.ids == ["2007_000001:aeroplane", "2007_000001:cat", "2007_000001#aug1:aeroplane",
                            "2007_000001#aug1:cat", "2007_000002:bicycle", "2007_000002#aug1:bicycle"]
    for sample in episodes:
        check_sample(sample)
        np.testing.assert_array_equal(sample["mask"], sample["label_map"] == sample["class_id"])
