"""Feature cache: keys, integrity, atomic writes, batched read-or-compute, (the precompute: tests/data/test_precompute.py)."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignsam.data import feature_files
from alignsam.data.features import (
    EMBEDDING_KIND,
    TEXT_MAP_KIND,
    FeatureStore,
)
from alignsam.foundation.segmenter import Segmenter
from alignsam.foundation.registry import build_segmenter
from alignsam.foundation.tiny import TinySamArch, build_tiny_sam

FP16_ATOL = 2e-3  # embeddings are O(1); half precision keeps ~3 significant digits


def make_samples(n: int, seed: int = 0, hw=(40, 56)) -> List[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"id": f"img{seed}_{i}", "image": rng.integers(0, 256, (hw[0] + 4 * i, hw[1], 3), dtype=np.uint8), "text": f"thing {i}"}
        for i in range(n)
    ]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny encoder is ~50 ms per image on one thread, but seconds when two threads fight a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def segmenter(one_torch_thread) -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter("tiny")


@pytest.fixture
def encoder_calls(segmenter):
    """Batch sizes of every image-encoder forward while the test runs."""
    calls: List[int] = []
    handle = segmenter.sam.image_encoder.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    yield calls
    handle.remove()


class StubMatcher:
    """Duck-typed text matcher: deterministic maps from the image's brightness and the text."""

    def __init__(self, fingerprint: str = "stub-v1") -> None:
        self.fingerprint = fingerprint
        self.calls: List[int] = []

    def similarity(self, images, texts, out_hw):
        self.calls.append(len(images))
        maps = []
        for image, text in zip(images, texts):
            grey = torch.as_tensor(image).float().mean(-1)[None, None] / 255.0
            scale = (sum(map(ord, text)) % 5 + 1) / 5.0
            maps.append(F.interpolate(grey, size=out_hw, mode="bilinear", align_corners=False)[0] * scale)
        return torch.stack(maps)


def only_entry(store: FeatureStore, kind: str = EMBEDDING_KIND) -> Path:
    paths = store.entry_paths(kind)
    assert len(paths) == 1, paths
    return paths[0]


# -- round trip and keys ---------------------------------------------------------------------------
def test_round_trip_matches_direct_embedding_and_reads_without_encoder(tmp_path, segmenter, encoder_calls):
    samples = make_samples(3)
    store = FeatureStore(tmp_path)
    direct = segmenter.embed([s["image"] for s in samples])
    encoder_calls.clear()

    first = store.embeddings(segmenter, samples)
    assert encoder_calls == [3]  # one embed call for the whole chunk of misses
    assert first.embeddings.dtype == torch.float16 and first.embeddings.shape == direct.embeddings.shape
    torch.testing.assert_close(first.embeddings.float(), direct.embeddings, atol=FP16_ATOL, rtol=1e-2)
    assert torch.equal(first.original_hw, direct.original_hw) and torch.equal(first.input_hw, direct.input_hw)
    assert len(store.entry_paths(EMBEDDING_KIND)) == 3

    second = store.embeddings(segmenter, samples)
    assert encoder_calls == [3]  # nothing recomputed
    assert store.stats.hits == 3
    assert torch.equal(second.embeddings, first.embeddings)  # read == what was freshly computed and stored
    assert torch.equal(second.original_hw, first.original_hw) and torch.equal(second.input_hw, first.input_hw)


def test_changed_image_misses(tmp_path, segmenter, encoder_calls):
    store = FeatureStore(tmp_path)
    sample = make_samples(1)[0]
    before = store.embeddings(segmenter, [sample]).embeddings
    changed = dict(sample, image=sample["image"].copy())  # same id, one pixel differs
    changed["image"][0, 0, 0] ^= 0xFF
    after = store.embeddings(segmenter, [changed]).embeddings
    assert encoder_calls == [1, 1]
    assert len(store.entry_paths(EMBEDDING_KIND)) == 2
    assert not torch.equal(before, after)


def test_changed_fingerprint_misses(tmp_path, segmenter, encoder_calls, monkeypatch):
    store = FeatureStore(tmp_path)
    samples = make_samples(1)
    monkeypatch.setattr(segmenter, "fingerprint", "sam_ckpt_A:123:abc")
    store.embeddings(segmenter, samples)
    store.embeddings(segmenter, samples)
    assert encoder_calls == [1]
    monkeypatch.setattr(segmenter, "fingerprint", "sam_ckpt_B:123:abc")
    store.embeddings(segmenter, samples)
    assert encoder_calls == [1, 1]
    assert len(store.entry_paths(EMBEDDING_KIND)) == 2


def test_changed_img_size_misses_with_same_name_and_fingerprint(tmp_path):
    samples = make_samples(1)
    store = FeatureStore(tmp_path)
    big = Segmenter(build_tiny_sam(TinySamArch(img_size=256)), name="tiny", fingerprint="same-weights")
    small = Segmenter(build_tiny_sam(TinySamArch(img_size=128)), name="tiny", fingerprint="same-weights")
    assert store.embeddings(big, samples).embeddings.shape[-2:] == (16, 16)
    out = store.embeddings(small, samples)  # a hit would return the 16x16 grid of the 256 px model
    assert out.embeddings.shape[-2:] == (8, 8)
    assert out.input_hw.max().item() == 128
    assert len(store.entry_paths(EMBEDDING_KIND)) == 2


def test_random_weights_without_fingerprint_are_keyed_by_weights(tmp_path):
    samples = make_samples(1)
    store = FeatureStore(tmp_path)
    torch.manual_seed(1)
    one = build_segmenter("tiny")
    torch.manual_seed(2)
    two = build_segmenter("tiny")
    assert one.fingerprint == two.fingerprint == "random-init"
    a = store.embeddings(one, samples).embeddings
    b = store.embeddings(two, samples).embeddings
    assert len(store.entry_paths(EMBEDDING_KIND)) == 2
    assert not torch.equal(a, b)

    with torch.no_grad():  # weights changed in place (e.g. by a training step): the memoised hash follows
        next(one.parameters()).add_(1.0)
    store.embeddings(one, samples)
    assert len(store.entry_paths(EMBEDDING_KIND)) == 3


def test_mixed_cached_and_uncached_come_back_in_input_order(tmp_path, segmenter, encoder_calls):
    samples = make_samples(5, seed=3)
    store = FeatureStore(tmp_path)
    direct = segmenter.embed([s["image"] for s in samples]).embeddings.half()
    store.embeddings(segmenter, [samples[1], samples[3]])
    encoder_calls.clear()

    order = [4, 1, 0, 3, 2, 1]  # cached and uncached interleaved, one duplicate
    out = store.embeddings(segmenter, [samples[i] for i in order], chunk_size=2)
    assert encoder_calls == [2, 1]  # the 3 distinct misses in chunks of 2, nothing else
    for row, i in enumerate(order):
        torch.testing.assert_close(out.embeddings[row].float(), direct[i].float(), atol=FP16_ATOL, rtol=1e-2)
        assert tuple(out.original_hw[row].tolist()) == samples[i]["image"].shape[:2]


# -- integrity ------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x5A
    path.write_bytes(bytes(data))


def _flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[feature_files.PREFIX.size + 5] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_byte, _flip_header_byte])
def test_corrupt_entry_is_reported_deleted_and_recomputed(tmp_path, segmenter, encoder_calls, caplog, damage):
    samples = make_samples(1)
    store = FeatureStore(tmp_path)
    good = store.embeddings(segmenter, samples).embeddings
    path = only_entry(store)
    damage(path)

    with caplog.at_level(logging.WARNING, logger="alignsam.data.features"):
        assert store.get(EMBEDDING_KIND, path.stem) is None  # detected: never served
    assert store.stats.corrupt == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0]
    assert not path.exists()  # deleted

    recomputed = store.embeddings(segmenter, samples)  # a miss: computed and written again
    path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="alignsam.data.features"):
        again = store.embeddings(segmenter, samples).embeddings
    assert encoder_calls == [1, 1, 1]  # recomputed twice, never served
    assert store.stats.corrupt == 2 and str(path) in caplog.records[-1].getMessage()
    assert torch.equal(again, good) and torch.equal(recomputed.embeddings, good)
    feature_files.read_entry(path)  # rewritten and valid again
    store.embeddings(segmenter, samples)
    assert encoder_calls == [1, 1, 1]


def test_crash_mid_write_leaves_no_entry_and_no_temp_file(tmp_path, segmenter, encoder_calls, monkeypatch):
    samples = make_samples(1)
    store = FeatureStore(tmp_path)

    def write_half_then_fail(file, chunks):
        head = bytes(chunks[0])
        file.write(head[: len(head) // 2])
        raise OSError("simulated crash: disk full")

    monkeypatch.setattr(feature_files, "_write_chunks", write_half_then_fail)
    with pytest.raises(OSError, match="simulated crash"):
        store.embeddings(segmenter, samples)
    assert store.entry_paths() == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the partial temp file was removed

    monkeypatch.undo()
    store.embeddings(segmenter, samples)
    assert encoder_calls == [1, 1]  # the crashed write left nothing that reads back
    feature_files.read_entry(only_entry(store))


def test_stray_temp_file_of_a_killed_writer_is_never_served(tmp_path, segmenter, encoder_calls):
    samples = make_samples(1)
    store = FeatureStore(tmp_path)
    store.embeddings(segmenter, samples)
    path = only_entry(store)
    stray = path.parent / f".{path.name}.x1y2z3{feature_files.TEMP_SUFFIX}"  # as a SIGKILLed writer leaves it
    stray.write_bytes(path.read_bytes()[:1000])
    path.unlink()

    assert store.get(EMBEDDING_KIND, path.stem) is None
    assert store.entry_paths() == []
    store.embeddings(segmenter, samples)
    assert encoder_calls == [1, 1]
    assert store.remove_stale_temp_files(max_age_s=3600) == 0  # a live writer's file is kept
    assert store.remove_stale_temp_files(max_age_s=0) == 1 and not stray.exists()


def test_concurrent_writers_of_one_entry_leave_a_valid_entry(tmp_path):
    store = FeatureStore(tmp_path, fsync=False)
    value = {"map": torch.rand(1, 8, 8)}
    errors = []

    def write():
        try:
            for _ in range(20):
                store.put(TEXT_MAP_KIND, "ab" * 32, value)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entry = store.get(TEXT_MAP_KIND, "ab" * 32, required=("map",))
    assert torch.equal(entry["map"], value["map"].half())
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["ab" * 32 + ".feat"]


def test_value_out_of_half_range_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="storage_dtype"):
        FeatureStore(tmp_path).put(TEXT_MAP_KIND, "cd" * 32, {"map": torch.full((1, 2, 2), 1e6)})
    wide = FeatureStore(tmp_path, storage_dtype=torch.float32).put(TEXT_MAP_KIND, "cd" * 32, {"map": torch.full((1, 2, 2), 1e6)})
    assert wide["map"].dtype == torch.float32


# -- text maps -------------------------------------------------------------------------------------
def test_text_maps_round_trip_and_keys(tmp_path):
    samples = make_samples(3)
    store = FeatureStore(tmp_path)
    matcher = StubMatcher()
    first = store.text_maps(matcher, samples, (12, 10))
    assert first.shape == (3, 1, 12, 10) and first.dtype == torch.float16
    torch.testing.assert_close(first.float(), matcher.similarity([s["image"] for s in samples], [s["text"] for s in samples], (12, 10)), atol=1e-3, rtol=1e-3)
    matcher.calls.clear()

    assert torch.equal(store.text_maps(matcher, samples, (12, 10)), first)
    assert matcher.calls == []
    store.text_maps(matcher, [dict(samples[0], text="another thing")], (12, 10))
    store.text_maps(matcher, samples[:1], (6, 5))
    store.text_maps(StubMatcher("stub-v2"), samples[:1], (12, 10))
    assert matcher.calls == [1, 1]
    assert len(store.entry_paths(TEXT_MAP_KIND)) == 6


def test_text_maps_reject_a_matcher_with_the_wrong_output_shape(tmp_path):
    class Flat(StubMatcher):
        def similarity(self, images, texts, out_hw):
            return super().similarity(images, texts, out_hw)[:, 0]

    with pytest.raises(ValueError, match=r"Flat.similarity returned shape \(1, 12, 10\)"):
        FeatureStore(tmp_path).text_maps(Flat(), make_samples(1), (12, 10))


def test_image_digest_is_remembered_for_read_only_arrays_only(monkeypatch):
    """A cache hit on an image object hashed before reads no pixels, when the object is read-only
    (its pixels cannot have changed); writable arrays, and views of writable ones, are hashed each time."""
    from alignsam.data import features

    hashed = []
    sha256 = features.hashlib.sha256
    monkeypatch.setattr(features.hashlib, "sha256", lambda data=b"": hashed.append(1) or sha256(data))
    image = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = features.image_digest(image)
    assert features.image_digest(image.copy()) == expected and len(hashed) == 2  # writable: hashed each time

    frozen = image.copy()
    frozen.flags.writeable = False
    hashed.clear()
    assert features.image_digest(frozen) == expected
    assert features.image_digest(frozen) == expected
    assert len(hashed) == 1  # the second call read no pixels

    base = image.copy()
    view = base[:, :]
    view.flags.writeable = False  # read-only view of a writable array: base[...] = ... would change it
    hashed.clear()
    features.image_digest(view)
    features.image_digest(view)
    assert len(hashed) == 2

    copy_key = id(frozen)
    del frozen  # a dead array's id is forgotten (another object may get it)
    assert copy_key not in features._IMAGE_DIGESTS


def test_cached_embeddings_of_a_scene_dataset_hash_each_image_once(tmp_path, segmenter, monkeypatch):
    from alignsam.data import features
    from alignsam.data.scene_data import SceneImages

    store = FeatureStore(tmp_path / "cache", fsync=False)
    samples = SceneImages("saliency", range(3))
    store.embeddings(segmenter, [samples[i] for i in range(3)])  # miss: embed and write
    pixel_hashes = []  # image_digest starts each pixel hash with the dtype and shape, e.g. b"|u1(256, 256, 3)"
    sha256 = features.hashlib.sha256
    monkeypatch.setattr(features.hashlib, "sha256",
                        lambda data=b"": (pixel_hashes.append(1) if data.startswith(b"|u1(") else None) or sha256(data))
    hits = store.stats.hits
    again = store.embeddings(segmenter, [samples[i] for i in range(3)])
    assert store.stats.hits == hits + 3 and again.embeddings.shape[0] == 3
    assert pixel_hashes == []  # the three images were hashed when the entries were written, not again
    store.embeddings(segmenter, [dict(samples[0], image=samples[0]["image"].copy())])
    assert pixel_hashes == [1]  # a writable copy is hashed
