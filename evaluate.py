"""Evaluate an AlignSAM agent against baselines and ablations: ``python evaluate.py --config ... --ckpt_path ...``.

Not built yet (issue "evaluate.py"): it will score a trained agent on the task's test split beside
centre / random / grid / SRM-only (w/o RL) / all-positive (w/o SRM) / single-step / CLIP Surgery
point / PerSAM-style / oracle-click baselines on the same cached embeddings, print and save the table
(Markdown, CSV, TensorBoard), and predict on folders of new images.
"""
import sys

if __name__ == "__main__":
    sys.exit(__doc__ + "\nevaluate.py is not implemented yet.")
