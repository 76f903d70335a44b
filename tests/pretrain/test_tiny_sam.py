"""Tiny-SAM pretraining: the loss goes down, the regions are right, the shipped weights are good."""
from pathlib import Path

import numpy as np
import torch

from alignsam.data.scenes import REGION_KINDS, render_scene
from alignsam.foundation.registry import build_segmenter
from alignsam.pretrain.evaluate_tiny_sam import click_curves, summarise
from alignsam.pretrain.regions import SceneRegionStream, region_components, sample_regions
from alignsam.pretrain.tiny_sam import TinySamPretraining

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny_sam.pt"
# Quality measured for the shipped file (checkpoints/README.md, all regions of 40 test scenes per task);
# the suite asks for 90% of it on a smaller set. The issue asks for 0.65 after one click and 0.80 after six.
MEASURED_IOU_FIRST_CLICK = 0.683
MEASURED_IOU_SIXTH_CLICK = 0.800



def fit_one_batch(module: TinySamPretraining, batch, steps: int = 12) -> list:
    """Losses of ``steps`` Adam steps on one batch, with the same clicks each step (a pure fit)."""
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        module.click_generator.manual_seed(0)
        loss = module.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses

def test_region_components_cover_every_kind_of_scene():
    kinds = set()
    for task in ("blur", "shadow", "glass", "saliency", "categories"):
        scene = render_scene(task, 3)
        for kind, mask in region_components(scene, min_area=150):
            assert mask.sum() >= 150
            kinds.add(kind)
    assert kinds == set(REGION_KINDS)


def test_sample_regions_draws_kinds_evenly():
    comps = [("object", np.ones((4, 4), bool))] * 9 + [("shadow", np.zeros((4, 4), bool))]
    picked = sample_regions(comps, 2000, np.random.default_rng(0))
    share = np.mean([k == "shadow" for k, _ in picked])
    assert 0.45 < share < 0.55  # by kind, not by count (which would give 0.1)
    weighted = sample_regions(comps, 2000, np.random.default_rng(0), {"shadow": 0.25})
    assert 0.15 < np.mean([k == "shadow" for k, _ in weighted]) < 0.25  # odds 0.25 : 1


def test_sample_regions_draws_every_component_before_repeating():
    comps = [("object", np.full((2, 2), i, bool)) for i in range(2)] + [("object", np.eye(2, dtype=bool))]
    picked = sample_regions(comps, 3, np.random.default_rng(1))
    assert len({id(m) for _, m in picked}) == 3


def test_region_stream_is_deterministic_and_well_formed():
    a = next(iter(SceneRegionStream(regions_per_image=3, seed=5)))
    b = next(iter(SceneRegionStream(regions_per_image=3, seed=5)))
    image, masks, kinds = a
    assert image.shape == (3, 256, 256) and image.dtype == torch.uint8
    assert masks.shape == (3, 256, 256) and masks.dtype == torch.bool and masks.flatten(1).any(1).all()
    assert kinds.shape == (3,)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_few_pretraining_steps_reduce_the_loss():
    torch.manual_seed(0)
    module = TinySamPretraining(encoder_dim=32, encoder_depth=1, encoder_heads=2, prompt_dim=32,
                                corrective_rounds=1, bf16=False)
    module.log = module.log_dict = lambda *a, **k: None
    stream = iter(SceneRegionStream(regions_per_image=2, seed=1))
    batch = [torch.stack(x) for x in zip(*[next(stream) for _ in range(2)])]
    losses = fit_one_batch(module, batch)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_click_curves_shape_and_summary():
    torch.manual_seed(0)
    curves = click_curves(build_segmenter("tiny"), scenes_per_task=1, clicks=2, tasks=("shadow",))
    assert set(curves) <= set(REGION_KINDS) and "shadow" in curves
    for rows in curves.values():
        assert rows.shape[1] == 3 and ((rows >= 0) & (rows <= 1)).all()
    assert "IoU@2" in summarise(curves) and "multimask" in summarise(curves)


def test_shipped_tiny_sam_reaches_90_percent_of_its_measured_quality():
    segmenter = build_segmenter("tiny", str(SHIPPED))
    curves = click_curves(segmenter, scenes_per_task=4, clicks=6)
    rows = np.concatenate(list(curves.values()))
    first, sixth = rows[:, 0].mean(), rows[:, 5].mean()
    print(f"shipped tiny SAM on {len(rows)} held-out regions: IoU@1 {first:.3f}, IoU@6 {sixth:.3f}")
    assert first >= 0.9 * MEASURED_IOU_FIRST_CLICK
    assert sixth >= 0.9 * MEASURED_IOU_SIXTH_CLICK


def test_init_from_a_weights_file_warm_starts(tmp_path):
    from alignsam.foundation.tiny import save_tiny_sam

    small = dict(encoder_dim=32, encoder_depth=1, encoder_heads=2, prompt_dim=32, bf16=False)
    first = TinySamPretraining(**small)
    path = tmp_path / "tiny.pt"
    save_tiny_sam(first.sam, first.arch, str(path))
    second = TinySamPretraining(**small, init_from=str(path), seed=1)
    for key, value in first.sam.state_dict().items():
        torch.testing.assert_close(second.sam.state_dict()[key], value.half().float() if value.is_floating_point() else value)


def test_corrective_clicks_follow_the_configured_sampler():
    small = dict(encoder_dim=32, encoder_depth=1, encoder_heads=2, prompt_dim=32, bf16=False)
    gt = torch.zeros(2, 64, 64, dtype=torch.bool)
    gt[:, 8:56, 8:56] = True  # a 48-px square; the low-res frame is 16 x 16 (cell 4)
    low_res = torch.full((2, 1, 16, 16), -1.0)
    low_res[:, :, 2:14, 2:8] = 1.0  # the left part found: the miss is the right part, cols 8..13 of the low-res frame
    oracle = TinySamPretraining(**small, largest_error_share=1.0)
    points, labels = oracle._corrective_clicks(low_res, gt)
    assert (labels == 1).all()
    assert ((points[:, 0] // 4 - 10.5).abs() <= 0.5).all()  # interior of the missed block, in columns
    uniform = TinySamPretraining(**small, largest_error_share=0.0, seed=3)
    columns = uniform._corrective_clicks(low_res[:1].expand(64, -1, -1, -1), gt[:1].expand(64, -1, -1))[0][:, 0] // 4
    assert columns.min() <= 9 and columns.max() >= 12  # spread over the whole miss
