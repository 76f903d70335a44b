"""PPO core (alignsam/rl/ppo.py) against hand-computed numbers."""
import math

import pytest
import torch

from alignsam.errors import ConfigError
from alignsam.rl.ppo import (
    PPOConfig,
    action_log_probs,
    all_states,
    autocast,
    check_actions,
    clipped_policy_loss,
    epoch_minibatches,
    explained_variance,
    explained_variance_tensor,
    gae,
    masked_entropy,
    masked_log_softmax,
    minibatches,
    network_input,
    normalize,
    sample_actions,
    value_loss,
)


def test_config_defaults_are_the_documented_ones():
    cfg = PPOConfig()
    assert (cfg.gamma, cfg.gae_lambda, cfg.epochs, cfg.clip) == (0.99, 0.95, 20, 0.2)
    assert (cfg.value_coef, cfg.entropy_coef, cfg.max_grad_norm) == (0.5, 0.01, 0.5)
    assert (cfg.lr, cfg.adam_eps, cfg.minibatch_size) == (1e-4, 1e-5, 64)
    assert cfg.normalize_advantages is True and cfg.clip_value_loss is False and cfg.precision == "auto"
    with pytest.raises(ValueError):
        PPOConfig(gamma=1.5)
    with pytest.raises(ValueError):
        PPOConfig(clip=0.0)


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------

def test_gae_hand_computed_with_bootstrap_at_truncation():
    # T=3, B=2, gamma=0.9, lam=0.5 (gamma*lam = 0.45).
    # episode 0: r = [1, 0, 2], V = [0.5, 1.0, 1.5], V(s_T) = 2.0
    #   delta_2 = 2 + 0.9*2.0 - 1.5 = 2.3      (bootstrap, not 2 - 1.5 = 0.5 as a terminal would give)
    #   delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35
    #   delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4
    #   A_2 = 2.3; A_1 = 0.35 + 0.45*2.3 = 1.385; A_0 = 1.4 + 0.45*1.385 = 2.02325
    #   returns = A + V = [2.52325, 2.385, 3.8]
    # episode 1: r = [0, 1, 0], V = [1, 0, -1], V(s_T) = -1
    #   delta_2 = 0 + 0.9*(-1) + 1 = 0.1; delta_1 = 1 + 0.9*(-1) - 0 = 0.1; delta_0 = 0 + 0 - 1 = -1
    #   A_2 = 0.1; A_1 = 0.1 + 0.045 = 0.145; A_0 = -1 + 0.45*0.145 = -0.93475
    #   returns = [0.06525, 0.145, -0.9]
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    values = torch.tensor([[0.5, 1.0], [1.0, 0.0], [1.5, -1.0]])
    bootstrap = torch.tensor([2.0, -1.0])
    adv, ret = gae(rewards, values, bootstrap, gamma=0.9, lam=0.5)
    expected_adv = torch.tensor([[2.02325, -0.93475], [1.385, 0.145], [2.3, 0.1]])
    expected_ret = torch.tensor([[2.52325, 0.06525], [2.385, 0.145], [3.8, -0.9]])
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


def test_gae_gamma_one_lambda_one_is_monte_carlo_plus_bootstrap():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 3, generator=g)
    values = torch.randn(5, 3, generator=g)
    bootstrap = torch.randn(3, generator=g)
    adv, ret = gae(rewards, values, bootstrap, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(0).cumsum(0).flip(0)  # sum_{k >= t} r_k
    torch.testing.assert_close(ret, reward_to_go + bootstrap)
    torch.testing.assert_close(adv, reward_to_go + bootstrap - values)


def test_gae_lambda_zero_is_one_step_td_error():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 2, generator=g)
    values = torch.randn(4, 2, generator=g)
    bootstrap = torch.randn(2, generator=g)
    adv, ret = gae(rewards, values, bootstrap, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[1:], bootstrap[None]])
    torch.testing.assert_close(adv, rewards + 0.9 * next_values - values)
    torch.testing.assert_close(ret, rewards + 0.9 * next_values)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), 0.99, 0.95)


# ---------------------------------------------------------------------------------------------
# Clipped policy loss
# ---------------------------------------------------------------------------------------------

def test_clipped_policy_loss_against_formula():
    # clip = 0.2. Per transition max(-A*r, -A*clip(r, 0.8, 1.2)):
    #   A=+1: r=0.5 -> max(-0.5, -0.8) = -0.5   (unclipped, below the range)
    #         r=1.1 -> -1.1                      (inside)
    #         r=1.5 -> max(-1.5, -1.2) = -1.2   (clipped)
    #   A=-2: r=0.5 -> max(1.0, 1.6)   = 1.6    (clipped)
    #         r=1.1 -> 2.2                       (inside)
    #         r=1.5 -> max(3.0, 2.4)   = 3.0    (unclipped, above the range)
    #   mean = (-0.5 - 1.1 - 1.2 + 1.6 + 2.2 + 3.0) / 6 = 4/6
    ratios = torch.tensor([0.5, 1.1, 1.5, 0.5, 1.1, 1.5], dtype=torch.float64)
    advantages = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    old = torch.tensor([-1.0, -2.0, -0.3, -4.0, -0.1, -2.5], dtype=torch.float64)
    new = (old + ratios.log()).requires_grad_()
    loss, stats = clipped_policy_loss(new, old, advantages, clip=0.2)
    assert loss.item() == pytest.approx(4.0 / 6.0)

    # |r-1| > 0.2 for r = 0.5 and 1.5: 4 of 6.
    assert stats["clip_fraction"].item() == pytest.approx(4.0 / 6.0)
    # (r-1) - log r: r=0.5 -> -0.5 + ln 2; r=1.1 -> 0.1 - ln 1.1; r=1.5 -> 0.5 - ln 1.5 (each twice).
    kl = ((-0.5 + math.log(2.0)) + (0.1 - math.log(1.1)) + (0.5 - math.log(1.5))) / 3.0
    assert stats["approx_kl"].item() == pytest.approx(kl)
    assert not stats["approx_kl"].requires_grad

    # d/dlogp of -A*r is -A*r; clipped terms give no gradient.
    loss.backward()
    expected_grad = torch.tensor([-0.5, -1.1, 0.0, 0.0, 2.2, 3.0], dtype=torch.float64) / 6.0
    torch.testing.assert_close(new.grad, expected_grad)


def test_clipped_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logp = torch.tensor([-1.0, -2.0, -3.0])
    adv = torch.tensor([1.0, -3.0, 0.5])
    loss, stats = clipped_policy_loss(logp, logp, adv, clip=0.2)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["approx_kl"].item() == 0.0
    assert stats["clip_fraction"].item() == 0.0


# ---------------------------------------------------------------------------------------------
# Masked categorical
# ---------------------------------------------------------------------------------------------

def test_masked_log_softmax_invalid_is_huge_negative_and_valid_sums_to_one():
    logits = torch.tensor([[0.3, 50.0, -1.0, 2.0], [1.0, 1.0, 1.0, -30.0]])
    valid = torch.tensor([[True, False, True, True], [False, True, True, True]])
    logp = masked_log_softmax(logits, valid)
    assert torch.isfinite(logp).all()
    assert (logp[~valid] < -1e6).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2))
    # The valid entries equal a plain log-softmax over the valid subset alone.
    torch.testing.assert_close(logp[0, [0, 2, 3]], logits[0, [0, 2, 3]].log_softmax(-1))
    torch.testing.assert_close(logp[1, [1, 2, 3]], logits[1, [1, 2, 3]].log_softmax(-1))


def test_masked_entropy_uniform_over_k_valid_is_log_k():
    # Invalid entries get large logits: if they leaked into the distribution the entropy would drop.
    logits = torch.tensor([[0.0, 0.0, 0.0, 40.0, 40.0], [2.0, 2.0, 2.0, 2.0, 2.0], [-5.0, 9.0, 9.0, 9.0, 9.0]])
    valid = torch.tensor([
        [True, True, True, False, False],
        [True, True, True, True, True],
        [True, False, False, False, False],
    ])
    ent = masked_entropy(logits, valid)
    torch.testing.assert_close(ent, torch.tensor([math.log(3), math.log(5), 0.0]))


def test_masked_entropy_matches_categorical_over_valid_subset_and_gradients_are_finite():
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(6, 10, generator=g)).requires_grad_()
    valid = torch.rand(6, 10, generator=g) > 0.5
    valid[:, 0] = True
    valid[5] = False
    valid[5, 7] = True  # a row with a single valid action
    ent = masked_entropy(logits, valid)
    for row in range(6):
        sub = torch.distributions.Categorical(logits=logits[row][valid[row]])
        torch.testing.assert_close(ent[row], sub.entropy())

    # Entropy plus a weighted sum over *all* log-probs (invalid included): no NaN/inf in gradients,
    # and invalid logits receive exactly zero gradient.
    logp = masked_log_softmax(logits, valid)
    (ent.sum() + (logp * torch.rand(6, 10, generator=g)).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~valid] == 0).all()
    assert logits.grad[valid].abs().sum() > 0


def test_row_without_valid_action_raises():
    logits = torch.zeros(2, 4)
    valid = torch.tensor([[True, False, False, False], [False, False, False, False]])
    with pytest.raises(ValueError):
        masked_log_softmax(logits, valid)
    with pytest.raises(ValueError):
        masked_entropy(logits, valid)
    with pytest.raises(ValueError):
        sample_actions(logits, valid)
    with pytest.raises(ValueError):
        sample_actions(logits, valid, greedy=True)


def test_sampling_never_picks_invalid_and_covers_valid():
    # Invalid actions carry by far the highest raw logits.
    logits = torch.tensor([[0.0, 30.0, 0.0, 30.0, 0.0, 0.0], [30.0, 30.0, 30.0, 30.0, 30.0, 1.0]])
    valid = torch.tensor([[True, False, True, False, True, True], [False, False, False, False, False, True]])
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(2, 6)
    for _ in range(500):
        actions, logp = sample_actions(logits, valid, generator=g)
        assert actions.dtype == torch.long and actions.shape == (2,)
        assert valid[torch.arange(2), actions].all()
        torch.testing.assert_close(logp, action_log_probs(logits, valid, actions))
        counts[torch.arange(2), actions] += 1
    assert (counts[~valid] == 0).all()
    assert (counts[0, valid[0]] > 0).all()  # every valid action of the uniform row is drawn
    assert counts[1, 5] == 500

    # Seeded draws are reproducible.
    a1, _ = sample_actions(logits, valid, generator=torch.Generator().manual_seed(7))
    a2, _ = sample_actions(logits, valid, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a1, a2)


def test_greedy_is_argmax_among_valid():
    logits = torch.tensor([[5.0, 9.0, 1.0, 3.0], [0.0, -1.0, 100.0, -2.0]])
    valid = torch.tensor([[True, False, True, True], [False, True, False, True]])
    actions, logp = sample_actions(logits, valid, greedy=True)
    assert actions.tolist() == [0, 1]
    expected = torch.stack([
        logits[0, [0, 2, 3]].log_softmax(-1)[0],
        logits[1, [1, 3]].log_softmax(-1)[0],
    ])
    torch.testing.assert_close(logp, expected)


def test_action_log_probs_values_and_invalid_action_rejected():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    lp = action_log_probs(logits, valid, torch.tensor([1, 2]))
    expected = torch.tensor([2.0 - math.log(math.e + math.e**2), -math.log(3)])
    torch.testing.assert_close(lp, expected)
    with pytest.raises(ValueError):
        action_log_probs(logits, valid, torch.tensor([2, 0]))


# ---------------------------------------------------------------------------------------------
# Value loss, explained variance, normalisation, minibatches
# ---------------------------------------------------------------------------------------------

def test_value_loss_plain_and_clipped():
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    returns = torch.tensor([2.0, 2.0, 4.0])
    # 0.5 * mean([1, 0, 1]) = 1/3
    assert value_loss(values, returns).item() == pytest.approx(1.0 / 3.0)

    # old = [1.5, 2, 2], clip 0.2 -> clipped predictions [1.3, 2.0, 2.2];
    # squared errors: unclipped [1, 0, 1], clipped [0.49, 0, 3.24] -> max [1, 0, 3.24]
    # loss = 0.5 * 4.24 / 3
    old = torch.tensor([1.5, 2.0, 2.0])
    loss = value_loss(values, returns, old_values=old, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 4.24 / 3.0)
    loss.backward()
    # The third term comes from the saturated clipped branch: no gradient. First: (1-2)/3.
    torch.testing.assert_close(values.grad, torch.tensor([-1.0 / 3.0, 0.0, 0.0]))

    with pytest.raises(ValueError):
        value_loss(values, returns, old_values=old)


def test_explained_variance():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(returns.clone(), returns) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), returns) == pytest.approx(0.0, abs=1e-12)
    # residual [0, 0, 0, 1]: Var = 0.1875; Var[returns] = 1.25 -> 1 - 0.15 = 0.85
    assert explained_variance(torch.tensor([1.0, 2.0, 3.0, 3.0]), returns) == pytest.approx(0.85)
    assert isinstance(explained_variance(returns, returns), float)
    assert math.isnan(explained_variance(torch.zeros(3), torch.ones(3)))


def test_normalize():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    y = normalize(x)
    assert y.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert y.std(correction=0).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.argsort(y).tolist() == torch.argsort(x).tolist()
    single = normalize(torch.tensor([5.0]))
    assert torch.isfinite(single).all() and single.item() == 0.0


def test_minibatches_cover_every_index_once():
    g = torch.Generator().manual_seed(4)
    chunks = minibatches(10, 4, g)
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert torch.cat(chunks).sort().values.tolist() == list(range(10))
    assert all(c.dtype == torch.long for c in chunks)
    assert [len(c) for c in minibatches(8, 4, g)] == [4, 4]
    # Shuffled, and reproducible per seed.
    perm_a = torch.cat(minibatches(50, 7, torch.Generator().manual_seed(5)))
    perm_b = torch.cat(minibatches(50, 7, torch.Generator().manual_seed(5)))
    assert torch.equal(perm_a, perm_b)
    assert perm_a.tolist() != list(range(50))


# ---------------------------------------------------------------------------------------------
# What the update needs to read nothing back per minibatch (docs/performance.md)
# ---------------------------------------------------------------------------------------------

def test_checks_can_be_skipped_and_done_once_for_a_rollout():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(8))
    valid = torch.tensor([[True, True, False, True, True]] * 3)
    actions = torch.tensor([0, 1, 4])
    torch.testing.assert_close(action_log_probs(logits, valid, actions, check=False),
                               action_log_probs(logits, valid, actions))
    torch.testing.assert_close(masked_entropy(logits, valid, check=False), masked_entropy(logits, valid))
    check_actions(valid[None].expand(2, -1, -1), actions[None].expand(2, -1))  # (T, B, A), (T, B)
    with pytest.raises(ValueError, match="invalid in its own row"):
        check_actions(valid, torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="no valid action"):
        check_actions(torch.zeros(2, 5, dtype=torch.bool), torch.tensor([0, 1]))


def test_explained_variance_tensor_matches_the_float_one():
    g = torch.Generator().manual_seed(9)
    for values, returns in ((torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)),
                            (torch.tensor([1.0, 2.0, 3.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))):
        out = explained_variance_tensor(values, returns)
        assert out.dim() == 0 and out.dtype == torch.float32
        assert out.item() == pytest.approx(explained_variance(values, returns), rel=1e-6)
    assert math.isnan(explained_variance_tensor(torch.zeros(3), torch.ones(3)).item())


def test_epoch_minibatches_are_the_draws_of_one_minibatches_call_per_epoch():
    g = torch.Generator().manual_seed(6)
    expected = [minibatches(10, 4, g) for _ in range(3)]
    after_expected = torch.randint(0, 1000, (4,), generator=g)
    g = torch.Generator().manual_seed(6)
    epochs = epoch_minibatches(10, 4, 3, g, "cpu")
    assert len(epochs) == 3
    for got, want in zip(epochs, expected):
        assert [c.tolist() for c in got] == [c.tolist() for c in want]
    assert torch.equal(torch.randint(0, 1000, (4,), generator=g), after_expected)  # the generator moved as far


def test_all_states_in_transition_order_and_bounded(monkeypatch):
    g = torch.Generator().manual_seed(10)
    embeddings, masks = torch.randn(3, 4, 2, 2, generator=g), torch.rand(2, 3, 1, 2, 2, generator=g)
    states = all_states(embeddings, masks)
    for index in range(6):
        t, b = divmod(index, 3)
        assert torch.equal(states[index], embeddings[b] * masks[t, b])
    monkeypatch.setattr("alignsam.rl.ppo.ALL_STATES_BYTES", 100)
    assert all_states(embeddings, masks) is None


def test_precision_is_checked_and_casts_only_for_bf16():
    assert PPOConfig().precision == "auto"  # tests/test_precision_auto.py
    with pytest.raises(ConfigError, match="model.ppo.precision"):
        PPOConfig(precision="fp16")
    x = torch.ones(2)
    assert network_input("fp32", x) is x and network_input("bf16", None) is None
    assert network_input("bf16", x).dtype == torch.bfloat16
    assert network_input("bf16", torch.ones(2, dtype=torch.long)).dtype == torch.long
    with autocast("bf16", torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast("fp32", torch.device("cpu")):
        # fp32 adds no autocast of its own: a Trainer's bf16-mixed still reaches the networks
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
