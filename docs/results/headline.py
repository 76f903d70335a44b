"""The README's headline table from ``evaluate.py summary``'s CSVs: per task, the agent's headline
metric (mean ± sd over seeds) and, for its ablations and the oracle, the strategy's mean and the
agent's paired bootstrap difference with its 95% interval.

    python docs/results/headline.py standard=docs/results/standard/summary.csv hard=docs/results/hard/summary.csv

Each entry is ``WORLD=CSV``; a CSV is the ``summary.csv`` that ``python evaluate.py summary --runs
... --out DIR`` wrote. Only each task's first headline metric is shown (the one the README ranks
by); the CSVs hold every headline metric. A difference is in **bold** where its interval excludes
zero (the summary's verdict), with the sign of "agent better" (lower-is-better metrics flipped).
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# the columns: the paper's ablations, the three readings of w/o RL, and the oracle
COLUMNS = {"no_rl": "w/o RL: SRM-confidence pts", "grid_srm": "w/o RL: even patches", "random_srm": "w/o RL: random patches",
           "single_step": "single step", "no_srm": "w/o SRM", "oracle": "oracle (T clicks)"}
TASK_ORDER = ("shadow", "glass", "categories", "saliency", "blur")


def read_rows(path: Path) -> List[Dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _value(x: str) -> float:
    return float(x) if x not in ("", "nan") else math.nan


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else (f"{x:.2f}" if abs(x) >= 10 else f"{x:.3f}")


def mean_sd_cell(row: Dict[str, str]) -> str:
    sd = _value(row["sd"])
    return _fmt(_value(row["mean"])) + ("" if math.isnan(sd) else f" ± {_fmt(sd)}")


def difference_cell(row: Dict[str, str]) -> str:
    diff, low, high = (_value(row[k]) for k in ("difference", "ci_low", "ci_high"))
    text = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
    return f"**{text}**" if row["verdict"] in ("win", "loss") else text


def headline_rows(world: str, rows: List[Dict[str, str]], agent_variant: str = "") -> List[str]:
    """Markdown rows, one per task of ``rows`` (a summary CSV), in README order."""
    lines = []
    for task in TASK_ORDER:
        mine = [r for r in rows if r["task"] == task and r["agent_variant"] == agent_variant]
        if not mine:
            continue
        metric = mine[0]["metric"]
        mine = [r for r in mine if r["metric"] == metric and r["variant"] in ("", agent_variant)]
        by = {r["strategy"]: r for r in mine}
        arrow = "↓" if mine[0]["lower_is_better"] == "1" else "↑"
        cells = [world, f"{task} ({metric} {arrow})", f"{by['agent']['seeds']}", mean_sd_cell(by["agent"])]
        for strategy in COLUMNS:
            r = by.get(strategy)
            cells.append("-" if r is None else f"{_fmt(_value(r['mean']))}; {difference_cell(r)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline_table(entries: Dict[str, Path], agent_variant: str = "") -> str:
    head = ["world", "task (metric)", "seeds", "agent (mean ± sd)"] + [f"{label}: mean; agent − it [95% CI]" for label in COLUMNS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for world, path in entries.items():
        lines += headline_rows(world, read_rows(path), agent_variant)
    return "\n".join(lines)


def world_entries(parser: argparse.ArgumentParser, entries: Sequence[str]) -> Dict[str, Path]:
    """``WORLD=CSV`` arguments -> ``{world: path}``; a malformed one or a missing file is a usage error."""
    out = {}
    for entry in entries:
        world, sep, path = entry.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"{entry!r}: expected WORLD=CSV with an existing summary.csv")
        out[world] = Path(path)
    return out


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", metavar="WORLD=CSV")
    parser.add_argument("--agent-variant", default="", help="the agent variant's label in the summary (default: unlabelled runs)")
    args = parser.parse_args(argv)
    table = headline_table(world_entries(parser, args.entries), args.agent_variant)
    print(table)
    return table


if __name__ == "__main__":
    main()
