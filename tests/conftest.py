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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, not failed, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_digest_memo(tmp_path_factory):
    """The weights-file digest memo (``$XDG_CACHE_HOME/alignsam``) goes to a temporary folder, not
    the user's own cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
