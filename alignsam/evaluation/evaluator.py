"""Runs a set of strategies over a split and builds the results table.

The LightningModule owns one :class:`Evaluator` per validation / test epoch: validation scores the
agent (and, once per run, the centre and random baselines); ``evaluate.py`` (the test loop) scores
every strategy of :mod:`alignsam.evaluation.strategies` on the same batches and embeddings.

A strategy that cannot score some episodes (PerSAM-style on a class missing from the few-shot
draw) never stops the others: its unscored episodes leave its own numbers only (see
:mod:`alignsam.evaluation.scoring` for what that means for the semantic tasks' label maps), the
table shows how many it scored, and :meth:`Evaluator.compute` logs one warning per such strategy
naming the classes.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from alignsam.evaluation.episodes import EpisodeStatistics
from alignsam.evaluation.scoring import StrategyScores, original_logits
from alignsam.foundation.segmenter import EmbeddedImages
from alignsam.evaluation.strategies import STRATEGIES, BatchContext, Outcome, persam_prototypes
from alignsam.tasks import task_record

if TYPE_CHECKING:  # pragma: no cover
    from alignsam.agent import Agent

# Called with (batch, embedded, outcome, original-size logits) for the agent's outcome of each batch.
PredictionHook = Callable[[List[Dict], object, Outcome, List[torch.Tensor]], None]

log = logging.getLogger(__name__)


class Evaluator:
    """Scores ``strategies`` batch by batch.

    Args:
        agent: the trained agent (its segmenter, SRM, policy and configs).
        strategies: names from :data:`~alignsam.evaluation.strategies.STRATEGIES`; ``agent`` first.
        seed: seed of the random-click baseline (the same clicks on every run).
        oracle_clicks: clicks the oracle makes (its NoC is capped there).
        train_samples: the few-shot training episodes (PerSAM's prototypes for ``persam``; without
            them PerSAM scores no episode, and says so).
        on_agent: optional hook that receives the agent's predictions (``--save_predictions``).
        keep_episodes: keep the per-unit statistics of the headline metrics (:attr:`episodes`,
            written by ``evaluate.py`` as ``test_episodes.npz``).
    """

    def __init__(self, agent: "Agent", strategies: Sequence[str], seed: int, oracle_clicks: int = 20,
                 train_samples: Optional[Sequence[Dict]] = None, on_agent: Optional[PredictionHook] = None,
                 keep_episodes: bool = True) -> None:
        self.agent = agent
        self.strategies = list(strategies)
        self.generator = torch.Generator().manual_seed(seed)
        self.oracle_clicks = oracle_clicks
        self.on_agent = on_agent
        self.prototypes = None
        if any(STRATEGIES[n].needs_prototypes for n in self.strategies):
            self.prototypes = persam_prototypes(agent, train_samples) if train_samples else {}
        self.scores = StrategyScores(self.strategies, agent.new_metrics, task_record(agent.task).semantic,
                                     agent.device, keep_episodes)
        # strategy -> (reason, class id -> episode text) of its unscored episodes, for one warning
        self._unscored: Dict[str, Tuple[str, Dict[int, str]]] = {}
        self._warned = False

    @torch.no_grad()
    def add_batch(self, batch: List[Dict]) -> Tuple[Dict[str, Outcome], EmbeddedImages]:
        """Run and score every strategy on one batch; returns their outcomes and the embeddings."""
        episodes, embedded = self.agent.prepare(batch)
        ctx = BatchContext(self.agent, batch, episodes, embedded, self.generator, self.oracle_clicks, self.prototypes)
        outcomes = {}
        for name in self.strategies:
            outcome = STRATEGIES[name].run(ctx)
            logits = original_logits(self.agent.segmenter, outcome.logits, embedded)
            self.scores.add(name, batch, logits, ctx.gts, outcome.unscored)
            if outcome.curve is not None:
                self.scores.add_curve(name, outcome.curve, outcome.unscored)
            if outcome.unscored is not None and outcome.unscored.any():
                _, classes = self._unscored.setdefault(name, (outcome.unscored_reason, {}))
                for sample, left_out in zip(batch, outcome.unscored.tolist()):
                    if left_out:
                        classes.setdefault(int(sample.get("class_id", 0)), str(sample.get("text", "")))
            if name == "agent" and self.on_agent is not None:
                self.on_agent(batch, embedded, outcome, logits)
            outcomes[name] = outcome
        return outcomes, embedded

    def compute(self) -> Dict[str, Dict[str, float]]:
        """``{strategy: {column: value}}`` in strategy order (see :meth:`StrategyScores.compute`);
        the first call logs a warning per strategy that left episodes unscored."""
        table = self.scores.compute()
        if not self._warned:
            self._warned = True
            self._warn_unscored()
        return table

    @property
    def episodes(self) -> Optional[EpisodeStatistics]:
        """The per-unit statistics of the last :meth:`compute` (None before it, or when not kept),
        with the task in their metadata."""
        episodes = self.scores.last_episodes
        if episodes is not None:
            episodes.meta.setdefault("task", self.agent.task)
        return episodes

    def _warn_unscored(self) -> None:
        from lightning.pytorch.utilities import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) != 0:
            return
        for name, cover in self.scores.last_coverage.items():  # every rank's counts, gathered by compute()
            counts: Counter = cover["unscored"]
            if not counts:
                continue
            reason, texts = self._unscored.get(name, ("the strategy could not score them", {}))
            classes = ", ".join(f"class {c} ({texts[c]}): {counts[c]}" if texts.get(c) else f"class {c}: {counts[c]}"
                                for c in sorted(counts))
            if self.scores.semantic:
                images = len(cover["images"])
                kept = (f"its metrics cover {images - len(cover['excluded_images'])} of {images} images (those "
                        f"without such an episode); the other strategies cover all {images}")
            else:
                kept = f"its metrics cover the {cover['scored']} it scored; the other strategies cover all {cover['total']}"
            log.warning("strategy %s: %d of %d episodes not scored (%s): %s; %s", name, cover["total"] - cover["scored"],
                        cover["total"], reason, classes, kept)
