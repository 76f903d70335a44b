"""The prompting environment: B episodes at once over cached SAM embeddings.

An episode (``docs/method.md``, "The episode"): initial prompts P_0 (the SRM's most and least confident
points, or none), then T steps of: the agent picks one patch of the ``G x G`` action grid, the SRM
(or the ground truth) labels the click, SAM re-segments with every click so far, and the new mask
feeds the next state ``s_t = E * m(M_{t-1})``.

Everything on the step path is batched over the B episodes (one SAM decode per step for all of
them); per-image work (ground truth into SAM's frames) happens once, in :func:`make_episodes`.
Spatial conventions come from :mod:`alignsam.geometry`; actions become SAM points only through
:func:`~alignsam.geometry.actions_to_sam_points`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, get_args

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from alignsam.baselines import best_and_worst_cells, srm_point_labels
from alignsam.errors import ConfigError, check_range
from alignsam.foundation.segmenter import EmbeddedImages, Segmenter
from alignsam.geometry import (
    MASK_LOGIT_THRESHOLD,
    PROB_THRESHOLD,
    actions_to_sam_points,
    image_region_on_grid,
    original_masks_to_sam_grid,
    patch_centres,
    patch_pool_matrix,
)
from alignsam.losses import mask_iou
from alignsam.srm import SRMConfig

# The option values, typed so that the command line lists them (--help) and checks them.
InitPrompts = Literal["srm", "none"]
StateMask = Literal["prob", "binary"]
TrainLabels = Literal["srm", "gt"]
Reward = Literal["target", "iou_gain", "target+iou", "coverage", "target+coverage"]
INIT_PROMPTS, STATE_MASKS, TRAIN_LABELS, REWARDS = (get_args(t) for t in (InitPrompts, StateMask, TrainLabels, Reward))
ALL_ONES_LOGIT = 10.0  # the "everything" mask M_0 of init_prompts: none (sigmoid ~ 1)


@dataclass
class EnvConfig:
    """The prompting environment's knobs (``model.env.*``; defaults from ``docs/method.md``).

    Args:
        steps: T, clicks the agent makes per episode (paper 15).
        grid: G, the action grid is ``G x G`` patches of the original image (100 actions).
        init_prompts: ``srm``: P_0 = the SRM's most confident foreground point (positive) and least
            confident point (negative); ``none``: no prompt and an all-ones M_0.
        state_mask: ``prob``: m(M) = sigmoid of SAM's low-res logits on the embedding grid;
            ``binary``: that probability thresholded at 0.5.
        train_labels: who labels clicks during training: ``srm`` (as at inference) or ``gt``.
        reward: ``target`` (+1 on ground-truth foreground, -1 elsewhere), ``iou_gain`` (IoU(M_t)
            - IoU(M_{t-1})) or ``target+iou`` (their sum); beyond the paper, ``coverage`` (+1 on a
            connected component of the target not clicked before in the episode, 0 on one clicked
            before, -1 off target) and ``target+coverage`` (``target`` plus 1 for a new component:
            +2, +1, -1). See :func:`step_rewards`.
        feed_mask_input: feed SAM's previous low-res logits back as ``mask_input``.
        greedy_eval: argmax actions in validation and test (else sampled).

    The SRM's labelling threshold is ``model.srm.threshold`` (:class:`alignsam.srm.SRMConfig`).
    Out-of-range values raise :class:`~alignsam.errors.ConfigError` naming ``model.env.<field>``:
    steps >= 1, grid >= 1, steps <= grid * grid; the option strings must be one of their values.
    """

    steps: int = 15
    grid: int = 10
    init_prompts: InitPrompts = "srm"
    state_mask: StateMask = "prob"
    train_labels: TrainLabels = "srm"
    reward: Reward = "target"
    feed_mask_input: bool = False
    greedy_eval: bool = True

    def __post_init__(self) -> None:
        for key, value, allowed in (("init_prompts", self.init_prompts, INIT_PROMPTS),
                                    ("state_mask", self.state_mask, STATE_MASKS),
                                    ("train_labels", self.train_labels, TRAIN_LABELS),
                                    ("reward", self.reward, REWARDS)):
            if value not in allowed:
                raise ConfigError(f"model.env.{key}", f"{value!r} is not one of {', '.join(allowed)}")
        check_range("model.env.steps", self.steps, 1)
        check_range("model.env.grid", self.grid, 1)
        if self.steps > self.grid * self.grid:
            raise ConfigError("model.env.steps", f"{self.steps} exceeds the {self.grid}x{self.grid} action grid "
                              f"(model.env.grid): a patch is never clicked twice")


@dataclass
class Episodes:
    """What B episodes need, prepared once per batch (``A = G*G``, ``h x w`` = embedding grid).

    embeddings ``(B, C, h, w)`` float32, the image features the policy and the SRM see (E);
    sam_embeddings what ``segmenter.decode`` takes (for SAM the same tensor; a segmenter with more
    decoder inputs packs them here, see :meth:`Segmenter.image_features`); original_hw, input_hw ``(B, 2)`` long;
    pool ``(B, A, h*w)`` patch-over-cell weights; region ``(B, 1, h, w)`` image fraction of each
    embedding cell; action_points ``(B, A, 2)`` every action's click in SAM's frame;
    text_map ``(B, 1, h, w)`` CLIP Surgery map M_c on the embedding grid, or None;
    gt_low ``(B, 4h, 4w)`` bool ground truth in the low-res frame and valid_low its image region;
    gt_grid ``(B, 1, h, w)`` ground-truth fraction per embedding cell (the SRM's target);
    patch_on_gt ``(B, A)`` bool whether each action's click lands on ground-truth foreground;
    patch_component ``(B, A)`` long the 8-connected component of the ground truth (original frame)
    under each action's click, 0 off target, ids unique within an episode (the coverage rewards).
    The ground-truth fields are None when there is no ground truth (prediction).
    """

    embeddings: torch.Tensor
    original_hw: torch.Tensor
    input_hw: torch.Tensor
    pool: torch.Tensor
    region: torch.Tensor
    action_points: torch.Tensor
    text_map: Optional[torch.Tensor] = None
    gt_low: Optional[torch.Tensor] = None
    valid_low: Optional[torch.Tensor] = None
    gt_grid: Optional[torch.Tensor] = None
    patch_on_gt: Optional[torch.Tensor] = None
    patch_component: Optional[torch.Tensor] = None
    sam_embeddings: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.sam_embeddings is None:
            self.sam_embeddings = self.embeddings
        if self.patch_component is None and self.patch_on_gt is not None:
            self.patch_component = self.patch_on_gt.long()  # without components: the target is one

    @property
    def text_state(self) -> Optional[torch.Tensor]:
        """s_c = E * M_c ``(B, C, h, w)`` (explicit branch), or None."""
        return None if self.text_map is None else self.embeddings * self.text_map

    def __len__(self) -> int:
        return self.embeddings.shape[0]


def make_episodes(
    segmenter: Segmenter,
    embedded: EmbeddedImages,
    grid: int,
    gt_masks: Optional[Sequence[np.ndarray]] = None,
    text_map: Optional[torch.Tensor] = None,
) -> Episodes:
    """Prepare B episodes from embeddings (and ground truth, when training or scoring).

    Args:
        embedded: embeddings ``(B, C, h, w)`` with each image's sizes.
        grid: G.
        gt_masks: B bool ``(H_b, W_b)`` masks in the original frames, or None.
        text_map: ``(B, 1, h, w)`` text-similarity maps already on the embedding grid, or None.
    """
    device = embedded.embeddings.device
    emb_hw, img_size = segmenter.embedding_hw, segmenter.img_size
    b = embedded.embeddings.shape[0]
    actions = torch.arange(grid * grid, device=device).expand(b, -1)
    packed = embedded.embeddings.float()
    episodes = Episodes(
        embeddings=segmenter.image_features(packed),
        sam_embeddings=packed,
        original_hw=embedded.original_hw.to(device),
        input_hw=embedded.input_hw.to(device),
        pool=patch_pool_matrix(grid, embedded.input_hw.to(device), img_size, emb_hw),
        region=image_region_on_grid(embedded.input_hw.to(device), img_size, emb_hw),
        action_points=actions_to_sam_points(actions, grid, embedded.original_hw.to(device), img_size),
        text_map=None if text_map is None else text_map.float().to(device),
    )
    if gt_masks is not None:
        if len(gt_masks) != b:
            raise ValueError(f"{len(gt_masks)} ground-truth masks for {b} episodes")
        masks = [torch.as_tensor(np.asarray(m, dtype=bool)) for m in gt_masks]
        for m, hw in zip(masks, embedded.original_hw.tolist()):
            if list(m.shape) != hw:
                raise ValueError(f"ground-truth mask of shape {tuple(m.shape)} for an image of size {tuple(hw)}")
        input_hw = embedded.input_hw.cpu()
        low_hw = segmenter.low_res_hw
        episodes.gt_low = (original_masks_to_sam_grid(masks, input_hw, img_size, low_hw)[:, 0] > 0.5).to(device)
        episodes.valid_low = (image_region_on_grid(input_hw, img_size, low_hw)[:, 0] > 0.5).to(device)
        episodes.gt_grid = original_masks_to_sam_grid(masks, input_hw, img_size, emb_hw).to(device)
        centres = patch_centres(grid, embedded.original_hw.cpu()).long()  # (B, A, 2) original frame
        episodes.patch_component = torch.stack(
            [component_at(m, c) for m, c in zip(masks, centres)]).to(device)
        episodes.patch_on_gt = episodes.patch_component > 0
    return episodes


def component_at(mask: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The 8-connected component of ``mask`` under each point (0: background).

    Args:
        mask: ``(H, W)`` bool ground truth in the original frame.
        points: ``(A, 2)`` long ``(x, y)`` pixels of the original frame (clamped into the image).
    Returns:
        ``(A,)`` long component ids (1..n numbered by OpenCV, unique within the mask).
    """
    _, components = cv2.connectedComponents(mask.numpy().astype(np.uint8), connectivity=8)
    components = torch.from_numpy(components.astype(np.int64))
    return components[points[:, 1].clamp(max=mask.shape[0] - 1), points[:, 0].clamp(max=mask.shape[1] - 1)]


def step_rewards(kind: str, component: torch.Tensor, clicked_components: torch.Tensor, iou_gain: torch.Tensor) -> torch.Tensor:
    """The reward of one step for every episode (``model.env.reward``).

    Args:
        kind: one of ``REWARDS``.
        component: ``(B,)`` long ground-truth component under this step's click (0: off target).
        clicked_components: ``(B, t)`` long the components under the episode's earlier clicks.
        iou_gain: ``(B,)`` IoU(M_t) - IoU(M_{t-1}).
    Returns:
        ``(B,)`` float: ``target`` +1 on target / -1 off; ``iou_gain``; ``target+iou`` their sum;
        ``coverage`` +1 on a component no earlier click of the episode hit, 0 on one already hit,
        -1 off target; ``target+coverage`` ``target`` + 1 for a new component (+2 / +1 / -1).
    """
    on_gt = component > 0
    target = on_gt.float() * 2 - 1  # +1 / -1
    if kind == "target":
        return target
    if kind == "iou_gain":
        return iou_gain
    if kind == "target+iou":
        return target + iou_gain
    new = on_gt & ~(clicked_components == component[:, None]).any(1)
    if kind == "coverage":
        return torch.where(on_gt, new.float(), -torch.ones_like(target))
    if kind == "target+coverage":
        return target + new.float()
    raise ValueError(f"model.env.reward {kind!r} is not one of {', '.join(REWARDS)}")


def low_res_iou(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of SAM's masks with the ground truth in the low-res frame, padding excluded.

    logits ``(B, 1, H, W)``, gt and valid bool ``(B, H, W)`` -> ``(B,)`` (1 when both are empty).
    """
    return mask_iou((logits[:, 0] > MASK_LOGIT_THRESHOLD) & valid, gt)


@dataclass
class StepResult:
    """What one step returns: reward ``(B,)`` (None without ground truth), the click labels
    ``(B,)`` long, IoU after the step ``(B,)`` (None without ground truth), the next state."""

    reward: Optional[torch.Tensor]
    labels: torch.Tensor
    iou: Optional[torch.Tensor]
    state: torch.Tensor


class PromptingEnv:
    """B prompting episodes in lock-step. Typical use (the LightningModule's rollout)::

        env = PromptingEnv(segmenter, config)
        state = env.reset(episodes, srm_probs=srm(env.blank_state(episodes), ...).sigmoid(), training=True)
        for t in range(config.steps):
            action ~ policy(state, episodes.pool, ...) masked by env.valid
            result = env.step(action, srm_probs=srm(state, ...).sigmoid())
            state = result.state

    Attributes after reset (``n`` = prompts so far):
        points ``(B, n, 2)`` SAM frame, labels ``(B, n)`` long, valid ``(B, A)`` bool (not clicked
        yet), logits ``(B, 1, 4h, 4w)`` SAM's current low-res logits, mask ``(B, 1, h, w)`` their
        m(M) (the state is ``E * mask``), clicked ``(B, t)`` actions,
        iou_history list of ``(B,)`` (IoU after P_0 and after each step; empty without ground truth),
        logits_history list of ``(B, 1, 4h, 4w)`` (the logits after P_0 and after each step).
    """

    def __init__(self, segmenter: Segmenter, config: EnvConfig, srm_threshold: float = PROB_THRESHOLD,
                 all_positive: bool = False, srm: Optional[SRMConfig] = None) -> None:
        """``srm_threshold``: a click is positive when the SRM probability at it is >= this.
        ``all_positive``: label every click positive (the "w/o SRM" ablation of evaluate.py).
        ``srm``: the SRM's config, whose ``threshold``, ``label_rule`` and ``negative_threshold``
        label the clicks (:func:`alignsam.baselines.srm_point_labels`); given, it replaces
        ``srm_threshold``."""
        self.segmenter = segmenter
        self.config = config
        self.srm_config = srm if srm is not None else SRMConfig(threshold=srm_threshold)
        self.srm_threshold = self.srm_config.threshold
        self.all_positive = all_positive

    # -- state ---------------------------------------------------------------------------------------
    @staticmethod
    def blank_state(episodes: Episodes) -> torch.Tensor:
        """E * 1: the state before any mask (what the SRM sees to seed P_0)."""
        return episodes.embeddings

    def mask_on_grid(self, logits: torch.Tensor) -> torch.Tensor:
        """m(M): ``(B, 1, 4h, 4w)`` logits -> ``(B, 1, h, w)`` probability (or its 0/1 threshold)."""
        prob = F.adaptive_avg_pool2d(torch.sigmoid(logits.float()), self.segmenter.embedding_hw)
        return (prob >= PROB_THRESHOLD).float() if self.config.state_mask == "binary" else prob

    def state_from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """s = E * m: ``(B, 1, h, w)`` -> ``(B, C, h, w)``."""
        return self.episodes.embeddings * mask

    # -- episode ----------------------------------------------------------------------------------------
    def reset(self, episodes: Episodes, srm_probs: Optional[torch.Tensor] = None, training: bool = False) -> torch.Tensor:
        """Start B episodes; returns the first state ``(B, C, h, w)``.

        Args:
            srm_probs: ``(B, 1, h, w)`` SRM foreground probabilities of :meth:`blank_state`
                (needed for ``init_prompts: srm``).
            training: labels come from ``train_labels`` (else always from the SRM).
        """
        self.episodes, self.training = episodes, training
        b, device = len(episodes), episodes.embeddings.device
        self.valid = torch.ones(b, self.config.grid ** 2, dtype=torch.bool, device=device)
        self.clicked = torch.zeros(b, 0, dtype=torch.long, device=device)
        self.iou_history, self.logits_history = [], []
        # the decoder's prompt-independent work, done once for the episode's T + 1 decodes
        image_side = getattr(self.segmenter, "image_side", None)
        self.image_side = image_side(episodes.sam_embeddings) if image_side is not None else None
        if self.config.init_prompts == "srm":
            if srm_probs is None:
                raise ValueError("model.env.init_prompts: srm needs the SRM's probabilities at reset")
            self.points, self.labels = self._srm_seed_prompts(srm_probs)
            self.logits, _ = self._decode(None)
        else:
            self.points = torch.zeros(b, 0, 2, device=device)
            self.labels = torch.zeros(b, 0, dtype=torch.long, device=device)
            self.logits = torch.full((b, 1, *self.segmenter.low_res_hw), ALL_ONES_LOGIT, device=device)
        self.logits_history.append(self.logits)
        self._record_iou()
        self.mask = self.mask_on_grid(self.logits)
        return self.state_from_mask(self.mask)

    def _decode(self, mask_input: Optional[torch.Tensor]):
        """SAM on every prompt so far (one batched decode of the B episodes)."""
        args = (self.episodes.sam_embeddings, self.points, self.labels, mask_input)
        if self.image_side is None or mask_input is not None:
            return self.segmenter.decode(*args)
        return self.segmenter.decode(*args, image_side=self.image_side)

    def _srm_seed_prompts(self, srm_probs: torch.Tensor):
        """P_0: the most confident foreground cell (positive) and the least confident (negative),
        among embedding cells inside the image; points at cell centres in SAM's frame."""
        return best_and_worst_cells(srm_probs, self.episodes.region, self.segmenter.img_size)

    def _record_iou(self) -> Optional[torch.Tensor]:
        if self.episodes.gt_low is None:
            return None
        iou = low_res_iou(self.logits, self.episodes.gt_low, self.episodes.valid_low)
        self.iou_history.append(iou)
        return iou

    def click_labels(self, actions: torch.Tensor, srm_probs: Optional[torch.Tensor]) -> torch.Tensor:
        """Label ``(B,)`` of each action's click: the SRM's, by ``model.srm.label_rule`` (default:
        its probability there >= threshold; -1, not sent to SAM, for a click ``drop`` leaves out),
        the ground truth when training with ``train_labels: gt``, or 1 with ``all_positive``."""
        rows = torch.arange(len(actions), device=actions.device)
        if self.all_positive:
            return torch.ones_like(actions)
        if self.training and self.config.train_labels == "gt":
            if self.episodes.patch_on_gt is None:
                raise ValueError("model.env.train_labels: gt needs ground truth")
            return self.episodes.patch_on_gt[rows, actions].long()
        if srm_probs is None:
            raise ValueError("the SRM's probabilities are needed to label clicks")
        points = self.episodes.action_points[rows, actions][:, None]  # (B, 1, 2)
        return srm_point_labels(srm_probs, points, self.segmenter.img_size, self.srm_config)[:, 0]

    def step(self, actions: torch.Tensor, srm_probs: Optional[torch.Tensor] = None) -> StepResult:
        """Click patch ``actions`` ``(B,)`` in every episode; one batched SAM decode.

        Raises:
            ValueError: when an action was already clicked in its episode.
        """
        rows = torch.arange(len(actions), device=actions.device)
        if not self.valid[rows, actions].all():
            raise ValueError("an action was chosen twice in one episode (mask the logits with env.valid)")
        labels = self.click_labels(actions, srm_probs)
        if self.episodes.patch_component is not None:  # before this click joins the clicked ones
            component = self.episodes.patch_component[rows, actions]
            clicked_components = self.episodes.patch_component.gather(1, self.clicked)
        came_from_sam = self.points.shape[1] > 0  # else the logits are the all-ones M_0 of init_prompts: none
        self.valid = self.valid.clone()
        self.valid[rows, actions] = False
        self.clicked = torch.cat([self.clicked, actions[:, None]], 1)
        self.points = torch.cat([self.points, self.episodes.action_points[rows, actions][:, None]], 1)
        self.labels = torch.cat([self.labels, labels[:, None]], 1)
        mask_input = self.logits if (self.config.feed_mask_input and came_from_sam) else None
        self.logits, _ = self._decode(mask_input)
        self.logits_history.append(self.logits)
        previous = self.iou_history[-1] if self.iou_history else None
        iou = self._record_iou()
        reward = None
        if iou is not None:
            reward = step_rewards(self.config.reward, component, clicked_components, iou - previous)
        self.mask = self.mask_on_grid(self.logits)
        return StepResult(reward, labels, iou, self.state_from_mask(self.mask))
