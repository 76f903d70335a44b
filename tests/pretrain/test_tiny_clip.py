"""Tiny-CLIP pretraining: data, losses, export to the matcher, and the shipped weights' quality."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from alignsam.data.scenes import CATEGORY_NAMES, TASKS, render_scene
from alignsam.foundation.registry import build_text_matcher
from alignsam.foundation.tiny_clip import WordTokenizer
from alignsam.pretrain.evaluate_tiny_clip import (
    held_out_crops,
    held_out_scenes,
    load_matcher_config,
    pointing_game,
    zero_shot_accuracy,
)
from alignsam.pretrain.scene_captions import (
    BACKGROUND_ID,
    DENSE_TEXTS,
    TASK_DENSE_TEXTS,
    SceneCaptionStream,
    dense_label_map,
    object_crop_box,
)
from alignsam.pretrain.tiny_clip import TinyClipPretraining, collate_captioned, patch_label_targets

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "checkpoints" / "tiny_clip.pt"
MATCHER_CONFIG = REPO / "conf" / "scenes" / "matcher_tiny.yaml"
# Quality gates of the shipped weights (issue 4): the test asks for 90% of them on a small set.
ZERO_SHOT_TARGET, POINTING_TARGET = 0.90, 0.75

SMALL_MODEL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_head_width=16,
                   text_width=32, text_layers=1, text_heads=2, embed_dim=32, warmup_steps=1)


def test_patch_labels_majority_centre_soft():
    labels = torch.zeros(1, 4, 4, dtype=torch.uint8)  # 2 x 2 grid of 2 x 2 patches
    labels[0, 0, 0] = 1  # top-left patch: one pixel of id 1, three of id 0
    labels[0, 0:2, 2:4] = 2  # top-right patch: all id 2
    labels[0, 3, 3] = 1  # bottom-right patch: its centre pixel (row 3, col 3) is id 1
    assert patch_label_targets(labels, (2, 2), 3, "majority").tolist() == [[0, 2, 0, 0]]
    assert patch_label_targets(labels, (2, 2), 3, "centre").tolist() == [[0, 2, 0, 1]]
    soft = patch_label_targets(labels, (2, 2), 3, "soft")
    assert torch.allclose(soft[0, 0], torch.tensor([0.75, 0.25, 0.0]))
    assert torch.allclose(soft.sum(-1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="multiple of the patch grid"):
        patch_label_targets(torch.zeros(1, 5, 5, dtype=torch.uint8), (2, 2), 3, "majority")


def test_dense_labels_follow_the_scene():
    scene = render_scene("categories", 5)
    labels = dense_label_map(scene)
    for name in scene.categories_present():
        assert (labels[scene.target(name)] == DENSE_TEXTS.index(name)).all()
    assert (labels[scene.label_map() == 0] == BACKGROUND_ID).all()
    shadow = render_scene("shadow", 5)
    assert set(np.unique(dense_label_map(shadow))) == {DENSE_TEXTS.index("shadow"), BACKGROUND_ID}


def test_stream_items_are_consistent():
    stream = SceneCaptionStream(seed=3, crops_per_scene=2, out_size=64)
    tokenizer = WordTokenizer(strict=True)
    for image, labels, task_id, caption in itertools.islice(iter(stream), 24):
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        assert labels.shape == (64, 64)
        allowed = {DENSE_TEXTS.index(t) for t in TASK_DENSE_TEXTS[TASKS[task_id]]}
        assert set(labels.unique().tolist()) <= allowed
        tokenizer([caption])  # every caption word is in the tiny CLIP vocabulary


def test_crop_box_is_square_inside_and_covers_the_object():
    mask = np.zeros((100, 100), bool)
    mask[2:20, 90:98] = True  # near the top-right corner
    x0, y0, x1, y1 = object_crop_box(mask, 0.3)
    assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 100 and y1 <= 100
    assert x0 <= 90 and y0 <= 2 and x1 >= 98 and y1 >= 20


def _batch(count: int = 8, seed: int = 0):
    stream = SceneCaptionStream(seed=seed, crops_per_scene=1, out_size=64)
    return collate_captioned(list(itertools.islice(iter(stream), count)))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    module = TinyClipPretraining(**SMALL_MODEL)
    batch = _batch()
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = module.losses(batch)
    for _ in range(12):
        loss = module.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = module.losses(batch)
    assert last["loss"] < 0.8 * first["loss"], (float(first["loss"]), float(last["loss"]))
    assert last["dense_loss"] < first["dense_loss"] and last["global_loss"] < first["global_loss"]


def test_export_is_what_the_matcher_reads(tmp_path):
    """The matcher's v-v patch features and global features are the ones the losses trained."""
    module = TinyClipPretraining(**SMALL_MODEL, vv_start_block=1).eval()
    path = tmp_path / "tiny_clip.pt"
    module.export(str(path))
    matcher = build_text_matcher("tiny", path, feature_surgery=False, vv_start_block=1)
    scenes = [render_scene("categories", s).image for s in (1, 2)]
    images = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in scenes])
    with torch.no_grad():
        patches, global_ = module.image_features(images)
        dense_text = module.dense_text_embeddings()
    m_patches, m_global = matcher.image_features(scenes)
    assert torch.allclose(m_patches.flatten(1, 2), patches, atol=2e-2)  # fp16 weights in the file
    assert torch.allclose(m_global, global_, atol=2e-2)
    assert torch.allclose(matcher.text_embeddings(list(DENSE_TEXTS)), dense_text, atol=2e-2)
    meta = torch.load(path, weights_only=False)["meta"]
    assert meta["matcher_options"]["vv_start_block"] == 1 and "command" in meta and "minutes" in meta


def test_shipped_weights_reach_the_quality_gates():
    """checkpoints/tiny_clip.pt with conf/scenes/matcher_tiny.yaml, on a small held-out set."""
    checkpoint, options = load_matcher_config(str(MATCHER_CONFIG))
    assert (REPO / checkpoint).resolve() == SHIPPED.resolve()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    matcher = build_text_matcher("tiny", SHIPPED, **options)
    crops, labels = held_out_crops(40, "test")
    assert set(labels) <= set(CATEGORY_NAMES)
    assert zero_shot_accuracy(matcher, crops, labels) >= 0.9 * ZERO_SHOT_TARGET
    figures = pointing_game({"config": matcher}, held_out_scenes("categories", 20, "test"))
    assert figures["pairs"] >= 40
    assert figures["config"] >= 0.9 * POINTING_TARGET
    assert figures["config"] > figures["largest object"] + 0.2
