"""``model.ppo.precision: auto`` (the default): bf16 where the device has native bfloat16, fp32 elsewhere."""
import pytest
import torch

from alignsam.errors import ConfigError
from alignsam.rl import ppo


@pytest.fixture
def native(monkeypatch):
    """Set what the CPU is said to support: ``native(True)`` / ``native(False)``."""
    def set_native(value: bool):
        monkeypatch.setattr(ppo, "_native_bf16", lambda device_type: value)
    return set_native


def test_auto_is_the_default():
    assert ppo.PPOConfig().precision == "auto"


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_device(native, has_bf16, expected):
    native(has_bf16)
    assert ppo.resolved_precision("auto", "cpu") == expected
    assert ppo.resolved_precision("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("has_bf16", [True, False])
def test_explicit_settings_ignore_the_device(native, has_bf16):
    native(has_bf16)
    assert ppo.resolved_precision("fp32", "cpu") == "fp32"
    assert ppo.resolved_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("has_bf16, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_casts_inputs_and_autocasts_as_resolved(native, has_bf16, dtype):
    native(has_bf16)
    x = torch.randn(2, 3)
    assert ppo.network_input("auto", x).dtype == dtype
    assert ppo.network_input("auto", torch.ones(2, dtype=torch.long)).dtype == torch.long  # integers untouched
    assert ppo.network_input("auto", None) is None
    layer = torch.nn.Linear(3, 4)
    with ppo.autocast("auto", torch.device("cpu")):
        assert layer(x).dtype == dtype


def test_the_cpu_probe_answers_without_raising():
    assert ppo._native_bf16("cpu") in (True, False)
    assert ppo._native_bf16("meta") is False


def test_unknown_precision_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.ppo\.precision.*'fp16'.*auto, fp32, bf16"):
        ppo.PPOConfig(precision="fp16")
