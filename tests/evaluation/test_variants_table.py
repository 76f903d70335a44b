"""docs/results/variants.py: the variants table from evaluate.py summary's labelled CSV."""
import importlib.util
from pathlib import Path

import pytest

from tests.evaluation.test_headline import row, summary_csv

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("variants", ROOT / "docs" / "results" / "variants.py")
variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(variants)


def labelled(task, strategy, mean, agent_variant, variant=None, **kw):
    r = row(task, "miou_fgbg", strategy, mean, variant=agent_variant, **kw)
    r["variant"] = agent_variant if variant is None else variant
    return r


def test_one_row_per_variant_baseline_first_with_its_differences(tmp_path):
    path = summary_csv(tmp_path / "summary.csv", [
        labelled("shadow", "agent", "0.898", "confident"),
        labelled("shadow", "no_rl", "0.876", "confident", diff="+0.022", low="+0.016", high="+0.027", verdict="win"),
        labelled("shadow", "agent", "0.886", "confident", variant="paper", diff="+0.012", low="+0.005", high="+0.021",
                 verdict="win"),
        labelled("shadow", "agent", "0.886", "paper"),
        labelled("shadow", "oracle", "0.902", "paper", diff="-0.017", low="-0.028", high="-0.005", verdict="loss"),
        labelled("shadow", "agent", "0.898", "paper", variant="confident", diff="-0.012", low="-0.021", high="-0.005",
                 verdict="loss"),
        labelled("blur", "agent", "0.5", "paper"),
    ])
    lines = variants.main([f"standard={path}"]).splitlines()
    assert len(lines) == 2 + 3
    shadow_paper, shadow_confident, blur_paper = lines[2:]
    assert "blur" in blur_paper  # README task order: shadow before blur
    assert "paper (default)" in shadow_paper and "| 0.886 ± 0.010 |  |" in shadow_paper
    assert "**-0.017 [-0.028, -0.005]**" in shadow_paper  # its oracle column
    assert shadow_confident.split(" | ")[2] == "`confident`"
    cells = shadow_confident.strip("| ").split(" | ")
    assert cells[5:] == ["**+0.012 [+0.005, +0.021]**", "**+0.022 [+0.016, +0.027]**", "-"]


def test_an_interval_holding_zero_is_not_bold(tmp_path):
    path = summary_csv(tmp_path / "summary.csv", [
        labelled("glass", "agent", "0.9", "paper"),
        labelled("glass", "agent", "0.91", "srm_input"),
        labelled("glass", "agent", "0.9", "srm_input", variant="paper", diff="+0.010", low="-0.004", high="+0.020"),
    ])
    table = variants.main([f"hard={path}"])
    assert "| +0.010 [-0.004, +0.020] |" in table and "**" not in table


def test_a_missing_csv_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        variants.main([f"standard={tmp_path / 'absent.csv'}"])
    assert "expected WORLD=CSV" in capsys.readouterr().err


def test_no_oracle_drops_the_column_for_runs_scored_without_it(tmp_path):
    path = summary_csv(tmp_path / "summary.csv", [
        labelled("glass", "agent", "0.9", "paper"),
        labelled("glass", "oracle", "0.95", "paper", diff="-0.05", low="-0.06", high="-0.04", verdict="loss"),
    ])
    with_oracle = variants.main([f"standard={path}"]).splitlines()
    without = variants.main([f"standard={path}", "--no-oracle"]).splitlines()
    assert "oracle" in with_oracle[0] and "oracle" not in without[0]
    assert with_oracle[2].count("|") == without[2].count("|") + 1
    assert "-0.050" in with_oracle[2] and "-0.050" not in without[2]


def test_a_baseline_label_absent_from_a_csv_is_a_one_line_usage_error_naming_it(tmp_path, capsys):
    path = summary_csv(tmp_path / "summary.csv", [
        labelled("categories", "agent", "0.69", "n50"),
        labelled("categories", "agent", "0.70", "n200"),
    ])
    with pytest.raises(SystemExit):
        variants.main([f"standard={path}"])  # the default baseline 'paper' is not among n50, n200
    err = capsys.readouterr().err
    assert "--baseline 'paper'" in err and str(path) in err and "n50" in err
    assert "n50 (default)" in variants.main([f"standard={path}", "--baseline", "n50"])
