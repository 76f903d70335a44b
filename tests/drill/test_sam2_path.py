"""The drill for SAM 2: the saliency config on SAM 2.1 Hiera-T, end to end (issue 15).

The same commands as tests/drill/test_real_path.py, with the segmenter swapped by the documented
one-line override ``--model.segmenter.name sam2.1_hiera_t --model.segmenter.checkpoint <file>``
(docs/sam2.md), on a stand-in of ``sam2.1_hiera_tiny.pt`` (random weights in the official
``{"model": state dict}`` format, tests/drill/standins.py) and the tiny DUTS tree:

1. ``python train.py --config conf/saliency.yaml`` shrunk (1 epoch, T = 2, 4 few-shot images);
2. ``python evaluate.py --ckpt_path <run>/checkpoints/last.ckpt --strategies '[agent, centre]'``
   (the run's own config);
3. ``python evaluate.py predict --ckpt_path ... --images <folder> --out <dir>``.

It checks that nothing of SAM 2 lands in the agent's checkpoint, that the cache holds one packed
(1024-channel, ~8 MiB fp16) embedding per image, and the outputs of each step. About 5 min on a
2-core CPU (Hiera-T embeds an image in ~2-6 s there). Skipped without the sam2 extra.

    .venv/bin/python -m pytest -q -m slow tests/drill/test_sam2_path.py
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from standins import REAL_LAYOUTS, SAM2_1_HIERA_T_CONFIG, SAM2_1_HIERA_T_NAME, sam2_standin_checkpoint, write_binary_tree
from test_real_path import ROOT, Runner, Task, check, feat_files, write_predict_folder

pytestmark = pytest.mark.slow
pytest.importorskip("sam2", reason="SAM 2 is an optional extra: pip install -e .[sam2] (docs/sam2.md)")

TRAIN_SIZE, VAL_SIZE, BATCH_SIZE = 4, 2, 2
PACKED_ENTRY_BYTES = 1024 * 64 * 64 * 2  # fp16 (1024, 64, 64): image embedding + two high-res maps
CONFIG = ROOT / "conf" / "saliency.yaml"


@pytest.fixture(scope="session")
def sam2_standin(tmp_path_factory) -> Path:
    return sam2_standin_checkpoint(tmp_path_factory.mktemp("sam2_standin"))


def test_sam2_standin_loads_like_the_official_file(sam2_standin):
    from sam2.build_sam import build_sam2

    from alignsam.foundation.registry import build_segmenter

    assert sam2_standin.name == SAM2_1_HIERA_T_NAME
    raw = torch.load(sam2_standin, map_location="cpu", weights_only=True)
    assert set(raw) == {"model"} and "image_encoder.trunk.patch_embed.proj.weight" in raw["model"]
    build_sam2(SAM2_1_HIERA_T_CONFIG, str(sam2_standin), device="cpu")  # the sam2 package's own loader
    segmenter = build_segmenter("sam2.1_hiera_t", str(sam2_standin))
    assert segmenter.fingerprint.startswith(f"{SAM2_1_HIERA_T_NAME}:")


def test_saliency_on_sam2_trains_evaluates_and_predicts(sam2_standin, drill_device, tmp_path):
    task = Task("saliency", "duts", "test", matcher=False, predict_text=None)
    data_root, cache, logs = tmp_path / "data", tmp_path / "cache", tmp_path / "logs"
    splits = write_binary_tree(data_root, task.preset)
    run = Runner(task, tmp_path)
    overrides = [
        f"--trainer.accelerator={'gpu' if drill_device == 'cuda' else 'cpu'}", "--trainer.devices=1",
        "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={logs}",
        "--model.segmenter.name", "sam2.1_hiera_t", "--model.segmenter.checkpoint", str(sam2_standin),
        "--model.env.steps=2", "--model.ppo.epochs=1", f"--model.feature_cache={cache}",
        f"--data.init_args.root={data_root}",
        f"--data.init_args.train_size={TRAIN_SIZE}", f"--data.init_args.val_size={VAL_SIZE}",
        f"--data.init_args.batch_size={BATCH_SIZE}", "--data.init_args.num_workers=0",
    ]

    # 1. train.py
    run("train", ["train.py", "--config", str(CONFIG), *overrides])
    run_dir = logs / "saliency" / "version_0"
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    check(task, "train", ckpt_path.is_file(), f"{ckpt_path} is missing")
    segmenter = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["segmenter"]
    check(task, "train", segmenter == {"name": "sam2.1_hiera_t", "checkpoint": str(sam2_standin)},
          f"config.yaml has segmenter {segmenter}")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    frozen = [k for k in state if "segmenter." in k or "image_encoder" in k]
    check(task, "train", state and not frozen, f"the checkpoint holds SAM 2 entries, e.g. {frozen[:3]}")
    entries = [cache / e for e in feat_files(cache, "sam_embedding")]
    check(task, "train", len(entries) == TRAIN_SIZE + VAL_SIZE, f"{len(entries)} embeddings cached")
    check(task, "train", all(PACKED_ENTRY_BYTES < e.stat().st_size < PACKED_ENTRY_BYTES + 65536 for e in entries),
          f"cache entries of {[e.stat().st_size for e in entries]} bytes; expected packed fp16 (1024, 64, 64)")

    # 2. evaluate.py, the run's own config, two strategies
    run("evaluate", ["evaluate.py", "--ckpt_path", str(ckpt_path), "--strategies", "[agent, centre]"])
    with open(run_dir / "evaluation" / "test.csv") as f:
        rows = list(csv.DictReader(f))
    check(task, "evaluate", [r["strategy"] for r in rows] == ["agent", "centre"], f"test.csv rows {rows}")
    check(task, "evaluate", all(0 <= float(r["iou_fg"]) <= 1 for r in rows), f"iou_fg out of [0, 1]: {rows}")
    n_test = len(splits["test"])
    check(task, "evaluate", len(feat_files(cache, "sam_embedding")) == TRAIN_SIZE + n_test,
          "the test images were not embedded once each")

    # 3. evaluate.py predict on a folder
    images = tmp_path / "predict_images"
    image_dir = REAL_LAYOUTS[task.preset]["test"][0]
    sizes = write_predict_folder(images, data_root / image_dir / f"{splits['test'][0]}.jpg")
    out = tmp_path / "predict"
    run("predict", ["evaluate.py", "predict", "--ckpt_path", str(ckpt_path), "--images", str(images),
                    "--out", str(out), "--device", drill_device])
    written = {p.stem: Image.open(p).size for p in (out / "masks").glob("*.png")}
    check(task, "predict", written == sizes, f"masks/ holds {written}; expected {sizes}")
    for mask in (out / "masks").glob("*.png"):
        values = set(np.unique(np.asarray(Image.open(mask))).tolist())
        check(task, "predict", values <= {0, 255}, f"{mask.name} has values {sorted(values)[:8]}")
    print("[saliency on sam2.1_hiera_t] step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in run.times.items()))
