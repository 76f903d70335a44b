"""The named prompting strategies of ``evaluate.py``: the agent, its ablations and the baselines.

Every strategy gets the same batch, cached embeddings and episodes (:class:`BatchContext`) and
returns an :class:`Outcome`: SAM's final low-res logits and every prompt it gave, plus, for the
sequential ones (the agent, its ablations, the oracle), the logits or IoU after each click.

=============  ==========================================================================================
name           prompts (T = ``model.env.steps``; "seeds" = the agent's P_0 when ``env.init_prompts: srm``)
=============  ==========================================================================================
agent          seeds + T clicks of the trained policy, labelled by the SRM (greedy, as in validation)
centre         one positive click at the image centre
random         T positive clicks at distinct random patches of the action grid
grid_srm       w/o RL, even patches: seeds + T clicks on a regular spread of action patches, labelled
               by the SRM
random_srm     w/o RL, random patches: seeds + T distinct action patches drawn at random (reproducible
               per episode), labelled by the SRM exactly as ``grid_srm``
no_rl          w/o RL, SRM-confidence points: seeds + the SRM's ceil(T/2) most confident patches
               (positive) and floor(T/2) least confident (negative), from the SRM's map of the
               unprompted image
no_srm         w/o SRM: the trained agent with every click labelled positive
single_step    the trained agent with T = 1
clip_surgery   CLIP Surgery's point recipe: the ceil(T/2) patches of highest text similarity
               (positive) and floor(T/2) of lowest (negative); explicit configs only (needs the matcher)
persam         PerSAM-style, training-free: cosine similarity of each embedding cell to the mean target
               feature of the few-shot training images of the episode's class; best cell positive,
               worst negative. An episode whose class no few-shot training episode shows (a 50-image
               draw from VOC often misses a rare class) is not scored: see ``Outcome.unscored``
oracle         the standard click simulator: each next click at the interior of the largest error
               region, labelled by the ground truth (an upper bound, not a competitor); its metrics
               are those after T clicks, its click curve and NoC go on to ``--oracle_clicks``
=============  ==========================================================================================

The ablations reuse the trained agent's networks; no strategy sees the test ground truth except the
oracle. Clicks on the action grid are at patch centres, as the agent's.

The paper's "w/o RL" removes the policy without saying how the prompts are then chosen, so three
readings are scored: ``no_rl`` (the SRM's own most / least confident points), ``grid_srm`` (evenly
spread patches) and ``random_srm`` (random patches). The last two label every click with the SRM
through one function, :func:`srm_labels`, so they differ only in where they click.

A strategy that cannot score some episodes marks them in :attr:`Outcome.unscored` (with a reason)
instead of raising: they leave that strategy's numbers only (how, for the semantic tasks' label
maps, is in :mod:`alignsam.evaluation.scoring`), the table shows how many it scored, and the
evaluator logs one warning per strategy naming the classes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from alignsam import baselines
from alignsam.clicks import oracle_next_click
from alignsam.evaluation.scoring import ClickCurve, episode_ious, original_logits
from alignsam.foundation.segmenter import EmbeddedImages
from alignsam.geometry import MASK_LOGIT_THRESHOLD, original_to_sam_points, sample_at_sam_points
from alignsam.rl.env import Episodes

if TYPE_CHECKING:  # pragma: no cover
    from alignsam.agent import Agent

@dataclass
class Outcome:
    """What one strategy produced on B episodes.

    logits ``(B, 1, 4h, 4w)`` SAM's final low-res logits; points ``(B, n, 2)`` (SAM frame) and
    labels ``(B, n)`` every prompt (label -1 = padding, ignored by SAM); curve: IoU after each click
    (sequential strategies only); unscored: ``(B,)`` bool, the episodes the strategy could not
    score (their logits are placeholders, left out of its metrics), None when it scored all;
    unscored_reason: why, for the warning (e.g. "no few-shot training episode of its class").
    """

    logits: torch.Tensor
    points: torch.Tensor
    labels: torch.Tensor
    curve: Optional[ClickCurve] = None
    unscored: Optional[torch.Tensor] = None
    unscored_reason: str = ""


@dataclass
class BatchContext:
    """One batch, prepared once and shared by every strategy.

    prototypes: PerSAM's mean target feature ``(C,)`` per class id (0 for the binary tasks); empty
    when there are no few-shot training episodes (then PerSAM scores nothing).
    """

    agent: "Agent"
    batch: List[Dict]
    episodes: Episodes
    embedded: EmbeddedImages
    generator: torch.Generator
    oracle_clicks: int = 20
    prototypes: Optional[Dict[int, torch.Tensor]] = None
    _cache: Dict[str, object] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.agent.env_config.steps

    @property
    def gts(self) -> List[torch.Tensor]:
        """The episodes' ground truth, bool ``(H_b, W_b)`` on the CPU (converted once per batch)."""
        if "gts" not in self._cache:
            self._cache["gts"] = [torch.as_tensor(np.asarray(s["mask"], bool)) for s in self.batch]
        return self._cache["gts"]

    def srm_probs(self) -> torch.Tensor:
        """The SRM's foreground probabilities of the unprompted image ``(B, 1, h, w)`` (E * 1)."""
        if "srm" not in self._cache:
            agent = self.agent
            text = self.episodes.text_state if agent.srm_text else None
            self._cache["srm"] = torch.sigmoid(agent.srm(self.episodes.embeddings, text)).float()
        return self._cache["srm"]

    def seed_prompts(self):
        """The agent's P_0 (``(B, 2, 2)``, ``(B, 2)``), or empty prompts with ``init_prompts: none``."""
        if self.agent.env_config.init_prompts != "srm":
            b, device = len(self.episodes), self.episodes.embeddings.device
            return torch.zeros(b, 0, 2, device=device), torch.zeros(b, 0, dtype=torch.long, device=device)
        return baselines.best_and_worst_cells(self.srm_probs(), self.episodes.region, self.agent.segmenter.img_size)

    def decode(self, points: torch.Tensor, labels: torch.Tensor) -> Outcome:
        logits, _ = self.agent.segmenter.decode(self.episodes.sam_embeddings, points, labels)
        return Outcome(logits, points, labels)


def _agent_outcome(ctx: BatchContext, **rollout_options) -> Outcome:
    agent = ctx.agent
    rollout = agent.rollout(ctx.episodes, training=False, greedy=agent.env_config.greedy_eval, **rollout_options)
    seeds = 2 if agent.env_config.init_prompts == "srm" else 0
    rows = len(rollout.step_logits)
    ious = torch.stack([episode_ious(original_logits(agent.segmenter, step, ctx.embedded), ctx.gts)
                        for step in rollout.step_logits])
    clicks = torch.arange(rows)
    curve = ClickCurve(ious, clicks, clicks + seeds)
    return Outcome(rollout.final_logits, rollout.points, rollout.point_labels, curve)


def agent(ctx: BatchContext) -> Outcome:
    return _agent_outcome(ctx)


def no_srm(ctx: BatchContext) -> Outcome:
    return _agent_outcome(ctx, all_positive=True)


def single_step(ctx: BatchContext) -> Outcome:
    return _agent_outcome(ctx, steps=1)


def centre(ctx: BatchContext) -> Outcome:
    e, segmenter = ctx.embedded, ctx.agent.segmenter
    return ctx.decode(*baselines.centre_click(ctx.agent.env_config.grid, e.original_hw, segmenter.img_size))


def random(ctx: BatchContext) -> Outcome:
    e, grid = ctx.embedded, ctx.agent.env_config.grid
    return ctx.decode(*baselines.random_clicks(ctx.steps, grid, e.original_hw, ctx.agent.segmenter.img_size, ctx.generator))


def _with_seeds(ctx: BatchContext, points: torch.Tensor, labels: torch.Tensor) -> Outcome:
    seed_points, seed_labels = ctx.seed_prompts()
    return ctx.decode(torch.cat([seed_points, points], 1), torch.cat([seed_labels, labels], 1))


def srm_labels(ctx: BatchContext, points: torch.Tensor) -> torch.Tensor:
    """The SRM's label of each click ``(B, n, 2)`` (SAM frame) -> ``(B, n)`` long, 1 positive, 0
    negative, -1 dropped: its map of the unprompted image at the click, by the agent's
    ``model.srm.label_rule`` (:func:`alignsam.baselines.srm_point_labels`, the rule the agent's own
    clicks get). The labelling of the patch baselines ``grid_srm`` and ``random_srm``."""
    return baselines.srm_point_labels(ctx.srm_probs(), points, ctx.agent.segmenter.img_size, ctx.agent.srm_config)


def _srm_labelled_patches(ctx: BatchContext, actions: torch.Tensor) -> Outcome:
    """Seeds + clicks at the centres of action patches ``actions`` ``(B, T)``, labelled by :func:`srm_labels`."""
    action_points = ctx.episodes.action_points  # (B, A, 2)
    rows = torch.arange(len(action_points), device=action_points.device)[:, None]
    points = action_points[rows, actions.to(action_points.device)]
    return _with_seeds(ctx, points, srm_labels(ctx, points))


def grid_srm(ctx: BatchContext) -> Outcome:
    actions = baselines.spread_patches(ctx.agent.env_config.grid, ctx.steps)
    return _srm_labelled_patches(ctx, actions.expand(len(ctx.batch), -1))


def episode_generator(ctx: BatchContext, sample: Dict, purpose: str) -> torch.Generator:
    """A generator seeded by the batch generator's seed, ``purpose`` and the episode's id: the same
    draws for an episode whatever its batch or position, and the batch generator itself is not
    advanced (the ``random`` baseline's clicks stay those of earlier runs)."""
    key = f"{ctx.generator.initial_seed()}|{purpose}|{sample.get('id', sample.get('image_id', ''))}"
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def random_srm(ctx: BatchContext) -> Outcome:
    patches = ctx.agent.env_config.grid ** 2
    actions = torch.stack([torch.randperm(patches, generator=episode_generator(ctx, s, "random_srm"))[:ctx.steps]
                           for s in ctx.batch])
    return _srm_labelled_patches(ctx, actions)


def no_rl(ctx: BatchContext) -> Outcome:
    scores = sample_at_sam_points(ctx.srm_probs(), ctx.episodes.action_points, ctx.agent.segmenter.img_size)
    return _with_seeds(ctx, *baselines.ranked_patch_prompts(scores, ctx.episodes.action_points, ctx.steps))


def clip_surgery(ctx: BatchContext) -> Outcome:
    if ctx.episodes.text_map is None:
        raise ValueError("the clip_surgery strategy needs the text matcher (model.matcher, an explicit config)")
    pooled = torch.bmm(ctx.episodes.pool, ctx.episodes.text_map.flatten(1)[..., None])[..., 0]  # (B, A)
    return ctx.decode(*baselines.ranked_patch_prompts(pooled, ctx.episodes.action_points, ctx.steps))


def persam(ctx: BatchContext) -> Outcome:
    """Episodes of a class without a prototype are decoded with a zero feature (a placeholder, so
    the batch stays one decode) and marked unscored."""
    if ctx.prototypes is None:
        raise ValueError("the persam strategy needs the few-shot prototypes (persam_prototypes)")
    embeddings = ctx.episodes.embeddings
    ids = [int(s.get("class_id", 0)) for s in ctx.batch]
    placeholder = torch.zeros(embeddings.shape[1])
    protos = torch.stack([ctx.prototypes.get(i, placeholder).float() for i in ids]).to(embeddings.device)
    prior = baselines.cosine_location_prior(embeddings, protos)
    outcome = ctx.decode(*baselines.best_and_worst_cells(prior, ctx.episodes.region, ctx.agent.segmenter.img_size))
    unscored = torch.tensor([i not in ctx.prototypes for i in ids])
    if unscored.any():
        outcome.unscored = unscored
        outcome.unscored_reason = ("no few-shot training episode of its class" if ctx.prototypes
                                   else "no few-shot training episode with a target (no training split?)")
    return outcome


def oracle(ctx: BatchContext) -> Outcome:
    """Clicks of the standard simulator, each from the previous mask's largest error region at
    original resolution; finished episodes get padding (label -1). The outcome's mask and prompts
    are those after T clicks (the agent's budget); the curve goes on to ``ctx.oracle_clicks``."""
    segmenter, e = ctx.agent.segmenter, ctx.embedded
    gts = [g.numpy() for g in ctx.gts]
    b, device = len(gts), ctx.episodes.embeddings.device
    preds = [np.zeros_like(g) for g in gts]
    points = torch.zeros(b, 0, 2, device=device)
    labels = torch.zeros(b, 0, dtype=torch.long, device=device)
    logits, rows, at_budget = None, [], None
    feed_mask = ctx.agent.env_config.feed_mask_input
    for click_index in range(1, max(ctx.oracle_clicks, ctx.steps) + 1):
        clicks, click_labels = [], []
        for pred, gt in zip(preds, gts):
            click = oracle_next_click(pred, gt)
            if click is None:  # perfect already (or an empty target predicted empty): pad
                clicks.append((0.0, 0.0))
                click_labels.append(-1)
            else:
                clicks.append(click[:2])
                click_labels.append(click[2])
        new = original_to_sam_points(torch.tensor(clicks, device=device)[:, None], e.original_hw.to(device), segmenter.img_size)
        points = torch.cat([points, new], 1)
        labels = torch.cat([labels, torch.tensor(click_labels, device=device)[:, None]], 1)
        logits, _ = segmenter.decode(ctx.episodes.sam_embeddings, points, labels, logits if feed_mask else None)
        full = original_logits(segmenter, logits, e)
        preds = [(l > MASK_LOGIT_THRESHOLD).cpu().numpy() for l in full]
        rows.append(episode_ious(full, ctx.gts))
        if click_index == ctx.steps:
            at_budget = Outcome(logits, points, labels)
    clicks_made = torch.arange(1, len(rows) + 1)
    at_budget.curve = ClickCurve(torch.stack(rows), clicks_made, clicks_made)
    return at_budget


@dataclass(frozen=True)
class Strategy:
    """One named strategy: its table label, what produces its outcome, and what it needs
    (``needs_matcher``: the CLIP Surgery text matcher of an explicit config; ``needs_prototypes``:
    the few-shot training split, for PerSAM's prototypes)."""

    name: str
    label: str
    run: Callable[[BatchContext], Outcome]
    needs_matcher: bool = False
    needs_prototypes: bool = False


# Every strategy, in table order (the agent first).
STRATEGIES: Dict[str, Strategy] = {s.name: s for s in (
    Strategy("agent", "AlignSAM agent", agent),
    Strategy("centre", "centre click", centre),
    Strategy("random", "T random clicks", random),
    Strategy("grid_srm", "w/o RL: even patches + SRM labels", grid_srm),
    Strategy("random_srm", "w/o RL: random patches + SRM labels", random_srm),
    Strategy("no_rl", "w/o RL: SRM-confidence points", no_rl),
    Strategy("no_srm", "w/o SRM (all positive)", no_srm),
    Strategy("single_step", "single step (T = 1)", single_step),
    Strategy("clip_surgery", "CLIP Surgery points", clip_surgery, needs_matcher=True),
    Strategy("persam", "PerSAM-style", persam, needs_prototypes=True),
    Strategy("oracle", "oracle clicks", oracle),
)}


def label_of(name: str) -> str:
    """A strategy's readable label (the name itself for an unknown one)."""
    return STRATEGIES[name].label if name in STRATEGIES else name


def check_strategies(names: Sequence[str], has_matcher: bool) -> List[str]:
    """Validate a strategy list (errors name ``--strategies``): known names, ``agent`` among them,
    and ``clip_surgery`` only with a text matcher."""
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {list(STRATEGIES)}")
    if "agent" not in names:
        raise ValueError("--strategies must include 'agent'")
    if not has_matcher and any(STRATEGIES[n].needs_matcher for n in names):
        raise ValueError("--strategies: clip_surgery needs a text matcher (an explicit config with model.matcher)")
    return list(names)


def default_strategies(has_matcher: bool) -> List[str]:
    """Every strategy that applies (CLIP Surgery points only where the config has a matcher)."""
    return [n for n, s in STRATEGIES.items() if has_matcher or not s.needs_matcher]


@torch.no_grad()
def persam_prototypes(agent: "Agent", samples: Sequence[Dict], chunk: int = 16) -> Dict[int, torch.Tensor]:
    """PerSAM's target feature per class id: the mean over few-shot training episodes of each
    episode's mean embedding under its ground truth (on the embedding grid) -> ``{class_id: (C,)}``."""
    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, int] = {}
    for start in range(0, len(samples), chunk):
        part = [samples[i] for i in range(start, min(start + chunk, len(samples)))]
        episodes, _ = agent.prepare(part)
        features = baselines.masked_mean_feature(episodes.embeddings, episodes.gt_grid)
        has_target = episodes.gt_grid.flatten(1).sum(1) > 0
        for sample, feature, ok in zip(part, features, has_target.tolist()):
            if not ok:
                continue
            key = int(sample.get("class_id", 0))
            sums[key] = sums.get(key, 0) + feature
            counts[key] = counts.get(key, 0) + 1
    return {k: (sums[k] / counts[k]).float() for k in sums}
