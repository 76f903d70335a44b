"""The agent variants beyond the paper (docs/method.md, "Variants beyond the paper"), on hand-made cases:
the SRM-aware policy's input, the coverage rewards, the label rules, and their config checks."""
from pathlib import Path

import numpy as np
import pytest
import torch

from alignsam.agent import Agent, SegmenterConfig
from alignsam.baselines import srm_point_labels
from alignsam.data.scene_data import SceneImages
from alignsam.data.scenes import SPLIT_SEED_BASE
from alignsam.errors import ConfigError
from alignsam.foundation.registry import build_segmenter
from alignsam.geometry import grid_cell_centres
from alignsam.rl.env import EnvConfig, PromptingEnv, make_episodes, step_rewards
from alignsam.rl.ppo import PPOConfig
from alignsam.rl.policy import SRM_MAPS, ActorCritic, PolicyConfig
from alignsam.srm import DROPPED_LABEL, SRMConfig, label_clicks

ROOT = Path(__file__).resolve().parents[2]
TINY_SAM = ROOT / "checkpoints" / "tiny_sam.pt"


@pytest.fixture(scope="module")
def segmenter():
    return build_segmenter("tiny", str(TINY_SAM))


# -- config keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, key, kwargs", [
    (PolicyConfig, "model.policy.srm_input", {"srm_input": "yes"}),
    (SRMConfig, "model.srm.label_rule", {"label_rule": "vote"}),
    (SRMConfig, "model.srm.negative_threshold", {"negative_threshold": 1.5}),
    (SRMConfig, "model.srm.negative_threshold", {"negative_threshold": -0.1}),
    (SRMConfig, "model.srm.negative_threshold", {"label_rule": "drop", "threshold": 0.3, "negative_threshold": 0.4}),
    (EnvConfig, "model.env.reward", {"reward": "coverage+iou"}),
])
def test_bad_values_name_their_key(cls, key, kwargs):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert err.value.key == key


def test_defaults_are_the_papers():
    assert PolicyConfig().srm_input is False
    assert SRMConfig().label_rule == "threshold" and EnvConfig().reward == "target"
    assert SRMConfig(label_rule="confident", negative_threshold=0.9).negative_threshold == 0.9  # no order needed
    for reward in ("coverage", "target+coverage"):
        assert EnvConfig(reward=reward).reward == reward


def test_the_default_policy_has_the_parameters_of_before():
    """Checkpoints written before the option load strictly: without it there is no reduce_srm."""
    plain = ActorCritic(16, PolicyConfig(hidden=16, groups=4))
    aware = ActorCritic(16, PolicyConfig(hidden=16, groups=4, srm_input=True))
    extra = set(aware.state_dict()) - set(plain.state_dict())
    assert plain.reduce_srm is None and extra == {"reduce_srm.weight"}
    assert aware.reduce_srm.weight.shape == (16, SRM_MAPS, 1, 1)


# -- label rules -------------------------------------------------------------------------------------
P = torch.tensor([[0.02, 0.08, 0.1, 0.3, 0.5, 0.95]])


@pytest.mark.parametrize("rule, expected", [
    ("threshold", [0, 0, 0, 0, 1, 1]),
    ("confident", [0, 0, 1, 1, 1, 1]),  # negative only where p < 0.1
    ("drop", [0, 0, -1, -1, 1, 1]),  # unsure (0.1 <= p < 0.5): not sent
])
def test_label_rules_on_hand_made_probabilities(rule, expected):
    assert label_clicks(P, 0.5, rule, 0.1).tolist() == [expected]
    assert DROPPED_LABEL == -1


def test_label_rules_on_a_hand_made_srm_map(segmenter):
    """One map, six clicks at cell centres: the shared function reads the map there and applies the rule."""
    h, w = segmenter.embedding_hw
    probs = torch.full((1, 1, h, w), 0.3)
    probs[0, 0, 0, :3] = torch.tensor([0.9, 0.05, 0.6])
    centres = grid_cell_centres((h, w), segmenter.img_size)  # (h*w, 2)
    points = (centres[[0, 1, 2, 3]] - 0.5)[None]  # SAM reads a point as its pixel centre
    got = {rule: srm_point_labels(probs, points, segmenter.img_size, SRMConfig(label_rule=rule)).tolist()[0]
           for rule in ("threshold", "confident", "drop")}
    assert got == {"threshold": [1, 0, 1, 0], "confident": [1, 0, 1, 1], "drop": [1, 0, 1, -1]}


def test_a_dropped_click_is_not_sent_to_sam(segmenter):
    image = np.full((256, 256, 3), 90, np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[20:110, 20:110] = True
    image[mask] = (230, 60, 40)
    episodes = make_episodes(segmenter, segmenter.embed([image, image]), 4, gt_masks=[mask, mask])
    probs = torch.full((2, 1, *segmenter.embedding_hw), 0.3)  # unsure everywhere
    env = PromptingEnv(segmenter, EnvConfig(steps=2, grid=4, init_prompts="none"), srm=SRMConfig(label_rule="drop"))
    env.reset(episodes)
    first = env.step(torch.tensor([0, 0]), probs * 3)  # 0.9: positive
    second = env.step(torch.tensor([5, 5]), probs)  # 0.3: dropped
    assert first.labels.tolist() == [1, 1] and second.labels.tolist() == [-1, -1]
    assert env.labels.tolist() == [[1, -1], [1, -1]] and not env.valid[:, 5].any()  # the patch is used up
    torch.testing.assert_close(env.logits, env.logits_history[1])  # SAM saw the first click only


# -- coverage rewards ----------------------------------------------------------------------------------
def two_squares():
    """Two separate squares: A covers patches 0, 1, 4, 5 of the 4x4 grid, B covers 10, 11, 14, 15."""
    image = np.full((256, 256, 3), 90, np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[20:110, 20:110] = True
    mask[150:240, 150:240] = True
    image[mask] = (230, 60, 40)
    return image, mask


def test_components_of_a_two_component_ground_truth(segmenter):
    image, mask = two_squares()
    episodes = make_episodes(segmenter, segmenter.embed([image]), 4, gt_masks=[mask])
    comp = episodes.patch_component[0]
    a, b = comp[0].item(), comp[15].item()
    assert a > 0 and b > 0 and a != b
    assert comp[[1, 4, 5]].tolist() == [a] * 3 and comp[[10, 11, 14]].tolist() == [b] * 3
    assert (comp > 0).sum() == 8 and torch.equal(episodes.patch_on_gt[0], comp > 0)


@pytest.mark.parametrize("reward, expected", [
    ("coverage", [1.0, 0.0, 1.0, -1.0, 0.0]),
    ("target+coverage", [2.0, 1.0, 2.0, -1.0, 1.0]),
    ("target", [1.0, 1.0, 1.0, -1.0, 1.0]),
])
def test_coverage_rewards_on_two_components(segmenter, reward, expected):
    """Clicks: A (new), A again, B (new), background, B again."""
    image, mask = two_squares()
    episodes = make_episodes(segmenter, segmenter.embed([image]), 4, gt_masks=[mask])
    env = PromptingEnv(segmenter, EnvConfig(steps=5, grid=4, init_prompts="none", reward=reward, train_labels="gt"))
    env.reset(episodes, training=True)
    rewards = [env.step(torch.tensor([a])).reward.item() for a in (0, 5, 15, 3, 10)]
    assert rewards == expected


def test_step_rewards_without_earlier_clicks_and_per_episode():
    component = torch.tensor([2, 2, 0])
    clicked = torch.tensor([[1], [2], [2]])  # episode 1 hit component 2 already
    gain = torch.zeros(3)
    assert step_rewards("coverage", component, clicked, gain).tolist() == [1.0, 0.0, -1.0]
    assert step_rewards("coverage", component, clicked[:, :0], gain).tolist() == [1.0, 1.0, -1.0]


# -- the SRM-aware policy -------------------------------------------------------------------------------
def test_srm_aware_policy_takes_the_maps_and_needs_them():
    torch.manual_seed(0)
    net = ActorCritic(16, PolicyConfig(hidden=16, groups=4, blocks=1, srm_input=True))
    state, pool = torch.randn(3, 16, 8, 8), torch.full((3, 4, 64), 1 / 64)
    logits, value = net(state, pool, None, torch.rand(3, SRM_MAPS, 8, 8))
    assert logits.shape == (3, 4) and value.shape == (3,)
    with pytest.raises(ValueError, match="srm_maps"):
        net(state, pool, None)
    with pytest.raises(ValueError, match="srm_maps"):
        net(state, pool, None, torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="srm_maps"):
        ActorCritic(16, PolicyConfig(hidden=16, groups=4))(state, pool, None, torch.rand(3, SRM_MAPS, 8, 8))


def test_the_rollout_feeds_the_policy_the_srms_maps(tmp_path, monkeypatch):
    """Every policy call gets (B, 2, h, w): the SRM's map of the unprompted image and of the state."""
    torch.manual_seed(0)
    agent = Agent("saliency", SegmenterConfig(name="tiny", checkpoint=str(TINY_SAM)),
                  env=EnvConfig(steps=3, grid=4), policy=PolicyConfig(srm_input=True), ppo=PPOConfig(precision="fp32"),
                  feature_cache=str(tmp_path / "cache"))
    samples = [SceneImages("saliency", [SPLIT_SEED_BASE["train"] + i])[0] for i in range(2)]
    episodes, _ = agent.prepare(samples)
    seen = []
    forward = agent.policy.forward
    monkeypatch.setattr(agent.policy, "forward", lambda *a: seen.append(a[3]) or forward(*a))
    for training in (True, False):
        seen.clear()
        rollout = agent.rollout(episodes, training=training, greedy=not training)
        h, w = agent.segmenter.embedding_hw
        assert len(seen) == 3 + 1  # T steps and V(s_T)
        assert all(m.shape == (2, SRM_MAPS, h, w) for m in seen)
        assert rollout.srm_blank.shape == (2, 1, h, w) and rollout.srm_maps.shape == (3, 2, 1, h, w)
        with torch.no_grad():
            blank = torch.sigmoid(agent.srm(episodes.embeddings))
            step0 = torch.sigmoid(agent.srm(episodes.embeddings * rollout.masks[0]))
        torch.testing.assert_close(seen[0][:, :1], blank)
        torch.testing.assert_close(seen[0][:, 1:], step0)
        for t in range(3):
            assert torch.equal(seen[t], torch.cat([rollout.srm_blank, rollout.srm_maps[t]], 1))
        assert not rollout.srm_maps.requires_grad
    plain = Agent("saliency", SegmenterConfig(name="tiny", checkpoint=str(TINY_SAM)), env=EnvConfig(steps=3, grid=4),
                  feature_cache=str(tmp_path / "cache"))
    rollout = plain.rollout(episodes, training=True, greedy=False)
    assert rollout.srm_blank is None and rollout.srm_maps is None
