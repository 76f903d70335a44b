"""Evaluate a trained AlignSAM agent against its ablations and the baselines, or predict on new images.

    python evaluate.py --config conf/scenes/shadow.yaml --ckpt_path logs/scenes/shadow/version_0/checkpoints/last.ckpt
    python evaluate.py --config conf/voc.yaml --ckpt_path ... --save_predictions predictions/voc
    python evaluate.py --config ... --ckpt_path ... --strategies '[agent, no_rl, oracle]'
    python evaluate.py predict --ckpt_path ... --images my_photos/ --out predictions/mine [--text cat]
    python evaluate.py summary --runs logs/std/s0 logs/std/s1 logs/std/s2 [--out summary]

The first form (the ``test`` subcommand, implied) scores every strategy of
alignsam/evaluation/strategies.py on the test split with the same cached embeddings and writes the
table to ``<run>/evaluation/test.md`` / ``test.csv`` (and TensorBoard), with the per-episode
statistics in ``test_episodes.npz``; ``summary`` turns several such runs (seeds, agent variants)
into mean ± sd and paired bootstrap intervals. See docs/evaluation.md.
"""
from alignsam.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
