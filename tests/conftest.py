"""Suite-wide settings."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """One intra-op thread unless ALIGNSAM_TEST_THREADS says otherwise.

    The tests use tiny models, which gain little from threads, and on a shared 2-core machine
    OpenMP threads that spin-wait for a busy core make everything several times slower.
    """
    torch.set_num_threads(int(os.environ.get("ALIGNSAM_TEST_THREADS", "1")))
    yield
