"""``evaluate.py summary``: several runs (seeds) per task -> mean +- sd and the agent's bootstrap CIs.

    python evaluate.py summary --runs logs/std/s0 logs/std/s1 logs/std/s2
    python evaluate.py summary --runs paper=logs/std/s0 paper=logs/std/s1 srm_input=logs/v1/s0 srm_input=logs/v1/s1

Each ``--runs`` entry is ``[label=]DIR``. DIR is a ``--trainer.logger.init_args.save_dir`` (its
``<task>/version_*/`` folders are runs), a task folder (``logs/shadow``: its ``version_*``), or one
run folder (``.../version_0``). Every run needs ``evaluation/test_episodes.npz`` (written by
``evaluate.py``; ``--split val`` reads ``evaluation_val/``). Entries with the same label are the
seeds of one agent variant; entries without a label form one unlabelled variant.

Per task and headline metric it prints and writes (``--out``: ``summary.md``, ``summary.csv``) each
strategy's mean +- sd over seeds and, per variant, its agent minus every other strategy of its own
runs and minus the other variants' agents, with a paired two-level bootstrap interval
(:mod:`alignsam.evaluation.statistics`); "win" / "loss" only where the interval excludes 0.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from alignsam.atomic import write_text_atomic
from alignsam.errors import UserError, exit_on_user_error
from alignsam.evaluation.episodes import EpisodeStatistics, episodes_path
from alignsam.evaluation.statistics import DEFAULT_LEVEL, DEFAULT_RESAMPLES, TaskSummary, summarise_task
from alignsam.evaluation.strategies import label_of

_VERSION = re.compile(r"^version_(\d+)$")
UNLABELLED = ""


# -- finding the runs ------------------------------------------------------------------------------
def parse_entry(entry: str) -> Tuple[str, Path]:
    """``label=DIR`` or ``DIR`` -> (label, DIR); a label holds no path separator."""
    label, sep, rest = entry.partition("=")
    if sep and label and "/" not in label and "\\" not in label:
        return label, Path(rest)
    return UNLABELLED, Path(entry)


def _is_run(folder: Path, results: str) -> bool:
    return any((folder / name).exists() for name in (results, "checkpoints", "config.yaml"))


def _versions(folder: Path) -> List[Path]:
    found = [p for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_VERSION.match(p.name).group(1)))


def run_folders(directory: Path, results: str = "evaluation") -> List[Path]:
    """The run folders under ``directory``: itself when it is one, its ``version_*``, or its
    ``<task>/version_*`` (a logger save_dir). None found is a :class:`UserError`."""
    if not directory.is_dir():
        raise UserError(f"--runs: {directory} is not a folder")
    if _is_run(directory, results):
        return [directory]
    runs = _versions(directory) or [v for task in sorted(directory.iterdir()) if task.is_dir() for v in _versions(task)]
    if not runs:
        raise UserError(f"--runs: no runs under {directory} (expected {directory}/<task>/version_N/ as train.py "
                        f"writes them, a task folder with version_N/, or a run folder)")
    return runs


def load_run(run: Path, results: str = "evaluation") -> EpisodeStatistics:
    """A run's per-episode statistics; a run without them is a one-line :class:`UserError` that
    names the evaluate.py command to run."""
    path = episodes_path(run / results, "test")
    if not path.is_file():
        ckpt = run / "checkpoints" / "last.ckpt"
        split = "" if results == "evaluation" else f" --data.init_args.test_split {results.split('_', 1)[1]}"
        raise UserError(f"{run}: no per-episode statistics ({path} is missing); score the run first: "
                        f"python evaluate.py --ckpt_path {ckpt}{split}")
    return EpisodeStatistics.load(path)


def collect(entries: Sequence[str], split: str = "test") -> Tuple[Dict[str, Dict[str, List[EpisodeStatistics]]], Dict[int, str]]:
    """``--runs`` entries -> ``{task: {variant: [runs]}}`` and ``{id(run): folder}``; a folder met
    twice under one label is read once."""
    results = "evaluation" if split == "test" else f"evaluation_{split}"
    by_task: Dict[str, Dict[str, List[EpisodeStatistics]]] = {}
    folders: Dict[int, str] = {}
    seen = set()
    for entry in entries:
        label, directory = parse_entry(entry)
        for run in run_folders(directory, results):
            key = (label, run.resolve())
            if key in seen:
                continue
            seen.add(key)
            stats = load_run(run, results)
            folders[id(stats)] = str(run)
            by_task.setdefault(stats.task, {}).setdefault(label, []).append(stats)
    return by_task, folders


def summarise(by_task, folders, resamples: int, seed: int, level: float) -> List[TaskSummary]:
    """One :class:`TaskSummary` per task and headline metric, tasks in :data:`alignsam.tasks.TASKS` order."""
    from alignsam.tasks import TASKS

    out = []
    for task in sorted(by_task, key=lambda t: list(TASKS).index(t) if t in TASKS else len(TASKS)):
        variants = by_task[task]
        first = next(iter(variants.values()))[0]
        for metric in first.metrics():
            summary = summarise_task(variants, metric, resamples, seed, level, names=folders)
            summary.notes += _seed_notes(variants, folders)
            out.append(summary)
    return out


def _seed_notes(variants, folders) -> List[str]:
    notes = []
    for label, runs in variants.items():
        seeds: Dict[object, List[str]] = {}
        for run in runs:
            seeds.setdefault(run.meta.get("seed"), []).append(folders.get(id(run), "?"))
        for seed, where in seeds.items():
            if seed is not None and len(where) > 1:
                notes.append(f"{label or 'runs'}: model seed {seed} in {len(where)} runs ({', '.join(where)}): "
                             f"the same seed twice?")
    return notes


# -- tables ----------------------------------------------------------------------------------------
def _number(value: float, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}" if metric in ("ber",) or abs(value) >= 10 else f"{value:.3f}"


def _signed(value: float, metric: str) -> str:
    text = _number(value, metric)
    return text if text == "-" or text.startswith("-") else "+" + text


def rows(summary: TaskSummary) -> List[Dict[str, object]]:
    """One row per (variant, strategy) compared with each variant's agent, in display order: the
    variant's own strategies (its agent first, without a difference), then the other variants' agents."""
    variants = list(dict.fromkeys(s.variant for s in summary.strategies))
    out = []
    for variant in variants:
        for s in summary.strategies:
            if s.variant == variant:
                diff = None if s.strategy == "agent" else summary.difference(variant, s.strategy)
                out.append({"versus": variant, "summary": s, "difference": diff})
        for other in variants:
            if other != variant:
                out.append({"versus": variant, "summary": summary.strategy(other, "agent"),
                            "difference": summary.difference(variant, "agent", other)})
    return out


def _row_label(row, many: bool) -> str:
    s = row["summary"]
    label = label_of(s.strategy)
    if many and s.variant != row["versus"]:
        label = f"{label} ({s.variant or 'unlabelled'})"
    return label


def _heading(summary: TaskSummary) -> str:
    arrow = "lower is better" if summary.lower_is_better else "higher is better"
    return (f"{summary.task}: {summary.metric} ({arrow}); {summary.units} test units, mean ± sd over seeds, "
            f"agent − strategy with a {round(100 * summary.level)}% paired bootstrap interval "
            f"({summary.resamples} resamples of seeds and units)")


def to_markdown(summaries: Sequence[TaskSummary]) -> str:
    blocks = []
    for summary in summaries:
        many = len({s.variant for s in summary.strategies}) > 1
        lines = [f"## {_heading(summary)}", ""]
        head = (["agent variant"] if many else []) + ["strategy", "seeds", summary.metric, "agent − strategy [CI]", "verdict"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * (2 if many else 1) + "---:|---:|---|---|"]
        for row in rows(summary):
            s, d = row["summary"], row["difference"]
            cells = ([row["versus"] or "(unlabelled)"] if many else []) + [
                f"**{_row_label(row, many)}**" if s.strategy == "agent" and s.variant == row["versus"] else _row_label(row, many),
                str(s.seeds), f"{_number(s.mean, summary.metric)} ± {_number(s.sd, summary.metric)}",
                "" if d is None else f"{_signed(d.estimate, summary.metric)} [{_signed(d.low, summary.metric)}, "
                                     f"{_signed(d.high, summary.metric)}]",
                "" if d is None else (f"**{d.verdict}**" if d.verdict else "")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [f"\n* {note}" for note in summary.notes]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


CSV_COLUMNS = ("task", "metric", "lower_is_better", "agent_variant", "variant", "strategy", "label", "seeds", "mean",
               "sd", "per_seed", "difference", "ci_low", "ci_high", "verdict", "units", "resamples", "level")


def to_csv(summaries: Sequence[TaskSummary]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for summary in summaries:
        for row in rows(summary):
            s, d = row["summary"], row["difference"]
            writer.writerow([summary.task, summary.metric, int(summary.lower_is_better), row["versus"], s.variant,
                             s.strategy, label_of(s.strategy), s.seeds, repr(s.mean), repr(s.sd),
                             ";".join(repr(float(v)) for v in s.values),
                             "" if d is None else repr(d.estimate), "" if d is None else repr(d.low),
                             "" if d is None else repr(d.high), "" if d is None else d.verdict,
                             summary.units, summary.resamples, summary.level])
    return buffer.getvalue()


def rich_table(summary: TaskSummary):
    from rich.table import Table

    many = len({s.variant for s in summary.strategies}) > 1
    table = Table(title=_heading(summary), title_justify="left")
    if many:
        table.add_column("agent variant", no_wrap=True)
    table.add_column("strategy", no_wrap=True)
    table.add_column("seeds", justify="right")
    table.add_column(summary.metric + (" ↓" if summary.lower_is_better else " ↑"), justify="right", no_wrap=True)
    table.add_column("agent − strategy [CI]", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for row in rows(summary):
        s, d = row["summary"], row["difference"]
        cells = ([row["versus"] or "(unlabelled)"] if many else []) + [
            _row_label(row, many), str(s.seeds), f"{_number(s.mean, summary.metric)} ± {_number(s.sd, summary.metric)}",
            "" if d is None else f"{_signed(d.estimate, summary.metric)} [{_signed(d.low, summary.metric)}, "
                                 f"{_signed(d.high, summary.metric)}]",
            "" if d is None else {"win": "[green]win[/green]", "loss": "[red]loss[/red]"}.get(d.verdict, "")]
        table.add_row(*cells)
    return table


# -- the command -------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py summary",
        description="Several scored runs (seeds) per task: each strategy's mean ± sd over seeds and the agent's "
                    "difference to each with a paired two-level bootstrap interval.")
    p.add_argument("--runs", nargs="+", required=True, metavar="[LABEL=]DIR",
                   help="save_dirs (DIR/<task>/version_N), task folders or run folders; LABEL=DIR groups runs "
                        "into labelled agent variants compared with one another")
    p.add_argument("--out", default="summary", help="folder for summary.md and summary.csv (default: ./summary)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap replicates (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default 0)")
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL, help="interval coverage (default 0.95)")
    p.add_argument("--split", default="test", help="the split the runs were scored on (default test)")
    return p


def summary_main(argv: Sequence[str]) -> int:
    """``evaluate.py summary``; a :class:`UserError` ends as one line and exit status 2."""
    args = parser().parse_args(list(argv))

    def run() -> int:
        from rich.console import Console

        by_task, folders = collect(args.runs, args.split)
        summaries = summarise(by_task, folders, args.resamples, args.seed, args.level)
        console = Console(width=None if sys.stdout.isatty() else 200)
        for summary in summaries:
            console.print(rich_table(summary))
            for note in summary.notes:
                console.print(f"* {note}", markup=False)
        out = Path(args.out)
        md = write_text_atomic(out / "summary.md", to_markdown(summaries))
        table = write_text_atomic(out / "summary.csv", to_csv(summaries))
        print(f"written: {md}, {table}")
        return 0

    return exit_on_user_error(run)
