"""Options of the drill (tests/drill/test_real_path.py)."""
from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--device", action="store", default=None, choices=("cpu", "cuda"),
                     help="drill: run train.py / evaluate.py on this device (default: cpu, or "
                          "ALIGNSAM_DRILL_ACCELERATOR=gpu)")


@pytest.fixture(scope="session")
def drill_device(request) -> str:
    """``cpu`` or ``cuda``: ``--device`` first, then ``ALIGNSAM_DRILL_ACCELERATOR`` (gpu / cuda / cpu)."""
    device = request.config.getoption("--device")
    if device is None:
        device = os.environ.get("ALIGNSAM_DRILL_ACCELERATOR", "cpu").strip().lower()
        device = {"gpu": "cuda"}.get(device, device)
    if device not in ("cpu", "cuda"):
        raise pytest.UsageError(f"ALIGNSAM_DRILL_ACCELERATOR={device!r}: expected cpu or gpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.fail("the drill was asked to run on cuda, but torch sees no CUDA device")
    return device
