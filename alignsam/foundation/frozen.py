"""Frozen foundation models inside a trainable module, kept out of its checkpoints.

The LightningModule holds the frozen SAM (:class:`~alignsam.foundation.segmenter.Segmenter`) and
CLIP Surgery (:class:`~alignsam.foundation.clip_surgery.TextMatcher`) as ordinary sub-modules, so
``.to(device)``, ``.half()``, Lightning's device placement and DDP see them like any other layer.
What differs is saving and loading, arranged by :func:`frozen_submodule` with two hooks on the
frozen module itself (so it works wherever that module sits in the tree):

* ``state_dict()`` of any *enclosing* module leaves the frozen module's entries out, so Lightning
  checkpoints hold only the trainable parts (a few MB instead of SAM's hundreds).
* ``load_state_dict()`` of an enclosing module neither expects those entries (strict loading and
  ``LightningModule.load_from_checkpoint`` work) nor uses them if an older checkpoint has them: a
  frozen model's weights come only from its own checkpoint file, named in the config.

Called on the frozen module directly (``segmenter.state_dict()``), both behave as usual.
Lightning warns "Found N module(s) in eval mode at the start of training" for the frozen modules;
that is intended (filter ``PossibleUserWarning`` with that message in the training entry point).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch.nn as nn

_EXCLUDED_FLAG = "_alignsam_excluded_from_checkpoints"
_LOAD_PREFIX = "_alignsam_frozen_load_prefix"


def frozen_submodule(module: nn.Module) -> nn.Module:
    """Freeze ``module`` (no gradients, eval mode) and keep it out of enclosing checkpoints.

    Use it where the trainable module stores a frozen model::

        self.segmenter = frozen_submodule(build_segmenter(cfg.name, cfg.checkpoint))

    Raises:
        TypeError: when ``module.train()`` switches it to training mode; frozen models must stay
            in eval mode whatever their holder does (override ``train`` as ``Segmenter`` does).
    """
    module.requires_grad_(False)
    module.train(True)
    if module.training:
        raise TypeError(
            f"{type(module).__name__} goes into training mode on .train(); a frozen model must "
            f"override train() to stay in eval mode (see Segmenter.train)"
        )
    return exclude_from_checkpoints(module)


def exclude_from_checkpoints(module: nn.Module) -> nn.Module:
    """Register the saving and loading hooks described in the module docstring; returns ``module``.

    Idempotent. Hooks are module-level functions (no closures), so the module still pickles and
    deep-copies.
    """
    if not is_excluded_from_checkpoints(module):
        module.register_state_dict_post_hook(_drop_own_entries)
        module.register_load_state_dict_pre_hook(_ignore_incoming_entries)
        module.register_load_state_dict_post_hook(_forgive_own_missing_keys)
        setattr(module, _EXCLUDED_FLAG, True)
    return module


def is_excluded_from_checkpoints(module: nn.Module) -> bool:
    """Whether :func:`exclude_from_checkpoints` was applied to ``module``."""
    return bool(getattr(module, _EXCLUDED_FLAG, False))


# -- hooks -------------------------------------------------------------------------------------------
def _drop_own_entries(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: remove ``prefix``-ed entries (and their version metadata) when nested."""
    if not prefix:  # asked directly: a normal state_dict
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == prefix[:-1] or k.startswith(prefix)]:
            del metadata[key]


def _ignore_incoming_entries(
    module: nn.Module,
    state_dict: Dict[str, Any],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: List[str],
    unexpected_keys: List[str],
    error_msgs: List[str],
) -> None:
    """load pre-hook: when nested, drop any incoming entries for this module (its own file rules)."""
    setattr(module, _LOAD_PREFIX, prefix)
    if not prefix:
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _forgive_own_missing_keys(module: nn.Module, incompatible_keys) -> None:
    """load post-hook: when nested, this module's keys are not missing, they are not saved."""
    prefix = getattr(module, _LOAD_PREFIX, "")
    setattr(module, _LOAD_PREFIX, "")
    if not prefix:
        return
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix)]
