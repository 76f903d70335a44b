"""The Python API (alignsam.AlignSAMPredictor): docs/python-api.md's example runs as written, from
another working directory, on a freshly trained tiny agent; inputs of every kind give one answer."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignsam.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("api")
    old, sys.argv = sys.argv, ["train.py"]
    try:
        main(["fit", "--config", str(ROOT / "conf/demo.yaml"), "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
              "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={tmp / 'logs'}",
              "--model.env.steps=2", "--model.env.grid=4", "--model.ppo.epochs=1", f"--model.feature_cache={tmp / 'cache'}",
              "--data.init_args.train_size=4", "--data.init_args.val_size=2", "--data.init_args.batch_size=2"])
    finally:
        sys.argv = old
    return tmp / "logs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"


def scene_image() -> np.ndarray:
    from alignsam.data.scenes import render_scene

    return render_scene("saliency", 123).image


def test_the_documented_example_runs_from_another_folder(checkpoint, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    code = blocks[0].replace("logs/demo/version_0/checkpoints/last.ckpt", str(checkpoint))
    monkeypatch.chdir(tmp_path)  # not the repository: the bundled tiny SAM must still be found
    Image.fromarray(scene_image()).save(tmp_path / "photo.jpg")
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    result = namespace["result"]
    assert result.mask.shape == (256, 256) and result.mask.dtype == bool
    assert len(result.clicks) == len(result.labels) == 2 + 2  # seed prompts + T clicks
    assert result.masks_per_click.shape == (3, 256, 256)
    assert np.array_equal(result.masks_per_click[-1], result.mask)
    assert (tmp_path / "photo_mask.png").is_file()
    assert "saliency" in capsys.readouterr().out


def test_a_path_a_pil_image_and_an_array_give_the_same_episode(checkpoint, tmp_path):
    from alignsam import AlignSAMPredictor

    predictor = AlignSAMPredictor.from_checkpoint(checkpoint, feature_cache=str(tmp_path / "cache"))
    image = scene_image()
    Image.fromarray(image).save(tmp_path / "scene.png")
    results = [predictor.predict(x) for x in (image, Image.fromarray(image), tmp_path / "scene.png")]
    for other in results[1:]:
        assert np.array_equal(other.mask, results[0].mask)
        assert np.array_equal(other.clicks, results[0].clicks) and np.array_equal(other.labels, results[0].labels)
    assert results[0].text == "salient"
    assert set(np.unique(results[0].labels)) <= {0, 1}
    h, w = image.shape[:2]
    assert (results[0].clicks[:, 0] < w).all() and (results[0].clicks[:, 1] < h).all()


def test_bad_inputs_are_one_clear_error(checkpoint, tmp_path):
    from alignsam import AlignSAMPredictor
    from alignsam.api import PredictionInputError

    predictor = AlignSAMPredictor.from_checkpoint(checkpoint, feature_cache=str(tmp_path / "cache"))
    with pytest.raises(PredictionInputError, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(PredictionInputError, match="missing.png"):
        predictor.predict(tmp_path / "missing.png")
