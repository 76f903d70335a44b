"""Semantic Recalibration Module (SRM): a foreground map y_r on the embedding grid.

The SRM labels every click of the agent (by default positive when its foreground probability at the
click is ``>= threshold``; :func:`label_clicks` holds every ``model.srm.label_rule``) and seeds the
initial prompts P_0 (its most and least confident cells). It is trained with its own optimiser on
Dice + BCE against the ground truth resized to its grid.

Two variants (``SRMConfig.variant``; only the chosen one is built):

* ``explicit``: s_t and s_c = E * M_c are merged by three conv layers, one multi-head self-attention
  layer runs on a downsampled ``attention_grid x attention_grid`` token grid (cheap at 64 x 64), its
  update is upsampled and added back, and two conv layers decode one channel.
* ``implicit``: two conv blocks on s_t alone, then a 1x1 conv to one channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from alignsam.errors import ConfigError, check_range
from alignsam.losses import bce_loss, dice_loss

# Whether a network also sees the text state s_c: one name for the policy and the SRM
# (``model.policy.variant``, ``model.srm.variant``).
Variant = Literal["implicit", "explicit"]
VARIANTS = get_args(Variant)
BRANCHES = VARIANTS  # the SRM's former name for them

# How the SRM's probability at a click becomes the click's label (``model.srm.label_rule``; see
# :func:`label_clicks`). ``threshold`` is the paper's rule.
LabelRule = Literal["threshold", "confident", "drop"]
LABEL_RULES = get_args(LabelRule)
DROPPED_LABEL = -1  # SAM's padding label: a dropped click is not sent to SAM (Segmenter.decode)

# Logit given to cells outside ``valid`` in :func:`srm_loss`: sigmoid is exactly 0 and the BCE
# against a 0 target is exactly 0, so those cells drop out of both sums (finite, so fp16-safe).
_EXCLUDED_LOGIT = -1e4


@dataclass
class SRMConfig:
    """SRM hyperparameters (the YAML key is ``srm``).

    Attributes:
        variant: ``"implicit"`` (s_t only; paper's choice for blur, glass, saliency) or
            ``"explicit"`` (s_t and the text state s_c; shadow and VOC), as for the policy.
        hidden: channels of the SRM's features.
        attention_grid: side of the token grid the explicit branch's self-attention runs on (the
            features are average-pooled to it, so attention costs ``attention_grid**4``, not
            ``(h*w)**2``).
        heads: attention heads (must divide ``hidden``).
        groups: GroupNorm groups (must divide ``hidden``).
        threshold: a click is positive when the SRM's foreground probability at it is ``>=`` this
            (rules ``threshold`` and ``drop``).
        label_rule: how a click's probability p becomes its label (:func:`label_clicks`):
            ``threshold`` (paper: positive iff p >= threshold), ``confident`` (negative only where
            the SRM is confident it is background, p < negative_threshold; positive otherwise) or
            ``drop`` (positive iff p >= threshold, negative iff p < negative_threshold, otherwise
            not sent to SAM at all).
        negative_threshold: the "confident background" cut of the ``confident`` and ``drop`` rules.
        dice_weight: weight of the Dice term of :func:`srm_loss`.
        bce_weight: weight of the BCE term of :func:`srm_loss`.
        lr: learning rate of the SRM's own Adam (separate from the policy's optimiser).
        branch: the former name of ``variant``, read from configs and checkpoints written before
            the two networks shared one name; folded into ``variant`` (and reset to None).

    Out-of-range values raise :class:`~alignsam.errors.ConfigError` naming ``model.srm.<field>``:
    threshold in [0, 1] (a probability: above 1 every click would be labelled negative),
    label_rule one of ``LABEL_RULES``, negative_threshold in [0, 1] (and, for ``drop``, at most threshold),
    hidden, attention_grid, heads, groups >= 1 (groups and heads divide hidden), the loss weights
    >= 0 and not both 0, lr > 0.
    """

    variant: Variant = "implicit"
    hidden: int = 64
    attention_grid: int = 8
    heads: int = 4
    groups: int = 8
    threshold: float = 0.5
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    lr: float = 1e-4
    branch: Optional[Variant] = None
    label_rule: LabelRule = "threshold"
    negative_threshold: float = 0.1

    def __post_init__(self) -> None:
        if self.branch is not None:
            if self.branch not in VARIANTS:
                raise ConfigError("model.srm.branch", f"{self.branch!r} is not one of {', '.join(VARIANTS)}")
            if self.variant != "implicit" and self.variant != self.branch:
                raise ConfigError("model.srm.branch", f"{self.branch!r} contradicts model.srm.variant {self.variant!r}; "
                                  f"set only model.srm.variant (branch is its former name)")
            self.variant, self.branch = self.branch, None
        if self.variant not in VARIANTS:
            raise ConfigError("model.srm.variant", f"{self.variant!r} is not one of {', '.join(VARIANTS)}")
        for key in ("hidden", "attention_grid", "heads", "groups"):
            check_range(f"model.srm.{key}", getattr(self, key), 1)
        check_range("model.srm.threshold", self.threshold, 0.0, 1.0)
        if self.label_rule not in LABEL_RULES:
            raise ConfigError("model.srm.label_rule", f"{self.label_rule!r} is not one of {', '.join(LABEL_RULES)}")
        check_range("model.srm.negative_threshold", self.negative_threshold, 0.0, 1.0)
        if self.label_rule == "drop" and self.negative_threshold > self.threshold:
            raise ConfigError("model.srm.negative_threshold", f"{self.negative_threshold} exceeds model.srm.threshold "
                              f"({self.threshold}): label_rule 'drop' keeps negatives below it and positives above threshold")
        check_range("model.srm.dice_weight", self.dice_weight, 0.0)
        check_range("model.srm.bce_weight", self.bce_weight, 0.0)
        if self.dice_weight == 0 and self.bce_weight == 0:
            raise ConfigError("model.srm.dice_weight", "model.srm.dice_weight and model.srm.bce_weight are both 0: "
                              "the SRM would get no loss")
        check_range("model.srm.lr", self.lr, 0.0, low_open=True)
        for key in ("groups", "heads"):
            if self.hidden % getattr(self, key):
                raise ConfigError(f"model.srm.{key}", f"model.srm.hidden ({self.hidden}) must be divisible by "
                                  f"{key} ({getattr(self, key)})")


def label_clicks(probs: torch.Tensor, threshold: float = 0.5, rule: str = "threshold",
                 negative_threshold: float = 0.1) -> torch.Tensor:
    """The labels of clicks from the SRM's foreground probability p at each click.

    Args:
        probs: ``(...)`` float, p at every click (any shape, e.g. ``(B,)`` or ``(B, N)``).
        threshold, rule, negative_threshold: ``model.srm.threshold``, ``label_rule``,
            ``negative_threshold`` (:class:`SRMConfig`):

            - ``threshold``: 1 where p >= threshold, else 0 (the paper's rule);
            - ``confident``: 0 where p < negative_threshold, else 1 (a negative click only where the
              SRM is sure it is background: a wrong negative on the target cuts it out of SAM's mask);
            - ``drop``: 1 where p >= threshold, 0 where p < negative_threshold, else
              :data:`DROPPED_LABEL` (-1, SAM's padding: the click is not sent to SAM).
    Returns:
        ``(...)`` long labels, the shape of ``probs``.
    """
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule {rule!r} is not one of {', '.join(LABEL_RULES)}")
    positive = probs >= (negative_threshold if rule == "confident" else threshold)
    labels = positive.long()
    if rule == "drop":
        unsure = ~positive & (probs >= negative_threshold)
        labels = labels.masked_fill(unsure, DROPPED_LABEL)
    return labels


def srm_click_labels(probs: torch.Tensor, config: SRMConfig) -> torch.Tensor:
    """:func:`label_clicks` with the rule of ``config`` (:class:`SRMConfig`): ``(...)`` -> ``(...)`` long."""
    return label_clicks(probs, config.threshold, config.label_rule, config.negative_threshold)


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm_layer: Callable[[int], nn.Module],
    act_layer: Callable[[], nn.Module],
) -> nn.Sequential:
    """conv (same padding) -> norm -> activation: ``(B, in, h, w) -> (B, out, h, w)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        norm_layer(out_channels),
        act_layer(),
    )


class GridSelfAttention(nn.Module):
    """One pre-norm multi-head self-attention layer on a coarse token grid.

    The features are average-pooled to ``grid x grid`` tokens, attended over, and the attention
    output (the residual update) is bilinearly upsampled and added to the full-resolution input.
    """

    def __init__(self, channels: int, grid: int, heads: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.grid = grid
        self.norm = norm_layer(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c, h, w) -> (B, c, h, w)``."""
        b, c, h, w = x.shape
        tokens = F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # (B, g*g, c)
        q = self.norm(tokens)
        update, _ = self.attn(q, q, q, need_weights=False)  # (B, g*g, c)
        update = update.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        return x + F.interpolate(update, (h, w), mode="bilinear", align_corners=False)


class SemanticRecalibration(nn.Module):
    """Foreground logits y_r from the state (and, explicit branch, the text state).

    Args:
        in_channels: C, channels of the SAM embedding.
        config: :class:`SRMConfig`.
        norm_layer: ``channels -> module`` for the conv layers; default
            ``GroupNorm(config.groups, channels)``.
        act_layer: activation class, instantiated without arguments.

    Layout: ``body`` (explicit: 1x1 merge of the concatenated s_t, s_c then two 3x3 conv layers;
    implicit: two 3x3 conv blocks), ``attention`` (explicit: :class:`GridSelfAttention`; implicit:
    ``nn.Identity``) and ``head`` (explicit: 3x3 conv block + 1x1 conv; implicit: 1x1 conv).
    """

    def __init__(
        self,
        in_channels: int,
        config: SRMConfig = SRMConfig(),
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.config = config
        self.explicit = config.variant == "explicit"
        if norm_layer is None:
            norm_layer = lambda channels: nn.GroupNorm(config.groups, channels)  # noqa: E731
        hidden = config.hidden
        if self.explicit:
            self.body = nn.Sequential(
                conv_norm_act(2 * in_channels, hidden, 1, norm_layer, act_layer),
                conv_norm_act(hidden, hidden, 3, norm_layer, act_layer),
                conv_norm_act(hidden, hidden, 3, norm_layer, act_layer),
            )
            self.attention = GridSelfAttention(hidden, config.attention_grid, config.heads)
            self.head = nn.Sequential(
                conv_norm_act(hidden, hidden, 3, norm_layer, act_layer),
                nn.Conv2d(hidden, 1, 1),
            )
        else:
            self.body = nn.Sequential(
                conv_norm_act(in_channels, hidden, 3, norm_layer, act_layer),
                conv_norm_act(hidden, hidden, 3, norm_layer, act_layer),
            )
            self.attention = nn.Identity()
            self.head = nn.Conv2d(hidden, 1, 1)

    def forward(self, state: torch.Tensor, text_state: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Foreground logits on the embedding grid.

        Args:
            state: ``(B, C, h, w)`` s_t = E * m(M_{t-1}).
            text_state: ``(B, C, h, w)`` s_c = E * M_c for the explicit branch; must be ``None``
                for the implicit one (given anyway, it is an error: the caller's branch is wrong).
        Returns:
            ``(B, 1, h, w)`` logits y_r (``sigmoid`` gives the foreground probability).
        """
        if self.explicit:
            if text_state is None:
                raise ValueError("the explicit SRM branch needs text_state (s_c = E * M_c), got None")
            x = torch.cat([state, text_state], dim=1)
        else:
            if text_state is not None:
                raise ValueError("the implicit SRM branch takes no text_state; use variant='explicit' to feed s_c")
            x = state
        return self.head(self.attention(self.body(x)))


def srm_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    config: SRMConfig = SRMConfig(),
) -> torch.Tensor:
    """``dice_weight * Dice + bce_weight * BCE``, averaged over the batch.

    Args:
        logits: ``(B, 1, h, w)`` SRM logits y_r.
        target: ``(B, 1, h, w)`` ground truth on the same grid, float in ``[0, 1]`` (soft where a
            cell straddles the mask border).
        valid: ``(B, 1, h, w)`` bool, True inside the image region; padding cells are left out of
            both terms (Dice sums and the BCE mean run over valid cells only). ``None``: all cells.
        config: supplies ``dice_weight`` and ``bce_weight``.
    Returns:
        scalar loss.
    """
    target = target.float()
    if valid is None:
        dice = dice_loss(logits, target)
        bce = bce_loss(logits, target)
    else:
        valid = valid.bool()
        # Excluded cells get probability 0 and target 0: they add nothing to the Dice sums and
        # exactly 0 to the BCE sum, so rescaling the BCE pixel mean gives the mean over valid cells.
        logits = torch.where(valid, logits, torch.full_like(logits, _EXCLUDED_LOGIT))
        target = torch.where(valid, target, torch.zeros_like(target))
        dice = dice_loss(logits, target)
        n_cells = valid.shape[-2] * valid.shape[-1]
        n_valid = valid.flatten(-2).sum(-1).clamp(min=1)
        bce = bce_loss(logits, target) * (n_cells / n_valid)
    return (config.dice_weight * dice + config.bce_weight * bce).mean()
