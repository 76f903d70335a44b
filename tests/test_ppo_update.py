"""The PPO and SRM updates of alignsam/module.py (issue 14, docs/performance.md).

* In float32 they give the parameters the implementation before issue 14 gave, bit for bit
  (a copy of it is below), on a rollout whose T*B transitions span several minibatches.
* They read nothing back from the device per minibatch: the host reads of an update do not grow
  with the number of PPO epochs.
* ``model.ppo.precision: bf16``: the rollout and the update evaluate the policy on the same
  bfloat16 states, so PPO's first ratios are exactly 1; the update runs and stays finite.
* ``model.policy.srm_input``: the same holds with the SRM's maps as extra inputs (float32 and bf16),
  and the PPO update leaves the SRM untouched (the maps are detached observations).
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

from alignsam.data.scene_data import SceneImages
from alignsam.data.scenes import SPLIT_SEED_BASE
from alignsam.module import AlignSAM, SegmenterConfig
from alignsam.rl import ppo
from alignsam.rl.env import EnvConfig
from alignsam.rl.policy import PolicyConfig
from alignsam.rl.ppo import PPOConfig
from alignsam.srm import SRMConfig, srm_loss

ROOT = Path(__file__).resolve().parents[1]
TINY_SAM = ROOT / "checkpoints" / "tiny_sam.pt"


def tiny_module(tmp_path: Path, epochs: int = 3, precision: str = "fp32", srm_input: bool = False) -> AlignSAM:
    """T = 3 clicks on 4 scenes with minibatches of 5: 12 transitions in minibatches of 5, 5, 2."""
    torch.manual_seed(0)
    return AlignSAM(
        task="saliency", segmenter=SegmenterConfig(name="tiny", checkpoint=str(TINY_SAM)),
        env=EnvConfig(steps=3, grid=4), policy=PolicyConfig(variant="implicit", srm_input=srm_input),
        srm=SRMConfig(variant="implicit"),
        ppo=PPOConfig(epochs=epochs, minibatch_size=5, precision=precision), feature_cache=str(tmp_path / "cache"),
    )


def without_trainer(module: AlignSAM) -> AlignSAM:
    """What the updates ask of Lightning, answered by plain torch (no Trainer attached)."""
    optimizers = module.configure_optimizers()
    module.optimizers = lambda: optimizers
    module.manual_backward = lambda loss: loss.backward()
    module.clip_gradients = lambda optimizer, gradient_clip_val, gradient_clip_algorithm: torch.nn.utils.clip_grad_norm_(
        [p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)
    return module


def episodes_and_rollout(module: AlignSAM):
    samples = [SceneImages("saliency", [SPLIT_SEED_BASE["train"] + i])[0] for i in range(4)]
    episodes, _ = module.agent.prepare(samples)
    return episodes, module.agent.rollout(episodes, training=True, greedy=False)


# -- the implementation before issue 14, verbatim but for Lightning's calls -------------------------
def legacy_ppo_update(module, episodes, rollout, policy_opt):
    agent, cfg = module.agent, module.agent.ppo_config
    advantages, returns = ppo.gae(rollout.rewards, rollout.values, rollout.bootstrap_value, cfg.gamma, cfg.gae_lambda)
    t_count, b_count = rollout.actions.shape
    for epoch in range(cfg.epochs):
        for index in ppo.minibatches(t_count * b_count, cfg.minibatch_size, agent.generator):
            t, b = index // b_count, index % b_count
            state = episodes.embeddings[b] * rollout.masks[t, b]
            logits, value = agent.policy(state, episodes.pool[b], None)
            valid = rollout.valid[t, b]
            new_log_probs = ppo.action_log_probs(logits, valid, rollout.actions[t, b])
            adv = ppo.normalize(advantages[t, b])
            policy_loss, _ = ppo.clipped_policy_loss(new_log_probs, rollout.log_probs[t, b], adv, cfg.clip)
            v_loss = ppo.value_loss(value, returns[t, b])
            entropy = ppo.masked_entropy(logits, valid).mean()
            loss = policy_loss + cfg.value_coef * v_loss - cfg.entropy_coef * entropy
            policy_opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.policy.parameters(), cfg.max_grad_norm)
            policy_opt.step()


def legacy_srm_update(module, episodes, rollout, srm_opt):
    agent = module.agent
    masks = torch.cat([torch.ones_like(rollout.masks[:1]), rollout.masks, rollout.final_mask[None]])
    t_count, b_count = masks.shape[:2]
    valid = episodes.region > 0.5
    for index in ppo.minibatches(t_count * b_count, agent.ppo_config.minibatch_size, agent.generator):
        t, b = index // b_count, index % b_count
        logits = agent.srm(episodes.embeddings[b] * masks[t, b], None)
        loss = srm_loss(logits, episodes.gt_grid[b], valid[b], agent.srm_config)
        srm_opt.zero_grad()
        loss.backward()
        srm_opt.step()


def test_float32_updates_give_the_previous_implementations_parameters_bit_for_bit(tmp_path):
    module = without_trainer(tiny_module(tmp_path))
    episodes, rollout = episodes_and_rollout(module)
    assert rollout.actions.numel() == 12  # 3 minibatches an epoch
    reference = copy.deepcopy(module)
    policy_opt = torch.optim.Adam(reference.agent.policy.parameters(), lr=reference.agent.ppo_config.lr,
                                  eps=reference.agent.ppo_config.adam_eps)
    srm_opt = torch.optim.Adam(reference.agent.srm.parameters(), lr=reference.agent.srm_config.lr)

    stats = module.ppo_update(episodes, rollout)
    stats["srm/loss"] = module.srm_update(episodes, rollout)
    legacy_ppo_update(reference, episodes, rollout, policy_opt)
    legacy_srm_update(reference, episodes, rollout, srm_opt)

    for (name, ours), (_, theirs) in zip(module.agent.named_parameters(), reference.agent.named_parameters()):
        if ours.requires_grad:
            assert torch.equal(ours, theirs), name
    assert torch.equal(module.agent.generator.get_state(), reference.agent.generator.get_state())
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and torch.isfinite(v) for v in stats.values())
    assert set(stats) == {"ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/approx_kl", "ppo/clip_fraction",
                          "ppo/explained_variance", "srm/loss"}


def count_host_reads(monkeypatch) -> dict:
    """Counts the Tensor.item / __float__ / __int__ / __bool__ / tolist calls made by alignsam's own
    code (what waits for a device; torch's optimisers read their CPU step counters, which do not)."""
    counts = {"n": 0}
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if f"{os.sep}alignsam{os.sep}" in sys._getframe(1).f_code.co_filename:
                counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_host_reads_of_an_update_do_not_grow_with_the_epochs(tmp_path, monkeypatch):
    reads = []
    for epochs in (1, 4):
        module = without_trainer(tiny_module(tmp_path / str(epochs), epochs=epochs))
        episodes, rollout = episodes_and_rollout(module)
        with monkeypatch.context() as patch:
            counts = count_host_reads(patch)
            module.ppo_update(episodes, rollout)
            module.srm_update(episodes, rollout)
        reads.append(counts["n"])
    assert reads[0] == reads[1] <= 4, reads  # the action-mask checks, once per update


def test_bf16_rollout_and_update_see_the_same_states(tmp_path):
    module = without_trainer(tiny_module(tmp_path, precision="bf16"))
    episodes, rollout = episodes_and_rollout(module)
    t_count, b_count = rollout.actions.shape
    index = torch.randperm(t_count * b_count, generator=torch.Generator().manual_seed(1))
    t, b = index // b_count, index % b_count
    embeddings, masks, pool = (ppo.network_input("bf16", x) for x in (episodes.embeddings, rollout.masks, episodes.pool))
    with torch.no_grad(), ppo.autocast("bf16", torch.device("cpu")):
        logits, value = module.agent.policy(embeddings[b] * masks[t, b], pool[b])
    log_probs = ppo.action_log_probs(logits.float(), rollout.valid[t, b], rollout.actions[t, b])
    assert torch.equal(log_probs, rollout.log_probs[t, b])  # PPO's first ratios are exactly 1
    assert torch.equal(value.float(), rollout.values[t, b])

    before = [p.detach().clone() for p in module.agent.policy.parameters()]
    stats = module.ppo_update(episodes, rollout)
    stats["srm/loss"] = module.srm_update(episodes, rollout)
    assert all(torch.isfinite(v) for v in stats.values())
    assert all(p.dtype == torch.float32 for p in module.agent.parameters())  # float32 weights, bf16 compute
    assert any(not torch.equal(a, p) for a, p in zip(before, module.agent.policy.parameters()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_srm_aware_policy_sees_the_same_inputs_in_the_rollout_and_the_update(tmp_path, precision):
    """model.policy.srm_input: the update feeds the policy the SRM maps the rollout stored, cast as
    the rollout cast them, so PPO's first ratios are exactly 1; no gradient reaches the SRM."""
    module = without_trainer(tiny_module(tmp_path, precision=precision, srm_input=True))
    episodes, rollout = episodes_and_rollout(module)
    h, w = module.agent.segmenter.embedding_hw
    assert rollout.srm_maps.shape == (3, 4, 1, h, w) and rollout.srm_blank.shape == (4, 1, h, w)
    t_count, b_count = rollout.actions.shape
    index = torch.randperm(t_count * b_count, generator=torch.Generator().manual_seed(1))
    t, b = index // b_count, index % b_count
    embeddings, masks, pool, blank, maps = (ppo.network_input(precision, x) for x in (
        episodes.embeddings, rollout.masks, episodes.pool, rollout.srm_blank, rollout.srm_maps))
    srm_maps = module.agent.policy_srm_maps(blank[b], maps[t, b])
    assert srm_maps.shape == (len(index), 2, h, w)
    with torch.no_grad(), ppo.autocast(precision, torch.device("cpu")):
        logits, value = module.agent.policy(embeddings[b] * masks[t, b], pool[b], None, srm_maps)
    log_probs = ppo.action_log_probs(logits.float(), rollout.valid[t, b], rollout.actions[t, b])
    assert torch.equal(log_probs, rollout.log_probs[t, b])  # PPO's first ratios are exactly 1
    assert torch.equal(value.float(), rollout.values[t, b])

    srm_before = [p.detach().clone() for p in module.agent.srm.parameters()]
    policy_before = module.agent.policy.reduce_srm.weight.detach().clone()
    stats = module.ppo_update(episodes, rollout)
    assert all(torch.isfinite(v) for v in stats.values())
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(srm_before, module.agent.srm.parameters()))
    assert not torch.equal(policy_before, module.agent.policy.reduce_srm.weight)  # the new input is learnt from


def test_the_srm_is_not_run_when_nothing_reads_it(tmp_path, monkeypatch):
    """Ground-truth click labels in training (or all-positive ones) leave the SRM's step output unused."""
    module = tiny_module(tmp_path)
    module.agent.env_config.train_labels = "gt"
    samples = [SceneImages("saliency", [SPLIT_SEED_BASE["train"] + i])[0] for i in range(2)]
    episodes, _ = module.agent.prepare(samples)
    calls = []
    forward = module.agent.srm.forward
    monkeypatch.setattr(module.agent.srm, "forward", lambda *a: calls.append(1) or forward(*a))
    module.agent.rollout(episodes, training=True, greedy=False)
    assert len(calls) == 1  # the blank state's, for the initial prompts
    calls.clear()
    module.agent.rollout(episodes, training=False, greedy=True)
    assert len(calls) == 1 + module.agent.env_config.steps
