"""docs/results/summarise.py: a pointer to ``evaluate.py summary`` (its label=DIR entries were seeds)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("summarise", ROOT / "docs" / "results" / "summarise.py")
summarise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarise)


def test_the_old_seed_labels_are_dropped_and_the_rest_passes_through(monkeypatch):
    seen = []
    monkeypatch.setattr(summarise.summary, "summary_main", lambda argv: seen.append(argv) or 0)
    assert summarise.main(["--runs", "seed0=logs/s0", "logs/s1", "--resamples", "10"]) == 0
    assert seen == [["--runs", "logs/s0", "logs/s1", "--resamples", "10"]]
