"""The results table of ``evaluate.py``: column order, Markdown, CSV.

A table is ``{strategy: {column: value}}`` (:meth:`alignsam.evaluation.evaluator.Evaluator.compute`).
Columns are the task's headline metrics first, then its other metrics, then NoC (``noc@85``,
``fail@85``, ``noc@90``, ``fail@90``), then the IoU after each click (``iou@0`` = after the seed
prompts only). The Markdown table stops the per-click columns at the agent's last click; the CSV
keeps every column (the oracle's clicks go further).
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from alignsam.atomic import write_text_atomic
from alignsam.evaluation.strategies import LABELS
from alignsam.metrics import HEADLINE_METRICS

Table = Dict[str, Dict[str, float]]
_CLICK = re.compile(r"^iou@(\d+)$")
_NOC = ("noc@85", "fail@85", "noc@90", "fail@90")


def columns(table: Table, task: str, max_click: Optional[int] = None) -> List[str]:
    """Ordered columns of ``table`` (per-click columns up to ``max_click`` when given)."""
    seen: List[str] = []
    for row in table.values():
        seen.extend(k for k in row if k not in seen)
    clicks = sorted((int(_CLICK.match(k).group(1)) for k in seen if _CLICK.match(k)))
    if max_click is not None:
        clicks = [c for c in clicks if c <= max_click]
    headline = [k for k in HEADLINE_METRICS.get(task, []) if k in seen]
    metrics = [k for k in seen if k not in headline and k not in _NOC and not _CLICK.match(k)]
    return headline + metrics + [k for k in _NOC if k in seen] + [f"iou@{c}" for c in clicks]


def _cell(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def to_markdown(table: Table, names: List[str]) -> str:
    """One row per strategy (its readable label), one column per name; ``-`` where not applicable."""
    lines = ["| strategy | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for strategy, row in table.items():
        label = LABELS.get(strategy, strategy)
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(k)) for k in names) + " |")
    return "\n".join(lines)


def to_csv(table: Table, names: List[str]) -> str:
    """``strategy,label,<columns>`` with empty cells where not applicable (full float precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["strategy", "label"] + names)
    for strategy, row in table.items():
        writer.writerow([strategy, LABELS.get(strategy, strategy)] + [repr(row[k]) if k in row else "" for k in names])
    return buffer.getvalue()


def write_tables(directory: Path, stem: str, table: Table, task: str, steps: int, header: str) -> Tuple[Path, Path]:
    """``<directory>/<stem>.md`` (header + table up to click ``steps``) and ``<stem>.csv``, atomically."""
    markdown = header.rstrip() + "\n\n" + to_markdown(table, columns(table, task, steps)) + "\n"
    md = write_text_atomic(Path(directory) / f"{stem}.md", markdown)
    csv_path = write_text_atomic(Path(directory) / f"{stem}.csv", to_csv(table, columns(table, task)))
    return md, csv_path
