"""Metric states reduce across processes: 2 CPU processes (gloo), each updating part of the data,
give after ``compute()`` the same numbers as one process updating all of it.

Rank 0 is the test process itself and rank 1 a spawned one: an interpreter start costs seconds
(torch and torchmetrics imports), so one spawn instead of two halves the test's time."""
from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignsam.metrics import task_metrics
from metric_cases import continuous_cases, random_cases, structured_cases, to_torch

WORLD_SIZE = 2
TIMEOUT = timedelta(seconds=120)  # a rank that never joins fails the test instead of hanging


def _data():
    binary = to_torch(random_cases(7) + structured_cases(7) + continuous_cases(7))
    gen = torch.Generator().manual_seed(7)
    labels = [torch.randint(0, 21, (h, w), generator=gen) for h, w in [(9, 14), (16, 8), (12, 12), (7, 20)]]
    targets = [torch.where(torch.rand(l.shape, generator=gen) < 0.2, torch.full_like(l, 255), l.roll(1, 0))
               for l in labels]
    return binary, (labels, targets)


def _update_all(collections, binary, semantic, indices_binary, indices_semantic):
    (preds, gts), (labels, targets) = binary, semantic
    for i in indices_binary:  # one image per update, so ranks see different numbers of calls
        collections["glass"].update(preds[i], gts[i])
    collections["voc"].update([labels[i] for i in indices_semantic], [targets[i] for i in indices_semantic])
    return {name: {k: v.item() for k, v in c.compute().items()} for name, c in collections.items()}


def _run_rank(rank: int, port: int):
    """Join the group as ``rank``, update this rank's share, return the synced values."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=TIMEOUT
    )
    try:
        binary, semantic = _data()
        # uneven split: rank 0 takes binary images 0..2 and one label map, rank 1 the rest
        idx_b = range(0, 3) if rank == 0 else range(3, len(binary[0]))
        idx_s = range(0, 1) if rank == 0 else range(1, len(semantic[0]))
        collections = {"glass": task_metrics("glass"), "voc": task_metrics("voc")}
        return _update_all(collections, binary, semantic, idx_b, idx_s)
    finally:
        dist.destroy_process_group()


def _child(index: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    torch.save(_run_rank(1 + index, port), out_path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_reduce_to_the_single_process_numbers(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # rank 1 runs in a spawned process, rank 0 here (one interpreter start instead of two)
    port, out_path = _free_port(), str(tmp_path / "rank1.pt")
    child = mp.start_processes(_child, args=(port, out_path), nprocs=1, join=False, start_method="spawn")
    try:
        synced = _run_rank(0, port)
    finally:
        child.join()
    assert torch.load(out_path) == synced  # both ranks hold the same reduced numbers

    binary, semantic = _data()
    single = _update_all(
        {"glass": task_metrics("glass"), "voc": task_metrics("voc")},
        binary, semantic, range(len(binary[0])), range(len(semantic[0])),
    )
    assert synced.keys() == single.keys()
    for task in single:
        assert synced[task].keys() == single[task].keys()
        for name, value in single[task].items():
            assert synced[task][name] == pytest.approx(value, abs=1e-9), (task, name)
    # the halves alone differ from the whole, so the comparison above needed the reduction
    half = _update_all({"glass": task_metrics("glass"), "voc": task_metrics("voc")}, binary, semantic,
                       range(3), range(1))
    assert half["glass"]["fbeta_max"] != pytest.approx(single["glass"]["fbeta_max"], abs=1e-6)
    assert half["voc"]["voc_miou"] != pytest.approx(single["voc"]["voc_miou"], abs=1e-6)
