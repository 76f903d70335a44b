"""docs/results/summarise.py: the result tables of docs/results.md from evaluate.py's CSVs."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("summarise", ROOT / "docs" / "results" / "summarise.py")
summarise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarise)


def write_run(root: Path, task: str, rows: dict) -> None:
    path = root / task / "version_0" / "evaluation" / "test.csv"
    path.parent.mkdir(parents=True)
    columns = sorted({c for values in rows.values() for c in values})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["strategy", "label", *columns])
        writer.writeheader()
        for strategy, values in rows.items():
            writer.writerow({"strategy": strategy, "label": strategy, **values})


def test_headline_bolds_the_best_contender_per_run_and_respects_lower_is_better(tmp_path):
    # the metric is the task's first headline metric, whatever the CSV's column order
    write_run(tmp_path / "a", "shadow", {"agent": {"ber": 9, "miou_fgbg": 0.80}, "no_rl": {"ber": 8, "miou_fgbg": 0.85},
                                         "single_step": {"ber": 20, "miou_fgbg": 0.70}})
    write_run(tmp_path / "b", "shadow", {"agent": {"ber": 7, "miou_fgbg": 0.90}, "no_rl": {"ber": 8, "miou_fgbg": 0.85},
                                         "single_step": {"ber": 20, "miou_fgbg": 0.70}})
    write_run(tmp_path / "a", "saliency", {"agent": {"mae": 0.02, "emeasure_mean": 0.9},
                                           "no_rl": {"mae": 0.01, "emeasure_mean": 0.8},
                                           "single_step": {"mae": 0.03, "emeasure_mean": 0.7}})
    table = summarise.headline_table({"a": tmp_path / "a", "b": tmp_path / "b"}).splitlines()
    shadow = next(line for line in table if line.startswith("| shadow (miou_fgbg)"))
    assert "| 0.800 / **0.900** | **0.850** / 0.850 | 0.700 / 0.700 |" in shadow
    saliency = next(line for line in table if line.startswith("| saliency (emeasure_mean)"))
    assert "| **0.900** | 0.800 | 0.700 |" in saliency


def test_task_table_formats_noc_with_its_fail_share(tmp_path):
    write_run(tmp_path, "categories", {"agent": {"categories_miou": 0.6, "noc@85": 5.5, "fail@85": 0.25, "noc@90": 6,
                                                 "fail@90": 0.5, "iou@0": 0.5}})
    table = summarise.task_table("categories", tmp_path / "categories" / "version_0" / "evaluation" / "test.csv")
    assert table.splitlines()[2] == "| **agent** | 0.600 | 5.50 (25%) | 6.00 (50%) | 0.500 |"
