"""Union targets for tiny-SAM pretraining: all regions of one kind, in several pieces, as the scene
tasks' ground truth is; sampled, trained on and scored as rows of their own."""
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from alignsam.data.scenes import REGION_KINDS, render_scene
from alignsam.foundation.registry import build_segmenter
from alignsam.pretrain.evaluate_tiny_sam import click_curves, summarise
from alignsam.pretrain.regions import UNION_OFFSET, SceneRegionStream, union_targets
from alignsam.pretrain.tiny_sam import TinySamPretraining

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tiny_sam import fit_one_batch  # noqa: E402


def _pieces(mask: np.ndarray, min_area: int = 150) -> int:
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return int((stats[1:, cv2.CC_STAT_AREA] >= min_area).sum())


def test_union_targets_are_the_task_targets_when_they_fall_apart():
    found = set()
    for seed in range(12):
        shadow = render_scene("shadow", seed)
        for kind, mask in union_targets(shadow, 150):
            assert kind == "shadow" and _pieces(mask) >= 2
            assert np.array_equal(mask, shadow.target())  # all shadows of the scene, small pieces too
            found.add(kind)
        scene = render_scene("categories", seed)
        for kind, mask in union_targets(scene, 150):
            assert kind == "object" and _pieces(mask) >= 2
            assert any(np.array_equal(mask, scene.target(c)) for c in scene.categories_present())
            found.add(kind)
    assert found == {"shadow", "object"}
    assert union_targets(render_scene("saliency", 0), 150) == []  # one target object, no union


def test_stream_mixes_multi_component_targets_and_is_unchanged_when_off():
    on = iter(SceneRegionStream(regions_per_image=4, seed=2, union_share=0.5, tasks=("shadow", "categories")))
    union_masks = []
    for _ in range(6):
        _, masks, kinds = next(on)
        union_masks += [m.numpy() for m, k in zip(masks, kinds) if k >= UNION_OFFSET]
        assert ((kinds >= 0) & (kinds < 2 * len(REGION_KINDS))).all()
    assert len(union_masks) >= 4 and all(_pieces(m) >= 2 for m in union_masks)
    # share 0 leaves the stream of before as it was (the shipped recipe's data)
    plain, off = iter(SceneRegionStream(seed=2)), iter(SceneRegionStream(seed=2, union_share=0.0))
    for _ in range(3):
        a, b = next(plain), next(off)
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and (a[2] < UNION_OFFSET).all()


def test_a_few_steps_on_union_targets_reduce_the_loss():
    torch.manual_seed(0)
    module = TinySamPretraining(encoder_dim=32, encoder_depth=1, encoder_heads=2, prompt_dim=32,
                                corrective_rounds=2, bf16=False)
    module.log = module.log_dict = lambda *a, **k: None
    stream = iter(SceneRegionStream(regions_per_image=2, seed=1, union_share=1.0, tasks=("shadow",)))
    batch = [torch.stack(x) for x in zip(*[next(stream) for _ in range(2)])]
    assert (batch[2] >= UNION_OFFSET).all()
    losses = fit_one_batch(module, batch)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_evaluation_reports_unions_apart_from_the_region_rows():
    torch.manual_seed(0)
    segmenter = build_segmenter("tiny")
    plain = click_curves(segmenter, scenes_per_task=2, clicks=2, tasks=("shadow",))
    both = click_curves(segmenter, scenes_per_task=2, clicks=2, tasks=("shadow",), unions=True)
    assert set(both) - set(plain) == {"union_shadow"}
    for kind, rows in plain.items():  # the region rows do not move
        np.testing.assert_array_equal(both[kind], rows)
    table = summarise(both)
    assert "union: all shadows" in table and "union: all (mean over targets)" in table
    assert summarise(plain) in table  # the region rows and their means come first, unchanged
