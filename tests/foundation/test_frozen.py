"""Frozen models move with their holder but never enter its state_dict or Lightning checkpoints."""
from __future__ import annotations

import copy
import os
import pickle

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from alignsam.foundation.frozen import exclude_from_checkpoints, frozen_submodule, is_excluded_from_checkpoints
from alignsam.foundation.registry import build_segmenter

SEGMENTER_SEED = 0


class ClickHead(L.LightningModule):
    """A trainable Linear scoring the tiny SAM's low-res logits: the shape of the real module."""

    def __init__(self, segmenter_seed: int = SEGMENTER_SEED, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(segmenter_seed)  # stands in for "load the segmenter's own checkpoint file"
        self.segmenter = frozen_submodule(build_segmenter("tiny"))
        self.head = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        (embeddings,) = batch
        points = torch.full((embeddings.shape[0], 1, 2), 128.0, device=self.device)
        labels = torch.ones(embeddings.shape[0], 1, dtype=torch.long, device=self.device)
        low_res, _ = self.segmenter.decode(embeddings, points, labels)
        pooled = nn.functional.adaptive_avg_pool2d(low_res, 4).flatten(1)  # (B, 16)
        assert not self.segmenter.training, "the frozen model must stay in eval mode during fit"
        return self.head(pooled).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def embeddings_loader(batches: int = 2, batch_size: int = 2) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(batches * batch_size, 128, 16, 16, generator=gen)), batch_size=batch_size)


def frozen_keys(state_dict) -> list:
    return [k for k in state_dict if k.startswith("segmenter.")]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen_fit")
    model = ClickHead()
    head_before = model.head.weight.detach().clone()
    sam_before = copy.deepcopy(model.segmenter.sam.state_dict())
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, embeddings_loader())
    return model, trainer.checkpoint_callback.best_model_path, head_before, sam_before


def test_fit_checkpoint_has_no_frozen_weights_and_is_small(fitted):
    model, path, head_before, sam_before = fitted
    assert path, "Lightning wrote no checkpoint"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert set(checkpoint["state_dict"]) == {"head.weight", "head.bias"}
    metadata = getattr(checkpoint["state_dict"], "_metadata", {})
    assert not [k for k in metadata if k.startswith("segmenter")]
    size = os.path.getsize(path)
    frozen_bytes = sum(v.numel() * v.element_size() for v in model.segmenter.state_dict().values())
    print(f"checkpoint {size / 1e3:.1f} kB; the frozen tiny SAM alone would add {frozen_bytes / 1e6:.1f} MB")
    assert size < 50_000 < frozen_bytes
    # Training changed the head and left the frozen model untouched.
    assert not torch.equal(model.head.weight, head_before)
    for name, value in model.segmenter.sam.state_dict().items():
        assert torch.equal(value, sam_before[name]), name


def test_load_from_checkpoint_restores_the_trainable_part(fitted):
    model, path, _, _ = fitted
    restored = ClickHead.load_from_checkpoint(path, map_location="cpu")  # strict loading
    assert torch.equal(restored.head.weight, model.head.weight)
    assert torch.equal(restored.head.bias, model.head.bias)
    assert is_excluded_from_checkpoints(restored.segmenter)
    for name, value in restored.segmenter.state_dict().items():
        assert torch.equal(value, model.segmenter.state_dict()[name]), name


def test_strict_loading_still_reports_missing_trainable_weights():
    model = ClickHead()
    with pytest.raises(RuntimeError, match="head.weight"):
        model.load_state_dict({"head.bias": torch.zeros(1)})


def test_frozen_entries_in_an_old_checkpoint_are_ignored():
    """A checkpoint written without the hooks loads, and cannot overwrite the frozen model."""
    model = ClickHead()
    old = {k: torch.zeros_like(v) for k, v in model.segmenter.state_dict(prefix="segmenter.").items()}
    old.update({"head.weight": torch.ones(1, 16), "head.bias": torch.ones(1)})
    before = copy.deepcopy(model.segmenter.state_dict())
    result = model.load_state_dict(old)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.head.weight, torch.ones(1, 16))
    for name, value in model.segmenter.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_direct_state_dict_of_the_frozen_model_is_unchanged():
    segmenter = exclude_from_checkpoints(build_segmenter("tiny"))
    plain = build_segmenter("tiny")
    state = segmenter.state_dict()
    assert set(state) == set(plain.state_dict()) and len(state) > 0
    segmenter.load_state_dict(plain.state_dict())  # strict, all keys present
    assert torch.equal(segmenter.state_dict()["sam.mask_decoder.iou_token.weight"], plain.state_dict()["sam.mask_decoder.iou_token.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        segmenter.load_state_dict({})


def test_frozen_model_moves_and_casts_with_its_holder():
    model = ClickHead()
    model.double()
    assert all(p.dtype == torch.float64 for p in model.segmenter.parameters())
    model.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in model.segmenter.parameters())
    if torch.cuda.is_available():
        model.to("cuda")
        assert all(p.is_cuda for p in model.segmenter.parameters())


@pytest.mark.gpu
def test_frozen_model_follows_lightning_to_the_gpu(tmp_path):
    model = ClickHead()
    trainer = L.Trainer(max_steps=1, accelerator="gpu", devices=1, logger=False, default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False)
    seen = []
    model.on_train_batch_start = lambda *a: seen.append({p.device.type for p in model.segmenter.parameters()})
    trainer.fit(model, embeddings_loader(batches=1))
    # during fit (Lightning's teardown moves the whole module back to the CPU afterwards)
    assert seen == [{"cuda"}]


def test_frozen_submodule_freezes_and_survives_copies():
    segmenter = frozen_submodule(build_segmenter("tiny"))
    assert not segmenter.training and all(not p.requires_grad for p in segmenter.parameters())
    holder = nn.ModuleDict({"segmenter": segmenter, "head": nn.Linear(2, 2)})
    for copied in (copy.deepcopy(holder), pickle.loads(pickle.dumps(holder))):
        assert set(copied.state_dict()) == {"head.weight", "head.bias"}


def test_frozen_submodule_rejects_models_that_leave_eval_mode():
    with pytest.raises(TypeError, match="override train"):
        frozen_submodule(nn.Linear(2, 2))
