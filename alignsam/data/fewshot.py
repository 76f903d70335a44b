"""The few-shot protocol: which training images a run uses, drawn from a seed and written down.

``data.train_size`` images (paper: 50) are drawn without replacement from the train split's ids,
sorted first so that the draw does not depend on the file system's listing order, with
``numpy.random.default_rng(data.subset_seed)``. The chosen ids go to ``fewshot_ids.txt`` in the
run's log directory; ``data.train_ids_file`` reads such a file back to repeat a run exactly even
if the folder has changed since.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from alignsam.data.files import DataConfigError, require_file

log = logging.getLogger(__name__)

FEWSHOT_IDS_FILENAME = "fewshot_ids.txt"


def draw_subset(ids: Sequence[str], size: Optional[int], seed: int,
                key: str = "data.train_size") -> List[str]:
    """``size`` ids drawn with ``seed`` from ``ids`` (all of them when ``size`` is None), sorted."""
    pool = sorted(ids)
    if size is None:
        return pool
    if size <= 0:
        raise DataConfigError(key, f"must be a positive number of images (or null for all), got {size}")
    if size >= len(pool):
        if size > len(pool):
            log.warning("%s=%d but the split has only %d images: using all of them", key, size, len(pool))
        return pool
    chosen = np.random.default_rng(seed).choice(len(pool), size=size, replace=False)
    return sorted(pool[i] for i in chosen)


def read_fewshot_ids(path: Path | str, available: Iterable[str],
                     key: str = "data.train_ids_file") -> List[str]:
    """Ids listed in ``path`` (``#`` comments skipped); each must exist in ``available``."""
    path = require_file(Path(path), key, "few-shot ids file")
    ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise DataConfigError(key, "few-shot ids file lists no ids", path)
    known = set(available)
    missing = [i for i in ids if i not in known]
    if missing:
        raise DataConfigError(key, f"few-shot ids not found in the train split: {missing[:5]}", path)
    return sorted(set(ids))


def write_fewshot_ids(directory: Path | str, ids: Sequence[str], header: Sequence[str] = ()) -> Path:
    """Write ``ids`` (one a line, after ``# header`` lines) to ``<directory>/fewshot_ids.txt``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FEWSHOT_IDS_FILENAME
    lines = [f"# {h}" for h in header] + list(ids)
    path.write_text("\n".join(lines) + "\n")
    return path
