"""Filling the feature cache before training (alignsam/data/precompute.py).

One image per ``embed`` call, the ranks' shards, eval / no_grad / no autocast, SIGTERM between two
images (in-process and for real in a subprocess), an unwritable cache folder, orphan temporary
files, and the Lightning callback (with a fake trainer, and in a 2-process CPU ``ddp_spawn`` fit).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignsam.data.feature_files import TEMP_SUFFIX
from alignsam.data.features import EMBEDDING_KIND, TEXT_MAP_KIND, FeatureStore
from alignsam.data.precompute import (
    STALE_TEMP_AGE_S,
    CacheNotWritableError,
    PrecomputeFeatures,
    PrecomputeInterrupted,
    precompute_splits,
)
from alignsam.errors import UserError
from alignsam.foundation.segmenter import Segmenter
from alignsam.foundation.registry import build_segmenter

ROOT = Path(__file__).resolve().parents[2]
TINY_SAM = ROOT / "checkpoints" / "tiny_sam.pt"


def make_samples(n: int, seed: int = 0, hw=(40, 56)) -> List[dict]:
    """``n`` sample dicts: ``image`` uint8 ``(h + 4 i, w, 3)``, ``id`` and ``text``."""
    rng = np.random.default_rng(seed)
    return [
        {"id": f"img{seed}_{i}", "image": rng.integers(0, 256, (hw[0] + 4 * i, hw[1], 3), dtype=np.uint8), "text": f"thing {i}"}
        for i in range(n)
    ]


class StubMatcher:
    """Duck-typed text matcher: ``(B, 1, h, w)`` maps from brightness; records batch sizes and grad mode."""

    fingerprint = "stub-v1"

    def __init__(self) -> None:
        self.calls: List[int] = []
        self.grad_enabled: List[bool] = []

    def similarity(self, images, texts, out_hw):
        self.calls.append(len(images))
        self.grad_enabled.append(torch.is_grad_enabled())
        grey = torch.stack([torch.as_tensor(im).float().mean(-1)[None] / 255.0 for im in images])
        return torch.stack([F.interpolate(g[None], size=out_hw, mode="bilinear", align_corners=False)[0] for g in grey])


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter("tiny")


@pytest.fixture
def encoder_calls(segmenter):
    """``(batch size, output dtype, grad enabled)`` of every image-encoder forward while the test runs."""
    calls: List[tuple] = []
    hook = lambda m, inp, out: calls.append((inp[0].shape[0], out.dtype, torch.is_grad_enabled()))  # noqa: E731
    handle = segmenter.sam.image_encoder.register_forward_hook(hook)
    yield calls
    handle.remove()


def batch_sizes(calls) -> List[int]:
    return [c[0] for c in calls]


# -- what one call does ----------------------------------------------------------------------------
def test_each_image_is_encoded_alone_and_a_second_run_computes_nothing(tmp_path, segmenter, encoder_calls, caplog):
    """The old path embedded 8 images per call (~21 GB for ViT-B on a CPU); now peak memory is one image's."""
    train, val = make_samples(5, seed=1), make_samples(2, seed=2)
    matcher = StubMatcher()
    caplog.set_level("INFO", logger="alignsam.data.precompute")

    stats = precompute_splits(segmenter, FeatureStore(tmp_path), {"train": train, "val": val, "test": None},
                              matcher=matcher, map_hw=(8, 8), device="cpu", show_progress=True)
    assert batch_sizes(encoder_calls) == [1] * 7 and matcher.calls == [1] * 7
    assert set(stats) == {"train", "val"}
    assert stats["train"].writes == 10 and stats["val"].writes == 4
    assert len(FeatureStore(tmp_path).entry_paths(EMBEDDING_KIND)) == 7
    assert len(FeatureStore(tmp_path).entry_paths(TEXT_MAP_KIND)) == 7
    assert "train split: 5 images, 0 cached already, 5 computed" in caplog.text

    encoder_calls.clear()
    again = precompute_splits(segmenter, FeatureStore(tmp_path), {"train": train}, matcher=matcher, map_hw=(8, 8),
                              device="cpu", show_progress=False)
    assert encoder_calls == [] and matcher.calls == [1] * 7
    assert again["train"].writes == 0 and again["train"].hits == 10
    assert "train split: 5 images, 5 cached already, 0 computed" in caplog.text


def test_encode_chunk_sets_the_images_per_embed_call(tmp_path, segmenter, encoder_calls):
    precompute_splits(segmenter, FeatureStore(tmp_path), {"train": make_samples(5)}, device="cpu",
                      encode_chunk=2, show_progress=False)
    assert batch_sizes(encoder_calls) == [2, 2, 1]


def test_ranks_take_disjoint_shards_that_cover_the_split(tmp_path, segmenter, encoder_calls):
    samples = make_samples(5)
    shards = []
    for rank in (0, 1):
        encoder_calls.clear()
        store = FeatureStore(tmp_path / f"rank{rank}")
        stats = precompute_splits(segmenter, store, {"val": samples}, device="cpu", rank=rank, world_size=2,
                                  show_progress=False)
        shards.append({p.name for p in store.entry_paths()})
        assert stats["val"].writes == len(encoder_calls) == (3 if rank == 0 else 2)
    together = FeatureStore(tmp_path / "together")
    precompute_splits(segmenter, together, {"val": samples}, device="cpu", show_progress=False)
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == {p.name for p in together.entry_paths()}


def test_models_run_in_eval_mode_without_grad_and_outside_autocast(tmp_path, segmenter, encoder_calls):
    """An enclosing autocast or grad mode must not reach the frozen models (entries are full precision)."""
    samples = make_samples(2)
    matcher = StubMatcher()
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        precompute_splits(segmenter, FeatureStore(tmp_path), {"train": samples}, matcher=matcher, map_hw=(8, 8),
                          device=torch.device("cpu"), show_progress=False)
        assert torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")  # restored afterwards
    assert [(dtype, grad) for _, dtype, grad in encoder_calls] == [(torch.float32, False)] * 2
    assert matcher.grad_enabled == [False, False]
    read = FeatureStore(tmp_path).embeddings(segmenter, samples).embeddings
    torch.testing.assert_close(read.float(), segmenter.embed([s["image"] for s in samples]).embeddings, atol=2e-3, rtol=1e-2)
    assert not segmenter.training and next(segmenter.parameters()).device.type == "cpu"


@pytest.mark.gpu
def test_models_move_to_the_device_and_back(tmp_path, segmenter):
    devices = []
    handle = segmenter.sam.image_encoder.register_forward_hook(lambda m, inp, out: devices.append(out.device.type))
    try:
        precompute_splits(segmenter, FeatureStore(tmp_path), {"train": make_samples(2)}, device="cuda",
                          show_progress=False)
    finally:
        handle.remove()
    assert devices == ["cuda", "cuda"] and next(segmenter.parameters()).device.type == "cpu"
    assert FeatureStore(tmp_path).embeddings(segmenter, make_samples(2)).embeddings.device.type == "cpu"


def test_a_matcher_needs_the_map_size(tmp_path, segmenter):
    with pytest.raises(ValueError, match="map_hw"):
        precompute_splits(segmenter, FeatureStore(tmp_path), {}, matcher=StubMatcher(), device="cpu")


# -- an unwritable cache folder --------------------------------------------------------------------
def test_unwritable_cache_folder_is_a_one_line_user_error_before_any_work(tmp_path, segmenter, encoder_calls):
    """The old path crashed with a raw OSError from deep inside a write (after encoding an image)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    root = blocker / "cache"  # cannot be created, whoever runs the test (root ignores permission bits)
    with pytest.raises(CacheNotWritableError) as info:
        precompute_splits(segmenter, FeatureStore(root), {"train": make_samples(1)}, device="cpu", show_progress=False)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "model.feature_cache" in message and str(root) in message and "writable folder" in message
    assert encoder_calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_is_a_user_error(tmp_path, segmenter):
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(CacheNotWritableError, match="model.feature_cache"):
            precompute_splits(segmenter, FeatureStore(root), {"train": make_samples(1)}, device="cpu", show_progress=False)
    finally:
        root.chmod(0o700)


# -- orphan temporary files ------------------------------------------------------------------------
def test_rank_zero_removes_old_orphan_temp_files_and_keeps_fresh_ones(tmp_path, segmenter):
    """Nobody called ``remove_stale_temp_files`` before: killed writers' temp files stayed forever."""
    folder = tmp_path / EMBEDDING_KIND / "ab"
    folder.mkdir(parents=True)
    old, fresh = folder / f".ab12.feat.killed{TEMP_SUFFIX}", folder / f".ab34.feat.live{TEMP_SUFFIX}"
    for path in (old, fresh):
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 2 * STALE_TEMP_AGE_S
    os.utime(old, (two_hours_ago, two_hours_ago))

    precompute_splits(segmenter, FeatureStore(tmp_path), {}, device="cpu", rank=1, world_size=2)
    assert old.exists()  # only rank 0 cleans (once, not once per rank)
    precompute_splits(segmenter, FeatureStore(tmp_path), {}, device="cpu", rank=0, world_size=2)
    assert not old.exists() and fresh.exists()
    assert not list(tmp_path.glob(".write-probe*"))  # the writability probe leaves nothing behind


# -- SIGTERM ---------------------------------------------------------------------------------------
def test_sigterm_stops_after_the_image_in_progress_and_restores_the_handler(tmp_path, segmenter):
    """First SIGTERM: finish and write the image, then stop; a second one goes to the previous handler."""
    received = []
    previous = lambda signum, frame: received.append(signum)  # noqa: E731
    old = signal.signal(signal.SIGTERM, previous)
    try:
        def two_sigterms(module, inp, out):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

        handle = segmenter.sam.image_encoder.register_forward_hook(two_sigterms)
        try:
            with pytest.raises(PrecomputeInterrupted) as info:
                precompute_splits(segmenter, FeatureStore(tmp_path), {"val": make_samples(4)}, device="cpu",
                                  show_progress=False)
        finally:
            handle.remove()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert received == [signal.SIGTERM]
    assert isinstance(info.value, UserError)
    assert "1 of 4 images of the val split cached" in str(info.value) and "continues where it stopped" in str(info.value)
    assert len(FeatureStore(tmp_path).entry_paths()) == 1


def test_outside_the_main_thread_no_handler_is_installed(tmp_path, segmenter):
    before, outcome = signal.getsignal(signal.SIGTERM), {}

    def work():
        outcome["stats"] = precompute_splits(segmenter, FeatureStore(tmp_path), {"train": make_samples(1)},
                                             device="cpu", show_progress=False)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert outcome["stats"]["train"].writes == 1 and signal.getsignal(signal.SIGTERM) is before


CHILD = """
import sys, time
import numpy as np, torch
from alignsam.data.features import FeatureStore
from alignsam.data.precompute import precompute_splits
from alignsam.errors import UserError
from alignsam.foundation.registry import build_segmenter

torch.set_num_threads(1)

class SlowSamples:
    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(n)]
    def __len__(self):
        return len(self.images)
    def __getitem__(self, i):
        time.sleep(0.3)
        return {"id": str(i), "image": self.images[i]}

segmenter = build_segmenter("tiny", sys.argv[2])
try:
    precompute_splits(segmenter, FeatureStore(sys.argv[1]), {"train": SlowSamples(int(sys.argv[3]))},
                      device="cpu", show_progress=False)
except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
print("finished")
"""


def test_sigterm_to_a_real_process_leaves_a_cache_a_rerun_completes(tmp_path):
    """The old path died on SIGTERM without a word (and without any cleanup point)."""
    n, cache = 20, tmp_path / "cache"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, str(script), str(cache), str(TINY_SAM), str(n)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = FeatureStore(cache)
    deadline = time.monotonic() + 120
    while len(store.entry_paths()) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)

    done = len(store.entry_paths(EMBEDDING_KIND))
    assert child.returncode == 2, (out, err)
    assert 2 <= done < n and "finished" not in out
    assert err.strip() == (f"error: feature cache: stopped by SIGTERM with {done} of {n} images of the train split "
                           f"cached in {cache}; rerunning continues where it stopped")
    assert not list(cache.rglob(f"*{TEMP_SUFFIX}"))

    rng = np.random.default_rng(0)
    samples = [{"id": str(i), "image": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)} for i in range(n)]
    rerun = precompute_splits(build_segmenter("tiny", str(TINY_SAM)), store, {"train": samples}, device="cpu",
                              show_progress=False)
    assert rerun["train"].hits == done and rerun["train"].writes == n - done


# -- the Lightning callback ------------------------------------------------------------------------
class FakeStrategy:
    """What the callback uses of a strategy; ``peer_failed`` plays another rank that raised."""

    def __init__(self, peer_failed: bool = False) -> None:
        self.root_device, self.peer_failed = torch.device("cpu"), peer_failed
        self.decisions: List[bool] = []
        self.barriers: List[str] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.decisions.append(decision)
        return decision or self.peer_failed

    def barrier(self, name=None) -> None:
        self.barriers.append(name)


def fake_trainer(strategy: FakeStrategy, **datasets) -> SimpleNamespace:
    return SimpleNamespace(datamodule=SimpleNamespace(**datasets), strategy=strategy, global_rank=0, world_size=1,
                           progress_bar_callback=None)


def test_callback_covers_the_splits_that_exist_with_maps_at_sam_low_res(tmp_path, segmenter, encoder_calls):
    strategy = FakeStrategy()
    module = SimpleNamespace(segmenter=segmenter, matcher=StubMatcher(), store=FeatureStore(tmp_path))
    trainer = fake_trainer(strategy, train_dataset=make_samples(2), val_dataset=None)  # and no test_dataset
    PrecomputeFeatures(["train", "val", "test"]).setup(trainer, module, "fit")
    assert batch_sizes(encoder_calls) == [1, 1] and strategy.decisions == [False] and len(strategy.barriers) == 1
    (map_path, *_) = module.store.entry_paths(TEXT_MAP_KIND)
    from alignsam.data.feature_files import read_entry

    assert read_entry(map_path)[0]["map"].shape == (1, *segmenter.low_res_hw)


def test_callback_raises_on_every_rank_when_one_fails_instead_of_waiting(tmp_path, segmenter):
    module = SimpleNamespace(segmenter=segmenter, matcher=None, store=FeatureStore(tmp_path))
    strategy = FakeStrategy(peer_failed=True)
    with pytest.raises(RuntimeError, match="another rank failed"):
        PrecomputeFeatures(["train"]).setup(fake_trainer(strategy, train_dataset=make_samples(1)), module, "fit")
    assert strategy.barriers == []

    (tmp_path / "file").write_text("")
    module.store = FeatureStore(tmp_path / "file" / "cache")
    strategy = FakeStrategy()
    with pytest.raises(CacheNotWritableError):
        PrecomputeFeatures(["train"]).setup(fake_trainer(strategy, train_dataset=make_samples(1)), module, "fit")
    assert strategy.decisions == [True] and strategy.barriers == []


def test_callback_rejects_unknown_splits():
    with pytest.raises(ValueError, match="unknown splits"):
        PrecomputeFeatures(["training"])


class RecordRanks(PrecomputeFeatures):
    """Writes ``rank<r>.json``: this rank's store counters after precomputing, the entries it then
    sees, and (at the end of the fit) its counters again."""

    def __init__(self, out_dir: str, splits) -> None:
        super().__init__(splits)
        self.out_dir = Path(out_dir)

    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        self.after = dict(vars(pl_module.agent.store.stats), entries=len(pl_module.agent.store.entry_paths(EMBEDDING_KIND)))

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {"after_precompute": self.after, "at_fit_end": vars(pl_module.agent.store.stats)}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_two_process_ddp_fit_each_rank_computes_its_shard_and_reads_all(tmp_path):
    """The old path: rank 0 embedded everything (in a Trainer of its own) before rank 1 even started."""
    from alignsam.data.scene_data import SceneDataModule
    from alignsam.module import AlignSAM, SegmenterConfig
    from alignsam.rl.env import EnvConfig
    from alignsam.rl.policy import PolicyConfig
    from alignsam.rl.ppo import PPOConfig
    from alignsam.srm import SRMConfig

    L.seed_everything(0)
    model = AlignSAM(task="saliency", segmenter=SegmenterConfig(name="tiny", checkpoint=str(TINY_SAM)),
                     env=EnvConfig(steps=2, grid=4), policy=PolicyConfig(variant="implicit"),
                     srm=SRMConfig(variant="implicit"), ppo=PPOConfig(epochs=2), feature_cache=str(tmp_path / "cache"))
    data = SceneDataModule(task="saliency", train_pool=20, train_size=4, val_size=2, test_size=2, batch_size=2)
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=2, strategy="ddp_spawn_find_unused_parameters_true",
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[RecordRanks(str(tmp_path), ["train", "val"])])
    trainer.fit(model, data)
    assert trainer.state.finished

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["after_precompute"]["writes"] for r in ranks] == [3, 3]  # 2 of 4 train + 1 of 2 val scenes each
    assert [r["after_precompute"]["entries"] for r in ranks] == [6, 6]  # after the barrier: the whole cache
    for record in ranks:  # training and validation only read, every entry they need is on disk
        assert record["at_fit_end"]["misses"] == record["after_precompute"]["misses"]
        assert record["at_fit_end"]["hits"] > record["after_precompute"]["hits"]
