"""Semantic Recalibration Module: shapes, branch layout, gradients, loss, and that it can learn."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from alignsam.srm import SemanticRecalibration, SRMConfig, srm_loss

C, H, W = 16, 16, 16


def small_config(branch: str, **kw) -> SRMConfig:
    return SRMConfig(branch=branch, hidden=16, attention_grid=4, heads=2, groups=4, **kw)


def inputs(branch: str, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    state = torch.randn(batch, C, H, W, generator=gen)
    text = torch.randn(batch, C, H, W, generator=gen) if branch == "explicit" else None
    return state, text


def disc_target(batch: int = 2) -> torch.Tensor:
    """``(B, 1, H, W)`` float: a disc of radius 4 (different centre per sample)."""
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    out = [((ys - 5 - 4 * b) ** 2 + (xs - 6 - 3 * b) ** 2 <= 16).float() for b in range(batch)]
    return torch.stack(out)[:, None]


@pytest.mark.parametrize("branch", ["implicit", "explicit"])
def test_output_shape(branch):
    torch.manual_seed(0)
    srm = SemanticRecalibration(C, small_config(branch))
    state, text = inputs(branch, batch=3)
    out = srm(state, text)
    assert out.shape == (3, 1, H, W)
    assert torch.isfinite(out).all()


def test_only_the_configured_branch_is_built():
    implicit = SemanticRecalibration(C, small_config("implicit"))
    explicit = SemanticRecalibration(C, small_config("explicit"))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in implicit.modules())
    assert not any(name.startswith("attention.") for name, _ in implicit.named_parameters())
    assert sum(isinstance(m, nn.MultiheadAttention) for m in explicit.modules()) == 1
    convs = lambda net: [m for m in net.modules() if isinstance(m, nn.Conv2d)]  # noqa: E731
    assert convs(implicit)[0].in_channels == C
    assert convs(explicit)[0].in_channels == 2 * C  # s_t and s_c merged
    assert len(convs(implicit)) == 3  # two conv blocks + 1x1
    assert len(convs(explicit)) == 5  # three merge convs + two decoder convs
    for net in (implicit, explicit):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("branch", ["implicit", "explicit"])
def test_every_parameter_gets_a_gradient(branch):
    torch.manual_seed(0)
    srm = SemanticRecalibration(C, small_config(branch))
    state, text = inputs(branch)
    srm_loss(srm(state, text), disc_target(), config=srm.config).backward()
    for name, p in srm.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_attention_reaches_beyond_the_conv_receptive_field():
    """Without (global) GroupNorm, only the explicit branch's attention links far-apart cells."""
    no_norm = lambda channels: nn.Identity()  # noqa: E731
    for branch, reaches in (("implicit", False), ("explicit", True)):
        torch.manual_seed(0)
        srm = SemanticRecalibration(C, small_config(branch), norm_layer=no_norm)
        state, text = inputs(branch, batch=1)
        state2 = state.clone()
        state2[..., :2, :2] += 10.0  # top-left corner; the convs see at most 3 cells around
        change = (srm(state2, text) - srm(state, text)).abs()
        assert change[..., :2, :2].sum() > 0
        assert (change[..., -6:, -6:].sum() > 0) == reaches, branch


def test_text_state_must_match_the_branch():
    state, text = inputs("explicit")
    with pytest.raises(ValueError, match="text_state"):
        SemanticRecalibration(C, small_config("explicit"))(state, None)
    with pytest.raises(ValueError, match="text_state"):
        SemanticRecalibration(C, small_config("implicit"))(state, text)
    with pytest.raises(ValueError, match="branch"):
        SRMConfig(branch="both")
    with pytest.raises(ValueError, match="divisible"):
        SRMConfig(hidden=16, heads=3)


def test_loss_is_small_when_right_and_large_when_wrong():
    target = disc_target()
    right = 20.0 * (2 * target - 1)
    assert srm_loss(right, target) < 1e-3
    assert srm_loss(-right, target) > 10.0  # confident and wrong: BCE ~ 20 per cell
    unsure = srm_loss(torch.zeros_like(target), target)
    assert srm_loss(right, target) < unsure < srm_loss(-right, target)


def test_loss_weights():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, H, W), disc_target()
    bce_only = srm_loss(logits, target, config=SRMConfig(dice_weight=0.0))
    dice_only = srm_loss(logits, target, config=SRMConfig(bce_weight=0.0))
    assert torch.allclose(bce_only, F.binary_cross_entropy_with_logits(logits, target))
    both = srm_loss(logits, target, config=SRMConfig(dice_weight=2.0, bce_weight=0.5))
    assert torch.allclose(both, 2.0 * dice_only + 0.5 * bce_only)


def test_padding_cells_are_left_out_of_the_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, H, W, requires_grad=True), disc_target()
    valid = torch.zeros(2, 1, H, W, dtype=torch.bool)
    valid[0, :, :12, :] = True  # SAM pads bottom/right
    valid[1, :, :, :10] = True
    loss = srm_loss(logits, target, valid)

    # equal to the loss on the image regions alone
    crops = [srm_loss(logits[:1, :, :12, :], target[:1, :, :12, :]), srm_loss(logits[1:, :, :, :10], target[1:, :, :, :10])]
    assert torch.allclose(loss, torch.stack(crops).mean(), atol=1e-6)
    # BCE term is the mean over valid cells
    bce = srm_loss(logits, target, valid, SRMConfig(dice_weight=0.0))
    per_cell = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = torch.stack([per_cell[b][valid[b]].mean() for b in range(2)]).mean()
    assert torch.allclose(bce, expected, atol=1e-6)
    # anything at padding cells changes nothing, and gets no gradient
    noisy_logits = torch.where(valid, logits, 50 * torch.randn(2, 1, H, W))
    noisy_target = torch.where(valid, target, torch.rand(2, 1, H, W))
    assert torch.allclose(loss, srm_loss(noisy_logits, noisy_target, valid), atol=1e-6)
    loss.backward()
    assert (logits.grad[~valid] == 0).all()
    assert (logits.grad[valid] != 0).any()
    # and the padding did matter without the mask
    assert not torch.allclose(loss, srm_loss(logits, noisy_target), atol=1e-3)


@pytest.mark.parametrize("branch", ["implicit", "explicit"])
def test_a_few_adam_steps_fit_one_example(branch):
    torch.manual_seed(0)
    config = small_config(branch)
    srm = SemanticRecalibration(C, config)
    state, text = inputs(branch)
    target = disc_target()
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[..., 14:, :] = False
    opt = torch.optim.Adam(srm.parameters(), lr=5e-3)  # faster than config.lr so 30 steps suffice
    losses = []
    for _ in range(30):
        loss = srm_loss(srm(state, text), target, valid, config)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
