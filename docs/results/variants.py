"""The variants table from ``evaluate.py summary``'s CSVs: per world, task and agent variant, the
variant's headline metric (mean ± sd over seeds) and its paired bootstrap difference with the
paper's agent, with the SRM's confidence points (the strongest w/o RL reading) and with the oracle.

    python docs/results/variants.py standard=docs/results/variants/standard/summary.csv \\
        hard=docs/results/variants/hard/summary.csv [--baseline paper] [--no-oracle]

Each entry is ``WORLD=CSV``, a ``summary.csv`` written by ``python evaluate.py summary --runs
paper=RUN ... confident=RUN ... --out DIR``: labelled runs, one label per agent variant, the paper's
agent under ``--baseline``'s label. Only each task's first headline metric is shown. A difference is
the variant minus the other, in **bold** where its interval excludes zero. A one-seed summary (the
validation screen) resamples the scenes only.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_spec = importlib.util.spec_from_file_location("headline", Path(__file__).with_name("headline.py"))
headline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(headline)

COLUMNS = ("seeds", "agent (mean ± sd)", "variant − {baseline} [95% CI]",
           "variant − SRM-confidence pts [95% CI]", "variant − oracle (T clicks) [95% CI]")


def _cell(row: Optional[Dict[str, str]]) -> str:
    return "-" if row is None else headline.difference_cell(row)


def variant_rows(world: str, rows: List[Dict[str, str]], baseline: str, oracle: bool = True) -> List[str]:
    """Markdown rows, one per (task, variant) of ``rows``, tasks in README order, the baseline first."""
    lines = []
    for task in headline.TASK_ORDER:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        metric = mine[0]["metric"]
        mine = [r for r in mine if r["metric"] == metric]
        arrow = "↓" if mine[0]["lower_is_better"] == "1" else "↑"
        labels = list(dict.fromkeys(r["agent_variant"] for r in mine))
        labels.sort(key=lambda label: label != baseline)
        for label in labels:
            own = {r["strategy"]: r for r in mine if r["agent_variant"] == label and r["variant"] == label}
            versus_baseline = next((r for r in mine if r["agent_variant"] == label and r["variant"] == baseline
                                 and r["strategy"] == "agent"), None)
            agent = own["agent"]
            cells = [world, f"{task} ({metric} {arrow})", f"`{label}`" if label != baseline else f"{label} (default)",
                     agent["seeds"], headline.mean_sd_cell(agent),
                     "" if label == baseline else _cell(versus_baseline), _cell(own.get("no_rl"))]
            cells += [_cell(own.get("oracle"))] if oracle else []
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def variants_table(entries: Dict[str, Path], baseline: str = "paper", oracle: bool = True) -> str:
    head = ["world", "task (metric)", "agent"] + [c.format(baseline=baseline) for c in COLUMNS[:None if oracle else -1]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for world, path in entries.items():
        lines += variant_rows(world, headline.read_rows(path), baseline, oracle)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", metavar="WORLD=CSV")
    parser.add_argument("--baseline", default="paper", help="the label of the paper's agent in the summaries")
    parser.add_argument("--no-oracle", action="store_true", help="leave out the oracle column (runs scored without it)")
    args = parser.parse_args(argv)
    entries = headline.world_entries(parser, args.entries)
    for path in entries.values():
        labels = {r["agent_variant"] for r in headline.read_rows(path)}
        if args.baseline not in labels:
            parser.error(f"--baseline {args.baseline!r}: no runs with that label in {path} (labels: {sorted(labels)})")
    table = variants_table(entries, args.baseline, not args.no_oracle)
    print(table)
    return table


if __name__ == "__main__":
    main()
