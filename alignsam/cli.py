"""The command line of ``train.py`` (and later ``evaluate.py``): a LightningCLI over :class:`AlignSAM`.

* configs are parsed by OmegaConf, so a config can interpolate (``grid: ${model.env.grid}``);
* the data module is chosen by ``data.class_path`` in the config (scene, folder or VOC data);
* before training, every image's SAM embedding (and text map) is computed once into the feature
  cache, with a progress bar, so that epochs only read the cache;
* the resolved config (``config.yaml``) and the few-shot ids (``fewshot_ids.txt``) land in the
  run's log directory; ``--ckpt_path`` resumes a run exactly.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from alignsam.data.features import precompute_features
from alignsam.metrics import HEADLINE_METRICS
from alignsam.module import AlignSAM

log = logging.getLogger(__name__)


def format_table(table: Dict[str, Dict[str, float]], metrics: Optional[list] = None) -> str:
    """Markdown table: one row per strategy, one column per metric."""
    if not table:
        return "(no validation results)"
    names = metrics or sorted({k for row in table.values() for k in row})
    lines = ["| strategy | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for strategy, row in table.items():
        lines.append(f"| {strategy} | " + " | ".join(f"{row[k]:.4f}" if k in row else "-" for k in names) + " |")
    return "\n".join(lines)


class AlignSAMCLI(LightningCLI):
    """LightningCLI with OmegaConf parsing, feature precomputation and a final results table."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_kwargs", {}).setdefault("parser_mode", "omegaconf")
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module owns its two optimizers
        super().__init__(AlignSAM, LightningDataModule, *args, subclass_mode_data=True, **kwargs)

    def _instantiate_trainer(self, config: Dict, callbacks: list):
        """Adds a rich progress bar unless the config has one or sets ``trainer.enable_progress_bar: false``."""
        given = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = list(callbacks) + [RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--precompute", type=bool, default=True,
                            help="embed every image into the feature cache before training (with a progress bar)")

    def before_fit(self) -> None:
        if self.config[self.subcommand].get("precompute", True):
            self.precompute()

    def precompute(self) -> None:
        """Fill the feature cache for the train and val splits (a no-op where it is already full)."""
        model, data = self.model, self.datamodule
        device = "gpu" if self.trainer.strategy.root_device.type == "cuda" else "cpu"
        callbacks = [RichProgressBar()] if self.trainer.progress_bar_callback is not None else []
        for name in ("train_dataset", "val_dataset"):
            dataset = getattr(data, name, None)
            if dataset is None:
                continue
            stats = precompute_features(
                model.segmenter, dataset, model.store, batch_size=8,
                trainer_kwargs={"accelerator": device, "devices": 1, "callbacks": callbacks,
                                "enable_progress_bar": bool(callbacks)},
                matcher=model.matcher, map_hw=model.segmenter.low_res_hw if model.matcher is not None else None,
            )
            log.info("feature cache for %s: %s", name, stats)

    def after_fit(self) -> None:
        if self.trainer.is_global_zero and self.model.validation_table:
            task = self.model.hparams.task
            columns = HEADLINE_METRICS[task] + (["iou_fg"] if "iou_fg" in self.model.validation_table["agent"] else [])
            steps = self.model.env_config.steps
            seeds = " after the SRM's 2 seed prompts" if self.model.env_config.init_prompts == "srm" else ""
            print(f"\nValidation ({task}, after epoch {self.model.validation_epoch}): the trained agent ({steps} clicks{seeds}) against one "
                  f"centre click and {steps} random clicks; all metrics in TensorBoard ({self.trainer.log_dir})")
            print(format_table(self.model.validation_table, columns))


def main(args=None) -> None:
    AlignSAMCLI(args=args)
