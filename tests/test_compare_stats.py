"""compare's statistics on hand-built curves: bootstrap intervals (checked against SciPy's),
evaluation-noise rows and the tolerant rule, the smoothed rule, the area under the curve and
the collapse flag."""

import json
import math
import statistics

import numpy as np
import pytest
import scipy.stats

from conftest import write_run
from dcgan_mn.runfolder import RunFolder
from dcgan_mn import compare as C

ITERS = [200, 400, 600, 800, 1000, 1200]


def make_run(root, name, values, seed=0, metric="cfd", count_key="mode_samples", seed_values=()):
    """A run folder whose metrics.jsonl holds ``values`` at ITERS; ``seed_values``: lists of
    extra scores per point, written to eval_seeds.jsonl as seeds 1, 2, ..."""
    rows = [
        {
            "iteration": it,
            metric: v,
            count_key: 1000,
            "sample_mode": "batch",
            "seed": 0,
            "train_seconds": it / 10,
        }
        for it, v in zip(ITERS, values)
    ]
    extra = [
        {"iteration": it, metric: v, count_key: 1000, "sample_mode": "batch", "seed": s}
        for it, point in zip(ITERS, seed_values)
        for s, v in enumerate(point, 1)
    ]
    return write_run(root, name, rows, {"seed": seed, "sample_mode": "batch"}, extra)


def arms(root, cand_values, base_values, **kw):
    cand = [
        C.read_run(make_run(root, f"mn-s{i}", v, seed=i), metric="cfd", **kw)
        for i, v in enumerate(cand_values)
    ]
    base = [
        C.read_run(make_run(root, f"bn-s{i}", v, seed=i), metric="cfd", **kw)
        for i, v in enumerate(base_values)
    ]
    return cand, base


BASE = [100.0, 70.0, 55.0, 50.0, 52.0, 51.0]


def test_bootstrap_interval_matches_scipy():
    x = np.random.default_rng(3).normal(10.0, 2.0, size=40)
    ours = C.bootstrap_interval(x, resamples=20_000)
    ref = scipy.stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=20_000,
        method="percentile",
        confidence_level=0.95,
        rng=np.random.default_rng(1),
    ).confidence_interval
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert ours[0] == pytest.approx(ref.low, abs=0.05 * se)
    assert ours[1] == pytest.approx(ref.high, abs=0.05 * se)
    # Unpaired: candidates and baselines resampled independently; mean over pairs = difference of means.
    c, b = np.random.default_rng(4).normal(0, 1, 30), np.random.default_rng(5).normal(1, 1, 25)
    ours = C.bootstrap_interval(c[:, None] - b[None, :], resamples=20_000)
    ref = scipy.stats.bootstrap(
        (c, b),
        lambda u, v, axis: u.mean(axis) - v.mean(axis),
        n_resamples=20_000,
        method="percentile",
        rng=np.random.default_rng(2),
    ).confidence_interval
    se = math.sqrt(c.var(ddof=1) / 30 + b.var(ddof=1) / 25)
    assert ours == pytest.approx([ref.low, ref.high], abs=0.05 * se)


def test_bootstrap_interval_edge_cases():
    assert C.bootstrap_interval([1.0]) is None  # one unit: no interval
    assert C.bootstrap_interval([2.0, 2.0, 2.0]) == [2.0, 2.0]
    # NaN left out
    assert C.bootstrap_interval([1.0, float("nan"), 3.0]) == pytest.approx([1.0, 3.0])
    assert C.bootstrap_interval([1.0, 3.0], seed=7) == C.bootstrap_interval([1.0, 3.0], seed=7)


def test_identical_arms_give_intervals_containing_zero(tmp_path):
    # The same five curves in both arms, paired differently: no arm is better.
    offsets = [-6.0, -3.0, 0.0, 3.0, 6.0]
    base_values = [[v + o for v in BASE] for o in offsets]
    cand_values = [base_values[i] for i in (2, 4, 1, 0, 3)]
    cand, base = arms(tmp_path, cand_values, base_values)
    s = C.compare_runs(cand, base)["summary"]
    for key in ("best", "final", "auc"):
        lo, hi = s["difference"][key]["ci"]
        assert lo < 0 < hi, key
        assert s["difference"][key]["mean"] == pytest.approx(0.0, abs=1e-9)
        # An interval containing 0 is no evidence of "no difference": the text says so.
        assert s["verdicts"][f"{key}_difference"].startswith(
            "not detected at this sample size (n = 5)"
        )
    # 2 of the 5 pairs never reach their baseline's best: they count against the candidate (the
    # old report averaged the 3 that did, 8.3% [0%, 25%]); the censored median is 0.
    acc = s["acceleration"]
    assert (acc["reached"], acc["pairs"], acc["mean"], acc["ci"], acc["median"]) == (
        3,
        5,
        None,
        None,
        0.0,
    )
    assert "the candidate is better" not in s["verdicts"]["acceleration"]
    assert "2 never reached the target, counted for the baseline" in s["verdicts"]["acceleration"]


def test_shifted_arm_gives_intervals_excluding_zero(tmp_path):
    # The candidate's curve is the baseline's one evaluation earlier and 10 lower, per seed.
    noise = [0.0, 1.5, -1.0, 2.0, -2.0]
    base_values = [[v + n for v in BASE] for n in noise]
    cand_values = [[v - 10 for v in b[1:]] + [b[-1] - 10] for b in base_values]
    cand, base = arms(tmp_path, cand_values, base_values)
    report = C.compare_runs(cand, base)
    s = report["summary"]
    assert report["pairing"] == "seed"
    for key in ("best", "final", "auc"):
        assert s["difference"][key]["ci"][1] < 0, key
        assert "excludes 0: the candidate is better" in s["verdicts"][f"{key}_difference"]
    assert s["acceleration"]["ci"][0] > 0 and s["pairs_reached"] == 5
    assert "excludes 0: the candidate is better" in s["verdicts"]["acceleration"]
    # Per pair by hand: baseline best 50 (+n) at 800; the candidate is below it from 200 on.
    assert [p["s_cand"] for p in report["pairs"]] == [400, 400, 400, 400, 400]
    assert [p["acceleration"] for p in report["pairs"]] == pytest.approx([0.5] * 5)
    # Evaluations 200 iterations apart: an S is only that fine, 200 / 800 of the acceleration.
    assert report["evaluation_interval"] == 200 and s["resolution"]["mean"] == pytest.approx(0.25)
    assert "only as fine as interval / S_base = 25.0%" in C.render_markdown(report)
    # Higher-is-better metric: the same numbers read the other way round.
    assert C.verdict({"mean": -1.0, "ci": [-2.0, -0.5]}, True, [-1.0] * 5).endswith("worse")


@pytest.mark.parametrize(
    "values, phrase",
    [
        ([0.2, 0.3, 0.1], "3 of 3 pairs favour the candidate (sign test p = 0.25): too few seeds"),
        ([-0.2, 0.3, -0.1], "2 of 3 pairs favour the baseline (sign test p = 1.00)"),
        ([0.2, -0.2], "not detected at this sample size (n = 2): 1 pair favours each arm"),
        ([0.2, 0.0, 0.4], "2 of 3 pairs favour the candidate, 1 tied (sign test p = 0.50)"),
        ([0.1, 0.2, 0.3, 0.2, 0.1], "the interval excludes 0: the candidate is better"),
        ([0.4], "a single pair or run: no interval"),
    ],
)
def test_verdicts_do_not_overclaim_with_few_seeds(values, phrase):
    """Three seeds make a percentile interval equal to [min, max] (~75% coverage): below five
    units the verdict counts signs instead of claiming 95%."""
    stat = C.summarize(values)
    assert phrase in C.verdict(stat, True, values)
    if len(values) == 3:
        assert stat["ci"] == pytest.approx([min(values), max(values)])  # the range, exactly


def test_unpaired_runs_resample_each_arm(tmp_path):
    cand, base = arms(
        tmp_path, [[v - 10 for v in BASE]] * 2, [BASE, [v + 1 for v in BASE], [v - 1 for v in BASE]]
    )
    cand[1].seed = 7  # seeds no longer match: every candidate against every baseline
    report = C.compare_runs(cand, base)
    assert report["pairing"] == "all" and len(report["pairs"]) == 6
    assert report["statistics"]["bootstrap"]["unit"] == "run, resampled within each arm"
    d = report["summary"]["difference"]["best"]
    assert d["mean"] == pytest.approx(-10.0) and d["ci"][1] < 0


def test_evaluation_noise_points_and_tolerant_rule(tmp_path):
    # Baseline best 50 at 800; candidate reaches 51 at 400, 49 only at 1000. Three seeds per point.
    base_pts = [[v, v + 1, v - 1] for v in BASE]  # mean = v, std 1
    cand_mean = [90.0, 51.0, 60.0, 55.0, 49.0, 48.0]
    cand_pts = [[v, v + 2, v - 2] for v in cand_mean]  # std 2
    base = [
        C.read_run(
            make_run(
                tmp_path, "bn", [p[0] for p in base_pts], seed_values=[p[1:] for p in base_pts]
            ),
            metric="cfd",
            eval_seeds=3,
        )
    ]
    cand = [
        C.read_run(
            make_run(
                tmp_path, "mn", [p[0] for p in cand_pts], seed_values=[p[1:] for p in cand_pts]
            ),
            metric="cfd",
            eval_seeds=3,
        )
    ]
    assert cand[0].values == pytest.approx(cand_mean) and cand[0].spread == pytest.approx([2.0] * 6)
    report = C.compare_runs(cand, base)
    noise = report["evaluation_noise"]
    assert noise["eval_seeds"] == 3 and noise["points"] == 12
    assert noise["sigma"] == pytest.approx(math.sqrt((6 * 1 + 6 * 4) / 12))
    p = report["pairs"][0]
    assert (p["s_base"], p["s_cand"], p["acceleration"]) == (800, 1000, pytest.approx(-0.25))
    # Tolerant: within sigma_eval (1.58) of the target 50, the baseline first at 800 (still its
    # best) and the candidate already at 400 (51.0).
    assert (p["s_base_tolerant"], p["s_cand_tolerant"]) == (800, 400)
    assert p["acceleration_tolerant"] == pytest.approx(0.5)
    assert report["curves"]["candidate"][0]["spread"] == pytest.approx([2.0] * 6)
    md = C.render_markdown(report)
    assert "sigma_eval = 1.58" in md and "within sigma_eval of the target" in md
    # Without noise rows: no tolerant rule.
    plain = C.compare_runs(
        [C.read_run(tmp_path / "mn", metric="cfd")], [C.read_run(tmp_path / "bn", metric="cfd")]
    )
    assert plain["evaluation_noise"] is None and plain["pairs"][0]["acceleration_tolerant"] is None


def test_running_median_smoothed_rule_and_area(tmp_path):
    assert C.running_median([5, 1, 9, 2, 8]) == [3.0, 5.0, 2.0, 8.0, 5.0]
    # One lucky dip (40 at 400) decides the raw rule; the smoothed curve ignores it.
    base = C.read_run(make_run(tmp_path, "bn", [100, 80, 60, 50, 50, 50]), metric="cfd")
    cand = C.read_run(make_run(tmp_path, "mn", [100, 40, 90, 70, 55, 48]), metric="cfd")
    p = C.compare_runs([cand], [base])["pairs"][0]
    assert (p["s_base"], p["s_cand"], p["acceleration"]) == (800, 400, pytest.approx(0.5))
    assert C.running_median(cand.values) == [70.0, 90.0, 70.0, 70.0, 55.0, 51.5]
    # smoothed baseline best 50 at 800; smoothed candidate never below 51.5
    assert (p["s_base_smoothed"], p["s_cand_smoothed"], p["acceleration_smoothed"]) == (
        800,
        None,
        None,
    )
    # Area: the mean value over [200, 1200] by trapezoids, against numpy's trapezoid rule.
    expect = np.trapezoid(base.values, ITERS) / 1000
    assert C.area_under_curve(base, 200, 1200) == pytest.approx(expect)
    assert C.area_under_curve(base, 300, 300) == pytest.approx(90.0)  # interpolated
    assert C.area_under_curve(base, 100, 1200) is None  # outside the curve


def test_common_auc_range(tmp_path):
    short = C.read_run(make_run(tmp_path, "short", [100, 80, 60]), metric="cfd")  # 200..600
    long = C.read_run(make_run(tmp_path, "long", BASE), metric="cfd")
    report = C.compare_runs([short], [long])
    assert report["statistics"]["auc_range"] == [200, 600]
    assert report["runs"]["baseline"][0]["auc"] == pytest.approx(
        np.trapezoid(BASE[:3], ITERS[:3]) / 400
    )


@pytest.mark.parametrize(
    "values, direction, worst, at, collapsed",
    [
        ([80, 49, 60, 137, 90, 70], "min", 137, 800, True),  # FID 49 -> 137: a collapse
        ([80, 49, 60, 70, 55, 52], "min", 70, 800, False),  # a rebound of 43%: not flagged
        ([100, 900, 800, 400, 600, 650], "max", 400, 800, True),  # modes fall by more than half
        ([100, 900, 800, 700, 850, 880], "max", 700, 800, False),
        ([80, 70, 60, 50, 40, 30], "min", None, None, False),  # best at the end: nothing after it
    ],
)
def test_collapse_flag(tmp_path, values, direction, worst, at, collapsed):
    metric = "modes" if direction == "max" else "cfd"
    curve = C.read_run(make_run(tmp_path, "r", values, metric=metric), metric=metric)
    assert curve.direction == direction
    rb = curve.rebound()
    assert (rb["worst_after"], rb["worst_after_iteration"], rb["collapsed"]) == (
        worst,
        at,
        collapsed,
    )
    report = C.compare_runs([curve], [curve])
    assert report["summary"]["baseline"]["collapsed"] == int(collapsed)
    assert ("**yes**" in C.render_markdown(report)) == collapsed


def test_report_is_reproducible_and_states_its_rule(tmp_path):
    cand, base = arms(
        tmp_path, [[v - 5 for v in BASE], [v - 1 for v in BASE]], [BASE, [v + 2 for v in BASE]]
    )
    a, b = C.compare_runs(cand, base), C.compare_runs(cand, base)
    assert json.dumps(a) == json.dumps(b)  # fixed bootstrap seed
    md = C.render_markdown(a)
    assert (
        "95% percentile bootstrap interval, 10000 resamples, unit: seed-paired pair of runs" in md
    )
    assert "running median of 3" in md and "AUC 200-1200" in md
    assert statistics.fmean([-5.0, -3.0]) == a["summary"]["difference"]["best"]["mean"]


def test_warns_when_numbers_come_from_different_environments(tmp_path):
    from dcgan_mn.provenance import env_key

    def with_env(run, env, protocol="pytorch-fid"):
        key = env_key(env)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text(
            "".join(
                json.dumps({**r, "env_key": key, "fid_protocol": protocol}) + "\n" for r in rows
            )
        )
        (run / RunFolder.PROVENANCE).write_text(
            json.dumps({"env_key": key, "first_iteration": 0, "environment": env}) + "\n"
        )

    env = {"torch": "2.14.1", "numpy": "2.4.6", "cpu_capability": "AVX512", "device": "cpu"}
    fid = dict(metric="fid", count_key="num_samples")
    a, b = make_run(tmp_path, "a", BASE, **fid), make_run(tmp_path, "b", BASE, seed=1, **fid)
    with_env(a, env)
    with_env(b, env)
    assert (
        C.compare_runs([C.read_run(a, metric="fid")], [C.read_run(b, metric="fid")])["warnings"]
        == []
    )
    with_env(b, {**env, "torch": "2.13.0", "cpu_capability": "AVX2"}, protocol="clean")
    report = C.compare_runs([C.read_run(a, metric="fid")], [C.read_run(b, metric="fid")])
    assert report["warnings"] == [
        "the rows mix FID protocols ['clean', 'pytorch-fid']: their numbers are not comparable",
        "the rows were computed in environments that differ in cpu_capability (AVX2, AVX512); torch (2.13.0, 2.14.1)",
    ]
    assert "**Warning:** the rows mix FID protocols" in C.render_markdown(report)
    # A mode metric does not depend on the FID protocol, nor on the Inception weights.
    c, d = make_run(tmp_path, "c", BASE), make_run(tmp_path, "d", BASE, seed=1)
    with_env(c, env)
    with_env(d, env, protocol="clean")
    for run, sha in ((c, "aa"), (d, "bb")):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text(
            "".join(
                json.dumps({**r, "weights_sha256": sha * 32, "classifier_sha256": "cc" * 32}) + "\n"
                for r in rows
            )
        )
    assert (
        C.compare_runs([C.read_run(c, metric="cfd")], [C.read_run(d, metric="cfd")])["warnings"]
        == []
    )
