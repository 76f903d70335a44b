"""The prompting environment on hand-built cases: rewards, masking, labels, state, geometry."""
from pathlib import Path

import numpy as np
import pytest
import torch

from alignsam.foundation.registry import build_segmenter
from alignsam.geometry import (
    grid_cell_centres,
    image_region_on_grid,
    patch_pool_matrix,
    sample_at_sam_points,
)
from alignsam.rl.env import EnvConfig, PromptingEnv, low_res_iou, make_episodes

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny_sam.pt"


@pytest.fixture(scope="module")
def segmenter():
    return build_segmenter("tiny", str(SHIPPED))


def _square_world(size=(256, 256)):
    """A grey image with one bright square in the top-left quarter, and its mask."""
    h, w = size
    image = np.full((h, w, 3), 90, np.uint8)
    mask = np.zeros((h, w), bool)
    mask[20:110, 20:110] = True
    image[mask] = (230, 60, 40)
    return image, mask


def _episodes(segmenter, grid=4, size=(256, 256), copies=2):
    image, mask = _square_world(size)
    embedded = segmenter.embed([image] * copies)
    return make_episodes(segmenter, embedded, grid, gt_masks=[mask] * copies), mask


def _probs(segmenter, episodes, value):
    return torch.full((len(episodes), 1, *segmenter.embedding_hw), float(value))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.env.reward"):
        EnvConfig(reward="dice")
    with pytest.raises(ValueError, match="model.env.steps"):
        EnvConfig(steps=20, grid=4)


def test_episodes_put_the_ground_truth_in_sam_frames(segmenter):
    episodes, mask = _episodes(segmenter, size=(256, 128))  # non-square: right half of SAM's square is padding
    assert episodes.gt_low.shape == (2, 64, 64) and episodes.valid_low[:, :, 32:].sum() == 0
    assert abs(episodes.gt_low[0].float().mean().item() - mask.mean() * 0.5) < 0.01
    # patch (row 1, col 1) of the 4x4 grid has its centre (48, 96) on the square; (0, 0) at (16, 32)
    # and (3, 3) at (112, 224) do not
    assert episodes.patch_on_gt[0, 5] and not episodes.patch_on_gt[0, 0] and not episodes.patch_on_gt[0, 15]
    torch.testing.assert_close(episodes.pool.sum(-1), torch.ones(2, 16))
    assert episodes.pool.reshape(2, 16, 16, 16)[..., 8:].sum() == 0  # padding cells never pooled


def test_rewards_of_each_kind(segmenter):
    for kind in ("target", "iou_gain", "target+iou"):
        episodes, _ = _episodes(segmenter)
        env = PromptingEnv(segmenter, EnvConfig(steps=2, grid=4, init_prompts="none", reward=kind, train_labels="gt"))
        env.reset(episodes, training=True)
        first_iou = env.iou_history[0]
        result = env.step(torch.tensor([0, 15]))  # episode 0 clicks the square, episode 1 the background
        target = torch.tensor([1.0, -1.0])
        gain = result.iou - first_iou
        expected = {"target": target, "iou_gain": gain, "target+iou": target + gain}[kind]
        torch.testing.assert_close(result.reward, expected)
    assert gain[0] > 0.2 and gain[1] < 0  # a click on the square beats the all-ones start


def test_a_clicked_patch_is_masked_and_never_accepted_again(segmenter):
    episodes, _ = _episodes(segmenter)
    env = PromptingEnv(segmenter, EnvConfig(steps=3, grid=4, init_prompts="none", train_labels="gt"))
    env.reset(episodes, training=True)
    env.step(torch.tensor([5, 6]))
    assert not env.valid[0, 5] and not env.valid[1, 6] and env.valid[0, 6] and env.valid.sum() == 30
    with pytest.raises(ValueError, match="chosen twice"):
        env.step(torch.tensor([5, 0]))
    assert env.clicked.tolist() == [[5], [6]] and env.points.shape == (2, 1, 2)


def test_labels_come_from_the_srm_or_the_ground_truth(segmenter):
    episodes, _ = _episodes(segmenter)
    env = PromptingEnv(segmenter, EnvConfig(steps=2, grid=4, init_prompts="none"))
    env.reset(episodes, training=True)
    probs = _probs(segmenter, episodes, 0.1)
    probs[1, 0, 12:, 12:] = 0.9  # episode 1: the SRM believes in the bottom-right corner only
    result = env.step(torch.tensor([15, 15]), probs)  # both click the bottom-right patch
    assert result.labels.tolist() == [0, 1]
    gt_env = PromptingEnv(segmenter, EnvConfig(steps=2, grid=4, init_prompts="none", train_labels="gt"))
    gt_env.reset(episodes, training=True)
    assert gt_env.step(torch.tensor([0, 15]), probs).labels.tolist() == [1, 0]
    gt_env.reset(episodes, training=False)  # evaluation always asks the SRM
    assert gt_env.step(torch.tensor([0, 15]), probs).labels.tolist() == [0, 1]


def test_srm_seeds_the_initial_prompts_inside_the_image(segmenter):
    episodes, _ = _episodes(segmenter, size=(256, 128))
    env = PromptingEnv(segmenter, EnvConfig(grid=4))
    probs = _probs(segmenter, episodes, 0.5)
    probs[:, 0, 3, 2] = 0.95  # most confident
    probs[:, 0, 10, 5] = 0.01  # least confident inside the image
    probs[:, 0, :, 8:] = 0.0  # the padding would be "less confident" still: it must be ignored
    env.reset(episodes, probs, training=True)
    centres = grid_cell_centres(segmenter.embedding_hw, segmenter.img_size)
    assert env.points.shape == (2, 2, 2) and env.labels.tolist() == [[1, 0], [1, 0]]
    torch.testing.assert_close(env.points[0, 0], centres[3 * 16 + 2])
    torch.testing.assert_close(env.points[0, 1], centres[10 * 16 + 5])
    with pytest.raises(ValueError, match="init_prompts"):
        env.reset(episodes, None)


def test_a_click_changes_the_mask_and_the_mask_changes_the_state(segmenter):
    episodes, _ = _episodes(segmenter)
    env = PromptingEnv(segmenter, EnvConfig(steps=2, grid=4, init_prompts="none", train_labels="gt"))
    state0 = env.reset(episodes, training=True)
    torch.testing.assert_close(state0, episodes.embeddings * torch.sigmoid(torch.tensor(10.0)))
    logits0 = env.logits.clone()
    state1 = env.step(torch.tensor([0, 0])).state
    assert not torch.equal(env.logits, logits0)
    torch.testing.assert_close(state1, episodes.embeddings * env.mask_on_grid(env.logits))
    inside = env.mask_on_grid(env.logits)[0, 0, 1:4, 1:4].mean()
    outside = env.mask_on_grid(env.logits)[0, 0, 10:, 10:].mean()
    assert inside > 0.5 > outside  # the state now highlights the clicked square
    binary = PromptingEnv(segmenter, EnvConfig(grid=4, state_mask="binary"))
    assert set(binary.mask_on_grid(env.logits).unique().tolist()) <= {0.0, 1.0}


def test_mask_input_is_fed_back_when_configured(segmenter):
    episodes, _ = _episodes(segmenter)
    results = []
    for feed in (False, True):
        env = PromptingEnv(segmenter, EnvConfig(steps=2, grid=4, init_prompts="none", train_labels="gt",
                                                feed_mask_input=feed))
        env.reset(episodes, training=True)
        env.step(torch.tensor([0, 0]))
        env.step(torch.tensor([5, 5]))
        results.append(env.logits)
    assert not torch.equal(results[0], results[1])


def test_geometry_helpers():
    pool = patch_pool_matrix(2, torch.tensor([[256, 128]]), 256, (4, 4)).reshape(4, 4, 4)
    assert torch.allclose(pool[0, :2, 0], torch.tensor([0.5, 0.5])) and pool[0].sum() == 1
    region = image_region_on_grid(torch.tensor([[256, 200]]), 256, (4, 4))[0, 0]
    assert region[0].tolist() == [1.0, 1.0, 1.0, pytest.approx(8 / 64)]
    maps = torch.arange(16.0).reshape(1, 1, 4, 4)
    points = grid_cell_centres((4, 4), 256)[None] - 0.5  # SAM reads a point as its pixel centre
    torch.testing.assert_close(sample_at_sam_points(maps, points, 256), torch.arange(16.0)[None])
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2] = True
    logits = torch.full((1, 1, 4, 4), -1.0)
    logits[0, 0, 0] = 1.0
    assert low_res_iou(logits, gt, torch.ones_like(gt)).item() == pytest.approx(0.5)


def test_sam_points_map_back_to_the_original_frame():
    from alignsam.geometry import original_to_sam_points, sam_to_original_points

    hw = torch.tensor([[480, 640], [300, 200]])
    points = torch.tensor([[[10.0, 20.0], [639.0, 479.0]], [[5.0, 290.0], [199.0, 0.0]]])
    sam = original_to_sam_points(points, hw, 1024)
    assert sam[0, 1, 0] == pytest.approx(639 * 1024 / 640)  # a real rescale, not the identity
    torch.testing.assert_close(sam_to_original_points(sam, hw, 1024), points)
