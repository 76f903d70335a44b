"""The AlignSAM LightningModule (alignsam/module.py) run by Lightning's Trainer on the bundled world.

Tiny settings throughout (8 training scenes, batches of 4, 4 validation scenes, T = 2 clicks on a
4 x 4 grid, K = 2 PPO epochs): the tests check the plumbing (what a fit leaves behind, resuming,
DDP), not learning.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alignsam.data.scene_data import SceneDataModule
from alignsam.metrics import HEADLINE_METRICS
from alignsam.module import AlignSAM, SegmenterConfig
from alignsam.rl.env import EnvConfig
from alignsam.rl.policy import PolicyConfig
from alignsam.rl.ppo import PPOConfig
from alignsam.srm import SRMConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_SAM = ROOT / "checkpoints" / "tiny_sam.pt"
MATCHER_TINY = ROOT / "conf" / "scenes" / "matcher_tiny.yaml"
EXPLICIT_TASKS = ("shadow", "voc", "categories")  # docs/method.md: the text-conditioned branch
SCALARS = ("train/return", "ppo/approx_kl", "ppo/clip_fraction", "ppo/explained_variance", "ppo/entropy", "srm/loss")


def tiny_model(task: str, cache: Path, seed: int = 0) -> AlignSAM:
    """The bundled world's model at test size; the explicit tasks get the tiny CLIP matcher."""
    explicit = task in EXPLICIT_TASKS
    variant = "explicit" if explicit else "implicit"
    matcher = yaml.safe_load(MATCHER_TINY.read_text()) if explicit else None
    return AlignSAM(
        task=task, segmenter=SegmenterConfig(name="tiny", checkpoint=str(TINY_SAM)),
        env=EnvConfig(steps=2, grid=4), policy=PolicyConfig(variant=variant), srm=SRMConfig(variant=variant),
        ppo=PPOConfig(epochs=2), matcher=matcher, feature_cache=str(cache), seed=seed,
    )


def tiny_data(task: str, batch_size: int = 4) -> SceneDataModule:
    return SceneDataModule(task=task, train_pool=50, train_size=8, val_size=4, test_size=4, batch_size=batch_size)


def tiny_trainer(max_epochs: int, root: Path, logger=False, callbacks=(), **kwargs) -> L.Trainer:
    """Without a logger, ``root`` is the log dir (``fewshot_ids.txt`` goes there, not into the cwd)."""
    return L.Trainer(
        default_root_dir=str(root),
        accelerator="cpu", devices=kwargs.pop("devices", 1), max_epochs=max_epochs, logger=logger,
        callbacks=list(callbacks), check_val_every_n_epoch=1, log_every_n_steps=1,
        num_sanity_val_steps=kwargs.pop("num_sanity_val_steps", 0), enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )


def scalar_and_image_tags(log_dir: Path):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return set(events.Tags()["scalars"]), set(events.Tags()["images"])


# ---------------------------------------------------------------------------------------------
# One fit per branch: what it leaves behind
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["saliency", "categories"], ids=["implicit-saliency", "explicit-categories"])
def fitted(request, tmp_path_factory):
    """A 1-epoch fit with TensorBoard and ``last.ckpt`` (the explicit one also runs a sanity check)."""
    task = request.param
    tmp = tmp_path_factory.mktemp(f"fit-{task}")
    L.seed_everything(0)
    model = tiny_model(task, tmp / "cache")
    logger = TensorBoardLogger(str(tmp / "logs"), name=task)
    trainer = tiny_trainer(1, tmp, logger=logger, callbacks=[ModelCheckpoint(save_last=True)],
                           num_sanity_val_steps=1 if task == "categories" else 0)
    trainer.fit(model, tiny_data(task))
    return task, model, trainer, Path(logger.log_dir)


def test_fit_finishes_and_validates_against_the_references(fitted):
    task, model, trainer, _ = fitted
    assert trainer.state.finished and trainer.current_epoch == 1
    table = model.validation_table
    assert set(table) == {"agent", "centre", "random"}
    for strategy, row in table.items():
        for metric in HEADLINE_METRICS[task]:
            assert metric in row, f"{strategy} lacks {metric}"
            assert math.isfinite(row[metric]), f"{strategy}/{metric} = {row[metric]}"


def test_checkpoint_holds_only_the_trainable_parts(fitted):
    task, model, _, log_dir = fitted
    path = log_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    keys = list(checkpoint["state_dict"])
    assert not [k for k in keys if k.startswith(("agent.segmenter.", "agent.matcher."))]
    assert {tuple(k.split(".")[:2]) for k in keys} == {("agent", "policy"), ("agent", "srm")}
    assert "generator" in checkpoint["alignsam"]  # the rollout sampler, for an exact resume
    # Weights plus Adam's two moments, and some room for loops and hyperparameters; a frozen model in
    # the file would not fit (the tiny SAM alone is larger than this budget).
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    budget = 3 * trainable + 512 * 1024
    assert budget < os.path.getsize(TINY_SAM)
    size = os.path.getsize(path)
    assert size < budget, f"last.ckpt is {size / 2**20:.2f} MiB, budget {budget / 2**20:.2f} MiB"
    if task == "saliency":
        assert size < 3 * 2**20  # the implicit agent's whole checkpoint stays under 3 MiB


def test_checkpoint_loads_with_torch_default_weights_only(fitted):
    """``trainer.fit(ckpt_path=...)`` and ``torch.load`` load with ``weights_only=True`` by default
    (torch >= 2.6): everything in the checkpoint, hyperparameters included, must be allowed."""
    _, _, _, log_dir = fitted
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert checkpoint["state_dict"]


def test_a_checkpoint_of_the_layout_before_the_agent_module_still_loads(fitted, tmp_path):
    """Checkpoints written before alignsam.agent existed name the weights policy.* / srm.*: the
    LightningModule (evaluate.py, resume) and Agent.from_checkpoint (the Python API) both load them."""
    from alignsam.agent import Agent

    _, model, _, log_dir = fitted
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {k.removeprefix("agent."): v for k, v in checkpoint["state_dict"].items()}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    expected = {k: v for k, v in model.state_dict().items()}
    loaded = AlignSAM.load_from_checkpoint(old, map_location="cpu")
    assert all(torch.equal(loaded.state_dict()[k], v.cpu()) for k, v in expected.items())
    agent = Agent.from_checkpoint(old)
    assert all(torch.equal(agent.state_dict()[k.removeprefix("agent.")], v.cpu()) for k, v in expected.items())


def test_tensorboard_holds_training_diagnostics_validation_and_episode_pictures(fitted):
    task, _, _, log_dir = fitted
    scalars, images = scalar_and_image_tags(log_dir)
    expected = set(SCALARS)
    expected |= {f"{prefix}/{m}" for prefix in ("val", "val_centre", "val_random") for m in HEADLINE_METRICS[task]}
    assert expected <= scalars, f"missing: {sorted(expected - scalars)}"
    # one picture per episode, at the step of the validation scalars logged with it
    assert {"val/episode_0", "val/episode_1"} <= images
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    metric = HEADLINE_METRICS[task][0]
    assert [e.step for e in events.Images("val/episode_0")] == [e.step for e in events.Scalars(f"val/{metric}")]
    picture = events.Images("val/episode_0")[0]
    assert picture.width >= 3 * 384  # enlarged: the 256 px scenes are drawn at 384 px or more per column


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------

class BatchIds(Callback):
    """Records the scene ids of every training batch: ``ids[(epoch, batch_idx)]``."""

    def __init__(self) -> None:
        self.ids = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids[(trainer.current_epoch, batch_idx)] = [sample["id"] for sample in batch]


def _fit(tmp: Path, cache: Path, max_epochs: int, ckpt_path=None):
    L.seed_everything(0)
    model, ids = tiny_model("saliency", cache, seed=0), BatchIds()
    trainer = tiny_trainer(max_epochs, tmp, callbacks=[ModelCheckpoint(dirpath=str(tmp), save_last=True), ids])
    trainer.fit(model, tiny_data("saliency"), ckpt_path=ckpt_path)
    return model, ids.ids


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """2 epochs at once == 1 epoch, then a new Trainer and model resumed from ``last.ckpt`` to 2."""
    cache = tmp_path / "cache"
    straight, straight_ids = _fit(tmp_path / "a", cache, 2)
    _fit(tmp_path / "b", cache, 1)
    resumed, resumed_ids = _fit(tmp_path / "b", cache, 2, ckpt_path=str(tmp_path / "b" / "last.ckpt"))

    second_epoch = {key: v for key, v in straight_ids.items() if key[0] == 1}
    assert second_epoch and resumed_ids == second_epoch, (
        "the resumed epoch trains on other batches than the uninterrupted one: the training loader "
        "shuffles with the global torch RNG, which seed_everything resets and the checkpoint does not hold"
    )
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-6)]
    assert not differ, f"policy/SRM weights differ after resuming: {differ[:5]}"
    assert resumed.validation_table == straight.validation_table


# ---------------------------------------------------------------------------------------------
# DDP on CPU
# ---------------------------------------------------------------------------------------------

class SaveRankWeights(Callback):
    """Each rank writes its trainable weights to ``<directory>/rank<r>.pt`` at the end of training."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(weights, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


def test_two_process_cpu_ddp_fit_finishes_with_ranks_in_step(tmp_path):
    """``ddp_spawn`` with gloo: 2 ranks x 2 batches of 2 scenes, then validation; the ranks' weights
    must agree at the end (DDP averaged every update's gradients) and come back to this process."""
    L.seed_everything(0)
    model = tiny_model("saliency", tmp_path / "cache")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="ddp")
    trainer = tiny_trainer(1, tmp_path, logger=logger, devices=2, strategy="ddp_spawn_find_unused_parameters_true",
                           callbacks=[ModelCheckpoint(save_last=True), SaveRankWeights(str(tmp_path))])
    trainer.fit(model, tiny_data("saliency", batch_size=2))
    assert trainer.state.finished

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' weights drifted apart"
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0), "no update happened"
    assert all(torch.equal(model.state_dict()[k], rank0[k]) for k in rank0), "trained weights did not come back"

    log_dir = tmp_path / "logs" / "ddp" / "version_0"
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "fewshot_ids.txt").is_file()
    scalars, _ = scalar_and_image_tags(log_dir)
    assert {"train/return", "srm/loss"} | {f"val/{m}" for m in HEADLINE_METRICS["saliency"]} <= scalars
