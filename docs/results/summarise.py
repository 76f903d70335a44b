"""Print the result tables of docs/results.md (and the README headline) from evaluate.py's CSVs.

    python docs/results/summarise.py --runs seed0=logs/s4/seed0 seed1=logs/s4/seed1 seed2=logs/s4/seed2

Each RUNS entry is ``label=DIR`` with ``DIR/<task>/version_0/evaluation/test.csv`` per scene task (the
layout of ``train.py --trainer.logger.init_args.save_dir DIR`` followed by ``evaluate.py``). Prints
the headline table (one column per strategy, ``a / b / c`` over the runs, bold for the best of the
agent, w/o RL and single step per run) and, for the first run, one condensed table per task.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Dict, List

from alignsam.metrics import HEADLINE_METRICS, LOWER_IS_BETTER

TASKS = ("shadow", "glass", "categories", "saliency", "blur")
CONTENDERS = ("agent", "no_rl", "single_step")  # the paper's ablation claim: the agent beats the other two
# README order: the agent and its ablations, the training-free strategies, the oracle; short heads
# for the wide table (evaluate.py's own labels, strategies.STRATEGIES[...].label, are longer).
HEADS = {"agent": "agent", "no_rl": "w/o RL (SRM points)", "single_step": "single step", "no_srm": "w/o SRM",
         "grid_srm": "grid + SRM", "clip_surgery": "CLIP Surgery pts", "persam": "PerSAM-style", "centre": "centre",
         "random": "random", "oracle": "oracle (T clicks)"}
ORDER = tuple(HEADS)


def read(path: Path) -> List[Dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(value: str) -> str:
    v = float(value)
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"


def headline_table(runs: Dict[str, Path]) -> str:
    lines = ["| task (metric) | " + " | ".join(HEADS[s] for s in ORDER) + " |", "|---" * (len(ORDER) + 1) + "|"]
    for task in TASKS:
        tables = {label: read(d / task / "version_0" / "evaluation" / "test.csv") for label, d in runs.items()
                  if (d / task / "version_0" / "evaluation" / "test.csv").exists()}
        if not tables:
            continue
        metric = HEADLINE_METRICS[task][0]
        sign = -1 if metric in LOWER_IS_BETTER else 1
        cells = {s: [] for s in ORDER}
        for rows in tables.values():
            by = {r["strategy"]: float(r[metric]) for r in rows}
            best = max((c for c in CONTENDERS if c in by), key=lambda c: sign * by[c])
            for s in ORDER:
                cells[s].append(None if s not in by else (f"**{by[s]:.3f}**" if s == best else f"{by[s]:.3f}"))
        row = [f"{task} ({metric})"]
        for s in ORDER:
            values = [v for v in cells[s] if v is not None]
            row.append(" / ".join(values) if values else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def task_table(task: str, path: Path) -> str:
    rows = read(path)
    cols = list(rows[0].keys())
    metrics = HEADLINE_METRICS[task]
    clicks = [c for c in cols if c.startswith("iou@") and int(c[4:]) <= 5]
    head = ["strategy", *metrics] + (["iou_fg"] if "iou_fg" in cols else []) + ["noc@85", "noc@90", *clicks]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        label = f"**{r['label']}**" if r["strategy"] == "agent" else r["label"]
        cells = [label] + [number(r[m]) for m in metrics] + ([number(r["iou_fg"])] if "iou_fg" in cols else [])
        for k in ("85", "90"):
            cells.append(f"{float(r['noc@' + k]):.2f} ({float(r['fail@' + k]):.0%})" if r.get("noc@" + k) else "-")
        cells += [number(r[c]) if r.get(c) else "-" for c in clicks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="label=DIR, first one also gives the per-task tables")
    args = parser.parse_args()
    runs = {}
    for entry in args.runs:
        label, sep, directory = entry.partition("=")
        if not sep:
            parser.error(f"--runs entry {entry!r} is not label=DIR")
        runs[label] = Path(directory)
    print(headline_table(runs))
    first = next(iter(runs.values()))
    for task in TASKS:
        path = first / task / "version_0" / "evaluation" / "test.csv"
        if path.exists():
            print(f"\n**{task}**\n\n{task_table(task, path)}")


if __name__ == "__main__":
    main()
