"""Runs a set of strategies over a split and builds the results table.

The LightningModule owns one :class:`Evaluator` per validation / test epoch: validation scores the
agent (and, once per run, the centre and random baselines); ``evaluate.py`` (the test loop) scores
every strategy of :mod:`alignsam.evaluation.strategies` on the same batches and embeddings.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from alignsam.evaluation.scoring import StrategyScores, original_logits
from alignsam.foundation.segmenter import EmbeddedImages
from alignsam.evaluation.strategies import NEEDS_PROTOTYPES, RUNNERS, BatchContext, Outcome, persam_prototypes
from alignsam.metrics.tasks import SEMANTIC_TASKS

if TYPE_CHECKING:  # pragma: no cover
    from alignsam.module import AlignSAM

# Called with (batch, embedded, outcome, original-size logits) for the agent's outcome of each batch.
PredictionHook = Callable[[List[Dict], object, Outcome, List[torch.Tensor]], None]


class Evaluator:
    """Scores ``strategies`` batch by batch.

    Args:
        module: the trained agent (its segmenter, SRM, policy and configs).
        strategies: names from :data:`~alignsam.evaluation.strategies.STRATEGIES`; ``agent`` first.
        seed: seed of the random-click baseline (the same clicks on every run).
        oracle_clicks: clicks the oracle makes (its NoC is capped there).
        train_samples: the few-shot training episodes (PerSAM's prototypes; needed for ``persam``).
        on_agent: optional hook that receives the agent's predictions (``--save_predictions``).
    """

    def __init__(self, module: "AlignSAM", strategies: Sequence[str], seed: int, oracle_clicks: int = 20,
                 train_samples: Optional[Sequence[Dict]] = None, on_agent: Optional[PredictionHook] = None) -> None:
        self.module = module
        self.strategies = list(strategies)
        self.generator = torch.Generator().manual_seed(seed)
        self.oracle_clicks = oracle_clicks
        self.on_agent = on_agent
        self.prototypes = None
        if any(n in NEEDS_PROTOTYPES for n in self.strategies):
            if not train_samples:
                raise ValueError("the persam strategy needs the few-shot training split (data.train_size > 0)")
            self.prototypes = persam_prototypes(module, train_samples)
        self.scores = StrategyScores(self.strategies, module.new_metrics, module.hparams.task in SEMANTIC_TASKS,
                                     module.device)

    @torch.no_grad()
    def add_batch(self, batch: List[Dict]) -> Tuple[Dict[str, Outcome], EmbeddedImages]:
        """Run and score every strategy on one batch; returns their outcomes and the embeddings."""
        episodes, embedded = self.module.prepare(batch)
        ctx = BatchContext(self.module, batch, episodes, embedded, self.generator, self.oracle_clicks, self.prototypes)
        outcomes = {}
        for name in self.strategies:
            outcome = RUNNERS[name](ctx)
            logits = original_logits(self.module.segmenter, outcome.logits, embedded)
            self.scores.add(name, batch, logits, ctx.gts)
            if outcome.curve is not None:
                self.scores.add_curve(name, outcome.curve)
            if name == "agent" and self.on_agent is not None:
                self.on_agent(batch, embedded, outcome, logits)
            outcomes[name] = outcome
        return outcomes, embedded

    def compute(self) -> Dict[str, Dict[str, float]]:
        """``{strategy: {column: value}}`` in strategy order (see :meth:`StrategyScores.compute`)."""
        return self.scores.compute()
