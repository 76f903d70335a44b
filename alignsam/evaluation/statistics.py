"""Seeds and episodes: mean +- sd over seeds and paired bootstrap intervals of the agent's lead.

Input: per task, one or more *variants* (labelled agents: ``paper``, ``srm_input``, ...), each a
list of runs (seeds) of :class:`~alignsam.evaluation.episodes.EpisodeStatistics` on the same test
units. For a headline metric :func:`summarise_task` gives

* per variant and strategy: the metric on the whole split for every seed, their mean and standard
  deviation (ddof 1; NaN with one seed);
* per variant: its agent minus each other strategy of its own runs, and minus the agent of every
  other variant, as the mean over seeds of the per-seed difference with a percentile bootstrap
  interval (95% by default).

The bootstrap has two levels. Outer: the seeds of each variant are drawn with replacement
(independently per variant: seeds of two variants are not paired). Inner: the test units are drawn
with replacement, **once per replicate, for every seed, strategy and variant alike**: the same test
scenes score every strategy (paired) and every seed (the seeds are crossed with one test set, so
drawing episodes per seed would understate the episode-sampling error of the seed mean). Each
replicate recomputes the dataset-level metric from the drawn units' sums
(:func:`~alignsam.evaluation.episodes.metric_values`): pooled pixel counts for ``miou_fgbg`` /
``ber``, the image-averaged curve's maximum for ``fbeta_max``, the per-class intersection and union
of the drawn images for the semantic mIoU. A draw is a vector of counts (multinomial), so a replicate
is a matrix product; R replicates x N units x every seed and strategy is a few GEMMs.

A difference is a win when the interval lies wholly on the agent's better side (above 0, or below
0 for lower-is-better metrics such as ``ber`` and ``mae``), a loss when wholly on the other side,
undecided otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from alignsam.errors import UserError
from alignsam.evaluation.episodes import DATASET_METRICS, DatasetMetric, EpisodeStatistics, metric_values

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
AGENT = "agent"
_CHUNK = 250  # replicates per matrix product (bounds memory: chunk x seeds*strategies x 256 floats)


@dataclass(frozen=True)
class StrategySummary:
    """One strategy of one variant: ``values`` ``(K,)`` the metric per seed, their mean and sd."""

    variant: str
    strategy: str
    values: np.ndarray

    @property
    def seeds(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else float("nan")


@dataclass(frozen=True)
class Difference:
    """``variant``'s agent minus ``strategy`` of ``other_variant``: the mean over seeds of the
    per-seed difference (``estimate``), its bootstrap interval ``[low, high]`` and ``verdict``
    (``"win"``, ``"loss"`` or ``""`` when the interval holds 0)."""

    variant: str
    other_variant: str
    strategy: str
    estimate: float
    low: float
    high: float
    verdict: str


@dataclass
class TaskSummary:
    """Everything :func:`summarise_task` found for one task and metric."""

    task: str
    metric: str
    lower_is_better: bool
    units: int
    resamples: int
    level: float
    strategies: List[StrategySummary] = field(default_factory=list)
    differences: List[Difference] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def strategy(self, variant: str, name: str) -> StrategySummary:
        return next(s for s in self.strategies if s.variant == variant and s.strategy == name)

    def difference(self, variant: str, strategy: str, other_variant: Optional[str] = None) -> Difference:
        other = variant if other_variant is None else other_variant
        return next(d for d in self.differences
                    if d.variant == variant and d.other_variant == other and d.strategy == strategy)


def verdict(low: float, high: float, lower_is_better: bool) -> str:
    """``"win"`` when ``[low, high]`` lies wholly on the agent's better side of 0, ``"loss"`` when
    wholly on the other, ``""`` otherwise (or when NaN)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return ""
    above, below = low > 0, high < 0
    if lower_is_better:
        above, below = below, above
    return "win" if above else "loss" if below else ""


def aligned_runs(variants: Mapping[str, Sequence[EpisodeStatistics]], names: Mapping[int, str] = None) -> List[str]:
    """The units every run shares, in the first run's order; runs over other units are a
    :class:`UserError` naming them (``names``: ``id(run) -> folder``, for the message)."""
    runs = [r for group in variants.values() for r in group]
    if not runs:
        raise UserError("no runs to summarise")
    first = runs[0]
    ids = first.ids.tolist()
    for run in runs[1:]:
        if set(run.ids.tolist()) != set(ids):
            where = names or {}
            raise UserError(
                f"{where.get(id(run), 'a run')} scored {len(run.ids)} test units, {where.get(id(first), 'the first run')} "
                f"{len(ids)} other ones: pair only runs evaluated on the same test split and size")
    return ids


def _strategies_of(runs: Sequence[EpisodeStatistics], agent: str) -> List[str]:
    """Strategies every run of a variant scored, in the first run's order (the agent first)."""
    common = [s for s in runs[0].strategies if all(s in r.strategies for r in runs)]
    if agent not in common:
        raise UserError(f"the runs have no '{agent}' row in their per-episode files")
    return [agent] + [s for s in common if s != agent]


def _stack(runs: Sequence[EpisodeStatistics], strategies: Sequence[str], metric: DatasetMetric, ids: Sequence[str]):
    """Fields ``{name: (K*S, N, *F)}`` and scored ``(K*S, N)`` of K runs x S strategies, units in ``ids`` order."""
    fields: Dict[str, List[np.ndarray]] = {name: [] for name in metric.fields}
    scored = []
    for run in runs:
        run = run.aligned(ids)
        rows = [run.strategies.index(s) for s in strategies]
        scored.append(run.scored[rows])
        for name in metric.fields:
            if name not in run.fields:
                raise UserError(f"the per-episode file of a {run.task} run has no '{name}' (needed by {metric.name}); "
                                f"run evaluate.py on it again")
            fields[name].append(run.fields[name][rows])
    return {k: np.concatenate(v) for k, v in fields.items()}, np.concatenate(scored)


def summarise_task(variants: Mapping[str, Sequence[EpisodeStatistics]], metric: str,
                   resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = DEFAULT_LEVEL,
                   agent: str = AGENT, names: Mapping[int, str] = None,
                   dataset_metric: Optional[DatasetMetric] = None) -> TaskSummary:
    """Mean +- sd over seeds and the agent's bootstrap differences for one task and metric.

    Args:
        variants: ``{label: [runs (seeds)]}``, all of one task over the same units.
        metric: a name of :data:`~alignsam.evaluation.episodes.DATASET_METRICS` (or pass
            ``dataset_metric`` for another one).
        resamples: bootstrap replicates R; seed: the bootstrap's random seed (same inputs, same
            intervals); level: the interval's coverage.
        agent: the strategy whose lead is measured.
        names: ``id(run) -> folder``, for error messages.
    Returns:
        a :class:`TaskSummary`.
    """
    if resamples < 1:
        raise UserError(f"--resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise UserError(f"--level must lie in (0, 1), got {level}")
    spec = dataset_metric or DATASET_METRICS[metric]
    ids = aligned_runs(variants, names)
    first = next(iter(variants.values()))[0]
    meta = first.meta
    rng = np.random.default_rng(seed)
    n = len(ids)
    unit_draws = rng.multinomial(n, np.full(n, 1 / n), size=resamples)  # (R, N), shared by all (paired)
    summary = TaskSummary(first.task, spec.name, spec.lower_is_better, n, resamples, level)
    full: Dict[str, np.ndarray] = {}  # variant -> (K, S) whole-split values
    boot: Dict[str, np.ndarray] = {}  # variant -> (R, S) seed-averaged replicate values
    order: Dict[str, List[str]] = {}
    for label, runs in variants.items():
        strategies = order[label] = _strategies_of(runs, agent)
        k, s = len(runs), len(strategies)
        fields, scored = _stack(runs, strategies, spec, ids)
        full[label] = metric_values(spec, fields, scored, np.ones((1, n)), meta)[0].reshape(k, s)
        seed_draws = rng.multinomial(k, np.full(k, 1 / k), size=resamples)  # (R, K)
        parts = []
        for start in range(0, resamples, _CHUNK):
            values = metric_values(spec, fields, scored, unit_draws[start:start + _CHUNK], meta).reshape(-1, k, s)
            parts.append(np.einsum("rk,rks->rs", seed_draws[start:start + _CHUNK], values) / k)
        boot[label] = np.concatenate(parts)
        for i, name in enumerate(strategies):
            summary.strategies.append(StrategySummary(label, name, full[label][:, i]))
        dropped = sorted({x for r in runs for x in r.strategies} - set(strategies))
        if dropped:
            summary.notes.append(f"{label or 'runs'}: {', '.join(dropped)} left out (not scored by every run)")

    tails = 100 * (1 - level) / 2
    for label in variants:
        mine = boot[label][:, 0]
        targets = [(label, name, full[label][:, i], boot[label][:, i]) for i, name in enumerate(order[label]) if i > 0]
        targets += [(other, agent, full[other][:, 0], boot[other][:, 0]) for other in variants if other != label]
        for other, name, values, replicate in targets:
            estimate = float(np.mean(full[label][:, 0]) - np.mean(values))
            differences = mine - replicate
            if np.isfinite(differences).any():
                low, high = (float(x) for x in np.nanpercentile(differences, [tails, 100 - tails]))
            else:
                low = high = float("nan")
            summary.differences.append(Difference(label, other, name, estimate, low, high,
                                                  verdict(low, high, spec.lower_is_better)))
    return summary
