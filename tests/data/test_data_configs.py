"""The ``data:`` section of every task config parses as LightningCLI parses it and builds its module."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.cli import LightningArgumentParser

from alignsam.config_files import load_config
from alignsam.data.datamodule import BinaryMaskDataModule, VOCDataModule
from fixture_trees import build_layout, build_voc

CONF = Path(__file__).resolve().parents[2] / "conf"
# config -> (module class, preset the fixture tree is built in, root named in the config)
TASKS = {
    "blur": (BinaryMaskDataModule, "cuhk_dbd", "data/cuhk"),
    "shadow": (BinaryMaskDataModule, "sbu", "data/sbu"),
    "glass": (BinaryMaskDataModule, "gdd", "data/gdd"),
    "saliency": (BinaryMaskDataModule, "duts", "data/duts"),
    "voc": (VOCDataModule, None, "data/voc"),
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_config_data_section_builds_on_a_tree_in_its_layout(tmp_path, task):
    cls, preset, root = TASKS[task]
    config = load_config(CONF / f"{task}.yaml")  # the task file over its bases (base_config)
    init_args = config["data"]["init_args"]
    assert init_args["root"] == root
    if preset is None:
        build_voc(tmp_path, {"train": [f"2007_{i:06d}" for i in range(4)], "val": ["2008_000001"]})
    else:
        assert init_args["preset"] == preset
        build_layout(tmp_path, preset, n=4)
    init_args.update(root=str(tmp_path), num_workers=0)
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True)
    dm = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
    assert type(dm) is cls and dm.hparams.train_size == 50
    assert len(dm.train_ids) == 4  # the fixture split is smaller than the paper's 50: all of it
    batch = next(iter(dm.val_dataloader()))
    assert batch and all("mask" in s and "id" in s for s in batch)
