"""The drill: every real task config, end to end, on stand-ins of the official checkpoints and of
the datasets (issue 12).

What the bundled world's tests cannot see: the ViT-B models as the official files hold them, the
five task configs as shipped (``conf/{blur,shadow,glass,saliency,voc}.yaml``), the real dataset
layouts with their quirks, and the commands a user types. For each config this runs, as
subprocesses from the repository root,

1. ``python train.py --config conf/<task>.yaml`` shrunk by overrides (1 epoch, T = 2, 4 few-shot
   images, 1 PPO epoch), with the checkpoints pointing at stand-ins (random weights in the official
   formats, ``tests/drill/standins.py``), the data root at a tiny tree in the real layout, and the
   feature cache and logs under pytest's tmp dir;
2. ``python evaluate.py --config conf/<task>.yaml --ckpt_path <run>/checkpoints/last.ckpt`` (every
   strategy), then again (``--strategies [agent]``), which must compute no new cache entry;
3. ``python evaluate.py predict --ckpt_path ... --images <folder> --out <dir>`` (and again with
   ``--segmenter_checkpoint``),

and checks what each leaves behind. A failing step names the config, the step, the exit status and
the first and last lines of its error; every step's full output is in ``<tmp>/<step>.log``. After
``train`` the steps are independent: one that fails does not stop the others, and the test reports
them all.

Run it (measured on the shared 2-core CPU: 20 min for the five configs, 34 min with the SAM 2 drill
and other jobs loading the machine; per config 1.5-8 min, most of it ViT-B image encodes)::

    make drill                                   # = pytest -q -m slow tests/drill, on the CPU
    ALIGNSAM_DRILL_ACCELERATOR=gpu make drill    # the same on a GPU (one command)
    .venv/bin/python -m pytest -q -m slow tests/drill --device cuda -k voc   # one config, on a GPU

``ALIGNSAM_DRILL_STANDINS=<dir>`` keeps the ~725 MB of stand-in checkpoints between sessions.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from standins import (CLIP_MODEL_NAME, CLIP_VIT_B_16_NAME, OPENAI_EXTRAS, REAL_LAYOUTS, SAM_VIT_B_NAME,
                      standin_checkpoints, write_binary_tree, write_voc_tree)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SIZE, VAL_SIZE, BATCH_SIZE = 4, 2, 2
STEP_TIMEOUT_S = 1800


class Task:
    def __init__(self, name: str, preset: Optional[str], eval_split: str, matcher: bool, predict_text: Optional[str]):
        self.name, self.preset, self.eval_split = name, preset, eval_split
        self.matcher, self.predict_text = matcher, predict_text
        self.config = ROOT / "conf" / f"{name}.yaml"


TASKS = {
    "blur": Task("blur", "cuhk_dbd", "test", matcher=False, predict_text=None),
    "shadow": Task("shadow", "sbu", "test", matcher=True, predict_text=None),
    "glass": Task("glass", "gdd", "test", matcher=False, predict_text=None),
    "saliency": Task("saliency", "duts", "test", matcher=False, predict_text=None),
    "voc": Task("voc", None, "val", matcher=True, predict_text="cat"),
}


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> Dict[str, Path]:
    """The stand-in checkpoints, built once per session (~375 MB + ~350 MB)."""
    return standin_checkpoints(tmp_path_factory.mktemp("standins"))


def feat_files(cache: Path, kind: str = "") -> List[str]:
    """Cache entries (``<cache>/<kind>/<xx>/<key>.feat``), as sorted relative paths."""
    base = cache / kind if kind else cache
    return sorted(str(p.relative_to(cache)) for p in base.rglob("*.feat")) if base.is_dir() else []


def error_excerpt(output: str, tail: int = 10) -> str:
    """The first line of the error's traceback, its deepest frame in this repository (the product
    code that failed) and the last lines of the output."""
    lines = output.rstrip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), None)
    if start is None:
        return "\n".join(lines[-tail:])
    ours = [i for i, line in enumerate(lines) if line.strip().startswith(f'File "{ROOT}/')
            and "/.venv/" not in line and i > start]
    excerpt = [lines[start]]
    if ours and ours[-1] < len(lines) - tail:
        excerpt += ["    ...", *lines[ours[-1]:ours[-1] + 2]]
    return "\n".join(excerpt + ["    ...", *lines[max(len(lines) - tail, start + 1):]])


class Runner:
    """Runs the commands of one config as subprocesses from the repository root, logging each."""

    def __init__(self, task: Task, log_dir: Path) -> None:
        self.task, self.log_dir = task, log_dir
        self.times: Dict[str, float] = {}

    def __call__(self, step: str, args: List[str]) -> str:
        cmd = [sys.executable, *args]
        log = self.log_dir / (step.replace(" --", "_").replace(" ", "_") + ".log")
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except subprocess.TimeoutExpired as timeout:
            output = f"{timeout.stdout or ''}\n{timeout.stderr or ''}"
            log.write_text(output)
            pytest.fail(f"[{self.task.name}] step '{step}' timed out after {STEP_TIMEOUT_S} s: {' '.join(cmd)}")
        self.times[step] = time.perf_counter() - start
        output = f"$ {' '.join(cmd)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        log.write_text(output)
        print(f"[{self.task.name}] {step}: exit {done.returncode} in {self.times[step]:.0f} s")
        if done.returncode != 0:
            pytest.fail(f"[{self.task.name}] step '{step}' exited with {done.returncode} "
                        f"(full log: {log}):\n{error_excerpt(done.stdout + done.stderr)}",
                        pytrace=False)
        return done.stdout + done.stderr


def check(task: Task, step: str, condition: bool, message: str) -> None:
    """An assertion that names the config and the step it checks."""
    assert condition, f"[{task.name}] after '{step}': {message}"


def write_predict_folder(folder: Path, tree_image: Path) -> Dict[str, tuple]:
    """A few images for ``evaluate.py predict``: a copy of a dataset image (its embedding is in the
    cache already) and a new greyscale portrait PNG of another size; returns ``{stem: (w, h)}``."""
    folder.mkdir(parents=True)
    (folder / f"copy_{tree_image.stem}{tree_image.suffix}").write_bytes(tree_image.read_bytes())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (110, 50), dtype=np.uint8), mode="L").save(folder / "portrait_grey.png")
    return {f"copy_{tree_image.stem}": Image.open(tree_image).size, "portrait_grey": (50, 110)}


# -- the stand-ins themselves ------------------------------------------------------------------------
def test_standins_load_like_the_official_files(standins):
    from open_clip.model import build_model_from_openai_state_dict

    from alignsam.foundation.registry import build_segmenter, build_text_matcher

    assert standins["sam"].name == SAM_VIT_B_NAME and standins["clip"].name == CLIP_VIT_B_16_NAME
    sam_state = torch.load(standins["sam"], map_location="cpu", weights_only=True)  # a plain state dict
    assert isinstance(sam_state, dict) and "image_encoder.patch_embed.proj.weight" in sam_state
    archive = torch.jit.load(str(standins["clip"]), map_location="cpu")  # a TorchScript archive
    clip_state = archive.state_dict()
    assert set(OPENAI_EXTRAS) <= set(clip_state) and clip_state["visual.conv1.weight"].dtype == torch.float16
    build_model_from_openai_state_dict(dict(clip_state), quick_gelu=True)  # open_clip's own OpenAI path

    segmenter = build_segmenter("vit_b", str(standins["sam"]))
    assert segmenter.fingerprint not in ("", "random-init")
    matcher = build_text_matcher(CLIP_MODEL_NAME, str(standins["clip"]))
    assert matcher.fingerprint not in ("", "random-init")


# -- every task config, end to end -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TASKS))
def test_real_config_trains_evaluates_and_predicts(name, standins, drill_device, tmp_path):
    from alignsam.evaluation.strategies import default_strategies, label_of

    task = TASKS[name]
    data_root, cache, logs = tmp_path / "data", tmp_path / "cache", tmp_path / "logs"
    splits = write_voc_tree(data_root) if task.preset is None else write_binary_tree(data_root, task.preset)
    run = Runner(task, tmp_path)
    overrides = [
        f"--trainer.accelerator={'gpu' if drill_device == 'cuda' else 'cpu'}", "--trainer.devices=1",
        "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--model.segmenter.checkpoint={standins['sam']}",
        "--model.env.steps=2", "--model.ppo.epochs=1",
        f"--model.feature_cache={cache}",
        f"--data.init_args.root={data_root}",
        f"--data.init_args.train_size={TRAIN_SIZE}", f"--data.init_args.val_size={VAL_SIZE}",
        f"--data.init_args.batch_size={BATCH_SIZE}", "--data.init_args.num_workers=0",
    ]
    if task.matcher:
        overrides.append(f"--model.matcher.checkpoint_path={standins['clip']}")

    # 1. train.py ---------------------------------------------------------------------------------
    run("train", ["train.py", "--config", str(task.config), *overrides])
    run_dir = logs / name / "version_0"
    for required in ("config.yaml", "fewshot_ids.txt", "checkpoints/last.ckpt"):
        check(task, "train", (run_dir / required).is_file(), f"{run_dir / required} is missing")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    check(task, "train", config["model"]["segmenter"]["checkpoint"] == str(standins["sam"]),
          f"config.yaml has segmenter.checkpoint {config['model']['segmenter']['checkpoint']!r}")
    ids = [line.strip() for line in (run_dir / "fewshot_ids.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    check(task, "train", len(ids) == TRAIN_SIZE and set(ids) <= set(splits["train"]),
          f"fewshot_ids.txt lists {ids}, expected {TRAIN_SIZE} of {splits['train']}")

    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # no pickled objects
    state = ckpt["state_dict"]
    # frozen models stay out, wherever they sit in the module tree (segmenter.*, agent.matcher.*, ...)
    frozen = sorted(k for k in state if {"segmenter", "matcher"} & set(k.split(".")))
    check(task, "train", state and not frozen,
          f"the checkpoint holds {len(frozen)} frozen-model entries (e.g. {frozen[:3]}); they must stay out")

    embeddings = feat_files(cache, "sam_embedding")
    check(task, "train", len(embeddings) == TRAIN_SIZE + VAL_SIZE,
          f"{len(embeddings)} SAM embeddings cached; expected one per few-shot and validation image "
          f"({TRAIN_SIZE} + {VAL_SIZE})")
    if task.matcher:
        check(task, "train", len(feat_files(cache, "text_map")) > 0, "no CLIP Surgery text map in the cache")

    # after train, the steps are independent: each failure is recorded and the others still run
    failures: List[str] = []

    def attempt(phase) -> bool:
        try:
            phase()
            return True
        except (AssertionError, pytest.fail.Exception) as error:
            failures.append(str(error))
            return False

    # 2. evaluate.py: every strategy, then again from the cache -----------------------------------
    evaluate = ["evaluate.py", "--config", str(task.config), "--ckpt_path", str(ckpt_path), *overrides]

    def evaluate_every_strategy() -> None:
        run("evaluate", evaluate)
        # the tables of the test split go to evaluation/, those of another split (VOC's val) to evaluation_<split>/
        results = run_dir / ("evaluation" if task.eval_split == "test" else f"evaluation_{task.eval_split}")
        for table in ("test.md", "test.csv"):
            check(task, "evaluate", (results / table).is_file(), f"{results / table} is missing")
        with open(results / "test.csv") as f:
            rows = [row["strategy"] for row in csv.DictReader(f)]
        expected = default_strategies(has_matcher=task.matcher)
        check(task, "evaluate", rows == expected, f"test.csv rows {rows}, expected one per strategy {expected}")
        markdown = (results / "test.md").read_text()
        missing = [s for s in expected if f"| {label_of(s)} |" not in markdown]
        check(task, "evaluate", not missing, f"test.md has no row for {missing}")
        n_eval = len(splits[task.eval_split])
        embeddings = feat_files(cache, "sam_embedding")
        check(task, "evaluate", len(embeddings) == TRAIN_SIZE + n_eval,
              f"{len(embeddings)} SAM embeddings cached; expected the few-shot and the {task.eval_split} images "
              f"({TRAIN_SIZE} + {n_eval}; validation images are {task.eval_split} images)")

    def evaluate_again_from_the_cache() -> None:
        before = feat_files(cache)
        # one strategy is enough: the cache is filled for the train and test splits before any scoring
        run("evaluate again", [*evaluate, "--strategies", "[agent]", "--results_dir", str(tmp_path / "evaluation_again")])
        after = feat_files(cache)
        check(task, "evaluate again", after == before,
              f"a second evaluate.py wrote {len(set(after) - set(before))} new cache entries "
              f"({len(before)} -> {len(after)}); it must only read the cache")

    if attempt(evaluate_every_strategy):
        attempt(evaluate_again_from_the_cache)
    else:
        failures.append(f"[{name}] step 'evaluate again' not run: 'evaluate' failed")

    # 3. evaluate.py predict on a folder ----------------------------------------------------------
    image_dir = "VOCdevkit/VOC2012/JPEGImages" if task.preset is None else REAL_LAYOUTS[task.preset][task.eval_split][0]
    images = tmp_path / "predict_images"
    sizes = write_predict_folder(images, data_root / image_dir / f"{splits[task.eval_split][0]}.jpg")
    text = ["--text", task.predict_text] if task.predict_text else []

    def predict(step: str, *extra: str) -> None:
        out = tmp_path / step.replace(" ", "_").replace("-", "")
        run(step, ["evaluate.py", "predict", "--ckpt_path", str(ckpt_path), "--images", str(images),
                   "--out", str(out), *text, "--device", drill_device, *extra])
        written = {p.stem: Image.open(p).size for p in (out / "masks").glob("*.png")}
        check(task, step, written == sizes, f"masks/ holds {written}; expected one per image at its size {sizes}")
        for mask in (out / "masks").glob("*.png"):
            values = set(np.unique(np.asarray(Image.open(mask))).tolist())
            check(task, step, values <= {0, 255}, f"{mask.name} has values {sorted(values)[:8]}, expected 0/255")
        overlays = sorted(p.stem for p in (out / "overlays").glob("*.png"))
        check(task, step, overlays == sorted(sizes), f"overlays/ holds {overlays}")

    attempt(lambda: predict("predict"))
    # the SAM weights given on the command line (moved since training), same file: cache hits
    attempt(lambda: predict("predict --segmenter_checkpoint", "--segmenter_checkpoint", str(standins["sam"])))

    print(f"[{name}] step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in run.times.items()))
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
