"""Smoke tests of the issue-14 benchmarks at toy sizes (the real runs: docs/performance.md)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rollout_benchmark_takes_the_naive_loops_actions_and_masks(capsys):
    rows = load("rollout").main(["--models", "tiny", "--batch-sizes", "2", "--steps", "2", "--repeats", "1",
                                 "--warmup", "0", "--threads", "1"])
    assert [(r["B"], r["T"]) for r in rows] == [(2, 2)]
    row = rows[0]
    assert row["same_actions"] and row["same_rewards"] and row["mask_agreement"] == 1.0
    assert row["logit_diff"] < 1e-4 and row["naive"] > 0 and row["ours"] > 0
    assert row["train"] > 0 and row["precision"] in ("fp32", "bf16")
    assert 0.0 <= row["train_action_agreement"] <= 1.0
    out = capsys.readouterr().out
    assert "| tiny | 2 | 2 |" in out and "same actions yes" in out


def test_rollout_benchmark_times_the_bf16_training_rollout(capsys):
    """(c): the rollout at model.ppo.precision bf16 (the policy and SRM in bfloat16, SAM float32)
    is timed beside the float32 one, and the check says how many of its actions match (a)'s."""
    rows = load("rollout").main(["--models", "tiny", "--batch-sizes", "2", "--steps", "2", "--repeats", "1",
                                 "--warmup", "0", "--threads", "1", "--precision", "bf16"])
    row = rows[0]
    assert row["precision"] == "bf16" and row["train"] > 0 and row["train_ratio"] > 0
    assert row["same_actions"]  # (b) stays float32 and equal to the naive loop
    out = capsys.readouterr().out
    assert "(c) Agent.rollout bf16" in out and "(c) at bf16, tiny B=2 T=2:" in out


def test_train_step_benchmark_times_every_phase(capsys):
    rows = load("train_step").main(["--batch-size", "2", "--steps", "2", "--ppo-epochs", "2", "--batches", "2",
                                    "--epochs-timed", "1", "--threads", "1"])
    row = rows["this checkout"]
    assert row["iterations"] >= 1 and row["total"] > 0
    assert all(row[phase] >= 0 for phase in ("data", "prepare", "rollout", "ppo", "srm"))
    assert "| **total** |" in capsys.readouterr().out


def test_update_profile_compares_before_fp32_and_bf16(capsys):
    rows = load("train_step").main(["--update-profile", "--batch-size", "2", "--steps", "2", "--ppo-epochs", "2",
                                    "--repeats", "1", "--threads", "1"])
    assert list(rows) == ["before (per-minibatch reads)", "after, fp32", "after, bf16"]
    assert all(r["ms"] > 0 and r["syncs"] is None for r in rows.values())  # syncs are counted on CUDA only
    assert "host syncs an update" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_checks_dry_run_on_the_cpu():
    """benchmarks/gpu_checks.sh --device cpu: every step of the GPU script at toy sizes (~1 min)."""
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_checks.sh"), "--device", "cpu"], capture_output=True,
                          text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for heading in ("1. machine", "2. SAM decode", "3. rollout", "4. the PPO update", "5. a training iteration"):
        assert heading in done.stdout
    assert "same actions yes" in done.stdout and "gpu_checks.sh: done (cpu)" in done.stdout
