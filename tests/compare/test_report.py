"""The Markdown summary printed at the end of ``losslab compare``, checked character for character."""

from __future__ import annotations

from pathlib import Path

from losslab.compare.report import markdown_summary
from losslab.compare.report import test_rows as paired_rows


def results(*, examples: bool) -> dict:
    paired_f1 = {
        "n": 2,
        "mean_diff": 0.02,
        "diffs": [0.01, 0.03],
        "p_value": 0.5,
        "method": "exact sign-flip permutation",
        "better": True,
        "significant": False,
        "mark": "",
    }
    paired_loss = {
        "n": 2,
        "mean_diff": 0.1,
        "diffs": [0.05, 0.15],
        "p_value": 0.01,
        "method": "exact sign-flip permutation",
        "better": False,
        "significant": True,
        "mark": "▼",
    }
    if examples:
        paired_f1["examples"] = {"delta": 0.02, "ci_low": -0.01, "ci_high": 0.05, "p_value": 0.2, "n_examples": 400}
    metric = {"per_seed": {"0": 0.5, "1": 0.6}, "n": 2, "mean": 0.55, "std": 0.07, "ci_low": 0.5, "ci_high": 0.6}
    return {
        "study": {
            "baseline": "ce",
            "seeds": [0, 1],
            "confidence": 0.95,
            "alpha": 0.05,
            "n_bootstrap": 10,
            "metrics": [{"name": "test/f1_macro", "direction": "max"}, {"name": "test/loss", "direction": "min"}],
        },
        "variants": {
            "ce": {"metrics": {"test/f1_macro": metric, "test/loss": metric}, "vs_baseline": {}},
            "focal": {
                "metrics": {"test/f1_macro": metric, "test/loss": metric},
                "vs_baseline": {"test/f1_macro": paired_f1, "test/loss": paired_loss},
            },
        },
        "tuning": {},
    }


def test_markdown_summary_exact_output_has_no_empty_columns() -> None:
    text = markdown_summary(results(examples=True), Path("/x/report.html"))
    assert (
        text
        == """\
## losslab compare: 2 variants x 2 seeds

Mean over seeds [95% bootstrap CI]; ▲/▼: significantly better/worse than `ce` (paired sign-flip test over seeds, p < 0.05).

| variant | test/f1_macro | test/loss |
|:---|---:|---:|
| ce (baseline) | 0.5500 [0.5000, 0.6000] | 0.5500 [0.5000, 0.6000] |
| focal | 0.5500 [0.5000, 0.6000] | 0.5500 [0.5000, 0.6000] ▼ |

Paired differences against the baseline (variant - baseline, per seed):

| variant | metric | mean diff | per seed | p (seeds) | vs baseline | test examples: delta [95% CI], p, n |
|:---|---:|---:|---:|---:|---:|---:|
| focal | test/f1_macro | 0.0200 | 0.0100, 0.0300 | 0.500 | better | 0.0200 [-0.0100, 0.0500], p = 0.200, n = 400 |
| focal | test/loss | 0.1000 | 0.0500, 0.1500 | 0.010 | worse ▼ | - |

Note: with 2 seeds the exact sign-flip test cannot go below p = 0.5; the paired bootstrap over test examples is the test with power here.

report: /x/report.html"""
    )


def test_paired_table_drops_the_examples_column_when_no_metric_has_one() -> None:
    header, rows = paired_rows(results(examples=False))
    assert header == ["variant", "metric", "mean diff", "per seed", "p (seeds)", "vs baseline"]
    assert rows == [
        ["focal", "test/f1_macro", "0.0200", "0.0100, 0.0300", "0.500", "better"],
        ["focal", "test/loss", "0.1000", "0.0500, 0.1500", "0.010", "worse ▼"],
    ]
    table = markdown_summary(results(examples=False)).split("per seed):\n\n", 1)[1].split("\n\n", 1)[0]
    assert all(cell.strip() for line in table.splitlines() for cell in line.strip("|").split("|"))


def test_frontier_points_pair_each_seeds_metrics_and_skip_missing_ones() -> None:
    from losslab.compare.report import frontier_plot, frontier_points

    data = results(examples=False)
    data["variants"]["focal"]["metrics"]["test/loss"] = {"per_seed": {"0": 2.0, "1": None}, "mean": 2.0}
    points = frontier_points(data, "test/loss", "test/f1_macro")
    assert points == {"ce": [(0.5, 0.5), (0.6, 0.6)], "focal": [(2.0, 0.5)]}
    assert frontier_plot(data) is None  # no frontiers asked for
    data["study"]["frontiers"] = [{"x": "test/loss", "y": "test/f1_macro"}]
    image = frontier_plot(data)
    assert image is not None and image.startswith("data:image/png;base64,")


def test_a_frontier_must_name_the_studys_metrics(tmp_path: Path) -> None:
    import pytest
    from pydantic import ValidationError

    from losslab.compare.config import CompareConfig

    study = {
        "base": {"task": "causal_lm"},
        "variants": [{"name": "a"}],
        "metrics": [{"name": "test/loss", "direction": "min"}],
        "output_dir": str(tmp_path),
    }
    CompareConfig.model_validate({**study, "frontiers": [{"x": "test/loss", "y": "test/loss"}]})
    with pytest.raises(ValidationError, match=r"frontiers\.0\.y: 'test/reward' is not one of the study's metrics"):
        CompareConfig.model_validate({**study, "frontiers": [{"x": "test/loss", "y": "test/reward"}]})
