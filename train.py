"""Train an AlignSAM agent (PPO policy + SRM over a frozen SAM).

    python train.py fit --config conf/scenes/shadow.yaml
    python train.py fit --config conf/voc.yaml --trainer.max_epochs=3 --model.env.steps=5
    python train.py fit --config conf/demo.yaml --ckpt_path logs/demo/version_0/checkpoints/last.ckpt
    python train.py fit --config conf/demo.yaml --print_config

The subcommand (``fit``) may be left out. See README "Training".
"""
import sys

from alignsam.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("fit", "validate", "test", "-h", "--help"):
        sys.argv.insert(1, "fit")
    main()
