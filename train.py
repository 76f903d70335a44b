"""Train an AlignSAM agent: ``python train.py --config conf/<task>.yaml`` (LightningCLI).

Not built yet (issue "AlignSAM training"): this will be a LightningCLI over the AlignSAM
LightningModule (PPO agent + SRM over the multi-step SAM prompting environment) and the task's
DataModule, with OmegaConf interpolation, dotted overrides (``--model.env.steps=5``),
``--print_config``, seeding, resume with ``--ckpt_path`` and TensorBoard logging.
What exists today: the data modules (``alignsam/data``), the frozen models (``alignsam/foundation``),
the metrics (``alignsam/metrics``) and the bundled world (``alignsam/data/scenes.py``,
``checkpoints/``).
"""
import sys

if __name__ == "__main__":
    sys.exit(__doc__ + "\ntrain.py is not implemented yet.")
