"""Every numeric knob is range-checked where it is defined; the error names the full dotted key.

One case per (config, field): a bad value raises :class:`~alignsam.errors.ConfigError` (a
``UserError``: the command line prints it as one line) whose message starts with the key; a good
value next to it is accepted. Option strings name their key and list the valid values.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from alignsam.data.datamodule import BinaryMaskDataModule, VOCDataModule
from alignsam.data.scene_data import SceneDataModule
from alignsam.errors import ConfigError, UserError
from alignsam.rl.env import EnvConfig
from alignsam.rl.policy import PolicyConfig
from alignsam.rl.ppo import PPOConfig
from alignsam.srm import SRMConfig

# (config class, field, bad value, good value); the key is model.<prefix>.<field>
CASES = [
    (EnvConfig, "env", "steps", 0, 1),
    (EnvConfig, "env", "grid", 0, 4),
    (EnvConfig, "env", "init_prompts", "both", "none"),
    (EnvConfig, "env", "state_mask", "soft", "binary"),
    (EnvConfig, "env", "train_labels", "oracle", "gt"),
    (EnvConfig, "env", "reward", "dice", "iou_gain"),
    (PolicyConfig, "policy", "variant", "textual", "explicit"),
    (PolicyConfig, "policy", "hidden", 0, 32),
    (PolicyConfig, "policy", "blocks", -1, 0),
    (PolicyConfig, "policy", "groups", 0, 4),
    (PolicyConfig, "policy", "value_hidden", 0, 8),
    (SRMConfig, "srm", "variant", "both", "explicit"),
    (SRMConfig, "srm", "hidden", 0, 32),
    (SRMConfig, "srm", "attention_grid", 0, 4),
    (SRMConfig, "srm", "heads", 0, 2),
    (SRMConfig, "srm", "groups", 0, 2),
    (SRMConfig, "srm", "threshold", 2.0, 1.0),
    (SRMConfig, "srm", "threshold", -0.1, 0.0),
    (SRMConfig, "srm", "dice_weight", -1.0, 0.0),
    (SRMConfig, "srm", "bce_weight", -1.0, 0.0),
    (SRMConfig, "srm", "lr", 0.0, 1e-3),
    (PPOConfig, "ppo", "gamma", 1.5, 1.0),
    (PPOConfig, "ppo", "gamma", -0.1, 0.0),
    (PPOConfig, "ppo", "gae_lambda", 1.01, 0.0),
    (PPOConfig, "ppo", "epochs", 0, 1),
    (PPOConfig, "ppo", "minibatch_size", 0, 1),
    (PPOConfig, "ppo", "clip", 0.0, 0.1),
    (PPOConfig, "ppo", "value_coef", -0.5, 0.0),
    (PPOConfig, "ppo", "entropy_coef", -0.01, 0.0),
    (PPOConfig, "ppo", "max_grad_norm", 0.0, 1.0),
    (PPOConfig, "ppo", "lr", -1e-4, 3e-4),
    (PPOConfig, "ppo", "adam_eps", 0.0, 1e-8),
]


@pytest.mark.parametrize("cls, prefix, field, bad, good", CASES,
                         ids=[f"{c[1]}.{c[2]}={c[3]}" for c in CASES])
def test_model_config_rejects_out_of_range_values_naming_the_key(cls, prefix, field, bad, good):
    key = f"model.{prefix}.{field}"
    with pytest.raises(ConfigError) as err:
        cls(**{field: bad})
    assert err.value.key == key and str(err.value).startswith(f"{key}: ")
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)  # old callers catch ValueError
    assert getattr(cls(**{field: good}), field) == good


@pytest.mark.parametrize("cls, field, bad, allowed", [
    (EnvConfig, "reward", "dice", ("target", "iou_gain", "target+iou")),
    (PolicyConfig, "variant", "textual", ("implicit", "explicit")),
    (SRMConfig, "variant", "both", ("implicit", "explicit")),
    (SRMConfig, "branch", "both", ("implicit", "explicit")),  # the former name, still read
])
def test_option_strings_list_the_valid_values(cls, field, bad, allowed):
    with pytest.raises(ConfigError) as err:
        cls(**{field: bad})
    assert repr(bad) in str(err.value) and all(a in str(err.value) for a in allowed)


@pytest.mark.parametrize("cls, kwargs, key", [
    (EnvConfig, {"steps": 20, "grid": 4}, "model.env.steps"),  # more clicks than patches
    (PolicyConfig, {"hidden": 30, "groups": 8}, "model.policy.groups"),
    (SRMConfig, {"hidden": 30, "groups": 5, "heads": 4}, "model.srm.heads"),
    (SRMConfig, {"dice_weight": 0.0, "bce_weight": 0.0}, "model.srm.dice_weight"),  # no loss at all
])
def test_combinations_name_a_key(cls, kwargs, key):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert err.value.key == key


def test_the_documented_defaults_pass():
    EnvConfig(), PolicyConfig(), SRMConfig(), PPOConfig()


# -- data modules: numeric __init__ arguments, checked before any folder is listed -----------------
DATA_CASES = [
    ("train_size", 0, None),
    ("val_size", 0, 2),
    ("batch_size", 0, 2),
    ("eval_batch_size", 0, None),
    ("num_workers", -1, 0),
    ("augment_views", -1, 0),
    ("subset_seed", -1, 3),
]


@pytest.mark.parametrize("field, bad, good", DATA_CASES, ids=[f"{c[0]}={c[1]}" for c in DATA_CASES])
def test_scene_data_module_rejects_bad_numbers_naming_the_key(field, bad, good):
    kwargs = dict(train_pool=6, train_size=2, val_size=2, test_size=2)
    with pytest.raises(ConfigError) as err:
        SceneDataModule(task="shadow", **{**kwargs, field: bad})
    assert err.value.key == f"data.{field}"
    SceneDataModule(task="shadow", **{**kwargs, field: good})


@pytest.mark.parametrize("field, bad", [("train_pool", 0), ("test_size", 0), ("val_size", -3)])
def test_scene_pool_sizes_are_counts(field, bad):
    kwargs = dict(train_pool=6, train_size=2, val_size=2, test_size=2)
    kwargs[field] = bad
    with pytest.raises(ConfigError, match=f"data.{field}"):
        SceneDataModule(task="shadow", **kwargs)


@pytest.mark.parametrize("field, bad", [("binary_margin", 200), ("max_intermediate_fraction", 1.5),
                                        ("batch_size", 0), ("train_size", -5)])
def test_folder_module_checks_numbers_before_reading_the_root(tmp_path, field, bad):
    # the root does not exist: the number is reported first, without touching the disk
    with pytest.raises(ConfigError) as err:
        BinaryMaskDataModule(str(tmp_path / "missing"), "sbu", **{field: bad})
    assert err.value.key == f"data.{field}"


@pytest.mark.parametrize("field, bad", [("val_size", 0), ("eval_batch_size", 0), ("num_workers", -2)])
def test_voc_module_checks_numbers_before_reading_the_root(tmp_path, field, bad):
    with pytest.raises(ConfigError) as err:
        VOCDataModule(str(tmp_path / "missing"), **{field: bad})
    assert err.value.key == f"data.{field}"


def test_check_files_option_is_one_of_its_values(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
    from fixture_trees import build_layout

    build_layout(tmp_path, "sbu", n=3)
    with pytest.raises(ConfigError) as err:
        BinaryMaskDataModule(str(tmp_path), "sbu", train_size=2, check_files="fast")
    assert err.value.key == "data.check_files" and "quick" in str(err.value)


@pytest.mark.parametrize("cls,field", [(SRMConfig, "threshold"), (PPOConfig, "gamma"), (PPOConfig, "lr")])
def test_nan_is_refused_naming_the_key(cls, field):
    """NaN passes every comparison, so a range check alone would let it through."""
    with pytest.raises(ConfigError, match=f"{field}: is NaN"):
        cls(**{field: float("nan")})


def test_the_srm_variant_has_the_policys_name_and_reads_its_former_one():
    """``model.srm.branch`` (configs and checkpoints written before the rename) becomes ``variant``."""
    assert SRMConfig(branch="explicit").variant == "explicit" and SRMConfig(branch="explicit").branch is None
    assert SRMConfig(variant="explicit", branch="explicit").variant == "explicit"
    with pytest.raises(ConfigError, match="model.srm.branch: 'implicit' contradicts model.srm.variant"):
        SRMConfig(variant="explicit", branch="implicit")

