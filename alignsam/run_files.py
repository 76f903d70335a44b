"""What a run leaves on disk, checked before any long work starts.

* :func:`read_run_checkpoint` opens a ``train.py`` checkpoint (``--ckpt_path``) and refuses, in one
  line naming the file, anything else: a missing, empty, truncated or random file, a SAM or CLIP
  weights file given by mistake.
* :func:`run_dir_of` finds the run folder of a checkpoint (``<run>/checkpoints/last.ckpt``).
* :func:`check_config_matches_checkpoint` refuses a config whose task, segmenter or action grid
  differs from the checkpoint's (``evaluate.py`` with another task's config would score the wrong
  data under the checkpoint's name).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from alignsam.errors import UserError

CKPT_KEY = "--ckpt_path"


class CheckpointFileError(UserError, ValueError):
    """A ``--ckpt_path`` that is not a readable ``train.py`` checkpoint."""


def _not_a_run_checkpoint(path: Path, what: str, fix: str) -> CheckpointFileError:
    return CheckpointFileError(f"{CKPT_KEY} {path}: {what}; {fix}")


def _describe_foreign(state: Any) -> Optional[str]:
    """What a loaded object is when it is not a train.py checkpoint (None when it might be one)."""
    if isinstance(state, torch.jit.ScriptModule):
        return "is a TorchScript archive (a CLIP weights file?), not a train.py checkpoint"
    if not isinstance(state, Mapping):
        return f"holds a {type(state).__name__}, not a train.py checkpoint"
    keys = list(state.keys())
    if any(str(k).startswith(("image_encoder.", "mask_decoder.", "prompt_encoder.")) for k in keys):
        return "is a SAM weights file, not a train.py checkpoint (SAM goes in model.segmenter.checkpoint)"
    if "state_dict" not in state or "hyper_parameters" not in state:
        return "is not a train.py checkpoint (no 'state_dict' / 'hyper_parameters')"
    if "task" not in state["hyper_parameters"]:
        return "is a Lightning checkpoint of another model (its hyper_parameters have no 'task')"
    return None


def _is_torchscript(path: Path) -> bool:
    """Whether a zip archive is a TorchScript module (``torch.jit.save``: it has a ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_run_checkpoint(path: Union[str, Path], key: str = CKPT_KEY) -> Dict[str, Any]:
    """Load a ``train.py`` checkpoint on the CPU with ``weights_only=True`` (as Lightning does).

    Returns:
        the checkpoint dict (``state_dict``, ``hyper_parameters``, ...).
    Raises:
        CheckpointFileError: one line naming ``key`` and the file, saying what it is and what to do.
    """
    path = Path(path)
    fix = "pass a checkpoint written by train.py, e.g. logs/<task>/version_0/checkpoints/last.ckpt"
    if not path.exists():
        raise CheckpointFileError(f"{key}: no file at {path} (working directory {os.getcwd()}); {fix}")
    if not path.is_file():
        raise _not_a_run_checkpoint(path, "is not a file", fix)
    if path.stat().st_size == 0:
        raise _not_a_run_checkpoint(path, "is empty (0 bytes; an interrupted copy or save?)", fix)
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is cut short or foreign
        raise _not_a_run_checkpoint(path, "is truncated or not a PyTorch file", fix)
    if _is_torchscript(path):
        raise _not_a_run_checkpoint(path, "is a TorchScript archive (a CLIP weights file?), not a train.py checkpoint", fix)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _not_a_run_checkpoint(path, f"cannot be read ({first_line[:160]})", fix) from None
    problem = _describe_foreign(state)
    if problem:
        raise _not_a_run_checkpoint(path, problem, fix)
    return state


def run_dir_of(ckpt_path: Union[str, Path]) -> Path:
    """``<run>`` of ``<run>/checkpoints/<name>.ckpt``; a checkpoint elsewhere: its own folder."""
    ckpt = Path(ckpt_path).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# What must agree between a config and the checkpoint it evaluates (config key -> hparams key).
MUST_MATCH = {
    "model.task": "task",
    "model.segmenter.name": "segmenter.name",
    "model.env.grid": "env.grid",
}


def check_config_matches_checkpoint(config: Mapping[str, Any], hparams: Mapping[str, Any],
                                    config_path: str, ckpt_path: Union[str, Path]) -> None:
    """Refuse a config (a plain nested dict) that disagrees with the checkpoint's hyperparameters.

    Only keys the config sets are compared; the scene data's ``data.init_args.task`` must also be
    the checkpoint's task.
    """
    mismatches = []
    for config_key, hparams_key in MUST_MATCH.items():
        ours, theirs = _get(config, config_key), _get(hparams, hparams_key)
        if ours is not None and theirs is not None and ours != theirs:
            mismatches.append(f"{config_key} is {ours!r} in the config but {theirs!r} in the checkpoint")
    data_task = _get(config, "data.init_args.task")
    task = _get(hparams, "task")
    if data_task is not None and task is not None and data_task != task:
        mismatches.append(f"data.init_args.task is {data_task!r} in the config but the checkpoint's task is {task!r}")
    if mismatches:
        raise ConfigMismatchError(
            f"--config {config_path} does not fit {CKPT_KEY} {ckpt_path}: {'; '.join(mismatches)}; "
            f"leave out --config to use the run's own config.yaml, or pass the config the checkpoint was trained with"
        )


class ConfigMismatchError(UserError, ValueError):
    """``evaluate.py --config`` describes another run than ``--ckpt_path``."""
