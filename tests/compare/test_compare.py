"""A tiny study end to end: results.json, resume after an interruption, report.html, config errors."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from losslab.compare import runs as runner
from losslab.compare.config import load_study
from losslab.compare.study import compare
from losslab.errors import UserError

from ..conftest import train_config, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EVIL = "<script>alert('x')</script>"


def study_dict(out: Path) -> dict:
    return {
        "output_dir": str(out),
        "base": train_config(
            None,
            validation=True,
            loss=None,
            data={"test": "builtin:chatterbot", "max_length": 64, "max_train_samples": 16, "max_eval_samples": 4},
            training={"max_steps": 3, "eval_steps": 2},
            eval={"generate": True, "generation_samples": 3, "max_new_tokens": 6},
        ),
        "variants": [
            {"name": "ce"},
            {
                "name": "ce_consistency",
                "overrides": {
                    "loss.terms": [
                        {"name": "token_cross_entropy"},
                        {"name": "consistency", "weight": {"schedule": "linear", "start": 0.3, "end": 0.0}},
                    ]
                },
            },
        ],
        "seeds": [0, 1],
        "metrics": [
            {"name": "validation/loss", "direction": "min"},
            {"name": "test/bleu"},
            {"name": "test/distinct_1"},
        ],
        "stats": {"n_bootstrap": 200},
    }


def write_study(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict, list[tuple[str, int]]]:
    tmp = tmp_path_factory.mktemp("study")
    study = load_study(write_study(tmp, study_dict(tmp / "out")))
    calls: list[tuple[str, int]] = []
    real = runner.train_run
    runner.train_run = lambda config: calls.append((config["output_dir"], config["seed"])) or real(config)
    try:
        results = compare(study)
    finally:
        runner.train_run = real
    return tmp, results, calls


def test_results_json_has_every_variant_seed_and_ci(finished) -> None:
    tmp, results, calls = finished
    assert len(calls) == 4
    saved = json.loads((tmp / "out" / "results.json").read_text())
    assert saved == results
    assert saved["study"]["baseline"] == "ce" and saved["study"]["seeds"] == [0, 1]
    assert set(saved["variants"]) == {"ce", "ce_consistency"}
    for name, entry in saved["variants"].items():
        assert set(entry["runs"]) == {"0", "1"}
        for run_dir in entry["runs"].values():
            assert Path(run_dir).name.startswith(f"{name}__seed") and (Path(run_dir) / "metrics.json").is_file()
            # finished: the checkpoints (model + optimizer state) are gone
            assert not list(Path(run_dir).glob("checkpoint-*"))
        for metric in ("validation/loss", "test/bleu", "test/distinct_1"):
            m = entry["metrics"][metric]
            assert set(m["per_seed"]) == {"0", "1"} and all(v is not None for v in m["per_seed"].values())
            assert m["n"] == 2 and m["ci_low"] <= m["mean"] <= m["ci_high"]
    # keep_models: best (the default): only the best seed of the winning variant keeps model/
    assert len(list((tmp / "out" / "runs").glob("*/model/model.safetensors"))) == 1
    paired = saved["variants"]["ce_consistency"]["vs_baseline"]
    assert set(paired) == {"validation/loss", "test/bleu", "test/distinct_1"}
    assert paired["validation/loss"]["method"] == "exact sign-flip permutation"
    assert paired["validation/loss"]["p_value"] >= 0.5  # two seeds: p >= 2/4
    ex = paired["test/bleu"]["examples"]
    assert (ex["n_examples"], ex["seeds_summed"]) == (3, 2)  # 3 test prompts, each with both seeds' replies
    # the two-level analysis: BLEU linearised per example, validation/loss over seeds only; Holm on the first metric
    bleu = paired["test/bleu"]
    assert bleu["interval"]["values"] == "examples (linearised)" and bleu["interval"]["n_examples"] == 3
    assert bleu["interval"]["mean"] == pytest.approx(bleu["mean_diff"])
    assert paired["validation/loss"]["interval"]["values"] == "seeds"
    assert saved["study"]["primary_metrics"] == ["validation/loss"]
    assert paired["validation/loss"]["family"] == "primary" and bleu["family"] == "secondary"
    for t in paired.values():
        assert t["p_adjusted"] is None or t["p_adjusted"] >= t["p_raw"]
        assert t["evidence"] in ("better", "worse", "no evidence") and 0 <= t["p_improvement"]["value"] <= 1
    assert "vs_baseline" in saved["variants"]["ce"] and not saved["variants"]["ce"]["vs_baseline"]
    gens = (Path(saved["variants"]["ce"]["runs"]["0"]) / "generations_test.jsonl").read_text().splitlines()
    assert len(gens) == 3 and set(json.loads(gens[0])) == {"prompt", "reference", "hypothesis"}


def test_rerun_only_reruns_unfinished_runs(finished, capsys) -> None:
    tmp, results, _ = finished
    out = tmp / "out"
    interrupted = Path(results["variants"]["ce_consistency"]["runs"]["1"])
    (interrupted / "metrics.json").unlink()  # as if killed before the end
    calls: list[str] = []
    real = runner.train_run
    runner.train_run = lambda config: calls.append(config["output_dir"]) or real(config)
    try:
        again = compare(load_study(tmp / "study.yaml"))
    finally:
        runner.train_run = real
    assert calls == [str(interrupted)]
    assert "4 runs, 3 already finished, 1 to run" in capsys.readouterr().out
    assert again["variants"]["ce"] == results["variants"]["ce"]
    # a changed variant is a new config: new hash, new folder, the old results are not reused
    data = study_dict(out)
    data["variants"][1]["overrides"]["training.lr"] = 1e-3
    (tmp / "changed").mkdir()
    changed = runner.plan(load_study(write_study(tmp / "changed", data)))
    assert [r.done for r in changed] == [True, True, False, False]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[str] = []
        self.images: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id", ""))
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_is_self_contained_with_tables_plots_and_escaped_text(finished) -> None:
    tmp, results, _ = finished
    from losslab.compare.report import render_report

    runs = [runner.Run(v, int(s), {}, Path(d)) for v, e in results["variants"].items() for s, d in e["runs"].items()]
    # plant dataset text with markup in a generation record: it must come out escaped
    gen = Path(results["variants"]["ce"]["runs"]["0"]) / "generations_test.jsonl"
    evil_dir = tmp / "evil"
    shutil.copytree(gen.parent, evil_dir, ignore=shutil.ignore_patterns("checkpoint-*", "model"))
    rows = [json.loads(line) for line in (evil_dir / gen.name).read_text().splitlines()]
    rows[0]["reference"] = EVIL
    (evil_dir / gen.name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs[0] = runner.Run("ce", 0, {}, evil_dir)
    html = render_report(results, runs, title="tiny & <study>")
    page = _Page()
    page.feed(html)
    assert {"results", "tests", "variants", "examples"} <= set(page.tables)
    assert "differences from the baseline" in html and "P(improvement)" in html and "p adjusted (Holm)" in html
    assert len(page.images) >= 3 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG" for src in page.images)
    assert page.scripts == 0 and EVIL not in html and "&lt;script&gt;" in html
    assert EVIL in "".join(page.text)  # shown as text
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    assert (tmp / "out" / "report.html").read_text().startswith("<!doctype html>")


def test_config_errors_name_file_line_and_field(tmp_path: Path) -> None:
    data = study_dict(tmp_path / "out")
    data["baseline"] = "nope"
    with pytest.raises(UserError, match=r"study\.yaml.*baseline 'nope' is not a variant"):
        load_study(write_study(tmp_path, data))
    data = study_dict(tmp_path / "out")
    data["variants"][1]["overrides"]["training.lrr"] = 1
    with pytest.raises(UserError, match=r"study\.yaml:\d+ \(variant 'ce_consistency'\).*training\.lrr"):
        load_study(write_study(tmp_path, data))
    data = study_dict(tmp_path / "out")
    data["variants"][1]["overrides"]["loss.terms"] = [{"name": "no_such_loss"}]
    with pytest.raises(UserError, match="no_such_loss"):
        load_study(write_study(tmp_path, data))
    data = study_dict(tmp_path / "out")
    data["metrics"] = [{"name": "test/bleu", "direction": "up"}]
    with pytest.raises(UserError, match=r"study\.yaml:\d+: field 'metrics\.0\.direction'"):
        load_study(write_study(tmp_path, data))
    data = study_dict(tmp_path / "out")  # a term the task cannot feed: refused up front, not when its run starts
    data["variants"][-1]["overrides"]["loss.terms"] = [{"name": "token_cross_entropy"}, {"name": "bradley_terry"}]
    with pytest.raises(
        UserError,
        match=r"study\.yaml:\d+ \(variant '\w+'\): field 'loss.terms': .*bradley_terry.*"
        r"a causal_lm batch provides",
    ):
        load_study(write_study(tmp_path, data))


def test_example_studies_parse() -> None:
    paths = sorted(EXAMPLES.glob("compare_*.yaml"))
    assert [p.name for p in paths] == [
        "compare_demo.yaml",
        "compare_dialogue_losses.yaml",
        "compare_distillation.yaml",
        "compare_preference_losses.yaml",
    ]
    for path in paths:
        study = load_study(path)
        assert len(study.config.variants) >= 4 and len(study.config.seeds) >= 2


CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chrome-headless-shell", "chromium-browser", "google-chrome")


def _chromium() -> str | None:
    """A headless-capable Chromium on PATH (.ci/run installs Debian's chromium-headless-shell)."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@pytest.mark.skipif(
    _chromium() is None, reason="no headless Chromium (apt-get install chromium-headless-shell; .ci/run does)"
)
def test_report_renders_in_headless_chromium(finished, tmp_path: Path) -> None:
    import subprocess

    tmp, _results, _ = finished
    html = (tmp / "out" / "report.html").read_text()
    # a probe copy: after load, write what the browser rendered (tables, decoded images) into the DOM
    probe = html.replace(
        "</body>",
        "<script>window.onload = () => { document.body.setAttribute('data-probe', JSON.stringify({"
        "tables: document.querySelectorAll('table').length, "
        "images: [...document.images].map(i => i.complete ? i.naturalWidth : 0)})); };</script></body>",
    )
    (tmp_path / "probe.html").write_text(probe)
    base = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--allow-file-access-from-files",
        "--window-size=1280,2400",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", (tmp_path / "probe.html").as_uri()],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
    found = json.loads(__import__("html").unescape(dom.stdout.split('data-probe="', 1)[1].split('"', 1)[0]))
    assert found["tables"] >= 4 and len(found["images"]) >= 3 and min(found["images"]) > 100
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", (tmp / "out" / "report.html").as_uri()],
        check=False,
        capture_output=True,
        timeout=90,
    )
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
    shutil.copy(shot, tmp / "out" / "report.png")


def test_tuning_runs_trials_resumes_and_runs_the_best_on_every_seed(tmp_path: Path) -> None:
    data = study_dict(tmp_path / "out")
    data["base"]["training"]["max_steps"] = 2
    data["seeds"] = [0, 1]
    data["variants"] = data["variants"][1:]  # the tuned variant alone (it is its own baseline)
    data["base"]["eval"] = {"splits": ["validation"]}
    data["metrics"] = [{"name": "validation/loss", "direction": "min"}]
    data["variants"][0]["tune"] = {"loss.terms.1.weight.start": {"low": 0.1, "high": 0.7}}
    data["tuning"] = {
        "trials": 2,
        "sampler": "random",
    }  # random: a resume seeded like the first attempt would repeat it
    path = write_study(tmp_path, data)
    results = compare(load_study(path))
    tuning = results["tuning"]["ce_consistency"]
    assert len(tuning["trials"]) == 2 and (tmp_path / "out" / "tuning.journal").is_file()
    best = tuning["best_params"]["loss.terms.1.weight.start"]
    assert 0.1 <= best <= 0.7 and results["variants"]["ce_consistency"]["tuned"] == tuning["best_params"]
    run_dir = Path(results["variants"]["ce_consistency"]["runs"]["1"])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]["terms"][1]["weight"][
        "start"
    ] == pytest.approx(best)
    # more trials: the study resumes from the stored two
    data["tuning"]["trials"] = 3
    again = compare(load_study(write_study(tmp_path, data)))
    trials = again["tuning"]["ce_consistency"]["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    tried = [t["params"]["loss.terms.1.weight.start"] for t in trials]
    assert tried[2] not in tried[:2]  # the resumed sampler does not draw the first attempt's values again


def test_tuning_selects_on_validation_and_a_changed_direction_is_a_new_study(tmp_path: Path) -> None:
    from losslab.compare.tuning import study_name

    data = study_dict(tmp_path / "out")
    data["variants"][1]["tune"] = {"loss.terms.1.weight.start": {"low": 0.1, "high": 0.7}}
    data["tuning"] = {"metric": "test/bleu", "direction": "max"}
    with pytest.raises(UserError, match=r"tuning.metric.*validation/"):
        load_study(write_study(tmp_path, data))
    data["tuning"] = {"metric": "validation/loss", "direction": "min"}
    data["base"]["eval"]["splits"] = ["test"]
    data["metrics"] = [{"name": "test/bleu"}]
    with pytest.raises(
        UserError, match=r"variant 'ce_consistency' is tuned on 'validation/loss' but does not evaluate"
    ):
        load_study(write_study(tmp_path, data))
    del data["base"]["eval"]["splits"]
    study = load_study(write_study(tmp_path, data))
    variant = study.config.variants[1]
    flipped = load_study(write_study(tmp_path, {**data, "tuning": {"metric": "validation/loss", "direction": "max"}}))
    assert study_name(study, variant) != study_name(flipped, flipped.config.variants[1])


def test_search_space_is_checked_before_any_work(tmp_path: Path) -> None:
    data = study_dict(tmp_path / "out")
    data["variants"][1]["tune"] = {"loss.terms.1.weight.strat": {"low": 0.1, "high": 0.7}}
    with pytest.raises(UserError, match=r"variant 'ce_consistency'"):
        load_study(write_study(tmp_path, data))
    data["variants"][1]["tune"] = {"loss.terms.1.weight.start": {"low": 0.7, "high": 0.1}}
    with pytest.raises(UserError, match=r"low.*<= .*high"):
        load_study(write_study(tmp_path, data))


def test_pruning_stops_a_clearly_worse_trial_at_its_first_evaluation(tmp_path: Path) -> None:
    import optuna

    from losslab.compare.tuning import study_name, tune_variant

    data = study_dict(tmp_path / "out")
    data["base"]["training"].update(max_steps=4, eval_steps=2)
    data["base"]["eval"] = {"splits": ["validation"]}
    data["seeds"] = [0]
    data["variants"] = [{"name": "ce", "tune": {"training.lr": {"type": "categorical", "choices": [3e-3, 1e-9]}}}]
    data["metrics"] = [{"name": "validation/loss", "direction": "min"}]
    data["tuning"] = {"trials": 3, "pruner": "median"}
    study = load_study(write_study(tmp_path, data))
    study.out.mkdir(parents=True)
    # two trials that learn, then one that cannot (lr 1e-9): the median pruner (2 startup trials) must stop it
    planted = optuna.create_study(
        study_name=study_name(study, study.config.variants[0]),
        storage=f"sqlite:///{(study.out / 'tuning.db').resolve()}",
    )
    for lr in (3e-3, 3e-3, 1e-9):
        planted.enqueue_trial({"training.lr": lr})
    tuning = tune_variant(study, study.config.variants[0])
    states = [(t["params"]["training.lr"], t["state"], t["last_step"]) for t in tuning["trials"]]
    assert states == [(3e-3, "COMPLETE", 4), (3e-3, "COMPLETE", 4), (1e-9, "PRUNED", 2)]
    stored = optuna.load_study(study_name=tuning["study_name"], storage=tuning["storage"]).trials
    assert [t.state for t in stored] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    # the reported values are the tuning metric itself: the completed trials' last report is their final metric
    assert stored[0].intermediate_values[4] == pytest.approx(stored[0].value)
    assert stored[2].intermediate_values[2] > stored[0].intermediate_values[2]
    pruned_dir = next((study.out / "tuning" / "ce").glob("trial2__*"))
    assert not (pruned_dir / "metrics.json").exists()  # stopped before the end: no final evaluation
    assert max(row["step"] for row in runner.read_log(pruned_dir)) == 2
    done_dir = next((study.out / "tuning" / "ce").glob("trial0__*"))
    assert json.loads((done_dir / "metrics.json").read_text())["train/steps"] == 4
    assert not list((study.out / "tuning" / "ce").glob("trial*/checkpoint-*"))  # ended trials keep no checkpoint


@pytest.mark.parametrize("keep", [False, True])
def test_finished_runs_lose_their_checkpoints_unless_kept(tmp_path: Path, monkeypatch, keep: bool) -> None:
    data = study_dict(tmp_path / "out")
    data["keep_checkpoints"] = keep
    runs = runner.plan(load_study(write_study(tmp_path, data)))

    def fake_train(config: dict) -> None:
        out = Path(config["output_dir"])
        for step in (2, 3):
            (out / f"checkpoint-{step}").mkdir()
            (out / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"x")
        (out / "metrics.json").write_text(json.dumps({"train/steps": 3}))

    monkeypatch.setattr(runner, "train_run", fake_train)
    # the first run finished in an earlier attempt that was killed before it could tidy up
    runs[0].dir.mkdir(parents=True)
    fake_train(runs[0].config)
    # the second was interrupted: its checkpoint is what a rerun resumes from, so it must survive until it ends
    unfinished = runs[1].dir / "checkpoint-1"
    unfinished.mkdir(parents=True)
    (runs[0].dir / ".deleting-checkpoint-1").mkdir()  # a deletion that was killed half-way
    seen = []
    monkeypatch.setattr(runner, "train_run", lambda config: seen.append(unfinished.is_dir()) or fake_train(config))
    runner.execute(runs, keep_checkpoints=keep)
    assert seen[0] is True
    left = sorted(p.name for r in runs for p in r.dir.glob("checkpoint-*"))
    assert left == (sorted(["checkpoint-1"] + ["checkpoint-2", "checkpoint-3"] * len(runs)) if keep else [])
    assert bool(list(runs[0].dir.glob(".deleting-*"))) == keep  # with keep_checkpoints nothing is deleted


def _compare_cli(study: Path) -> tuple[subprocess.Popen, Path]:
    """Start `losslab compare STUDY` in a subprocess (output to a file)."""
    log = study.with_suffix(f".{time.monotonic_ns()}.log")
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "losslab.cli", "compare", str(study)],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            stdout=fh,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return proc, log


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    wait_for(condition, proc, timeout=timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _without_dir(results: dict, out: Path) -> dict:
    """``results`` with the study's output_dir replaced by one name (run folders name it)."""
    return json.loads(json.dumps(results).replace(str(out), "OUT"))


@pytest.mark.slow  # ~25-40 s of one core (CI time); run by hand: pytest tests/compare/test_compare.py
def test_sigkills_then_rerun_give_the_same_results(finished, tmp_path: Path) -> None:
    """SIGKILL while the first run writes a checkpoint, then once two runs are finished; the
    rerun's results.json equals the uninterrupted study's (the fixture)."""
    tmp, results, _ = finished
    out = tmp_path / "out"
    study = write_study(tmp_path, study_dict(out))
    runs = out / "runs"
    proc, _ = _compare_cli(study)
    _kill_when(proc, lambda: any(runs.glob("*/checkpoint-2")))
    proc, _ = _compare_cli(study)
    _kill_when(proc, lambda: len(list(runs.glob("*/metrics.json"))) >= 2)
    assert not (out / "results.json").exists()
    proc, log = _compare_cli(study)
    assert proc.wait(timeout=600) == 0, log.read_text()[-2000:]
    assert "already finished" in log.read_text()
    assert _without_dir(json.loads((out / "results.json").read_text()), out) == _without_dir(results, tmp / "out")


@pytest.mark.slow
def test_many_random_sigkills_then_rerun_give_the_same_results(tmp_path: Path) -> None:
    """Series of three SIGKILLs of `losslab compare` (the first aimed at a checkpoint save, then
    at random times), then a rerun to the end. Prints the figures quoted in docs/reliability.md."""
    import random

    straight_out = tmp_path / "straight" / "out"
    (tmp_path / "straight").mkdir()
    proc, log = _compare_cli(write_study(tmp_path / "straight", study_dict(straight_out)))
    started = time.monotonic()
    assert proc.wait(timeout=900) == 0, log.read_text()[-2000:]
    duration = time.monotonic() - started
    expected = _without_dir(json.loads((straight_out / "results.json").read_text()), straight_out)
    rng = random.Random(int(os.environ.get("LOSSLAB_KILL_SEED", "0")))
    series, kills_per_series = int(os.environ.get("LOSSLAB_KILL_SERIES", "3")), 3
    kills = during_save = identical = 0
    for k in range(series):
        (tmp_path / f"killed{k}").mkdir()
        out = tmp_path / f"killed{k}" / "out"
        study = write_study(tmp_path / f"killed{k}", study_dict(out))
        for i in range(kills_per_series):
            proc, _ = _compare_cli(study)
            launched = time.time()
            if i == 0:  # aim at a checkpoint save: a folder this process made, not yet marked complete

                def saving(launched: float = launched, out: Path = out) -> bool:
                    return any(
                        p.stat().st_mtime >= launched and not (p / "losslab_checkpoint.json").is_file()
                        for p in out.glob("runs/*/checkpoint-*")
                    )

                while not saving() and proc.poll() is None:
                    time.sleep(0.002)
            else:
                time.sleep(rng.uniform(0.5, 0.6 * duration))  # each rerun has less left to do
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
            during_save += any(not (p / "losslab_checkpoint.json").is_file() for p in out.glob("runs/*/checkpoint-*"))
        proc, log = _compare_cli(study)
        assert proc.wait(timeout=900) == 0, log.read_text()[-2000:]
        identical += _without_dir(json.loads((out / "results.json").read_text()), out) == expected
    print(
        f"\ncompare kill figures: {kills} SIGKILLs in {series} series, {during_save} left an incomplete checkpoint, "
        f"{identical}/{series} reruns with identical results.json"
    )
    assert identical == series
