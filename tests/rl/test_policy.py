"""ActorCritic: shapes, patch-aligned logits, variants' parameters, init, padding invariance."""
import pytest
import torch
import torch.nn as nn

from alignsam.rl.policy import ActorCritic, PolicyConfig, image_region

C, H, W = 16, 8, 8
G = 3  # 3 x 3 patches of 2 x 2 cells tile the top-left 6 x 6 image region; the rest is padding
REGION = 6


def small_config(variant: str) -> PolicyConfig:
    return PolicyConfig(variant=variant, hidden=16, blocks=2, groups=4, value_hidden=16)


def patch_pool(batch: int) -> torch.Tensor:
    """``(B, G*G, H*W)``: patch (r, c) averages its 2 x 2 cells; cells outside 6 x 6 weigh 0."""
    side = REGION // G
    pool = torch.zeros(G * G, H, W)
    for a in range(G * G):
        r, c = divmod(a, G)
        pool[a, r * side : (r + 1) * side, c * side : (c + 1) * side] = 1.0 / side**2
    return pool.flatten(1).expand(batch, -1, -1).clone()


def inputs(variant: str, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    state = torch.randn(batch, C, H, W, generator=gen)
    text = torch.randn(batch, C, H, W, generator=gen) if variant == "explicit" else None
    return state, patch_pool(batch), text


@pytest.mark.parametrize("variant", ["implicit", "explicit"])
def test_output_shapes(variant):
    torch.manual_seed(0)
    net = ActorCritic(C, small_config(variant))
    state, pool, text = inputs(variant, batch=3)
    logits, value = net(state, pool, text)
    assert logits.shape == (3, G * G)
    assert value.shape == (3,)
    assert torch.isfinite(logits).all() and torch.isfinite(value).all()


@pytest.mark.parametrize("variant", ["implicit", "explicit"])
def test_logits_are_pool_weighted_cell_scores(variant):
    """Each logit is the average of the head's per-cell scores over its own patch's cells."""
    torch.manual_seed(0)
    net = ActorCritic(C, small_config(variant))
    nn.init.normal_(net.logit_head.weight)  # scores far from 0 so the comparison is informative
    captured = {}
    net.logit_head.register_forward_hook(lambda m, i, out: captured.__setitem__("scores", out))
    state, pool, text = inputs(variant)
    logits, _ = net(state, pool, text)
    scores = captured["scores"].flatten(1)  # (B, H*W)
    assert torch.allclose(logits, torch.einsum("ban,bn->ba", pool, scores), atol=1e-5)

    # one-cell patches: each logit is exactly the score of its cell
    cells = torch.tensor([0, 7, 9, 20, 35])
    one_hot = torch.zeros(2, len(cells), H * W)
    one_hot[:, torch.arange(len(cells)), cells] = 1.0
    logits, _ = net(state, one_hot, text)
    scores = captured["scores"].flatten(1)
    assert torch.allclose(logits, scores[:, cells], atol=1e-6)
    assert logits.std() > 0.1  # different cells, different logits


def test_implicit_variant_has_no_text_layers():
    implicit = dict(ActorCritic(C, small_config("implicit")).named_parameters())
    explicit = dict(ActorCritic(C, small_config("explicit")).named_parameters())
    extra = set(explicit) - set(implicit)
    assert extra and all(name.startswith("reduce_text") for name in extra)
    assert set(implicit) <= set(explicit)
    n_extra = sum(explicit[name].numel() for name in extra)
    assert n_extra == C * 16  # the 1x1 text reduction (no bias)
    assert sum(p.numel() for p in explicit.values()) - sum(p.numel() for p in implicit.values()) == n_extra


@pytest.mark.parametrize("variant", ["implicit", "explicit"])
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(0)
    net = ActorCritic(C, small_config(variant))
    state, pool, text = inputs(variant)
    logits, value = net(state, pool, text)
    action = torch.tensor([1, 4])
    loss = -torch.log_softmax(logits, -1)[torch.arange(2), action].sum() + (value - 3.0).pow(2).sum()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["implicit", "explicit"])
def test_no_batchnorm(variant):
    net = ActorCritic(C, small_config(variant))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())


def test_norm_and_activation_are_injectable():
    net = ActorCritic(C, small_config("implicit"), norm_layer=lambda c: nn.GroupNorm(2, c), act_layer=nn.GELU)
    assert any(isinstance(m, nn.GELU) for m in net.modules())
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    assert all(m.num_groups == 2 for m in net.modules() if isinstance(m, nn.GroupNorm))


@pytest.mark.parametrize("variant", ["implicit", "explicit"])
def test_initial_policy_is_near_uniform_and_value_small(variant):
    torch.manual_seed(0)
    net = ActorCritic(C, small_config(variant))
    state, pool, text = inputs(variant, batch=4)
    logits, value = net(state * 5, pool, text if text is None else text * 5)
    probs = logits.softmax(-1)
    assert probs.max() < 1.2 / (G * G)
    assert probs.min() > 0.8 / (G * G)
    assert value.abs().max() < 0.1


@pytest.mark.parametrize("variant", ["implicit", "explicit"])
def test_padding_cells_do_not_matter(variant):
    torch.manual_seed(0)
    net = ActorCritic(C, small_config(variant))
    nn.init.normal_(net.logit_head.weight)
    nn.init.normal_(net.value_head[-1].weight)
    state, pool, text = inputs(variant)
    padding = image_region(pool, (H, W)) == 0  # (B, 1, H, W)
    assert padding.sum() == 2 * (H * W - REGION * REGION)

    noise = 100 * torch.randn(2, C, H, W)
    state2 = torch.where(padding, noise, state)
    text2 = None if text is None else torch.where(padding, -noise, text)
    logits, value = net(state, pool, text)
    logits2, value2 = net(state2, pool, text2)
    assert torch.allclose(logits, logits2, atol=1e-5)
    assert torch.allclose(value, value2, atol=1e-5)

    # control: the same change inside the image region does move the outputs
    inside = ~padding
    logits3, value3 = net(torch.where(inside, noise, state), pool, text)
    assert not torch.allclose(logits, logits3, atol=1e-3)
    assert not torch.allclose(value, value3, atol=1e-3)


def test_text_state_must_match_the_variant():
    state, pool, text = inputs("explicit")
    with pytest.raises(ValueError, match="text_state"):
        ActorCritic(C, small_config("explicit"))(state, pool, None)
    with pytest.raises(ValueError, match="text_state"):
        ActorCritic(C, small_config("implicit"))(state, pool, text)


def test_config_is_validated():
    with pytest.raises(ValueError, match="variant"):
        PolicyConfig(variant="both")
    with pytest.raises(ValueError, match="divisible"):
        PolicyConfig(hidden=10, groups=4)
    state, pool, _ = inputs("implicit")
    with pytest.raises(ValueError, match="pool"):
        ActorCritic(C, small_config("implicit"))(state, pool[..., :-1])
