"""AlignSAM: a reinforcement-learning agent that aligns a frozen SAM to a task by choosing where to click.

``from alignsam import AlignSAMPredictor`` runs a trained agent on images (:mod:`alignsam.api`);
training and evaluation are ``train.py`` and ``evaluate.py``.
"""
from typing import Any

__all__ = ["AlignSAMPredictor", "Prediction", "Agent"]


def __getattr__(name: str) -> Any:  # imported on first use: `import alignsam.errors` stays light
    if name in ("AlignSAMPredictor", "Prediction"):
        from alignsam import api

        return getattr(api, name)
    if name == "Agent":
        from alignsam.agent import Agent

        return Agent
    raise AttributeError(f"module 'alignsam' has no attribute {name!r}")
