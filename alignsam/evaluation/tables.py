"""The results table of ``evaluate.py``: column order, Markdown, CSV.

A table is ``{strategy: {column: value}}`` (:meth:`alignsam.evaluation.evaluator.Evaluator.compute`).
Columns are the task's headline metrics first, then its other metrics, then NoC (``noc@85``,
``fail@85``, ``noc@90``, ``fail@90``), then the IoU after each click (``iou@0`` = after the seed
prompts only). The Markdown table stops the per-click columns at the agent's last click; the CSV
keeps every column (the oracle's clicks go further).

Coverage: when some strategy could not score every episode (PerSAM-style on a class missing from
the few-shot draw; see :mod:`alignsam.evaluation.scoring`), every row has ``episodes`` /
``episodes_total`` (and, for the semantic tasks, ``images`` / ``images_total``: the label maps its
metrics cover), after the metrics; such a strategy's row has ``unscored@<class id>`` (episodes of
that class left out), last. The Markdown table shows ``scored/total`` in one column and, under the
table, one footnote per such strategy naming the count and the classes; the CSV keeps the numbers.
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from alignsam.atomic import write_text_atomic
from alignsam.evaluation.strategies import label_of
from alignsam.metrics import HEADLINE_METRICS

Table = Dict[str, Dict[str, float]]
_CLICK = re.compile(r"^iou@(\d+)$")
_NOC = ("noc@85", "fail@85", "noc@90", "fail@90")
_COVERAGE = ("episodes", "episodes_total", "images", "images_total")
_UNSCORED = re.compile(r"^unscored@(-?\d+)$")
_MARKDOWN_HIDDEN = ("episodes_total", "images_total")  # shown inside the "scored/total" cells


def columns(table: Table, task: str, max_click: Optional[int] = None) -> List[str]:
    """Ordered columns of ``table`` (per-click columns up to ``max_click`` when given)."""
    seen: List[str] = []
    for row in table.values():
        seen.extend(k for k in row if k not in seen)
    clicks = sorted((int(_CLICK.match(k).group(1)) for k in seen if _CLICK.match(k)))
    if max_click is not None:
        clicks = [c for c in clicks if c <= max_click]
    headline = [k for k in HEADLINE_METRICS.get(task, []) if k in seen]
    metrics = [k for k in seen if k not in headline and k not in _NOC and k not in _COVERAGE
               and not _CLICK.match(k) and not _UNSCORED.match(k)]
    unscored = sorted((k for k in seen if _UNSCORED.match(k)), key=lambda k: int(_UNSCORED.match(k).group(1)))
    return (headline + metrics + [k for k in _COVERAGE if k in seen] + [k for k in _NOC if k in seen]
            + [f"iou@{c}" for c in clicks] + unscored)


def _cell(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _markdown_cell(row: Dict[str, float], name: str) -> str:
    if name in ("episodes", "images") and name in row and f"{name}_total" in row:
        return f"{int(row[name])}/{int(row[name + '_total'])}"
    return _cell(row.get(name))


def to_markdown(table: Table, names: List[str]) -> str:
    """One row per strategy (its readable label), one column per name; ``-`` where not applicable.

    Coverage shows as ``scored/total`` under ``episodes`` (and ``images``); the ``unscored@<id>``
    counts are left to :func:`coverage_notes`."""
    names = [k for k in names if k not in _MARKDOWN_HIDDEN and not _UNSCORED.match(k)]
    lines = ["| strategy | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for strategy, row in table.items():
        label = label_of(strategy)
        lines.append(f"| {label} | " + " | ".join(_markdown_cell(row, k) for k in names) + " |")
    return "\n".join(lines)


def _class_name(task: str, class_id: int) -> Optional[str]:
    """The readable name of a semantic task's class id (None for the binary tasks)."""
    from alignsam.tasks import TASKS

    names = TASKS[task].class_names if task in TASKS else ()
    return names[class_id - 1] if 1 <= class_id <= len(names) else None


def coverage_notes(table: Table, task: str) -> List[str]:
    """One footnote per strategy that left episodes unscored: how many, of which classes, and
    what its metrics cover (empty when every strategy scored every episode)."""
    notes = []
    for strategy, row in table.items():
        unscored = {int(_UNSCORED.match(k).group(1)): int(v) for k, v in row.items() if _UNSCORED.match(k)}
        if not unscored or "episodes_total" not in row:
            continue
        scored, total = int(row["episodes"]), int(row["episodes_total"])
        classes = ", ".join(f"class {c}" + (f" ({_class_name(task, c)})" if _class_name(task, c) else "")
                            + f": {n}" for c, n in sorted(unscored.items()))
        if "images_total" in row:
            images, all_images = int(row["images"]), int(row["images_total"])
            cover = (f"its metrics cover {images} of {all_images} images, those without such an episode (a "
                     f"label map needs every episode of its image); the other rows cover all {all_images}")
        else:
            cover = f"its metrics cover the {scored} it scored; the other rows cover all {total}"
        which = "" if set(unscored) == {0} else f", {classes}"  # the binary tasks have one class, 0
        notes.append(f"* {label_of(strategy)}: {total - scored} of {total} episodes not "
                     f"scored{which}; {cover}.")
    return notes


def to_csv(table: Table, names: List[str]) -> str:
    """``strategy,label,<columns>`` with empty cells where not applicable (full float precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["strategy", "label"] + names)
    for strategy, row in table.items():
        writer.writerow([strategy, label_of(strategy)] + [repr(row[k]) if k in row else "" for k in names])
    return buffer.getvalue()


def write_tables(directory: Path, stem: str, table: Table, task: str, steps: int, header: str) -> Tuple[Path, Path]:
    """``<directory>/<stem>.md`` (header + table up to click ``steps``) and ``<stem>.csv``, atomically."""
    markdown = header.rstrip() + "\n\n" + to_markdown(table, columns(table, task, steps)) + "\n"
    notes = coverage_notes(table, task)
    if notes:
        markdown += "\n" + "\n".join(notes) + "\n"
    md = write_text_atomic(Path(directory) / f"{stem}.md", markdown)
    csv_path = write_text_atomic(Path(directory) / f"{stem}.csv", to_csv(table, columns(table, task)))
    return md, csv_path


def compact_columns(table: Table, task: str) -> List[str]:
    """The terminal's columns: the task's headline metrics, the further ones it shows
    (:attr:`alignsam.tasks.Task.shown`), coverage when some strategy skipped episodes, then NoC@85."""
    from alignsam.tasks import task_record

    record = task_record(task)
    seen = {k for row in table.values() for k in row}
    wanted = list(record.headline) + list(record.shown) + ["episodes", "noc@85"]
    return [k for k in wanted if k in seen]


def compact_table(table: Table, task: str, title: str = ""):
    """A ``rich.table.Table`` of the task's own metrics, headline first (arrows say which way is
    better), coverage ``scored/total`` where it applies, and ``NoC@85 (fail %)``; the full table
    is in the Markdown and CSV files."""
    from rich.table import Table as RichTable

    from alignsam.tasks import LOWER_IS_BETTER

    names = compact_columns(table, task)
    out = RichTable(title=title or None, title_justify="left")
    out.add_column("strategy", no_wrap=True)
    for name in names:
        header = {"noc@85": "NoC@85 (fail)", "episodes": "episodes"}.get(name, name)
        if name not in ("noc@85", "episodes"):
            header += " ↓" if name in LOWER_IS_BETTER else " ↑"
        out.add_column(header, justify="right", no_wrap=True)
    for strategy, row in table.items():
        cells = []
        for name in names:
            if name == "noc@85" and "noc@85" in row:
                cells.append(f"{row['noc@85']:.2f} ({100 * row.get('fail@85', 0.0):.0f}%)")
            else:
                cells.append(_markdown_cell(row, name))
        out.add_row(label_of(strategy), *cells)
    return out

