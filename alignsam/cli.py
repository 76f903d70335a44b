"""The command line of ``train.py`` (and later ``evaluate.py``): a LightningCLI over :class:`AlignSAM`.

* configs are parsed by OmegaConf, so a config can interpolate (``grid: ${model.env.grid}``);
* the data module is chosen by ``data.class_path`` in the config (scene, folder or VOC data);
* before training, every image's SAM embedding (and text map) is computed once into the feature
  cache, with a progress bar, so that epochs only read the cache;
* the resolved config (``config.yaml``) and the few-shot ids (``fewshot_ids.txt``) land in the
  run's log directory; ``--ckpt_path`` resumes a run exactly.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from alignsam.config_files import add_base_config_argument, expand_base_configs
from alignsam.data.precompute import PrecomputeFeatures
from alignsam.errors import CommandLineError, UserError, check_range, exit_on_user_error, traceback_requested
from alignsam.metrics import HEADLINE_METRICS
from alignsam.module import AlignSAM
from alignsam.run_files import check_config_matches_checkpoint, read_run_checkpoint, run_dir_of

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
        kwargs["parser_kwargs"].setdefault("exit_on_error", False)  # parse errors become one line (parse_arguments)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module owns its two optimizers
        super().__init__(AlignSAM, LightningDataModule, *args, subclass_mode_data=True, **kwargs)

    @staticmethod
    def subcommands() -> Dict[str, set]:
        """``fit`` (implied by train.py) and ``validate``; scoring a checkpoint is evaluate.py's job."""
        return {name: LightningCLI.subcommands()[name] for name in ("fit", "validate")}

    # splits whose features are cached before the loop of each subcommand
    PRECOMPUTE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("train", "test")}

    # Each manual_backward reaches only the policy or only the SRM, so DDP must not wait for the
    # other's gradients: Lightning's own strategy names that say so.
    FIND_UNUSED = {name: f"{name}_find_unused_parameters_true" for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")}

    def trainer_config(self) -> Dict:
        """The instantiated ``trainer`` section of this subcommand's config."""
        return dict((self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"])

    def instantiate_trainer(self, **kwargs):
        """The Trainer of the config, plus: a rich progress bar unless the config has one or sets
        ``trainer.enable_progress_bar: false``; the feature precompute (:class:`PrecomputeFeatures`:
        every rank embeds its share of the splits, then all wait until the cache is full) unless
        ``--precompute false``; DDP strategy names mapped to their ``find_unused_parameters`` form."""
        config = {**self.trainer_config(), **kwargs}
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        options = self.config[self.subcommand] if self.subcommand else self.config
        if options.get("precompute", True) and self.subcommand in self.PRECOMPUTE_SPLITS:
            callbacks.append(PrecomputeFeatures(self.PRECOMPUTE_SPLITS[self.subcommand],
                                                encode_chunk=options.get("encode_chunk", 1)))
        strategy = config.get("strategy")
        if isinstance(strategy, str) and strategy in self.FIND_UNUSED:
            kwargs["strategy"] = self.FIND_UNUSED[strategy]
        return super().instantiate_trainer(**{**kwargs, "callbacks": callbacks})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_base_config_argument(parser)  # a config's base_config key (conf/<task>.yaml -> conf/_base.yaml)
        parser.add_argument("--precompute", type=bool, default=True,
                            help="embed every image into the feature cache before the loop (a progress bar per split; "
                                 "under DDP each rank embeds its share)")
        parser.add_argument("--encode_chunk", type=int, default=1,
                            help="images per SAM encoder call while precomputing (peak memory grows by about 2.5 GiB "
                                 "per image for ViT-B at 1024 px; raise it only on a GPU with memory to spare)")

    # -- parsing: every mistake is one line, found before any model is built -------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise parse_error_to_user_error(error, parser) from None
        self.checkpoint = None
        options = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        check_range("encode_chunk", options.get("encode_chunk", 1), 1)
        if options.get("ckpt_path"):
            self.checkpoint = read_run_checkpoint(options["ckpt_path"])

    def after_fit(self) -> None:
        """On every rank (the steps below are collective under DDP): validate the final weights when
        the last epoch was not a validation epoch, then print the table and what to run next."""
        trainer, model = self.trainer, self.model
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not rank 0 alone
        epochs = trainer.current_epoch
        if not trainer.interrupted and model.validation_epoch < epochs:
            if trainer.is_global_zero:
                last = f"after epoch {model.validation_epoch}" if model.validation_epoch else "never"
                print(f"\nValidation ran {last} (trainer.check_val_every_n_epoch="
                      f"{trainer.check_val_every_n_epoch}, trainer.max_epochs={trainer.max_epochs}): "
                      f"validating the final weights (epoch {epochs})")
            trainer.validate(model, datamodule=self.datamodule, verbose=False)
        if not trainer.is_global_zero or not model.validation_table:
            return
        task = model.hparams.task
        columns = HEADLINE_METRICS[task] + (["iou_fg"] if "iou_fg" in model.validation_table["agent"] else [])
        steps = model.agent.env_config.steps
        seeds = " after the SRM's 2 seed prompts" if model.agent.env_config.init_prompts == "srm" else ""
        print(f"\nValidation ({task}, after epoch {model.validation_epoch}): the trained agent ({steps} clicks{seeds}) against one "
              f"centre click and {steps} random clicks; all metrics in TensorBoard ({log_dir})")
        print(format_table(model.validation_table, columns))
        last_ckpt = next((Path(cb.last_model_path) for cb in trainer.checkpoint_callbacks
                          if getattr(cb, "last_model_path", "")), None)
        if last_ckpt is not None:
            print(f"\ncheckpoint: {last_ckpt}\nnext: python evaluate.py --ckpt_path {last_ckpt}")


def parse_error_to_user_error(error: ArgumentError, parser: LightningArgumentParser) -> CommandLineError:
    """jsonargparse's refusal as one line: what is wrong, the nearest valid key for a misspelt one,
    and which config to pass when there is none."""
    message = " ".join(str(error).split())
    if "the following arguments are required" in message:
        return CommandLineError(
            f"no config given ({message}): pass one, e.g. --config conf/demo.yaml (the bundled world) or "
            f"--config conf/<task>.yaml (blur, shadow, glass, saliency, voc; README 'Quickstart')")
    unknown = re.findall(r"--?([A-Za-z_][\w.]*)", message) if "unrecognized arguments" in message else []
    unknown += re.findall(r'Key "([\w.]+)" is not expected', message)
    hints = []
    valid = known_keys(parser)
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            hints.append(f"did you mean --{close[0]}?")
    return CommandLineError(message + ("; " + " ".join(hints) if hints else "") + "; see --help for every key")


def known_keys(parser: LightningArgumentParser) -> List[str]:
    """Every dotted option of the parser and of its subcommands' parsers (``model.env.steps``, ...)."""
    keys = []
    for action in parser._actions:  # jsonargparse exposes no public list of its keys
        keys += [o.lstrip("-") for o in action.option_strings if o.startswith("--")]
        for sub in getattr(action, "_name_parser_map", {}).values():
            keys += known_keys(sub)
    return sorted(set(keys))


def main(args=None) -> None:
    """``train.py``: a UserError (data, checkpoint, config) ends as one line and exit status 2."""
    def run() -> None:
        if args is None:
            sys.argv[1:] = expand_base_configs(sys.argv[1:])
            AlignSAMCLI()
        else:
            AlignSAMCLI(args=expand_base_configs(list(args)))

    exit_on_user_error(run)


class EvaluateCLI(AlignSAMCLI):
    """``evaluate.py``: the ``test`` subcommand over a trained checkpoint, scoring every strategy of
    :mod:`alignsam.evaluation.strategies` and writing the results table next to the checkpoint's run
    (``<run>/evaluation/test.md``, ``test.csv`` and TensorBoard events)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", None)  # no logger, no run directory of its own
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("epilog", "To run a trained agent on a folder of your own images: "
                                    "evaluate.py predict --ckpt_path ... --images DIR --out DIR (evaluate.py predict --help). "
                                    "To compare several scored runs (seeds) with bootstrap intervals: "
                                    "evaluate.py summary --runs DIR ... (evaluate.py summary --help).")
        return super().init_parser(**kwargs)

    @staticmethod
    def subcommands() -> Dict[str, set]:
        """Only ``test``: folders of new images go through ``evaluate.py predict`` (our own parser)."""
        return {"test": LightningCLI.subcommands()["test"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--strategies", type=Optional[List[str]], default=None,
                            help="strategies to score (default: all that apply; see alignsam/evaluation/strategies.py)")
        parser.add_argument("--oracle_clicks", type=int, default=20, help="clicks of the oracle (its NoC cap)")
        parser.add_argument("--save_predictions", type=Optional[str], default=None,
                            help="folder for the agent's masks and overlays (masks/, overlays/)")
        parser.add_argument("--results_dir", type=Optional[str], default=None,
                            help="where the tables go (default: <the checkpoint's run>/evaluation)")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """As for training, then refuse a ``--config`` that describes another run than the checkpoint."""
        super().parse_arguments(parser, args)
        options = self.config[self.config.subcommand]
        if self.checkpoint is None:
            raise CommandLineError("evaluate.py: --ckpt_path is required (a checkpoint written by train.py)")
        config_files = [str(c) for c in (options.get("config") or [])]
        check_config_matches_checkpoint(options.as_dict(), self.checkpoint.get("hyper_parameters", {}),
                                        ", ".join(config_files) or "(none)", options["ckpt_path"])

    def instantiate_trainer(self, **kwargs):
        # evaluation restores only the weights; the run's checkpoint callbacks have nothing to resume
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
        # the tables and events go next to the checkpoint's run; evaluation writes no checkpoints
        # (the run's own config.yaml names its ModelCheckpoint, which would point at ./checkpoints)
        kept = [c for c in (self.trainer_config().get("callbacks") or []) if not isinstance(c, ModelCheckpoint)]
        return super().instantiate_trainer(logger=False, enable_checkpointing=False, callbacks=kept, **kwargs)

    def before_test(self) -> None:
        from alignsam.evaluation.predict import PredictionSaver
        from alignsam.evaluation.strategies import check_strategies

        options = self.config[self.subcommand]
        if options.get("oracle_clicks", 20) < 1:
            raise CommandLineError("evaluate.py: --oracle_clicks must be >= 1")
        model = self.model
        if options.get("strategies"):
            try:
                model.test_strategies = check_strategies(options["strategies"], model.agent.matcher is not None)
            except ValueError as error:
                raise CommandLineError(str(error)) from None
        model.oracle_clicks = options.get("oracle_clicks", 20)
        if options.get("save_predictions"):
            model.prediction_hook = PredictionSaver(options["save_predictions"], model.agent.segmenter)

    def after_test(self) -> None:
        from rich.console import Console

        from alignsam.evaluation.tables import compact_table, coverage_notes, write_tables

        model, options = self.model, self.config[self.subcommand]
        if not self.trainer.is_global_zero or not model.test_table:
            return
        ckpt = Path(options["ckpt_path"]).resolve()
        run_dir = run_dir_of(ckpt)
        split = getattr(self.datamodule, "hparams", {}).get("test_split", "test")
        default_dir = run_dir / ("evaluation" if split == "test" else f"evaluation_{split}")
        out_dir = Path(options.get("results_dir") or default_dir)
        env = model.agent.env_config
        seeds = "the SRM's 2 seed prompts + " if env.init_prompts == "srm" else ""
        header = (f"# {model.hparams.task}: {split} split, checkpoint {display_path(ckpt)}\n\n"
                  f"T = {env.steps} clicks ({seeds}T for the agent), grid {env.grid}x{env.grid}, "
                  f"oracle {model.oracle_clicks} clicks. Metrics at original resolution; "
                  f"iou@k = mean per-episode IoU after k clicks; NoC counts every prompt SAM received. "
                  f"Strategies: alignsam/evaluation/strategies.py.")
        md, csv_path = write_tables(out_dir, "test", model.test_table, model.hparams.task, env.steps, header)
        episodes_file = self._write_episodes(out_dir, split, ckpt)
        self._log_to_tensorboard(out_dir, md.read_text())
        task = model.hparams.task
        # a terminal wraps the table to its width; a log file or pipe gets it whole, one line per row
        console = Console(width=None if sys.stdout.isatty() else 200)
        console.print(compact_table(model.test_table, task, f"{task}, {split} split, T = {env.steps} clicks ({seeds}T)"))
        for note in coverage_notes(model.test_table, task):
            console.print(note, markup=False)
        print(f"every metric and click: {md}, {csv_path}")
        if episodes_file is not None:
            print(f"per episode (for evaluate.py summary): {episodes_file}")
        if model.prediction_hook is not None:
            print(f"predictions: {model.prediction_hook.written} episode(s) in {options['save_predictions']} "
                  f"(per episode: {model.prediction_hook.episodes_csv})")

    def _write_episodes(self, out_dir: Path, split: str, ckpt: Path) -> Optional[Path]:
        """``<out_dir>/test_episodes.npz``: the per-episode statistics of every strategy
        (:mod:`alignsam.evaluation.episodes`), or None when the evaluator kept none."""
        from alignsam.evaluation.episodes import episodes_path

        episodes = self.model.test_episodes  # set by the test loop (alignsam/module.py)
        if episodes is None:
            return None
        episodes.meta.update(split=split, seed=int(self.model.hparams.seed), checkpoint=display_path(ckpt))
        return episodes.save(episodes_path(out_dir, "test"))

    def _log_to_tensorboard(self, out_dir: Path, markdown: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out_dir)) as writer:
            writer.add_text("test/table", markdown, 0)
            for strategy, row in self.model.test_table.items():
                for column, value in row.items():
                    writer.add_scalar(f"test_{strategy}/{column}", value, 0)


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (tables written into the
    repository then carry no machine's absolute paths), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def with_run_config(argv: List[str]) -> List[str]:
    """``argv`` with ``--config <run>/config.yaml`` added when it names no config: the run's own
    config (written by train.py beside its checkpoints) is the one the checkpoint fits."""
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv) or any(a in ("-h", "--help") for a in argv):
        return argv
    ckpt = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--ckpt_path"), None)
    ckpt = ckpt or next((a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")), None)
    if ckpt is None:
        raise CommandLineError("evaluate.py: --ckpt_path is required (a checkpoint written by train.py)")
    config = run_dir_of(ckpt) / "config.yaml"
    if not config.is_file():
        raise CommandLineError(f"evaluate.py: no --config given and no run config at {config}; "
                               f"pass the config the checkpoint was trained with (--config conf/<task>.yaml)")
    return [argv[0], "--config", str(config), *argv[1:]]


def evaluate_main(args=None) -> None:
    """``evaluate.py``: ``test`` (implied) on a dataset split, ``predict`` on a folder of images, or
    ``summary`` over several scored runs. A UserError ends as one line and exit status 2."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "predict":
        raise SystemExit(predict_main(argv[1:]))
    if argv and argv[0] == "summary":
        from alignsam.evaluation.summary import summary_main

        raise SystemExit(summary_main(argv[1:]))
    if not argv or argv[0] != "test":
        argv.insert(0, "test")  # also for -h: the help of test, whose options are evaluate.py's

    def run() -> None:
        full = expand_base_configs(with_run_config(argv))
        if args is None:
            sys.argv[1:] = full
            EvaluateCLI()
        else:
            EvaluateCLI(args=full)

    exit_on_user_error(run)


# -- evaluate.py predict ---------------------------------------------------------------------------
def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py predict",
        description="Run a trained AlignSAM agent on a folder of images without ground truth.")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by train.py (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--images", required=True, help="folder of images (any size; RGB, grey or RGBA; EXIF orientation honoured)")
    parser.add_argument("--out", required=True, help="output folder: masks/ and overlays/ are written into it")
    parser.add_argument("--text", default=None, help="episode text (the class name for voc / categories; default: the task's word)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--segmenter_checkpoint", default=None,
                        help="SAM weights, when they are not where the checkpoint's model.segmenter.checkpoint says")
    parser.add_argument("--feature_cache", default=None, help="feature cache directory (default: the checkpoint's)")
    return parser


def predict_main(argv: Sequence[str]) -> int:
    """``evaluate.py predict``: an :class:`~alignsam.api.AlignSAMPredictor` over a folder of images."""
    from alignsam.api import AlignSAMPredictor, default_text
    from alignsam.evaluation.images import ImageFolderError
    from alignsam.evaluation.predict import predict_folder

    args = predict_parser().parse_args(list(argv))
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be >= 1")
    try:
        predictor = AlignSAMPredictor.from_checkpoint(args.ckpt_path, args.device, args.segmenter_checkpoint,
                                                      args.feature_cache)
        default_text(predictor.task, args.text)  # fails before any image is read
        written, failures = predict_folder(predictor, args.images, args.out, args.text, args.batch_size)
    except (UserError, FileNotFoundError, ImageFolderError, ValueError) as error:
        if traceback_requested():
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for path, reason in failures:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{written} prediction(s) written to {args.out} (masks/, overlays/); {len(failures)} unreadable file(s) skipped")
    return 0 if written else 1
