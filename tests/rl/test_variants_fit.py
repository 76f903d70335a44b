"""A tiny fit with each agent variant beyond the paper (docs/method.md, "Variants beyond the paper"):
it runs, validates, and its checkpoint keeps the option and rebuilds the same agent.

Test size as in tests/test_module.py: 8 training scenes in batches of 4, 4 validation scenes, T = 2
on a 4 x 4 grid, K = 2 PPO epochs. Three fits cover the five option values.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from alignsam.agent import Agent
from alignsam.data.scene_data import SceneDataModule
from alignsam.module import AlignSAM, SegmenterConfig
from alignsam.rl.env import EnvConfig
from alignsam.rl.policy import PolicyConfig
from alignsam.rl.ppo import PPOConfig
from alignsam.srm import SRMConfig

ROOT = Path(__file__).resolve().parents[2]
TINY_SAM = ROOT / "checkpoints" / "tiny_sam.pt"

FITS = {
    "srm_input-bf16": dict(policy={"srm_input": True}, ppo={"precision": "bf16"}),
    "coverage-confident": dict(env={"reward": "coverage"}, srm={"label_rule": "confident", "negative_threshold": 0.2}),
    "target+coverage-drop": dict(env={"reward": "target+coverage"}, srm={"label_rule": "drop"},
                                 policy={"srm_input": True}),
}


@pytest.mark.parametrize("name", list(FITS))
def test_a_tiny_fit_runs_and_its_checkpoint_keeps_the_option(name, tmp_path):
    options = FITS[name]
    L.seed_everything(0)
    model = AlignSAM(
        task="saliency", segmenter=SegmenterConfig(name="tiny", checkpoint=str(TINY_SAM)),
        env=EnvConfig(steps=2, grid=4, **options.get("env", {})), policy=PolicyConfig(**options.get("policy", {})),
        srm=SRMConfig(**options.get("srm", {})), ppo=PPOConfig(epochs=2, **options.get("ppo", {})),
        feature_cache=str(tmp_path / "cache"),
    )
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_epochs=1, logger=False,
                        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)],
                        check_val_every_n_epoch=1, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, SceneDataModule(task="saliency", train_pool=50, train_size=8, val_size=4, test_size=4,
                                       batch_size=4))
    assert trainer.state.finished
    assert all(math.isfinite(v) for v in model.validation_table["agent"].values())

    path = tmp_path / "ckpt" / "last.ckpt"
    hparams = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
    for group, values in options.items():
        assert all(hparams[group][k] == v for k, v in values.items()), (group, hparams[group])
    agent = Agent.from_checkpoint(path)
    assert agent.policy.srm_input == options.get("policy", {}).get("srm_input", False)
    assert agent.srm_config.label_rule == options.get("srm", {}).get("label_rule", "threshold")
    assert agent.env_config.reward == options.get("env", {}).get("reward", "target")
    for key, value in model.agent.state_dict().items():
        if key.startswith(("policy.", "srm.")):
            assert torch.equal(agent.state_dict()[key], value.cpu()), key
