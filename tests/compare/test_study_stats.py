"""The two-level paired analysis, Holm, P(improvement) and the planner, by simulation and against
statsmodels / brute force. The simulations are vectorised: 1,000 studies take well under a second."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from losslab.compare.stats import (
    components,
    generalized_interval,
    holm,
    linearize,
    paired_interval,
    pivot_draws,
    probability_of_improvement,
    simulated_power,
    sums_of_squares,
)

MU = 0.3
CASES = {  # (sigma_seed, sigma_example, sigma_interaction)
    "seeds dominate": (1.0, 0.5, 1.0),
    "examples dominate": (0.02, 2.0, 1.0),
    "mixed": (0.3, 1.0, 1.0),
}


def simulate(rng: np.random.Generator, studies: int, seeds: int, examples: int, sa: float, sb: float, se: float):
    """(studies, seeds, examples) differences mu + a_s + b_n + e_sn."""
    a = rng.normal(0, sa, (studies, seeds, 1))
    b = rng.normal(0, sb, (studies, 1, examples))
    return MU + a + b + rng.normal(0, se, (studies, seeds, examples))


def coverages(d: np.ndarray) -> dict[str, float]:
    """Coverage of MU by the two-level interval, the old examples-only bootstrap and the old
    seeds-only sign-flip test (1 - its rejection rate of the true difference)."""
    _, s, n = d.shape
    rng = np.random.default_rng(1)
    grand, ss_a, ss_b, ss_e = sums_of_squares(d)
    low, high, _ = generalized_interval(grand, ss_a, ss_b, ss_e, s, n, draws=pivot_draws(s, n, 2000))
    # the examples-only paired bootstrap: each example summed over the seeds, the examples resampled
    per_example = d.mean(axis=1)  # (M, N)
    counts = np.stack([np.bincount(r, minlength=n) for r in rng.integers(0, n, (1000, n))]) / n
    boot = per_example @ counts.T  # (M, B)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=1)
    # the seeds-only exact sign-flip test of the true difference
    centred = d.mean(axis=2) - MU  # (M, S)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=s)))
    p = (np.abs(centred @ signs.T / s) >= np.abs(centred.mean(1))[:, None] - 1e-12).mean(1)
    return {
        "two-level": float(np.mean((low <= MU) & (high >= MU))),
        "examples bootstrap": float(np.mean((lo <= MU) & (hi >= MU))),
        "seeds sign-flip": float(np.mean(p >= 0.05)),
    }


@pytest.mark.parametrize("seeds", [3, 10])
@pytest.mark.parametrize("case", list(CASES))
def test_two_level_interval_covers_the_true_difference(seeds: int, case: str) -> None:
    rng = np.random.default_rng(seeds)
    d = simulate(rng, 1000, seeds, 60, *CASES[case])
    cov = coverages(d)
    print(f"\ncoverage {seeds} seeds, {case}: {cov}")  # the figures in docs/compare.md
    assert cov["two-level"] >= 0.93
    if case == "seeds dominate":  # the old test over examples ignores the seeds' noise
        assert cov["examples bootstrap"] < 0.8


@pytest.mark.parametrize("seeds", [3, 10])
@pytest.mark.parametrize("case", list(CASES))
def test_seed_share_recovers_the_true_share(seeds: int, case: str) -> None:
    sa, sb, se = CASES[case]
    n = 60
    truth = sa**2 / seeds / (sa**2 / seeds + sb**2 / n + se**2 / (seeds * n))
    rng = np.random.default_rng(7)
    _, ss_a, ss_b, ss_e = sums_of_squares(simulate(rng, 1000, seeds, n, sa, sb, se))
    c = components(ss_a, ss_b, ss_e, seeds, n)
    shares = c["seed_var"] / seeds / c["var"]  # paired_interval's seed_share, vectorised
    pooled = c["seed_var"].mean() / seeds / c["var"].mean()  # the components are (nearly) unbiased
    assert abs(pooled - truth) < 0.05
    if seeds >= 10:  # one study's share: with 3 seeds the seed component has 2 df, a rough estimate
        assert abs(np.median(shares) - truth) < 0.1


def test_one_seed_and_one_example_fall_back_to_t_intervals() -> None:
    from scipy import stats

    x = np.array([0.1, 0.4, -0.2, 0.5, 0.3])
    one_seed = paired_interval(x[None, :])
    ref = stats.ttest_1samp(x, 0.0)
    assert one_seed.p_value == pytest.approx(ref.pvalue) and one_seed.df == 4
    ci = ref.confidence_interval(0.95)
    assert (one_seed.low, one_seed.high) == pytest.approx((ci.low, ci.high))
    seeds = paired_interval(x)  # one value per seed
    assert seeds.p_value == pytest.approx(ref.pvalue) and seeds.seed_share == 1.0
    assert np.isnan(paired_interval(np.array([[0.2]])).low)


def test_clustered_standard_error_equals_statsmodels_cluster_robust_ols() -> None:
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 12, 80)  # unequal clusters (turns of 12 conversations)
    d = rng.normal(0.2, 1.0, 80) + rng.normal(0, 1, 12)[groups]
    fit = sm.OLS(d, np.ones((80, 1))).fit(cov_type="cluster", cov_kwds={"groups": groups})
    ours = paired_interval(d[None, :], clusters=list(groups))
    assert ours.se == pytest.approx(float(fit.bse[0]), rel=1e-10)
    assert ours.mean == pytest.approx(float(fit.params[0])) and ours.n_examples == 12 and ours.df == 11
    plain = paired_interval(d[None, :])
    assert plain.se < ours.se  # the shared cluster noise widens it
    # with seeds: the mean is unchanged, the units are the clusters
    two = paired_interval(np.stack([d, d + rng.normal(0, 0.1, 80)]), clusters=list(groups))
    assert two.n_examples == 12 and two.mean == pytest.approx(np.mean([d, d]) + 0, abs=0.05)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=30))
def test_holm_equals_statsmodels_and_is_monotone(p: list[float]) -> None:
    from statsmodels.stats.multitest import multipletests

    adjusted = holm(p)
    assert adjusted == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-12)
    assert all(a >= r - 1e-15 for a, r in zip(adjusted, p))
    order = np.argsort(p, kind="stable")
    assert all(np.diff(np.asarray(adjusted)[order]) >= -1e-15)


def test_holm_keeps_missing_p_values_out_of_the_family() -> None:
    adjusted = holm([0.01, None, 0.04])
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)


@pytest.mark.parametrize("direction", ["max", "min"])
def test_probability_of_improvement_equals_a_brute_force_count(direction: str) -> None:
    x, y = [0.5, 0.7, 0.7, 0.2], [0.7, 0.1, 0.4]
    wins = 0.0
    for a in x:
        for b in y:
            better = a > b if direction == "max" else a < b
            wins += 1.0 if better else 0.5 if a == b else 0.0
    pi = probability_of_improvement(x, y, direction=direction, n_bootstrap=500)
    assert pi.value == pytest.approx(wins / 12)
    assert 0.0 <= pi.low <= pi.value <= pi.high <= 1.0
    assert probability_of_improvement([1.0, 2.0], [0.0]).to_dict()["low"] == 1.0


def test_linearisation_of_a_mean_and_of_bleu() -> None:
    from losslab.eval.generation import sentence_statistics

    x = np.array([1.0, 0.0, 1.0, 1.0])
    values = linearize(np.stack([x, np.ones(4)], axis=1), lambda s: s[0] / s[1])
    assert values == pytest.approx(x)
    hyps = ["the cat sat on the mat", "a dog ran", "hello there friend", "it is raining today"]
    refs = ["the cat sat on a mat", "the dog ran away", "hello there my friend", "it rains today"]
    stats, score = sentence_statistics(hyps, refs, metric="bleu")
    per_example = linearize(stats, score)
    assert per_example.mean() == pytest.approx(score(stats.sum(axis=0)))  # the corpus BLEU


def test_planned_study_reaches_80_percent_power() -> None:
    """The planner's design (examples needed at 5 seeds for the effect), run 1,000 times on
    simulated data with the same components: the two-level test finds the effect 80 % +- 5 %."""
    from losslab.compare.planner import _examples_needed

    comps = {"seed_var": 0.02**2, "example_var": 1.0, "interaction_var": 1.0}
    effect, seeds = 0.25, 5
    n, planned, reached = _examples_needed(effect, comps, seeds, 50, 0.05)
    assert reached and planned >= 0.8 and 20 < n < 2000
    rng = np.random.default_rng(11)
    rejected = []
    for _ in range(4):  # 4 x 250 studies
        d = simulate(rng, 250, seeds, n, 0.02, 1.0, 1.0) - MU + effect
        grand, ss_a, ss_b, ss_e = sums_of_squares(d)
        rejected.append(
            generalized_interval(grand, ss_a, ss_b, ss_e, seeds, n, draws=pivot_draws(seeds, n, 2000))[2] < 0.05
        )
    power = float(np.mean(np.concatenate(rejected)))
    assert abs(power - 0.8) <= 0.05, power
    assert simulated_power(effect, *comps.values(), seeds, n) == pytest.approx(planned)


def test_a_plan_of_a_missing_or_unfinished_study_is_a_clear_error(tmp_path, capsys) -> None:
    import yaml

    from losslab.cli import main

    from ..conftest import train_config

    study = {
        "output_dir": str(tmp_path / "out"),
        "base": train_config(None, validation=True, loss=None),
        "variants": [{"name": "a"}, {"name": "b", "overrides": {"training.lr": 1e-3}}],
        "seeds": [0, 1],
        "metrics": [{"name": "validation/loss", "direction": "min"}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["compare", str(path), "--plan", "--effect", "2%"]) == 2
    err = capsys.readouterr().err
    assert "has not been run" in err and "Traceback" not in err
    (tmp_path / "out" / "runs").mkdir(parents=True)
    assert main(["compare", str(path), "--plan", "--effect", "0.1"]) == 2
    assert "not finished: 4 of 4 runs" in capsys.readouterr().err
    assert main(["compare", str(path), "--plan"]) == 2
    assert "--effect" in capsys.readouterr().err
    assert main(["compare", str(path), "--effect", "2%"]) == 2
    assert "only with --plan" in capsys.readouterr().err
