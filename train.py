"""Train an AlignSAM agent (PPO policy + SRM over a frozen SAM).

    python train.py fit --config conf/scenes/shadow.yaml
    python train.py fit --config conf/voc.yaml --trainer.max_epochs=3 --model.env.steps=5
    python train.py fit --config conf/demo.yaml --ckpt_path logs/demo/version_0/checkpoints/last.ckpt
    python train.py fit --config conf/demo.yaml --print_config

The subcommand (``fit``) may be left out; ``validate`` scores a checkpoint on the validation split
(evaluate.py scores every strategy on the test split). See docs/training.md.
"""
import sys

from alignsam.cli import main

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("test", "predict"):
        print(f"error: train.py only trains (fit, validate); to score a checkpoint or predict on images use "
              f"evaluate.py {'predict ' if sys.argv[1] == 'predict' else ''}--ckpt_path <run>/checkpoints/last.ckpt ...",
              file=sys.stderr)
        sys.exit(2)
    if len(sys.argv) < 2 or sys.argv[1] not in ("fit", "validate"):
        sys.argv.insert(1, "fit")  # also for -h: the help of fit, the command train.py is for
    main()
