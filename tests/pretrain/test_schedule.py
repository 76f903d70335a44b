"""The pretraining learning-rate schedule and the modules that use it."""
from types import SimpleNamespace

import pytest
import torch

from alignsam.pretrain.schedule import warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = warmup_cosine(opt, warmup_steps=10, total_steps=110, floor=0.1)["scheduler"].lr_lambdas[0]
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.55)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)


def test_tiny_sam_pretraining_uses_it():
    from alignsam.pretrain.tiny_sam import TinySamPretraining

    module = TinySamPretraining(encoder_dim=32, encoder_depth=1, encoder_heads=2, prompt_dim=32, warmup_steps=5)
    module._trainer = SimpleNamespace(max_steps=50)
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["lr_scheduler"]["scheduler"].lr_lambdas[0](50) == pytest.approx(0.05)
