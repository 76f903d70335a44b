"""Moved: the result tables now come from ``python evaluate.py summary`` (mean ± sd over seeds and the
agent's paired bootstrap intervals, from each run's ``evaluation/test_episodes.npz``; docs/evaluation.md).

    python docs/results/summarise.py --runs seed0=logs/s4/seed0 seed1=logs/s4/seed1 seed2=logs/s4/seed2

still works: its ``label=DIR`` entries named seeds, so the labels are dropped and every DIR is one
seed of the same agent, i.e. ``python evaluate.py summary --runs logs/s4/seed0 logs/s4/seed1 logs/s4/seed2``.
Other options (``--out``, ``--resamples``, ...) pass through.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignsam.evaluation import summary  # noqa: E402


def forwarded(argv: Sequence[str]) -> List[str]:
    """This script's arguments as ``evaluate.py summary``'s: ``--runs`` entries without their labels."""
    out, in_runs = [], False
    for arg in argv:
        if arg.startswith("--"):
            in_runs = arg == "--runs"
        elif in_runs:
            arg = str(summary.parse_entry(arg)[1])
        out.append(arg)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = forwarded(sys.argv[1:] if argv is None else argv)
    print("docs/results/summarise.py -> python evaluate.py summary " + " ".join(args), file=sys.stderr)
    return summary.summary_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
