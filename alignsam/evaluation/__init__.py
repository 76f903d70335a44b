"""Evaluation: prompting strategies (the agent, baselines, ablations), scoring, tables, predictions."""
