"""Smoke test of benchmarks/decode.py at the smallest size (the real run is `make benchmark`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("decode_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_benchmark_prints_a_markdown_table(capsys):
    benchmark = load_benchmark()
    rows = benchmark.main(["--models", "tiny", "--batch-sizes", "2", "3", "--clicks", "2", "--repeats", "1", "--warmup", "0"])
    assert [row["B"] for row in rows] == [2, 3]
    for row in rows:
        for key in ("predictor", "per_image", "batched"):
            assert row[key] > 0
        assert abs(row["ratio"] - row["batched"] / row["predictor"]) < 1e-9
    table = capsys.readouterr().out
    assert "| tiny (random weights) | 2 | 2 |" in table and "| tiny (random weights) | 3 | 2 |" in table
