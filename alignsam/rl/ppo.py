"""The PPO core: masked categorical policy, GAE and the clipped losses, as pure functions over tensors.

Nothing here knows about the environment, the networks or Lightning. One PPO iteration, as
``alignsam/module.py`` runs it, reads from top to bottom:

1. Roll out B episodes for T steps under ``no_grad``; each step stores the state, the action mask
   ``valid (B, A)``, the action from ``sample_actions``, its log-prob, the value and the reward.
2. ``advantages, returns = gae(rewards, values, bootstrap_value, gamma, gae_lambda)`` once per rollout.
3. Flatten the T*B transitions; for each of ``epochs`` epochs, for each index tensor of
   ``minibatches(T*B, minibatch_size, generator)``:
     - re-evaluate the policy: ``new_log_probs = action_log_probs(logits, valid, actions)``,
       ``entropy = masked_entropy(logits, valid)``, ``new_values``;
     - ``normalize`` the minibatch advantages (if ``normalize_advantages``);
     - ``loss = policy_loss + value_coef * value_loss - entropy_coef * entropy.mean()``;
     - backward, clip the global grad norm to ``max_grad_norm``, Adam step.
4. Log approx-KL, clip fraction, entropy, ``explained_variance(values, returns)``.

On an accelerator every host read stalls the queue, so the update reads nothing per minibatch: the
action masks are checked once per update (``check_actions``), the per-minibatch calls pass
``check=False``, and the statistics stay tensors until the logger reads them
(``explained_variance_tensor``). ``PPOConfig.precision: bf16`` runs the policy and the SRM under
bfloat16 autocast (their forward and backward; the losses and SAM stay in float32).

Invalid actions (patches already clicked) are removed from the distribution by ``masked_log_softmax``:
their log-probability is a large negative *finite* constant, so they have probability exactly 0,
are never sampled, contribute exactly 0 to the entropy, and no NaN or inf appears in any value or
gradient.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from alignsam.errors import ConfigError, check_range

# Log-probability given to invalid actions (clamped to the dtype's range, e.g. for float16).
# exp() of it is exactly 0, yet it is finite, so sums and products with it stay NaN-free.
INVALID_LOG_PROB = -1e8
# model.ppo.precision: what the policy and the SRM compute in while training; "auto" (the default)
# is bf16 where the device has native bfloat16 arithmetic and fp32 elsewhere (resolved_precision).
PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=None)
def _native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu", "cuda", ...) runs bfloat16 matmuls and convolutions natively:
    a CUDA GPU that supports bf16 without emulation (Ampere and later), a CPU with AMX or AVX512-BF16
    (where bf16 autocast made the PPO update 2x faster, docs/performance.md). Elsewhere (older
    CPUs, other accelerators) bf16 would be emulated and slower, so ``auto`` keeps float32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
        return any(probe is not None and probe() for probe in probes)
    return False


def resolved_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` with ``auto`` replaced by what it means on ``device``: ``bf16`` or ``fp32``."""
    if precision != "auto":
        return precision
    return "bf16" if _native_bf16(torch.device(device).type) else "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device``: bfloat16 autocast for ``bf16`` (and
    ``auto`` on a device with native bfloat16); none of its own for ``fp32`` (an enclosing one,
    e.g. ``Trainer(precision="bf16-mixed")``, still applies to the policy and the SRM, as before
    ``model.ppo.precision`` existed; SAM's decode is float32 either way)."""
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def network_input(precision: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` in the dtype the networks read under ``precision``: bfloat16 for ``bf16`` (the
    embeddings, masks and patch weights are cast once per rollout or update, not in every layer,
    and the states ``E * m`` are formed in bfloat16), unchanged for ``fp32``; None stays None."""
    if tensor is None or not tensor.is_floating_point() or resolved_precision(precision, tensor.device) != "bf16":
        return tensor
    return tensor.to(torch.bfloat16)


@dataclass
class PPOConfig:
    """Hyperparameters of the PPO update (defaults from docs/method.md, i.e. the paper where it says).

    Attributes:
        gamma: discount factor of the rewards (0.99).
        gae_lambda: GAE's lambda; 1 gives Monte-Carlo advantages, 0 one-step TD errors (0.95).
        epochs: K, the number of passes over one rollout's T*B transitions (paper: 20).
        minibatch_size: transitions per minibatch; the rollout's T*B transitions are shuffled and
            split into chunks of this size each epoch (the last chunk may be smaller) (64).
        clip: epsilon of the clipped surrogate, ratios outside [1 - clip, 1 + clip] get no gradient
            (0.2). Also the clip range of the value loss when ``clip_value_loss`` is on.
        value_coef: weight of the value loss in the total loss (0.5).
        entropy_coef: weight of the entropy bonus, subtracted from the total loss (0.01).
        max_grad_norm: global gradient-norm clip over all trainable parameters (0.5).
        lr: Adam learning rate (1e-4).
        adam_eps: Adam's epsilon (1e-5, larger than torch's default 1e-8, as common in PPO).
        normalize_advantages: normalise advantages to mean 0, std 1 within each minibatch (True).
        clip_value_loss: also clip the value prediction to ``old_value +- clip`` and take the larger
            of the clipped and unclipped squared errors (off by default).
        precision: ``auto`` (default), ``fp32`` or ``bf16``: with ``bf16`` the policy and the SRM
            run under bfloat16 autocast in the training rollout, the PPO update and the SRM update
            (forward and backward; weights, optimiser state, losses and SAM's decode stay float32;
            evaluation is float32 whatever the setting). About 2x faster updates on CPUs with AMX
            and on recent GPUs; docs/performance.md. ``auto`` is ``bf16`` on such devices and
            ``fp32`` elsewhere (:func:`resolved_precision`).

    Out-of-range values raise :class:`~alignsam.errors.ConfigError` naming ``model.ppo.<field>``:
    gamma and gae_lambda in [0, 1], epochs and minibatch_size >= 1, clip, max_grad_norm, lr and
    adam_eps > 0, value_coef and entropy_coef >= 0; precision must be one of ``PRECISIONS``.
    """

    gamma: float = 0.99
    gae_lambda: float = 0.95
    epochs: int = 20
    minibatch_size: int = 64
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    lr: float = 1e-4
    adam_eps: float = 1e-5
    normalize_advantages: bool = True
    clip_value_loss: bool = False
    precision: str = "auto"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError("model.ppo.precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for key in ("gamma", "gae_lambda"):
            check_range(f"model.ppo.{key}", getattr(self, key), 0.0, 1.0)
        for key in ("epochs", "minibatch_size"):
            check_range(f"model.ppo.{key}", getattr(self, key), 1)
        for key in ("clip", "max_grad_norm", "lr", "adam_eps"):
            check_range(f"model.ppo.{key}", getattr(self, key), 0.0, low_open=True)
        for key in ("value_coef", "entropy_coef"):
            check_range(f"model.ppo.{key}", getattr(self, key), 0.0)


# ----------------------------------------------------------------------------------------------
# Masked categorical policy
# ----------------------------------------------------------------------------------------------

def _check_some_valid(valid: torch.Tensor) -> None:
    """Raise if a row of ``valid (N, A)`` has no valid action (the distribution would be empty)."""
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    empty = ~valid.any(dim=-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no valid action")


def masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Log-probabilities of a categorical restricted to the valid actions.

    Args:
        logits: ``(N, A)`` float, raw action scores.
        valid: ``(N, A)`` bool, False = the action may not be taken.
        check: raise on a row without valid action (a host read; pass False when the rows were
            checked already, e.g. by :func:`check_actions`).
    Returns:
        ``(N, A)``: for valid actions ``logits - logsumexp(logits over valid actions)`` (so their
        ``exp`` sums to 1 per row); for invalid actions ``INVALID_LOG_PROB``, a constant that carries
        no gradient back to the logits.
    Raises:
        ValueError: if a row has no valid action.
    """
    if check:
        _check_some_valid(valid)
    # -inf only inside logsumexp: its gradient there is softmax = exp(-inf - lse) = 0, never NaN.
    normalizer = torch.logsumexp(logits.masked_fill(~valid, float("-inf")), dim=-1, keepdim=True)
    fill = max(INVALID_LOG_PROB, torch.finfo(logits.dtype).min)
    return torch.where(valid, logits - normalizer, torch.full_like(logits, fill))


def masked_entropy(logits: torch.Tensor, valid: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Entropy (nats) of the masked categorical. ``logits, valid: (N, A)`` -> ``(N,)``.

    Invalid actions contribute exactly 0; a uniform distribution over k valid actions gives log(k).
    ``check`` as in :func:`masked_log_softmax`.
    """
    log_probs = masked_log_softmax(logits, valid, check)
    p_log_p = torch.where(valid, log_probs.exp() * log_probs, torch.zeros_like(log_probs))
    return -p_log_p.sum(dim=-1)


def action_log_probs(logits: torch.Tensor, valid: torch.Tensor, actions: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Log-probability of the given actions under the masked categorical.

    Args:
        logits: ``(N, A)`` float.
        valid: ``(N, A)`` bool.
        actions: ``(N,)`` long, indices in ``[0, A)``; each must be valid in its row.
        check: raise on the errors below (host reads; pass False when :func:`check_actions` has
            checked these rows already).
    Returns:
        ``(N,)`` float (differentiable w.r.t. ``logits``).
    Raises:
        ValueError: if an action is invalid in its row (its ratio in the PPO loss would explode).
    """
    index = actions.long().unsqueeze(-1)
    if check:
        check_actions(valid, actions)
    return masked_log_softmax(logits, valid, check).gather(-1, index).squeeze(-1)


def check_actions(valid: torch.Tensor, actions: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every row of ``valid (..., A)`` has a valid action and every
    action ``(...)`` is valid in its own row: what :func:`action_log_probs` checks, for a whole
    rollout at once (one host read instead of three per minibatch)."""
    _check_some_valid(valid.reshape(-1, valid.shape[-1]))
    if not valid.gather(-1, actions.long().unsqueeze(-1)).all():
        raise ValueError("an action is marked invalid in its own row")


def sample_actions(
    logits: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one action per row from the masked categorical (or its mode when ``greedy``).

    Args:
        logits: ``(N, A)`` float.
        valid: ``(N, A)`` bool; an invalid action is never returned.
        generator: random generator on ``logits``' device, for reproducible draws (ignored if greedy).
        greedy: take the argmax over valid actions instead of sampling (ties: lowest index).
    Returns:
        actions ``(N,)`` long and their log-probabilities ``(N,)`` float.
    Raises:
        ValueError: if a row has no valid action.
    """
    log_probs = masked_log_softmax(logits, valid)
    if greedy:
        # argmax over the raw logits with invalid ones at -inf: exact even if logits are extreme.
        actions = logits.detach().masked_fill(~valid, float("-inf")).argmax(dim=-1)
    else:
        # Invalid actions have probability exactly 0, which multinomial never draws.
        probs = log_probs.detach().exp()
        actions = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return actions, log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------

def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over one rollout of B episodes of T steps.

    Every episode ends by truncation after exactly T steps (no terminal states), so the last step
    bootstraps from the value of the state after it instead of from 0:
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   with V(s_T) = ``bootstrap_value``
        A_t     = delta_t + gamma * lam * A_{t+1},     with A_T = 0

    Args:
        rewards: ``(T, B)`` reward received after the action at step t.
        values: ``(T, B)`` V(s_t) from the rollout.
        bootstrap_value: ``(B,)`` V(s_T), the value of the state after the last action.
        gamma: discount factor.
        lam: GAE lambda.
    Returns:
        advantages ``(T, B)`` and returns ``(T, B)`` = advantages + values (the value targets).
    """
    if rewards.shape != values.shape or rewards.dim() != 2 or bootstrap_value.shape != rewards.shape[1:]:
        raise ValueError(
            f"expected rewards, values (T, B) and bootstrap_value (B,), got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(bootstrap_value.shape)}"
        )
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_value = bootstrap_value
    next_advantage = torch.zeros_like(bootstrap_value)
    for t in reversed(range(num_steps)):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t] = next_advantage
        next_value = values[t]
    return advantages, advantages + values


def normalize(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(advantages - mean) / (std + eps)`` over all elements, any shape -> same shape.

    Uses the population std (no Bessel correction) so that a minibatch of one element gives 0,
    not NaN.
    """
    return (advantages - advantages.mean()) / (advantages.std(correction=0) + eps)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def clipped_policy_loss(
    new_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as a loss to minimise.

    ratio = exp(new - old); loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip))),
    i.e. the pessimistic of the unclipped and clipped objectives.

    Args:
        new_log_probs: ``(N,)`` log pi_new(a|s), with gradient.
        old_log_probs: ``(N,)`` log pi_old(a|s) from the rollout.
        advantages: ``(N,)`` (already normalised if wanted).
        clip: epsilon.
    Returns:
        the scalar loss, and detached 0-dim statistics:
        ``approx_kl`` = mean((ratio - 1) - log ratio) (an unbiased, non-negative estimate of
        KL(old || new)), and ``clip_fraction`` = fraction of transitions with |ratio - 1| > clip.
    """
    log_ratio = new_log_probs - old_log_probs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.max(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1.0).abs() > clip).float().mean(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Value loss ``0.5 * mean((values - returns)^2)``. All tensors ``(N,)``; returns a scalar.

    With ``old_values`` and ``clip`` (``PPOConfig.clip_value_loss``): the prediction is also clipped
    to ``old_values +- clip`` and the larger of the two squared errors is taken per transition.
    """
    if (old_values is None) != (clip is None):
        raise ValueError("value clipping needs both old_values and clip (or neither)")
    squared_error = (values - returns) ** 2
    if old_values is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        squared_error = torch.max(squared_error, (clipped_values - returns) ** 2)
    return 0.5 * squared_error.mean()


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over all elements (any equal shapes).

    1 = perfect value predictions, 0 = no better than predicting the mean return, < 0 = worse.
    Returns ``nan`` when Var[returns] == 0 (the statistic is undefined then).
    """
    returns = returns.detach().flatten().double()
    values = values.detach().flatten().double()
    var_returns = returns.var(correction=0).item()
    if var_returns == 0.0:
        return math.nan
    return 1.0 - (returns - values).var(correction=0).item() / var_returns


def explained_variance_tensor(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """:func:`explained_variance` as a 0-dim float32 tensor on the inputs' device (NaN when
    Var[returns] == 0), computed without a host read."""
    returns = returns.detach().flatten().double()
    values = values.detach().flatten().double()
    var_returns = returns.var(correction=0)
    ratio = (returns - values).var(correction=0) / var_returns
    return torch.where(var_returns == 0, torch.full_like(ratio, math.nan), 1.0 - ratio).float()


# ----------------------------------------------------------------------------------------------
# Minibatches
# ----------------------------------------------------------------------------------------------

def minibatches(n: int, minibatch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Shuffle ``range(n)`` and split it into index tensors of ``minibatch_size`` (the last may be
    smaller); every index appears exactly once. Indices are long tensors on the generator's device.
    """
    if n < 1 or minibatch_size < 1:
        raise ValueError(f"n and minibatch_size must be >= 1, got {n}, {minibatch_size}")
    device = generator.device if generator is not None else None
    return list(torch.randperm(n, generator=generator, device=device).split(minibatch_size))


# all_states forms every state of a rollout at once up to this size (beyond it, per minibatch)
ALL_STATES_BYTES = 256 << 20


def all_states(embeddings: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | None:
    """Every state ``s = E * m`` of a rollout, ``(T * B, C, h, w)`` in transition order
    (``t * B + b``), formed once for the K epochs instead of once per minibatch; None when it would
    exceed :data:`ALL_STATES_BYTES` (then form each minibatch's states as it comes).

    Args:
        embeddings: ``(B, C, h, w)``; masks: ``(T, B, 1, h, w)``.
    """
    t, b = masks.shape[:2]
    if t * embeddings.numel() * embeddings.element_size() > ALL_STATES_BYTES:
        return None
    return (embeddings[None] * masks).flatten(0, 1)


def epoch_minibatches(
    n: int, minibatch_size: int, epochs: int, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[list[torch.Tensor]]:
    """:func:`minibatches` for ``epochs`` epochs (the same draws, in the same order, as ``epochs``
    calls of it), moved to ``device`` in one transfer: per epoch, the list of its index tensors."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    orders = torch.stack([torch.cat(minibatches(n, minibatch_size, generator)) for _ in range(epochs)])
    orders = orders.to(device) if device is not None else orders
    return [list(order.split(minibatch_size)) for order in orders]
