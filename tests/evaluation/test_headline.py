"""docs/results/headline.py: the README's headline table from evaluate.py summary's CSV."""
import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("headline", ROOT / "docs" / "results" / "headline.py")
headline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(headline)

FIELDS = ["task", "metric", "lower_is_better", "agent_variant", "variant", "strategy", "label", "seeds", "mean", "sd",
          "per_seed", "difference", "ci_low", "ci_high", "verdict", "units", "resamples", "level"]


def summary_csv(path: Path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    return path


def row(task, metric, strategy, mean, sd="0.01", diff="", low="", high="", verdict="", lower="0", variant=""):
    return dict(task=task, metric=metric, lower_is_better=lower, agent_variant=variant, strategy=strategy, seeds="5",
                mean=mean, sd=sd, difference=diff, ci_low=low, ci_high=high, verdict=verdict)


def test_one_row_per_task_in_readme_order_with_bold_only_where_the_interval_excludes_zero(tmp_path, capsys):
    path = summary_csv(tmp_path / "summary.csv", [
        row("blur", "miou_fgbg", "agent", "0.5"),
        row("blur", "miou_fgbg", "no_rl", "0.52", diff="-0.02", low="-0.03", high="-0.01", verdict="loss"),
        row("blur", "fbeta_max", "agent", "0.3"),  # a second headline metric: not in the table
        row("shadow", "miou_fgbg", "agent", "0.9", sd="nan"),
        row("shadow", "miou_fgbg", "no_rl", "0.88", diff="+0.01", low="-0.002", high="+0.02"),
        row("shadow", "miou_fgbg", "agent", "0.95", variant="confident"),  # another variant: left out
    ])
    table = headline.main([f"standard={path}"])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| standard | shadow (miou_fgbg ↑) | 5 | 0.900 |")
    assert "0.880; +0.010 [-0.002, +0.020]" in lines[2] and "**" not in lines[2]
    assert "0.520; **-0.020 [-0.030, -0.010]**" in lines[3] and lines[3].count(" - ") == 5  # absent strategies
    assert "0.3" not in lines[3].split("|")[4]
    assert capsys.readouterr().out.strip() == table


def test_a_named_agent_variant_gets_its_own_rows(tmp_path):
    path = summary_csv(tmp_path / "summary.csv", [
        row("shadow", "miou_fgbg", "agent", "0.9"),
        row("shadow", "miou_fgbg", "agent", "0.95", variant="confident"),
        row("shadow", "miou_fgbg", "no_srm", "0.91", diff="+0.04", low="+0.03", high="+0.05", verdict="win", variant="confident"),
    ])
    lines = headline.main([f"std={path}", "--agent-variant", "confident"]).splitlines()
    assert "| 0.950 ± 0.010 |" in lines[2] and "0.910; **+0.040 [+0.030, +0.050]**" in lines[2]


def test_a_missing_csv_is_named(tmp_path):
    with pytest.raises(SystemExit):
        headline.main([f"std={tmp_path / 'nope.csv'}"])
