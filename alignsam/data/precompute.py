"""Filling the feature cache before training: one image at a time, shared by the ranks, interruptible.

:func:`precompute_splits` makes sure every sample of the named splits has its SAM embedding (and,
with a text matcher, its text map) in the :class:`~alignsam.data.features.FeatureStore`, so that
epochs only read the cache. It

* reads the samples one at a time (``dataset[i]``, exactly what the training loaders yield: the
  cache is keyed by pixel content) and encodes ``encode_chunk`` images per ``segmenter.embed``
  call. The default 1 keeps the peak memory at one image's activations (about 2.5 GiB for SAM
  ViT-B at 1024 px on a CPU; ``benchmarks/precompute_memory.py`` measures it per chunk size);
* splits the work between the ranks: rank ``r`` of ``w`` takes the samples ``indices[r::w]``;
  entries are written atomically, so ranks never see partial files;
* moves the frozen models to ``device`` for the work and back afterwards, and runs them in eval
  mode, under ``torch.no_grad()`` and outside autocast (entries must not depend on the precision
  of the run that happened to compute them);
* shows a ``rich`` progress bar per split and logs one summary line (cached already / computed);
* stops cleanly on SIGTERM between two images (:class:`PrecomputeInterrupted`): what is written
  stays written, and a rerun continues where it stopped;
* fails at once, before any work, when the cache folder cannot be written
  (:class:`CacheNotWritableError`). Failing is deliberate: running uncached would silently make
  every epoch re-encode every image (several times slower on a GPU, hours on a CPU);
* removes temporary files that writers killed mid-write left behind (rank 0, older than
  :data:`STALE_TEMP_AGE_S`, so a live writer's file survives).

:class:`PrecomputeFeatures` is the Lightning callback that does this in ``setup`` on every rank,
then waits until every rank is done: every rank then reads every entry from disk.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

from alignsam.data.feature_files import TEMP_SUFFIX
from alignsam.data.features import CacheStats, FeatureStore, TextMatcherLike
from alignsam.errors import UserError
from alignsam.foundation.segmenter import Segmenter

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CACHE_CONFIG_KEY = "model.feature_cache"
STALE_TEMP_AGE_S = 3600.0  # a live writer finishes an entry in seconds; an hour-old temp file is an orphan
Device = Union[str, torch.device]


class CacheNotWritableError(UserError):
    """The feature-cache folder cannot be created or written (the message names the config key)."""


class PrecomputeInterrupted(UserError):
    """SIGTERM arrived while precomputing; the entries written so far stay valid."""


# -- checks ----------------------------------------------------------------------------------------
def check_cache_writable(root: Union[str, Path]) -> None:
    """Create ``root`` and a probe file in it, or raise :class:`CacheNotWritableError`.

    The probe is named like a writer's temporary file, so that if this process is killed between
    creating and removing it, :func:`~alignsam.data.feature_files.remove_stale_temp_files` reclaims it.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMP_SUFFIX, dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise CacheNotWritableError(
            f"{CACHE_CONFIG_KEY}: the feature cache folder {root} cannot be written ({reason}); "
            f"point {CACHE_CONFIG_KEY} at a writable folder"
        ) from err


def _check_arguments(encode_chunk: int, rank: int, world_size: int, matcher, map_hw) -> None:
    if encode_chunk < 1:
        raise ValueError(f"encode_chunk must be >= 1, got {encode_chunk}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
    if matcher is not None and map_hw is None:
        raise ValueError("precompute_splits: map_hw (the cached map size) is required when a matcher is given")


# -- the run's surroundings: signal, device, grad mode ---------------------------------------------
@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs (the previous handler is restored afterwards).

    Installed only in the main thread (Python allows signal handlers nowhere else); elsewhere the
    event is never set. A second SIGTERM while the first is still pending goes to the previous
    handler (by default: the process ends at once; entries are atomic, so nothing is corrupted).
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: installed outside Python

    def on_sigterm(signum, frame) -> None:
        if not flag.is_set():
            flag.set()
            return
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)  # SIG_DFL ends the process, SIG_IGN ignores it

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _home_device(module: nn.Module) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def frozen_models_on(device: torch.device, *models) -> Iterator[None]:
    """Move the ``nn.Module`` among ``models`` to ``device`` in eval mode; back (device, mode) afterwards."""
    modules = [m for m in models if isinstance(m, nn.Module)]
    homes = [(_home_device(m), m.training) for m in modules]
    try:
        for module in modules:
            module.to(device).eval()
        yield
    finally:
        for module, (home, training) in zip(modules, homes):
            module.to(home).train(training)


@contextlib.contextmanager
def plain_inference(device: torch.device) -> Iterator[None]:
    """``torch.no_grad()`` with autocast off on the CPU and on ``device`` (entries in full precision)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for device_type in dict.fromkeys(("cpu", device.type)):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


# -- progress --------------------------------------------------------------------------------------
class _Progress:
    """One ``rich`` bar per split (or nothing): ``advance(n)``, and a last description when done."""

    def __init__(self, show: bool, description: str, total: int) -> None:
        self.show, self.description, self.total = show, description, total
        self._bar = self._task = None

    def __enter__(self) -> "_Progress":
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def finish(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


# -- the work --------------------------------------------------------------------------------------
@dataclass
class _SplitJob:
    """Everything one split's pass needs (the arguments of :func:`precompute_splits`)."""

    segmenter: Segmenter
    store: FeatureStore
    matcher: Optional[TextMatcherLike]
    map_hw: Optional[Tuple[int, int]]
    encode_chunk: int
    rank: int
    world_size: int
    show_progress: bool
    stop: threading.Event

    def where(self, split: str) -> str:
        ranks = f" (rank {self.rank}/{self.world_size})" if self.world_size > 1 else ""
        return f"{split} split{ranks}"

    def what(self) -> str:
        return "SAM embeddings + text maps" if self.matcher is not None else "SAM embeddings"


def _chunks(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _cover(job: _SplitJob, samples: List[Mapping]) -> int:
    """Read or compute the entries of ``samples``; returns how many images had to be encoded."""
    misses = job.store.stats.misses
    job.store.embeddings(job.segmenter, samples, chunk_size=job.encode_chunk)
    embedded = job.store.stats.misses - misses
    if job.matcher is None:
        return embedded
    misses = job.store.stats.misses
    job.store.text_maps(job.matcher, samples, job.map_hw, chunk_size=job.encode_chunk)
    return max(embedded, job.store.stats.misses - misses)


def _stop_if_asked(job: _SplitJob, split: str, done: int, total: int) -> None:
    """Raise :class:`PrecomputeInterrupted` once SIGTERM has come (even after a split's last image:
    the signal must not be lost, nothing else would stop the run)."""
    if job.stop.is_set():
        raise PrecomputeInterrupted(
            f"feature cache: stopped by SIGTERM with {done} of {total} images of the {job.where(split)} "
            f"cached in {job.store.root}; rerunning continues where it stopped"
        )


def _precompute_split(job: _SplitJob, split: str, dataset: Dataset) -> CacheStats:
    """Cover this rank's shard of ``dataset``; returns what the store did meanwhile."""
    shard = range(len(dataset))[job.rank :: job.world_size]
    before, start = CacheStats(**vars(job.store.stats)), time.perf_counter()
    done = computed = 0
    description = f"{job.what()}, {job.where(split)}"
    with _Progress(job.show_progress, description, len(shard)) as progress:
        for indices in _chunks(shard, job.encode_chunk):
            computed += _cover(job, [dataset[i] for i in indices])
            done += len(indices)
            progress.advance(len(indices))
            _stop_if_asked(job, split, done, len(shard))
        _stop_if_asked(job, split, done, len(shard))  # an empty shard
        summary = f"{done - computed} cached already, {computed} computed"
        progress.finish(f"{description}: {summary}")
    logger.info("feature cache, %s: %d images, %s (%.1f s)", job.where(split), done, summary,
                time.perf_counter() - start)
    return job.store.stats.minus(before)


def precompute_splits(
    segmenter: Segmenter,
    store: FeatureStore,
    datasets: Mapping[str, Optional[Dataset]],
    *,
    matcher: Optional[TextMatcherLike] = None,
    map_hw: Optional[Tuple[int, int]] = None,
    device: Device,
    encode_chunk: int = 1,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
) -> Dict[str, CacheStats]:
    """Fill ``store`` with this rank's share of the entries of every split in ``datasets``.

    Args:
        segmenter: the frozen SAM; ``embed`` gets lists of ``encode_chunk`` uint8 ``(H, W, 3)`` images.
        store: the feature cache (its folder is created; it must be writable).
        datasets: split name (``train``, ``val``, ``test``) -> dataset of sample dicts with ``"image"``
            and ``"id"`` (and ``"text"`` with a matcher); ``None`` values are skipped.
        matcher, map_hw: optionally a text matcher and the ``(h, w)`` of its cached maps
            (``(1, h, w)`` per sample), as in :meth:`FeatureStore.text_maps`.
        device: where the frozen models run (they are moved back afterwards).
        encode_chunk: images per ``embed`` / ``similarity`` call; peak memory grows with it.
        rank, world_size: this process takes the samples ``[rank::world_size]`` of every split.
        show_progress: a ``rich`` bar per split.

    Returns:
        per split, what this process's store did (hits, misses, writes, corrupt entries).

    Raises:
        CacheNotWritableError: the store's folder cannot be written (checked before any work).
        PrecomputeInterrupted: SIGTERM arrived; raised after the image in progress is written.
    """
    _check_arguments(encode_chunk, rank, world_size, matcher, map_hw)
    device = torch.device(device)
    check_cache_writable(store.root)
    if rank == 0:
        removed = store.remove_stale_temp_files(STALE_TEMP_AGE_S)
        if removed:
            logger.info("feature cache: removed %d temporary files of killed writers from %s", removed, store.root)
    results: Dict[str, CacheStats] = {}
    with sigterm_flag() as stop, frozen_models_on(device, segmenter, matcher), plain_inference(device):
        job = _SplitJob(segmenter, store, matcher, map_hw, encode_chunk, rank, world_size, show_progress, stop)
        for split, dataset in datasets.items():
            if dataset is not None:
                results[split] = _precompute_split(job, split, dataset)
    return results


# -- Lightning -------------------------------------------------------------------------------------
class PrecomputeFeatures(Callback):
    """Fill the feature cache in ``setup``, every rank its share, then wait for all ranks.

    Args:
        splits: names among ``train``, ``val``, ``test``; the datamodule's ``<split>_dataset``
            attributes that exist (and are not ``None``) are precomputed.
        encode_chunk: images per ``segmenter.embed`` call (see :func:`precompute_splits`).

    The LightningModule must hold ``segmenter``, ``matcher`` (or ``None``) and ``store`` (as
    :class:`~alignsam.module.AlignSAM` does); maps are cached at ``segmenter.low_res_hw``. The bars
    are shown where the trainer has a progress bar. When one rank fails, every rank raises (the
    others with a ``RuntimeError`` that points at it) instead of waiting for it forever.
    """

    def __init__(self, splits: Sequence[str] = ("train", "val"), encode_chunk: int = 1) -> None:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise ValueError(f"PrecomputeFeatures: unknown splits {unknown}; choose among {list(SPLITS)}")
        if encode_chunk < 1:
            raise ValueError(f"PrecomputeFeatures: encode_chunk must be >= 1, got {encode_chunk}")
        self.splits, self.encode_chunk = tuple(splits), encode_chunk

    def datasets(self, trainer: "pl.Trainer") -> Dict[str, Dataset]:
        data = trainer.datamodule
        found = {s: getattr(data, f"{s}_dataset", None) for s in self.splits} if data is not None else {}
        return {split: dataset for split, dataset in found.items() if dataset is not None}

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        error: Optional[Exception] = None
        agent = getattr(pl_module, "agent", pl_module)  # AlignSAM holds an Agent: segmenter, matcher, store
        try:
            precompute_splits(
                agent.segmenter, agent.store, self.datasets(trainer),
                matcher=agent.matcher,
                map_hw=agent.segmenter.low_res_hw if agent.matcher is not None else None,
                device=trainer.strategy.root_device, encode_chunk=self.encode_chunk,
                rank=trainer.global_rank, world_size=trainer.world_size,
                show_progress=trainer.progress_bar_callback is not None and trainer.is_global_zero,
            )
        except Exception as err:  # re-raised below, once every rank knows
            error = err
        failed_somewhere = trainer.strategy.reduce_boolean_decision(error is not None, all=False)
        if error is not None:
            raise error
        if failed_somewhere:
            raise RuntimeError("feature cache: another rank failed while precomputing (its error is above); "
                               "rerunning continues where it stopped")
        trainer.strategy.barrier("feature_cache_filled")
