"""Classification studies: the paired bootstrap over test examples from the runs' saved
predictions, and their outputs side by side in the report (runs fabricated, no training)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from losslab.compare.config import load_study
from losslab.compare.report import markdown_summary, render_report
from losslab.compare.results import analyze
from losslab.compare.runs import Run
from losslab.eval.classification import classification_report
from losslab.eval.report import namespace, write_metrics_json

NAMES = ["negative", "neutral", "positive"]
N = 60
EVIL = "<b>bold</b> & text"


def predictions(seed: int, flips: int) -> list[dict]:
    """The same N test texts for every seed; the baseline is right on a third of them (which
    third depends on the seed), a variant on ``flips`` more."""
    gold = np.random.default_rng(0).integers(0, 3, N)
    pred = np.where(np.arange(N) % 3 == seed % 3, gold, (gold + 1) % 3)
    wrong = [i for i in range(N) if pred[i] != gold[i]]
    pred[wrong[:flips]] = gold[wrong[:flips]]
    return [
        {
            "text": EVIL if i == 0 else f"text {i}",
            "gold": NAMES[g],
            "predicted": NAMES[p],
            "score": round(0.4 + 0.01 * ((i + flips + seed) % 50), 2),
        }  # a run's own confidence
        for i, (g, p) in enumerate(zip(gold, pred))
    ]


def fabricate(tmp_path: Path) -> tuple[object, list[Run]]:
    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "out"),
                "base": {
                    "task": "sequence_classification",
                    "model": "builtin:minilm-l6",
                    "data": {"train": "builtin:sentiment", "test": "builtin:sentiment"},
                },
                "variants": [
                    {"name": "ce"},
                    {"name": "same", "overrides": {"training.lr": 1e-4}},
                    {"name": "better", "overrides": {"training.lr": 2e-4}},
                ],
                "seeds": [0, 1],
                "metrics": [
                    {"name": "test/accuracy"},
                    {"name": "test/f1_macro"},
                    {"name": "test/loss", "direction": "min"},
                ],
                "stats": {"n_bootstrap": 500},
            }
        )
    )
    study = load_study(study_file)
    runs = []
    for variant, flips in (("ce", 0), ("same", 0), ("better", 20)):
        for seed in (0, 1):
            folder = tmp_path / "runs" / f"{variant}{seed}"
            folder.mkdir(parents=True)
            rows = predictions(seed, flips)
            (folder / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            report = classification_report([r["gold"] for r in rows], [r["predicted"] for r in rows], labels=NAMES)
            write_metrics_json(
                namespace({**report.to_dict(), "loss": 1.0 - flips / 100 + seed / 10}, "test"), folder / "metrics.json"
            )
            runs.append(Run(variant, seed, {}, folder).load())
    return study, runs


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> tuple[dict, list[Run]]:
    study, runs = fabricate(tmp_path_factory.mktemp("cls"))
    return analyze(study, runs), runs


def test_identical_predictions_give_p_1_and_a_planted_gain_is_significant(analysed) -> None:
    results, runs = analysed
    same = results["variants"]["same"]["vs_baseline"]["test/accuracy"]["examples"]
    assert same["delta"] == 0.0 and same["p_value"] == 1.0 and same["n_examples"] == N and same["seeds_summed"] == 2
    better = results["variants"]["better"]["vs_baseline"]
    acc = better["test/accuracy"]["examples"]
    # over both seeds: the baseline is right on 20 of 60 per seed, the variant on 40
    assert acc["score_a"] == pytest.approx(1 / 3) and acc["score_b"] == pytest.approx(2 / 3)
    assert acc["delta"] == pytest.approx(1 / 3) and acc["ci_low"] > 0 and acc["p_value"] < 0.01 and acc["significant"]
    pooled_base = [
        r
        for run in runs
        if run.variant == "ce"
        for r in map(json.loads, (run.dir / "predictions_test.jsonl").read_text().splitlines())
    ]
    f1 = classification_report([r["gold"] for r in pooled_base], [r["predicted"] for r in pooled_base], labels=NAMES)
    assert better["test/f1_macro"]["examples"]["score_a"] == pytest.approx(f1.to_dict()["f1_macro"])
    assert better["test/f1_macro"]["examples"]["p_value"] < 0.01
    assert "examples" not in better["test/loss"]  # not a per-example statistic


def test_an_example_counts_once_however_many_seeds_saw_it(tmp_path: Path) -> None:
    """Three seeds with the same outputs carry no more evidence than one: the same interval
    and p-value (resampling the 3N outputs as independent would shrink both about sqrt(3)-fold).
    Examples that do not line up across seeds or runs get no test."""
    from losslab.compare.examples import example_id, example_stats
    from losslab.compare.results import _over_examples

    study, _ = fabricate(tmp_path)
    base, other = predictions(0, 0), predictions(0, 5)
    keys = [example_id(r) for r in base]
    (a, score), (b, _) = example_stats("accuracy", base, NAMES), example_stats("accuracy", other, NAMES)
    one = _over_examples(study, [(keys, a, b)], score)
    three = _over_examples(study, [(keys, a, b)] * 3, score)
    assert one["delta"] == pytest.approx(5 / N) and 0.01 < one["p_value"] < 0.5
    for field in ("delta", "ci_low", "ci_high", "p_value"):
        assert three[field] == pytest.approx(one[field]), field
    assert (one["n_examples"], three["n_examples"], three["seeds_summed"]) == (N, N, 3)
    pooled = np.concatenate([a] * 3), np.concatenate([b] * 3)  # what treating them as independent gives
    from losslab.eval.bootstrap import paired_bootstrap

    naive = paired_bootstrap(*pooled, score, n_samples=study.config.stats.n_bootstrap, seed=0)
    assert naive.p_value < one["p_value"] and naive.ci_high - naive.ci_low < 0.75 * (one["ci_high"] - one["ci_low"])
    shuffled = keys[1:] + keys[:1]
    assert _over_examples(study, [(keys, a, b), (shuffled, a, b)], score) is None


def test_summary_and_report_show_the_predictions_side_by_side(analysed) -> None:
    results, runs = analysed
    summary = markdown_summary(results)
    row = next(line for line in summary.splitlines() if line.startswith("| better | test/accuracy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # difference [CI], ..., the per-seed differences, then the paired bootstrap over test examples
    assert cells[2].startswith("0.3333 [") and cells[8] == "0.3333, 0.3333" and cells[9].startswith("0.3333 [")
    html = render_report(results, runs, title="cls", examples=3)

    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.table, self.rows = None, []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag == "table":
                self.table = dict(attrs).get("id")
            elif tag == "tr" and self.table == "examples":
                self.rows.append([])

        def handle_data(self, data: str) -> None:
            if self.table == "examples" and self.rows and data.strip():
                self.rows[-1].append(data.strip())

    page = Cells()
    page.feed(html)
    header, first, *rest = page.rows
    assert header == ["input", "reference", "ce", "same", "better"]
    rows0 = predictions(0, 0)
    better0 = predictions(0, 20)
    expected = lambda r: f"{r['predicted']} ({r['score']:.2f})" + ("" if r["predicted"] == r["gold"] else " ✗")  # noqa: E731
    assert first == [EVIL, rows0[0]["gold"], expected(rows0[0]), expected(rows0[0]), expected(better0[0])]
    assert len(rest) == 2 and rest[0][0] == "text 1"
    assert EVIL not in html  # escaped


def test_ner_and_reward_statistics_and_display_by_hand() -> None:
    from losslab.compare.examples import display, example_stats

    ner = [
        {
            "tokens": ["John", "Smith", "in", "Paris"],
            "gold": ["B-PER", "I-PER", "O", "B-LOC"],
            "predicted": ["B-PER", "I-PER", "O", "B-PER"],
        },
        {"tokens": ["hi"], "gold": ["O"], "predicted": ["B-LOC"]},
    ]
    stats, score = example_stats("f1_micro", ner, [])
    assert stats.tolist() == [[1, 2, 2, 3, 4], [0, 1, 0, 0, 1]]  # tp, predicted, true entities, right / scored words
    assert score(stats.sum(axis=0)) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert example_stats("token_accuracy", ner, [])[1](stats.sum(axis=0)) == pytest.approx(3 / 5)
    assert example_stats("f1/PER", ner, []) is None  # per-type NER scores: not bootstrapped
    assert display(ner[0]) == (
        "John Smith in Paris",
        "John/B-PER Smith/I-PER in Paris/B-LOC",
        "John/B-PER Smith/I-PER in Paris/B-PER",
    )
    pairs = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "reward_chosen": 1.0, "reward_rejected": 0.5},
        {"prompt": "q", "chosen": "a", "rejected": "b", "reward_chosen": 0.0, "reward_rejected": 0.0},
        {"prompt": "q", "chosen": "a", "rejected": "b", "reward_chosen": 0.0, "reward_rejected": 2.0},
    ]
    stats, score = example_stats("pairwise_accuracy", pairs, [])
    assert score(stats.sum(axis=0)) == pytest.approx(1.5 / 3)  # a tie counts half
    stats, score = example_stats("reward_margin", pairs, [])
    assert score(stats.sum(axis=0)) == pytest.approx(-1.5 / 3)
    assert display(pairs[2])[1:] == ("chosen > rejected", "0.000 vs 2.000 (wrong)")
    multi = [{"text": "t", "gold": ["red"], "predicted": []}]
    assert example_stats("f1_micro", multi, []) is None and display(multi[0]) == ("t", "red", "(none)")
    classes = [{"text": "t", "gold": "a", "predicted": "b", "score": 0.7}]
    assert example_stats("loss", classes, ["a", "b"]) is None
    assert display(classes[0]) == ("t", "a", "b (0.70) ✗")


def test_preference_generations_give_per_example_reward_and_kl_and_a_frontier(tmp_path: Path) -> None:
    """The preference task saves each reply's reward and KL: the comparison analyses both over
    seeds x prompts (a planted reward gain is found, equal replies give a zero difference), the
    reward accuracy over the saved pairs, and the report shows the frontier and the scored replies."""
    study_file = tmp_path / "study.yaml"
    metrics = [
        {"name": "test/reward"},
        {"name": "test/kl", "direction": "min"},
        {"name": "test/reward_accuracy"},
    ]
    study_file.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "out"),
                "base": {
                    "task": "preference",
                    "data": {"train": "builtin:preference", "test": "builtin:preference"},
                    "eval": {"generate": True},
                },
                "variants": [{"name": "sft"}, {"name": "dpo", "overrides": {"training.lr": 1e-4}}],
                "seeds": [0, 1, 2],
                "metrics": metrics,
                "frontiers": [{"x": "test/kl", "y": "test/reward"}],
                "stats": {"n_bootstrap": 300},
            }
        )
    )
    study = load_study(study_file)
    rng = np.random.default_rng(0)
    n = 40
    runs = []
    for variant, gain in (("sft", 0.0), ("dpo", 0.3)):
        for seed in (0, 1, 2):
            folder = tmp_path / "runs" / f"{variant}{seed}"
            folder.mkdir(parents=True)
            rewards = np.clip(rng.normal(0.2 + gain, 0.2, n), -1, 1)
            kls = rng.normal(2.0 + 10 * gain, 1.0, n)
            gens = [
                {"prompt": f"p{i % 4}", "reference": f"liked {i}", "hypothesis": EVIL, "reward": r, "kl": k}
                for i, (r, k) in enumerate(zip(rewards.tolist(), kls.tolist()))
            ]
            (folder / "generations_test.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
            pairs = [
                {"prompt": "p", "chosen": "a", "rejected": "b", "reward_chosen": float(i % 3), "reward_rejected": 1.0}
                for i in range(n)
            ]
            (folder / "predictions_test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
            accuracy = np.mean(
                [1.0 if p["reward_chosen"] > 1 else 0.5 if p["reward_chosen"] == 1 else 0.0 for p in pairs]
            )
            write_metrics_json(
                namespace({"reward": rewards.mean(), "kl": kls.mean(), "reward_accuracy": accuracy}, "test"),
                folder / "metrics.json",
            )
            runs.append(Run(variant, seed, {}, folder).load())
    results = analyze(study, runs)
    reward = results["variants"]["dpo"]["vs_baseline"]["test/reward"]
    assert reward["interval"]["values"].startswith("examples") and reward["interval"]["n_examples"] == n
    assert reward["interval"]["low"] > 0 and reward["interval"]["mean"] == pytest.approx(reward["mean_diff"])
    kl = results["variants"]["dpo"]["vs_baseline"]["test/kl"]
    assert kl["interval"]["values"].startswith("examples") and kl["interval"]["low"] > 0
    accuracy = results["variants"]["dpo"]["vs_baseline"]["test/reward_accuracy"]
    assert accuracy["examples"]["delta"] == 0.0  # the same saved pairs: no difference, found per example
    html = render_report(results, runs, title="pref")
    assert "Frontiers" in html and "reward 0." in html and "&lt;b&gt;bold&lt;/b&gt;" in html and EVIL not in html
