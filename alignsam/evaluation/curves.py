"""Learning-curve figures from the TensorBoard logs of training runs (the per-task curves of docs/results.md).

A run directory is one Lightning ``TensorBoardLogger`` version, e.g. ``logs/scenes/blur/version_0``.
What :class:`alignsam.module.AlignSAM` logs there, and at which step:

* every training batch (one PPO iteration: rollout, PPO epochs, SRM update) logs ``train/final_iou``
  (mean low-res IoU of the rollout's final masks on that batch), ``train/return``, ...;
* every validation logs the agent's task metrics ``val/<metric>``, the baselines'
  ``val_centre/<metric>``, ``val_random/<metric>``, and the agent's IoU after each click,
  ``val_iou_curve/step_NN`` (original size; NN counts the agent's clicks, 00 = after its seed
  prompts only). Runs made before
  the evaluation refactor logged the greedy low-res IoU of the final masks,
  ``val/final_iou_low_res``, instead; the figure uses that when present, else the last click's
  ``val_iou_curve`` tag;
* ``epoch`` (0-based) is logged with every training batch.

The step Lightning writes is the count of training batches done before the one being logged
(``fit_loop.epoch_loop._batches_that_stepped``), not ``trainer.global_step``, which under manual
optimisation counts the many optimizer steps inside each PPO iteration. The saliency scene run has
steps 0..104 for 15 epochs of 7 batches, and its validations after epochs 5, 10, 15 sit at steps 34,
69, 104, the step of the epoch's last batch. The figures therefore put a scalar logged at step ``s``
at ``x = s + 1`` PPO iterations: a training value at the iteration that produced it (1-based), a
validation value after that many iterations; a second x axis on top counts epochs, from the
``epoch`` tag.

Command (prints what it read, writes the PNG)::

    python -m alignsam.evaluation.curves --runs logs/scenes/blur/version_0 [more runs] \\
        [--metric miou_fgbg] [--labels "seed 0" ...] [--smooth 10] [--title ...] \\
        --out docs/images/curve_blur.png

Without ``--metric`` the task's first headline metric (:data:`alignsam.metrics.HEADLINE_METRICS`,
task read from the run's ``hparams.yaml``) is drawn.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

TRAIN_TAG = "train/final_iou"
VAL_LOW_RES_TAG = "val/final_iou_low_res"  # older runs
VAL_CURVE_PREFIX = "val_iou_curve/step_"
EPOCH_TAG = "epoch"
BASELINES = {"centre": "centre click", "random": "random clicks"}  # val_<name>/<metric> -> legend text
EVENT_FILE_MARKER = "tfevents"

# Figure layout, in one place: 10 x 6.5 inches at 110 dpi -> a 1100 x 715 PNG, legends right of the plots.
FIGSIZE = (10.0, 6.5)
DPI = 110
RAW_ALPHA = 0.25
BASELINE_COLOURS = {"centre": "0.35", "random": "tab:brown"}  # when all runs share the baselines
BASELINE_STYLES = {"centre": "--", "random": ":"}  # per-run baselines: the run's colour, these styles


# ---------------------------------------------------------------------------------------------
# reading event files
# ---------------------------------------------------------------------------------------------
def event_files(run_dir: PathLike) -> List[Path]:
    """The TensorBoard event files directly inside ``run_dir``, sorted by name (= creation time).

    Raises ``FileNotFoundError`` naming ``run_dir`` when it is missing or holds no event file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    files = sorted(p for p in run_dir.iterdir() if p.is_file() and EVENT_FILE_MARKER in p.name)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files (*{EVENT_FILE_MARKER}*) in {run_dir}")
    return files


def load_scalars(run_dir: PathLike) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar tag of a run: ``{tag: [(step, value), ...]}`` sorted by step.

    Each event file is read on its own with tensorboard's ``EventAccumulator`` (all points kept, no
    reservoir sampling) and the files are merged. Where one step of a tag was written more than once
    (within a file, e.g. ``epoch`` at an epoch's last batch, or across files of a resumed run), the
    value written last (by wall time) is kept.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    merged: Dict[str, Dict[int, Tuple[float, float]]] = {}  # tag -> step -> (wall_time, value)
    for path in event_files(run_dir):
        acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()[SCALARS]:
            by_step = merged.setdefault(tag, {})
            for event in acc.Scalars(tag):
                kept = by_step.get(event.step)
                if kept is None or event.wall_time >= kept[0]:
                    by_step[event.step] = (event.wall_time, float(event.value))
    return {tag: [(step, by_step[step][1]) for step in sorted(by_step)] for tag, by_step in merged.items()}


class UnknownTagError(KeyError):
    """A tag that the run never logged; the message lists the tags it did log."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _pick(scalars: Dict[str, List[Tuple[int, float]]], tag: str, run_dir: PathLike) -> List[Tuple[int, float]]:
    if tag not in scalars:
        raise UnknownTagError(f"tag {tag!r} not in the event files of {run_dir}; "
                              f"available tags: {', '.join(sorted(scalars))}")
    return scalars[tag]


def read_scalars(run_dir: PathLike, tag: str) -> List[Tuple[int, float]]:
    """One scalar tag of a run as ``[(step, value), ...]``, sorted by step, all event files merged.

    Raises ``FileNotFoundError`` naming ``run_dir`` when it holds no event file, and ``KeyError``
    listing the available tags (:class:`UnknownTagError`, a ``KeyError``) when ``tag`` was never logged.
    """
    return _pick(load_scalars(run_dir), tag, run_dir)


def read_hparams(run_dir: PathLike) -> dict:
    """The run's ``hparams.yaml`` (Lightning writes it next to the event files); ``{}`` if absent."""
    import yaml

    path = Path(run_dir) / "hparams.yaml"
    if not path.is_file():
        return {}
    with open(path) as f:
        loaded = yaml.safe_load(f)
    return loaded if isinstance(loaded, dict) else {}


@dataclass
class RunCurves:
    """What one run contributes to a figure. Steps are the logged steps (see the module docstring).

    Attributes:
        label: legend text.
        train: ``train/final_iou`` per PPO iteration, ``[(step, value)]``.
        val: the agent's ``val/<metric>`` at each validation.
        val_iou: the agent's validation IoU of its final masks at each validation, from
            ``val_iou_tag`` (see :func:`validation_iou_tag`; empty if neither was logged).
        val_iou_tag: the tag ``val_iou`` came from, or ``None``.
        baselines: ``{"centre": value, "random": value}``, the last logged value of each baseline
            present (they are computed once and logged unchanged at every validation).
        epochs: ``epoch`` per step (0-based epoch of that batch; empty if not logged).
    """

    label: str
    train: List[Tuple[int, float]]
    val: List[Tuple[int, float]]
    val_iou: List[Tuple[int, float]] = field(default_factory=list)
    val_iou_tag: Optional[str] = None
    baselines: Dict[str, float] = field(default_factory=dict)
    epochs: List[Tuple[int, float]] = field(default_factory=list)


def validation_iou_tag(tags) -> Optional[str]:
    """The tag of the agent's validation IoU after its last click: ``val/final_iou_low_res`` if
    logged (older runs, low-res), else the ``val_iou_curve/step_NN`` with the largest NN (original
    size), else ``None``."""
    if VAL_LOW_RES_TAG in tags:
        return VAL_LOW_RES_TAG
    curve = [t for t in tags if t.startswith(VAL_CURVE_PREFIX) and t[len(VAL_CURVE_PREFIX):].isdigit()]
    return max(curve, key=lambda t: int(t[len(VAL_CURVE_PREFIX):])) if curve else None


def read_run(run_dir: PathLike, metric: str, label: Optional[str] = None) -> RunCurves:
    """Read the curves of one run for validation metric ``metric`` (e.g. ``miou_fgbg``).

    ``label`` defaults to ``"seed <seed>"`` from ``hparams.yaml``, else the directory's last two
    path parts. Missing ``train/final_iou`` or ``val/<metric>`` raise ``KeyError`` listing the tags.
    """
    scalars = load_scalars(run_dir)
    val_iou_tag = validation_iou_tag(scalars)
    if label is None:
        seed = read_hparams(run_dir).get("seed")
        label = f"seed {seed}" if seed is not None else "/".join(Path(run_dir).resolve().parts[-2:])
    return RunCurves(
        label=label,
        train=_pick(scalars, TRAIN_TAG, run_dir),
        val=_pick(scalars, f"val/{metric}", run_dir),
        val_iou=scalars[val_iou_tag] if val_iou_tag else [],
        val_iou_tag=val_iou_tag,
        baselines={name: scalars[tag][-1][1] for name in BASELINES if (tag := f"val_{name}/{metric}") in scalars},
        epochs=scalars.get(EPOCH_TAG, []),
    )


# ---------------------------------------------------------------------------------------------
# plotting
# ---------------------------------------------------------------------------------------------
def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start), same length as ``values``."""
    if window < 1:
        raise ValueError(f"moving-average window must be >= 1, got {window}")
    v = np.asarray(values, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(len(v))
    lo = np.maximum(idx + 1 - window, 0)
    return (csum[idx + 1] - csum[lo]) / (idx + 1 - lo)


def iterations(points: Sequence[Tuple[int, float]]) -> np.ndarray:
    """x positions of logged points: ``step + 1`` PPO iterations (see the module docstring)."""
    return np.array([s for s, _ in points], dtype=np.float64) + 1


def epoch_ends(epochs: Sequence[Tuple[int, float]]) -> List[int]:
    """PPO iterations done at the end of each epoch, from the ``epoch`` tag: ``[7, 14, ...]``.

    The last epoch counts as ended at the last logged step.
    """
    last_step: Dict[int, int] = {}
    for step, epoch in epochs:
        last_step[int(round(epoch))] = max(step, last_step.get(int(round(epoch)), step))
    return [last_step[e] + 1 for e in sorted(last_step)]


def _values(points: Sequence[Tuple[int, float]]) -> np.ndarray:
    return np.array([v for _, v in points], dtype=np.float64)


def _piecewise_linear(x, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp`` that continues the end segments' slopes outside ``xp`` instead of clamping
    (the secondary axis needs an invertible map over the whole, margin-padded x range)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.interp(x, xp, fp)
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0]), y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2]), y)


def _add_epoch_axis(ax, ends: List[int]) -> None:
    """Top x axis in epochs: piecewise-linear between epoch boundaries (iterations -> epochs)."""
    xp = np.array([0] + ends, dtype=np.float64)
    fp = np.arange(len(xp), dtype=np.float64)
    top = ax.secondary_xaxis("top", functions=(lambda x: _piecewise_linear(x, xp, fp),
                                               lambda e: _piecewise_linear(e, fp, xp)))
    top.set_xlabel("epochs")
    every = max(1, int(np.ceil(len(ends) / 15)))
    top.set_xticks(fp[::every])


def plot_learning_curves(
    runs: Sequence[RunCurves],
    metric: str,
    title: Optional[str] = None,
    smooth: int = 10,
    figsize: Tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
):
    """Draw one task's learning curves; returns a ``matplotlib.figure.Figure`` (Agg canvas).

    Top panel: ``train/final_iou`` per PPO iteration, raw (faint) and a trailing ``smooth``-point
    moving average, with the agent's validation IoU (``RunCurves.val_iou``) as markers. Bottom panel: the agent's
    ``val/<metric>`` at each validation, the centre / random click baselines as dashed horizontal
    lines (drawn once, grey and brown, when all runs agree on them; else in each run's colour, dashed
    for centre, dotted for random). One colour per run; legends right of the panels. Each line has a gid for
    tests and scripts: ``train_raw/<i>``, ``train_smooth/<i>``, ``val_iou/<i>``, ``val/<i>``,
    ``baseline_<name>`` or ``baseline_<name>/<i>``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot_learning_curves needs at least one run")
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_val = fig.subplots(2, 1, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for i, (run, colour) in enumerate(zip(runs, colours)):
        x, y = iterations(run.train), _values(run.train)
        ax_train.plot(x, y, color=colour, alpha=RAW_ALPHA, linewidth=1.0, gid=f"train_raw/{i}", label="_nolegend_")
        ax_train.plot(x, moving_average(y, smooth), color=colour, linewidth=2.0, gid=f"train_smooth/{i}",
                      label=f"{run.label}: training batches\n(sampled clicks, low-res, {smooth}-iteration mean)")
        if run.val_iou:
            size = "low-res" if run.val_iou_tag == VAL_LOW_RES_TAG else "original size"
            ax_train.plot(iterations(run.val_iou), _values(run.val_iou), color=colour, linestyle="none",
                          marker="D", markersize=6, markeredgecolor="black", gid=f"val_iou/{i}",
                          label=f"{run.label}: validation set\n(greedy clicks, {size})")
        ax_val.plot(iterations(run.val), _values(run.val), color=colour, marker="o", markersize=7, linewidth=2.0,
                    gid=f"val/{i}", label=f"{run.label}: agent (greedy clicks)")

    for name, text in BASELINES.items():
        values = [run.baselines[name] for run in runs if name in run.baselines]
        if not values:
            continue
        shared = len(values) == len(runs) and np.allclose(values, values[0], rtol=0, atol=1e-6)
        for i, run in enumerate(runs):
            if name not in run.baselines or (shared and i > 0):
                continue
            ax_val.axhline(run.baselines[name], color=BASELINE_COLOURS[name] if shared else colours[i],
                           linestyle="--" if shared else BASELINE_STYLES[name], linewidth=1.5,
                           gid=f"baseline_{name}" if shared else f"baseline_{name}/{i}",
                           label=text if shared else f"{run.label}: {text}")

    ax_train.set_ylabel("IoU of the final masks")
    ax_val.set_ylabel(f"validation set\n{metric}")
    ax_val.set_xlabel("PPO iterations (training batches)")
    for ax in (ax_train, ax_val):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
    ax_train.set_xlim(left=0)
    ends = [epoch_ends(run.epochs) for run in runs]
    if ends[0] and all(e == ends[0] for e in ends):
        _add_epoch_axis(ax_train, ends[0])
    if title:
        fig.suptitle(title, fontsize="large")
    return fig


def save_figure(fig, path: PathLike) -> Path:
    """Render ``fig`` with Agg and write it as a PNG of ``figsize * dpi`` pixels, atomically.

    The pixels go through :func:`alignsam.visualize.save_png` (temporary file, then rename).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from alignsam.visualize import save_png

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])
    return save_png(path, rgb)


# ---------------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------------
def _default_metric(run_dir: PathLike) -> str:
    from alignsam.metrics import HEADLINE_METRICS

    task = read_hparams(run_dir).get("task")
    if task not in HEADLINE_METRICS:
        raise ValueError(f"no --metric given and {Path(run_dir) / 'hparams.yaml'} names no known task "
                         f"(task={task!r}; known: {', '.join(HEADLINE_METRICS)})")
    return HEADLINE_METRICS[task][0]


def _describe(name: str, points: Sequence[Tuple[int, float]]) -> str:
    if not points:
        return f"  {name}: no points"
    step, value = points[-1]
    return f"  {name}: {len(points)} points, last {value:.4f} at step {step} (PPO iteration {step + 1})"


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="TensorBoard run directories (e.g. one per seed)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--metric", default=None,
                        help="validation metric, without the 'val/' prefix (default: the task's first headline metric)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: 'seed <seed>')")
    parser.add_argument("--smooth", type=int, default=10,
                        help="moving-average window of the training curve, in PPO iterations")
    parser.add_argument("--title", default=None, help="figure title (default: '<task>: learning curve')")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} entries for {len(args.runs)} --runs")
    metric = args.metric or _default_metric(args.runs[0])
    labels = args.labels or [None] * len(args.runs)
    runs = []
    for run_dir, label in zip(args.runs, labels):
        run = read_run(run_dir, metric, label)
        runs.append(run)
        print(f"{run_dir} ({run.label}):")
        print(_describe(TRAIN_TAG, run.train))
        print(_describe(f"val/{metric}", run.val))
        if run.val_iou_tag:
            print(_describe(run.val_iou_tag, run.val_iou))
        for name, value in run.baselines.items():
            print(f"  val_{name}/{metric}: {value:.4f}")
        ends = epoch_ends(run.epochs)
        if ends:
            print(f"  {len(ends)} epochs, {ends[0]} PPO iterations in the first")
    title = args.title
    if title is None:
        task = read_hparams(args.runs[0]).get("task")
        title = f"{task}: learning curve" if task else None
    out = save_figure(plot_learning_curves(runs, metric, title=title, smooth=args.smooth), args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
