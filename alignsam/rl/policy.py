"""The agent: a fully convolutional actor-critic over the embedding grid.

The network scores every cell of the ``h x w`` embedding grid; the logit of action ``a`` is the
average of those scores over the cells patch ``a`` covers (``pool[a]``), so each logit sits over its
own patch and a G x G grid of any size can be read off the same score map. The value head averages
the features over the image region and maps them to a scalar.

Shapes (see ``alignsam/rl/env.py``): B episodes, C embedding channels, ``h x w`` embedding grid,
A = G*G actions.

* ``state`` s_t = E * m(M_{t-1}): ``(B, C, h, w)``.
* ``text_state`` s_c = E * M_c: ``(B, C, h, w)``, explicit variant only.
* ``srm_maps``: ``(B, 2, h, w)`` the SRM's foreground probabilities of the unprompted image (E * 1)
  and of the current state s_t, ``model.policy.srm_input: true`` only (beyond the paper; detached
  observations, no gradient reaches the SRM).
* ``pool``: ``(B, A, h*w)``; row ``a`` holds the averaging weights of patch ``a`` over the cells
  (rows sum to 1; cells outside the image region, i.e. SAM's bottom/right padding, weigh 0).

Padding cells never influence the outputs: the cells with zero weight in every row of ``pool`` are
zeroed at the input and after every block, so whatever SAM's embedding holds there is ignored and
the image border behaves like a zero-padded frame edge for the 3x3 convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from alignsam.errors import ConfigError, check_range
from alignsam.srm import VARIANTS, Variant  # one name for the policy's and the SRM's variants


@dataclass
class PolicyConfig:
    """Policy hyperparameters (the YAML key is ``policy``).

    Attributes:
        variant: ``"implicit"`` sees the state s_t only; ``"explicit"`` also sees the text state
            s_c = E * M_c (CLIP Surgery map), like the SRM's explicit branch.
        hidden: channels of the trunk after the 1x1 reduction of the C embedding channels.
        blocks: number of residual 3x3 conv blocks (each conv -> norm -> activation).
        groups: GroupNorm groups (must divide ``hidden``). No BatchNorm: rollout batches (no_grad,
            one step of B episodes) and PPO minibatches (shuffled steps) have different statistics.
        value_hidden: width of the value MLP on the pooled features.
        srm_input: beyond the paper: also see the SRM's foreground maps (``SRM_MAPS`` channels: of
            the unprompted image, as the "w/o RL" strategy ranks them, and of the current state),
            through a bias-free 1x1 reduction added to the state's. Off: the paper's policy, and
            the same parameters as before the option existed.

    Out-of-range values raise :class:`~alignsam.errors.ConfigError` naming ``model.policy.<field>``:
    hidden, groups, value_hidden >= 1, blocks >= 0, groups divides hidden, srm_input a bool.
    """

    variant: Variant = "implicit"
    hidden: int = 64
    blocks: int = 3
    groups: int = 8
    value_hidden: int = 64
    srm_input: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError("model.policy.variant", f"{self.variant!r} is not one of {', '.join(VARIANTS)}")
        if not isinstance(self.srm_input, bool):
            raise ConfigError("model.policy.srm_input", f"{self.srm_input!r} is not one of true, false")
        for key in ("hidden", "groups", "value_hidden"):
            check_range(f"model.policy.{key}", getattr(self, key), 1)
        check_range("model.policy.blocks", self.blocks, 0)
        if self.hidden % self.groups:
            raise ConfigError("model.policy.groups", f"model.policy.hidden ({self.hidden}) must be divisible "
                              f"by the GroupNorm groups ({self.groups})")


# channels of ``srm_maps``: the SRM's probability map of the unprompted image and of the current state
SRM_MAPS = 2


def image_region(pool: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """Cells of the embedding grid that some patch covers.

    Args:
        pool: ``(B, A, h*w)`` patch averaging weights.
        grid_hw: ``(h, w)``.
    Returns:
        ``(B, 1, h, w)`` float, 1 inside the image region, 0 on padding cells.
    """
    return (pool.sum(1) > 0).to(pool.dtype).view(pool.shape[0], 1, *grid_hw)


class ConvBlock(nn.Module):
    """``x + act(norm(conv3x3(x)))``: a residual 3x3 block that keeps the channel count."""

    def __init__(self, channels: int, norm_layer: Callable[[int], nn.Module], act_layer: Callable[[], nn.Module]):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = norm_layer(channels)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c, h, w) -> (B, c, h, w)``."""
        return x + self.act(self.norm(self.conv(x)))


class ActorCritic(nn.Module):
    """Patch logits and a state value from the (text-)masked SAM embedding.

    Args:
        in_channels: C, channels of the SAM embedding (256 for the official models).
        config: :class:`PolicyConfig`.
        norm_layer: ``channels -> module``; default ``GroupNorm(config.groups, channels)``.
        act_layer: activation class, instantiated without arguments.

    Explicit variant: s_t and s_c each get their own 1x1 reduction and the two are summed (the sum of
    two 1x1 convs is one 1x1 conv over their concatenation, without the concatenated tensor). The
    text reduction exists only in the explicit variant, so every parameter of either variant gets a
    gradient (DDP needs no ``find_unused_parameters``). ``srm_input`` adds the SRM maps the same way
    (``reduce_srm``, present only with the option).
    """

    def __init__(
        self,
        in_channels: int,
        config: PolicyConfig = PolicyConfig(),
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.config = config
        self.explicit = config.variant == "explicit"
        if norm_layer is None:
            norm_layer = lambda channels: nn.GroupNorm(config.groups, channels)  # noqa: E731
        hidden = config.hidden

        self.reduce = nn.Conv2d(in_channels, hidden, 1)
        self.reduce_text = nn.Conv2d(in_channels, hidden, 1, bias=False) if self.explicit else None
        self.srm_input = bool(getattr(config, "srm_input", False))  # configs pickled before the option
        self.reduce_srm = nn.Conv2d(SRM_MAPS, hidden, 1, bias=False) if self.srm_input else None
        self.stem_norm = norm_layer(hidden)
        self.stem_act = act_layer()
        self.blocks = nn.ModuleList(ConvBlock(hidden, norm_layer, act_layer) for _ in range(config.blocks))
        # One score per embedding cell. No bias: pool rows sum to 1, so a bias would shift every
        # logit equally and never change the policy (it could only ever get a zero gradient).
        self.logit_head = nn.Conv2d(hidden, 1, 1, bias=False)
        self.value_head = nn.Sequential(
            nn.Linear(hidden, config.value_hidden),
            act_layer(),
            nn.Linear(config.value_hidden, 1),
        )
        # Small last layers (CleanRL's habit): std 0.01 logits make the initial policy nearly
        # uniform over the patches, so early rollouts explore every patch instead of locking onto
        # whatever a random init prefers; a small value layer starts V ~ 0 so the first critic
        # errors do not send large gradients into the trunk the actor shares. Not exactly zero, so
        # that every parameter already gets a gradient on the first update.
        nn.init.normal_(self.logit_head.weight, std=0.01)
        nn.init.normal_(self.value_head[-1].weight, std=0.01)
        nn.init.zeros_(self.value_head[-1].bias)

    def forward(
        self, state: torch.Tensor, pool: torch.Tensor, text_state: Optional[torch.Tensor] = None,
        srm_maps: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits over the action grid and the state value.

        Args:
            state: ``(B, C, h, w)`` s_t.
            pool: ``(B, A, h*w)`` patch averaging weights (zero on padding cells).
            text_state: ``(B, C, h, w)`` s_c for the explicit variant; must be ``None`` for the
                implicit one (a given text state is an error rather than silently ignored, since it
                means the env and the policy disagree about the variant).
            srm_maps: ``(B, SRM_MAPS, h, w)`` the SRM's probabilities (unprompted image, current
                state) with ``srm_input``; must be ``None`` without it.
        Returns:
            logits ``(B, A)`` (unmasked: invalid actions are masked by the caller), value ``(B,)``.
        """
        b, _, h, w = state.shape
        if pool.dim() != 3 or pool.shape[0] != b or pool.shape[2] != h * w:
            raise ValueError(f"pool must be (B={b}, A, h*w={h * w}), got {tuple(pool.shape)}")
        if self.explicit and text_state is None:
            raise ValueError("the explicit policy needs text_state (s_c = E * M_c), got None")
        if not self.explicit and text_state is not None:
            raise ValueError("the implicit policy takes no text_state; use variant='explicit' to feed s_c")
        if self.srm_input != (srm_maps is not None):
            raise ValueError("srm_maps must be given exactly when model.policy.srm_input is true")
        if srm_maps is not None and srm_maps.shape != (b, SRM_MAPS, h, w):
            raise ValueError(f"srm_maps must be (B={b}, {SRM_MAPS}, h={h}, w={w}), got {tuple(srm_maps.shape)}")

        region = image_region(pool, (h, w))  # (B, 1, h, w)
        x = self.reduce(state * region)
        if self.reduce_text is not None:
            x = x + self.reduce_text(text_state * region)
        if self.reduce_srm is not None:
            x = x + self.reduce_srm(srm_maps * region)
        x = self.stem_act(self.stem_norm(x)) * region
        for block in self.blocks:
            x = block(x) * region  # (B, hidden, h, w)

        feats = x.flatten(2)  # (B, hidden, h*w)
        scores = self.logit_head(x).flatten(1)  # (B, h*w)
        logits = torch.bmm(pool, scores.unsqueeze(-1)).squeeze(-1)  # (B, A)

        weights = pool.mean(1)  # (B, h*w): sums to 1 over the image region, 0 on padding
        pooled = torch.bmm(feats, weights.unsqueeze(-1)).squeeze(-1)  # (B, hidden)
        value = self.value_head(pooled).squeeze(-1)  # (B,)
        return logits, value
