"""Weights-file fingerprints: a hash of the whole file, memoised in-process and in a JSON memo.

The feature cache keys entries on ``file_fingerprint``; a fingerprint that missed a change deep
inside a re-saved checkpoint served stale embeddings (issue 12, failure 4).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alignsam.data.features import EMBEDDING_KIND, FeatureStore
from alignsam.foundation import segmenter as segmenter_module
from alignsam.foundation.segmenter import digest_memo_path, file_fingerprint
from alignsam.foundation.registry import build_segmenter
from alignsam.foundation.tiny import TINY_SAM_FILE, TinySamArch, build_tiny_sam, save_tiny_sam

OLD_HEAD_BYTES = 1 << 20  # what the old fingerprint hashed: the first MiB only
TIMESTAMP_TICK_S = 0.05  # more than a coarse file-timestamp tick, so that a rewrite gets a new ctime


@pytest.fixture(autouse=True)
def fresh_memo(tmp_path, monkeypatch):
    """A private JSON memo under tmp_path and an empty in-process memo ("a fresh process")."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(segmenter_module, "_FILE_DIGESTS", {})


@pytest.fixture
def hash_calls(monkeypatch):
    """Paths given to the whole-file hash while the test runs."""
    calls = []
    real = segmenter_module.sha256_of_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(segmenter_module, "sha256_of_file", counting)
    return calls


def new_process(monkeypatch):
    """Forget the in-process memo, as a new run would (the JSON memo stays)."""
    monkeypatch.setattr(segmenter_module, "_FILE_DIGESTS", {})


def write_random_file(path: Path, size: int = 3 << 20, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def change_middle_keep_size_and_mtime(path: Path) -> None:
    """Flip a few bytes in the middle of the file in place, then put the old mtime back."""
    before = path.stat()
    time.sleep(TIMESTAMP_TICK_S)
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        old = f.read(4)
        f.seek(before.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


# -- content ---------------------------------------------------------------------------------------
def test_change_deep_inside_with_same_size_and_mtime_changes_the_fingerprint(tmp_path, monkeypatch):
    path = write_random_file(tmp_path / "sam_vit_h_4b8939.pth")
    before = file_fingerprint(path)
    head = path.read_bytes()[:OLD_HEAD_BYTES]
    change_middle_keep_size_and_mtime(path)
    assert path.read_bytes()[:OLD_HEAD_BYTES] == head  # the old fingerprint's blind spot

    after = file_fingerprint(path)  # memo warm: the restored mtime must not hide the change
    assert after != before
    new_process(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-cache"))
    assert file_fingerprint(path) == after  # and a fresh memo agrees


def test_fingerprint_is_name_size_and_sha256_of_the_whole_file(tmp_path):
    path = write_random_file(tmp_path / "weights.pt", size=(2 << 20) + 12345)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_fingerprint(path) == f"weights.pt:{(2 << 20) + 12345}:sha256:{expected}"
    assert file_fingerprint(str(path)) == file_fingerprint(path)


def test_hash_reads_in_8_mib_chunks(tmp_path, monkeypatch):
    path = write_random_file(tmp_path / "weights.pt", size=(17 << 20) + 5)
    sizes = []
    real_open = open

    class Recording:
        def __init__(self, file):
            self.file = file

        def read(self, n=-1):
            sizes.append(n)
            return self.file.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(segmenter_module, "open", lambda p, mode="r": Recording(real_open(p, mode)), raising=False)
    assert segmenter_module.sha256_of_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sizes and set(sizes) == {8 << 20}
    assert len(sizes) == 4  # 8 + 8 + the last 1 MiB and 5 bytes, then the empty read


# -- memo ------------------------------------------------------------------------------------------
def test_unchanged_file_is_hashed_once_across_runs(tmp_path, monkeypatch, hash_calls):
    path = write_random_file(tmp_path / "weights.pt")
    first = file_fingerprint(path)
    assert file_fingerprint(path) == first
    assert len(hash_calls) == 1  # in-process memo

    new_process(monkeypatch)
    assert file_fingerprint(path) == first
    assert len(hash_calls) == 1  # the JSON memo of the earlier "run"
    memo = json.loads(digest_memo_path().read_text())
    assert digest_memo_path() == tmp_path / "xdg-cache" / "alignsam" / "file_digests.json"
    assert memo["files"][str(path.absolute())]["sha256"] in first

    new_process(monkeypatch)
    time.sleep(TIMESTAMP_TICK_S)
    os.utime(path)  # touched: same bytes, but it is hashed again
    assert file_fingerprint(path) == first
    assert len(hash_calls) == 2


def test_memo_default_location_is_under_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert digest_memo_path() == tmp_path / ".cache" / "alignsam" / "file_digests.json"


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffnot json",
        b'{"version": 1, "files": {',  # truncated
        b"[1, 2, 3]",
        b'{"version": 1, "files": []}',
        b'{"version": 1, "files": {"PATH": "not an entry"}}',
        b'{"version": 1, "files": {"PATH": {"size": "x", "mtime_ns": null, "sha256": 3}}}',
        b'{"version": 999, "files": {}}',
    ],
)
def test_corrupt_memo_is_ignored_and_replaced(tmp_path, hash_calls, content):
    path = write_random_file(tmp_path / "weights.pt", size=1000)
    memo = digest_memo_path()
    memo.parent.mkdir(parents=True)
    memo.write_bytes(content.replace(b"PATH", str(path.absolute()).encode()))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_fingerprint(path).endswith(f":sha256:{expected}")
    assert len(hash_calls) == 1
    assert json.loads(memo.read_text())["files"][str(path.absolute())]["sha256"] == expected


def test_memo_entry_with_a_malformed_digest_is_ignored(tmp_path, hash_calls):
    path = write_random_file(tmp_path / "weights.pt", size=1000)
    stat = path.stat()
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "sha256": "../etc"}
    digest_memo_path().parent.mkdir(parents=True)
    digest_memo_path().write_text(json.dumps({"version": 1, "files": {str(path.absolute()): entry}}))
    assert file_fingerprint(path).endswith(f":sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}")
    assert len(hash_calls) == 1


def test_unwritable_memo_is_ignored(tmp_path, monkeypatch, hash_calls):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    path = write_random_file(tmp_path / "weights.pt", size=1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_fingerprint(path).endswith(f":sha256:{expected}")
    new_process(monkeypatch)
    assert file_fingerprint(path).endswith(f":sha256:{expected}")
    assert len(hash_calls) == 2  # nothing remembered across runs, but no error either


def test_file_changed_while_being_hashed_is_not_remembered(tmp_path, monkeypatch):
    path = write_random_file(tmp_path / "weights.pt", size=1000)
    real = segmenter_module.sha256_of_file
    calls = []

    def hash_then_rewrite(p):
        calls.append(p)
        digest = real(p)
        if len(calls) == 1:  # a writer replaces the file while it is read
            time.sleep(TIMESTAMP_TICK_S)
            write_random_file(path, size=1000, seed=1)
        return digest

    monkeypatch.setattr(segmenter_module, "sha256_of_file", hash_then_rewrite)
    file_fingerprint(path)
    assert file_fingerprint(path).endswith(f":sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}")
    assert len(calls) == 2


def test_memo_drops_files_that_no_longer_exist(tmp_path):
    gone = write_random_file(tmp_path / "gone.pt", size=100)
    file_fingerprint(gone)
    gone.unlink()
    kept = write_random_file(tmp_path / "kept.pt", size=100)
    file_fingerprint(kept)
    assert list(json.loads(digest_memo_path().read_text())["files"]) == [str(kept.absolute())]


# -- end to end: the feature cache -----------------------------------------------------------------
def test_resaved_tiny_sam_changed_deep_inside_gets_new_feature_cache_keys(tmp_path):
    """A tiny SAM re-saved with one image-encoder weight changed: same name and size, same first MiB
    (the change is deep inside), so only a whole-file fingerprint gives the cache a new key."""
    path = tmp_path / "weights" / TINY_SAM_FILE
    path.parent.mkdir()
    torch.manual_seed(0)
    sam = build_tiny_sam()
    save_tiny_sam(sam, TinySamArch(), str(path), seed=0)
    original = path.read_bytes()
    samples = [{"id": "img0", "image": np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)}]
    store = FeatureStore(tmp_path / "cache")
    before = store.embeddings(build_segmenter("tiny", str(path)), samples).embeddings

    with torch.no_grad():
        sam.image_encoder.neck[0].weight.mul_(-1)  # the encoder's last layers: stored after the first MiB
    time.sleep(TIMESTAMP_TICK_S)
    save_tiny_sam(sam, TinySamArch(), str(path), seed=0)
    changed = path.read_bytes()
    assert len(changed) == len(original) and changed[:OLD_HEAD_BYTES] == original[:OLD_HEAD_BYTES]
    assert changed != original

    after = store.embeddings(build_segmenter("tiny", str(path)), samples).embeddings
    assert store.stats.hits == 0
    assert len(store.entry_paths(EMBEDDING_KIND)) == 2
    assert not torch.equal(before, after)
