"""Data modules: few-shot draw and its ids file, list-of-sample batches, checks before any model."""
from __future__ import annotations

import pickle
import time

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from alignsam.data.datamodule import BinaryMaskDataModule, VOCDataModule
from alignsam.data.fewshot import FEWSHOT_IDS_FILENAME
from alignsam.data.files import DataConfigError
from alignsam.data.sample import check_sample
from fixture_trees import H, W, build_layout, build_voc, red_mask, truncate, write_mask


def ids_in(path):
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


@pytest.fixture()
def sbu(tmp_path):
    root = tmp_path / "sbu"
    written = build_layout(root, "sbu", n=8)
    return root, written


def test_binary_module_batches_are_lists_of_samples_at_original_resolution(sbu, tmp_path):
    root, written = sbu
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=5, subset_seed=3, batch_size=2,
                              eval_batch_size=3, fewshot_ids_dir=str(tmp_path / "run"))
    dm.setup("fit")
    assert len(dm.train_dataset) == 5 and set(dm.train_ids) <= set(written["train"])
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and len(batch) == 2
    for sample in batch:
        check_sample(sample)
        np.testing.assert_array_equal(sample["mask"], written["train"][sample["id"]])
    val_batch = next(iter(dm.val_dataloader()))
    assert [s["id"] for s in val_batch] == sorted(written["test"])[:3]
    for sample in val_batch:
        assert sample["mask"].shape == (H, W) and sample["text"] == "shadow"
        np.testing.assert_array_equal(sample["mask"], written["test"][sample["id"]])
    assert len(list(dm.test_dataloader())) == 3  # 8 test images in batches of 3
    assert ids_in(tmp_path / "run" / FEWSHOT_IDS_FILENAME) == dm.train_ids


def test_fewshot_draw_is_reproducible_and_seed_dependent(sbu, tmp_path):
    root, _ = sbu
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        dm = BinaryMaskDataModule(str(root), "sbu", train_size=3, subset_seed=seed,
                                  fewshot_ids_dir=str(tmp_path / name))
        dm.setup("fit")
        runs[name] = (tmp_path / name / FEWSHOT_IDS_FILENAME).read_text()
    assert runs["a"] == runs["b"]
    assert ids_in(tmp_path / "a" / FEWSHOT_IDS_FILENAME) != ids_in(tmp_path / "c" / FEWSHOT_IDS_FILENAME)
    # the written file repeats the run, whatever the seed says
    repeat = BinaryMaskDataModule(str(root), "sbu", train_ids_file=str(tmp_path / "a" / FEWSHOT_IDS_FILENAME),
                                  subset_seed=99)
    assert repeat.train_ids == ids_in(tmp_path / "a" / FEWSHOT_IDS_FILENAME)
    (tmp_path / "bad.txt").write_text("lssd_gone\n")
    with pytest.raises(DataConfigError, match="lssd_gone") as err:
        BinaryMaskDataModule(str(root), "sbu", train_ids_file=str(tmp_path / "bad.txt"))
    assert err.value.key == "data.train_ids_file"


class _ListBatchModule(L.LightningModule):
    """Consumes list-of-sample batches the way the AlignSAM module will."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"] += [s["id"] for s in batch]
        return (self.weight - 1.0) ** 2

    def validation_step(self, batch, batch_idx):
        self.seen["val"] += [s["id"] for s in batch]
        assert all(isinstance(s["mask"], np.ndarray) for s in batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_writes_ids_into_its_log_dir(sbu, tmp_path):
    root, _ = sbu
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=4, augment_views=1, batch_size=4,
                              val_size=2)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path / "logs"), max_steps=2,
                        log_every_n_steps=1, limit_val_batches=1, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    module = _ListBatchModule()
    trainer.fit(module, datamodule=dm)
    written = ids_in((tmp_path / "logs" / "lightning_logs" / "version_0" / FEWSHOT_IDS_FILENAME))
    assert written == dm.train_ids and len(written) == 4
    assert len(module.seen["train"]) == 8 and sum("#aug1" in i for i in module.seen["train"]) == 4
    assert {i.split("#")[0] for i in module.seen["train"]} == set(written)
    assert len(module.seen["val"]) == 2


def test_augmented_training_views(sbu):
    root, _ = sbu
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=3, augment_views=2)
    assert len(dm.train_dataset) == 9
    assert dm.train_dataset.ids[:3] == [dm.train_ids[0], f"{dm.train_ids[0]}#aug1", f"{dm.train_ids[0]}#aug2"]
    sample = dm.train_dataset[2]
    assert (red_mask(sample["image"]) == sample["mask"]).mean() > 0.97
    assert len(dm.test_dataset) == 8  # evaluation is never augmented


def test_bad_inputs_fail_in_init_naming_file_and_key(sbu, tmp_path):
    root, written = sbu
    start = time.perf_counter()
    with pytest.raises(DataConfigError) as err:
        BinaryMaskDataModule(str(tmp_path / "no_such_dir"), "sbu")
    assert err.value.key == "data.root" and time.perf_counter() - start < 1.0
    with pytest.raises(DataConfigError) as err:
        BinaryMaskDataModule(str(root), "sbu", splits={"test": {"mask_dir": "SBU-Test/Masks"}})
    assert err.value.key == "data.splits.test.mask_dir"

    broken = truncate(root / "SBU-Test/ShadowImages" / f"{sorted(written['test'])[4]}.jpg", 0.7)
    with pytest.raises(DataConfigError) as err:
        BinaryMaskDataModule(str(root), "sbu", train_size=2)
    assert err.value.path == broken and err.value.key == "data.splits.test.image_dir"
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=2, check_files="none")  # paths only
    with pytest.raises(DataConfigError):
        dm.test_dataset[4]


def test_few_shot_masks_are_decoded_and_checked_in_init(sbu):
    root, written = sbu
    stems = sorted(written["train"])
    for stem in stems:  # every train mask is graded: whichever few-shot images are drawn, it fails
        write_mask(root / "SBUTrain4KRecoveredSmall/ShadowMasks" / f"{stem}.png",
                   np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1)))
    with pytest.raises(DataConfigError, match="not binary") as err:
        BinaryMaskDataModule(str(root), "sbu", train_size=2)
    assert err.value.key == "data.splits.train.mask_dir"
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=2, mask_check="off")
    assert dm.train_dataset[0]["mask"].any()


def test_training_images_inside_the_evaluation_split_are_refused(sbu):
    root, _ = sbu
    with pytest.raises(DataConfigError, match="also in the val split") as err:
        BinaryMaskDataModule(str(root), "sbu", train_size=3, val_split="train", test_split=None)
    assert err.value.key == "data.val_split"
    dm = BinaryMaskDataModule(str(root), "sbu", train_size=3, val_split="train", test_split=None,
                              allow_split_overlap=True)
    assert len(dm.val_dataset) == 8 and dm.test_dataset is None
    with pytest.raises(DataConfigError, match="no test split"):
        dm.test_dataloader()


def test_test_only_module_for_a_saliency_benchmark(tmp_path):
    written = build_layout(tmp_path, "ecssd", n=4)["test"]
    dm = BinaryMaskDataModule(str(tmp_path), "ecssd", train_split=None, val_split=None)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert sorted(s["id"] for s in batch) == sorted(written)
    assert pickle.loads(pickle.dumps(dm.test_dataset))[0]["id"] == batch[0]["id"]  # worker-safe


def test_voc_module_draws_images_not_episodes(tmp_path):
    train_ids = [f"2007_{i:06d}" for i in range(10)]
    val_ids = [f"2008_{i:06d}" for i in range(6)]
    label_maps = build_voc(tmp_path, {"train": train_ids, "val": val_ids})
    dm = VOCDataModule(str(tmp_path), train_size=4, subset_seed=1, batch_size=3, val_size=3,
                       fewshot_ids_dir=str(tmp_path / "run"))
    dm.setup("fit")
    assert len(dm.train_ids) == 4
    assert {s.split(":")[0] for s in dm.train_dataset.ids} == set(dm.train_ids)
    expected = sum(len(set(np.unique(label_maps[i])) - {0, 255}) for i in dm.train_ids)
    assert len(dm.train_dataset) == expected > 4
    assert ids_in(tmp_path / "run" / FEWSHOT_IDS_FILENAME) == dm.train_ids
    val_images = {s["image_id"] for batch in dm.val_dataloader() for s in batch}
    assert len(val_images) == 3
    test_batch = next(iter(dm.test_dataloader()))
    for sample in test_batch:
        check_sample(sample)
        np.testing.assert_array_equal(sample["label_map"], label_maps[sample["image_id"]])
    assert len(dm.test_dataset) == sum(len(set(np.unique(label_maps[i])) - {0, 255}) for i in val_ids)


def test_voc_module_with_sbd_labels_and_overlap_check(tmp_path):
    build_voc(tmp_path, {"train_aug": [f"2009_{i:06d}" for i in range(5)],
                         "val": ["2008_000001", "2008_000002"],
                         "trainval": ["2008_000001", "2009_000000"]}, aug=True)
    dm = VOCDataModule(str(tmp_path), train_split="train_aug", train_label_dir="SegmentationClassAug",
                       train_size=None)
    assert len(dm.train_ids) == 5
    with pytest.raises(DataConfigError, match="also in the val split"):
        VOCDataModule(str(tmp_path), train_split="trainval", train_size=None)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("2008_000001\n2008_404040\n")
    with pytest.raises(DataConfigError, match="2008_404040") as err:
        VOCDataModule(str(tmp_path), train_split="train_aug", train_label_dir="SegmentationClassAug")
    assert err.value.key == "data.val_split"


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    from alignsam.data.datamodule import EpochShuffle

    first, again = EpochShuffle(20, seed=3), EpochShuffle(20, seed=3)
    first.set_epoch(4)
    again.set_epoch(4)
    assert list(first) == list(again) and sorted(first) == list(range(20))
    again.set_epoch(5)
    assert list(again) != list(first)
    assert list(EpochShuffle(20, seed=4)) != list(EpochShuffle(20, seed=3))
