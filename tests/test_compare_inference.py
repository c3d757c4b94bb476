"""compare's inference on few seeds: censored pairs (never reached) count against the candidate,
runs still improving are flagged, exact permutation tests (checked against a by-hand enumeration
of every sign flip), intervals labelled by what they are, and the report's other small claims."""

import itertools
import math
import statistics

import numpy as np
import pytest

from conftest import write_run
from dcgan_mn import compare as C

ITERS = [200, 400, 600, 800, 1000, 1200]
BASE = [100.0, 70.0, 55.0, 50.0, 52.0, 51.0]  # best 50 at 800


def make_run(
    root, name, values, seed=0, iters=ITERS, extra_row=None, config_extra=None, env_key=None
):
    cfg = {"seed": seed, "sample_mode": "batch"}
    if config_extra:
        cfg["extra"] = config_extra
    rows = []
    for k, (it, v) in enumerate(zip(iters, values)):
        row = {
            "iteration": it,
            "cfd": v,
            "mode_samples": 1000,
            "sample_mode": "batch",
            "seed": 0,
            "train_seconds": it / 10,
        }
        if env_key:
            row["env_key"] = env_key
        if extra_row:
            row.update(extra_row(k, it))
        rows.append(row)
    return write_run(root, name, rows, cfg)


def read(root, name, values, **kw):
    return C.read_run(make_run(root, name, values, **kw), metric="cfd")


def flips_p(values, statistic):
    """Two-sided p by hand: the share of all 2^n sign flips whose |statistic| >= the observed."""
    x = np.asarray(values, dtype=float)
    observed = abs(statistic(x))
    hits = sum(
        abs(statistic(x * np.asarray(s))) >= observed * (1 - 1e-12)
        for s in itertools.product([1, -1], repeat=len(x))
    )
    return hits / 2 ** len(x)


# ---- 1. a pair that never reaches the target counts against the candidate ----------------------


def test_never_reached_pair_counts_against_the_candidate(tmp_path):
    # Pairs 0 and 1 reach the baseline's best at 400 (acceleration 0.5); pair 2 never does.
    cand = [
        read(tmp_path, f"mn-s{i}", v, seed=i)
        for i, v in enumerate(
            [[60, 45, 45, 45, 45, 45], [60, 48, 47, 46, 46, 46], [90, 80, 70, 65, 60, 58]]
        )
    ]
    base = [read(tmp_path, f"bn-s{i}", BASE, seed=i) for i in range(3)]
    report = C.compare_runs(cand, base, candidate_label="MN", baseline_label="BN")
    acc = report["summary"]["acceleration"]
    # Not the mean over the two pairs that reached (50%): reached 2 of 3, median 50%.
    assert (acc["reached"], acc["pairs"], acc["mean"], acc["ci"]) == (2, 3, None, None)
    assert acc["median"] == pytest.approx(0.5) and acc["median_reached"]
    assert acc["reached_by"][:2] == [[200, 0.0], [400, pytest.approx(2 / 3)]] and acc["reached_by"][
        -1
    ][1] == pytest.approx(2 / 3)
    verdict = report["summary"]["verdicts"]["acceleration"]
    assert (
        "2 of 3 pairs favour the candidate; 1 never reached the target, counted for the baseline"
        in verdict
    )
    md = C.render_markdown(report)
    assert "Reached 2 of 3" in md
    assert "The pair mn-s2/bn-s2 never reached BN's best within 1,200 iterations." in md
    assert "median 50.0% (not reached counted as -inf)" in md
    # The permutation test ranks the not-reached pair as the most extreme one for the baseline.
    p = report["statistics"]["permutation"]["tests"]["acceleration"]
    assert p["statistic"] == "signed_rank"
    assert p["p"] == pytest.approx(flips_p([0.5, 0.5, -1e9], C.signed_rank))
    # Two of three never reached: the median is "not reached".
    cand[1] = read(tmp_path, "mn-late", [90, 80, 70, 65, 60, 58], seed=1)
    s = C.compare_runs(cand, base)["summary"]
    assert (
        s["acceleration"]["reached"],
        s["acceleration"]["median"],
        s["acceleration"]["median_reached"],
    ) == (1, None, False)
    assert "2 of 3 pairs favour the baseline" in s["verdicts"]["acceleration"]


def test_sign_and_permutation_tests_count_not_reached_for_the_baseline():
    stat = {"mean": None, "ci": None}
    assert C.verdict(stat, True, [-math.inf, -math.inf, -math.inf]).startswith(
        "3 of 3 pairs favour the baseline; 3 never reached the target"
    )
    res = C.paired_permutation_p([-0.1, -0.2, -math.inf], statistic="signed_rank")
    assert res["p"] == pytest.approx(0.25) and res["exact"]  # all three for the baseline: 2/2^3


# ---- 2. still improving ------------------------------------------------------------------------


def test_run_still_improving_is_flagged(tmp_path):
    base = [read(tmp_path, "bn", [100, 80, 70, 60, 55, 50])]  # best at its last evaluation
    cand = [read(tmp_path, "mn", [90, 60, 49, 52, 53, 54])]
    report = C.compare_runs(cand, base, baseline_label="BN")
    assert (
        report["runs"]["baseline"][0]["still_improving"]
        and not report["runs"]["candidate"][0]["still_improving"]
    )
    assert report["summary"]["baseline"]["still_improving"] == 1
    assert report["pairs"][0]["target_is_bound"]
    md = C.render_markdown(report)
    assert (
        "**Still improving:** bn is at its best at the last evaluation" in md
        and "Run longer." in md
    )
    assert "50.00 (bound: BN still improving)" in md and "**yes: run longer**" in md


# ---- 3. exact permutation tests, labelled intervals --------------------------------------------


@pytest.mark.parametrize("n", [3, 6])
def test_permutation_p_equals_enumeration_of_all_sign_flips(tmp_path, n):
    shifts = [-4.0, -1.5, 2.0, -3.0, -0.5, 1.0][:n]
    base = [read(tmp_path, f"bn-s{i}", [v + i for v in BASE], seed=i) for i in range(n)]
    cand = [
        read(
            tmp_path,
            f"mn-s{i}",
            [v + i + shifts[i] * (k + 1) / 6 for k, v in enumerate(BASE)],
            seed=i,
        )
        for i in range(n)
    ]
    report = C.compare_runs(cand, base)
    tests = report["statistics"]["permutation"]["tests"]
    for key in ("best", "final", "auc"):
        diffs = [p[f"{key}_difference"] for p in report["pairs"]]
        assert tests[f"{key}_difference"]["p"] == pytest.approx(flips_p(diffs, np.mean)), key
        assert tests[f"{key}_difference"]["exact"] and tests[f"{key}_difference"][
            "smallest_p"
        ] == pytest.approx(2 / 2**n)
    accs = [p["acceleration"] if p["reached"] else -1e9 for p in report["pairs"]]
    assert tests["acceleration"]["p"] == pytest.approx(flips_p(accs, C.signed_rank))
    ci_label = report["summary"]["difference"]["best"]["ci_label"]
    assert ci_label == ("range of 3" if n == 3 else "95%")
    if n == 3:
        d = [p["best_difference"] for p in report["pairs"]]
        assert report["summary"]["difference"]["best"]["ci"] == pytest.approx([min(d), max(d)])
        assert "(range of 3)" in C.render_markdown(report)
    assert "Permutation tests: sign flips of the seed-paired differences" in C.render_markdown(
        report
    )


def test_unpaired_runs_use_independent_permutations(tmp_path):
    base = [
        read(tmp_path, f"bn-s{i}", [v + o for v in BASE], seed=i)
        for i, o in enumerate([0.0, 2.0, -1.0])
    ]
    cand = [
        read(tmp_path, f"mn-s{i}", [v - o for v in BASE], seed=10 + i)
        for i, o in enumerate([5.0, 1.0])
    ]
    report = C.compare_runs(cand, base)
    assert report["pairing"] == "all"
    t = report["statistics"]["permutation"]["tests"]["best_difference"]
    assert t["permutation_type"] == "independent" and t["exact"]
    assert "Permutation tests: relabellings of the runs between the two arms" in C.render_markdown(
        report
    )
    # By hand over all C(5, 2) relabellings; the null of unequal arms is not symmetric, so the
    # two-sided p is scipy's: twice the smaller tail.
    bests = np.array([r.best for r in [*cand, *base]])
    observed = bests[:2].mean() - bests[2:].mean()
    null = [
        bests[list(c)].mean() - np.delete(bests, list(c)).mean()
        for c in itertools.combinations(range(5), 2)
    ]
    upper = sum(v >= observed - 1e-12 for v in null) / len(null)
    lower = sum(v <= observed + 1e-12 for v in null) / len(null)
    assert t["p"] == pytest.approx(min(1.0, 2 * min(upper, lower)))


# ---- 4. small defects -------------------------------------------------------------------------


def test_per_arm_rows_are_labelled_by_run(tmp_path):
    cand = [read(tmp_path, f"mn-s{i}", [v - 3 for v in BASE], seed=i) for i in range(2)]
    base = [read(tmp_path, f"bn-s{i}", BASE, seed=i) for i in range(2)]
    md = C.render_markdown(C.compare_runs(cand, base))
    assert (
        "Per-arm rows: mean ± std over runs [95% percentile bootstrap interval, 10000 resamples, unit: run]"
        in md
    )


def test_all_pairs_units_use_every_candidate(tmp_path):
    # Unpaired: candidate a far better than both baselines, candidate b far worse. The old units
    # were the first candidate's two pairs ("2 of 2 favour the candidate").
    base = [read(tmp_path, f"bn-{i}", [v + i for v in BASE], seed=i) for i in range(2)]
    cand = [
        read(tmp_path, "mn-a", [v - 20 for v in BASE], seed=7),
        read(tmp_path, "mn-b", [v + 20 for v in BASE], seed=8),
    ]
    report = C.compare_runs(cand, base)
    assert report["pairing"] == "all"
    assert report["summary"]["verdicts"]["best_difference"].startswith(
        "not detected at this sample size (n = 2): 1 candidate run favours each arm"
    )


def test_final_difference_at_the_common_last_iteration_and_ended_sooner(tmp_path):
    base = [read(tmp_path, "bn", BASE)]
    # stops at 800, never reaches 50
    cand = [read(tmp_path, "mn", [90, 80, 70, 60], iters=ITERS[:4])]
    report = C.compare_runs(cand, base, baseline_label="BN")
    p = report["pairs"][0]
    assert p["final_difference_iteration"] == 800
    assert p["final_difference"] == pytest.approx(60 - 50)  # not 60 - 51 (the baseline at 1200)
    md = C.render_markdown(report)
    assert "not reached (ended at 800)" in md
    assert "its curve ended at 800 (BN ran to 1,200)" in md and "final (at 800)" in md


def test_rows_without_provenance_warn(tmp_path):
    a = read(tmp_path, "a", BASE, env_key="abc")
    b = read(tmp_path, "b", BASE, seed=1)
    warnings = C.compare_runs([a], [b])["warnings"]
    assert (
        "run b has rows without provenance (no env_key: which library versions, device and "
        "weights computed them is unknown)" in warnings
    )
    assert not any("run a " in w for w in warnings)


def test_time_figure_from_a_loaded_machine_or_other_devices_warns(tmp_path):
    loaded = lambda k, it: {"load_per_core": 1.6 if it == 400 else 0.5}
    quiet = lambda k, it: {"load_per_core": 0.4}
    base = [read(tmp_path, "bn", BASE, extra_row=quiet, config_extra={"device": "cpu"})]
    cand = [
        read(
            tmp_path,
            "mn",
            [90, 49, 60, 55, 52, 51],
            extra_row=loaded,
            config_extra={"device": "cpu"},
        )
    ]
    w = C.compare_runs(cand, base)["warnings"]
    assert any(
        x.startswith(
            "the time figure is not comparable: training seconds it uses come from a "
            "loaded machine (load per core > 1.25): mn (load per core up to 1.60)"
        )
        for x in w
    )
    # A loaded row after S_cand (400) is not used by the time figure; a missing key is unknown.
    late = lambda k, it: {"load_per_core": 1.6} if it > 400 else {}
    cand = [
        read(
            tmp_path,
            "mn-late",
            [90, 49, 60, 55, 52, 51],
            extra_row=late,
            config_extra={"device": "cpu"},
        )
    ]
    assert not any("time figure" in x for x in C.compare_runs(cand, base)["warnings"])
    gpu = [read(tmp_path, "mn-gpu", [90, 49, 60, 55, 52, 51], config_extra={"device": "cuda:0"})]
    w = C.compare_runs(gpu, base)["warnings"]
    assert (
        "the time figure is not comparable: the runs were trained on different devices (cpu: bn; cuda:0: mn-gpu)"
        in w
    )


def test_plot_labels_inside_the_figure(tmp_path):
    cand = [read(tmp_path, "mn", [v - 3 for v in BASE])]
    base = [read(tmp_path, "bn", BASE)]
    fig = C.curve_figure(C.compare_runs(cand, base))
    fig.canvas.draw()
    box = fig.bbox
    for text in (fig.axes[0].yaxis.label, fig.axes[0].xaxis.label, fig.axes[0].title):
        ext = text.get_window_extent()
        assert box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1, (
            text.get_text()
        )


# ---- 5./6. wording, reading guide, seed counts -------------------------------------------------


def test_interval_containing_zero_is_not_detected_and_guide_and_seed_table(tmp_path):
    noise = [0.0, 1.5, -1.0, 2.0, -2.0]
    base = [read(tmp_path, f"bn-s{i}", [v + n for v in BASE], seed=i) for i, n in enumerate(noise)]
    cand = [
        read(tmp_path, f"mn-s{i}", [v + n + (0.5 if i % 2 else -0.6) for v in BASE], seed=i)
        for i, n in enumerate(noise)
    ]
    report = C.compare_runs(cand, base)
    md = C.render_markdown(report)
    assert "not detected at this sample size (n = 5)" in md
    assert "does not differ" not in md and "within noise" not in md
    assert "### Reading this report" in md and "2/2^n" in md and "range of n" in md
    diffs = [p["best_difference"] for p in report["pairs"]]
    sd, delta = statistics.stdev(diffs), statistics.fmean(diffs)
    z = 1.959963984540054 + 0.8416212335729143
    row = report["statistics"]["seeds_needed"][0]
    assert row["quantity"] == "best" and row["sigma"] == pytest.approx(sd)
    assert row["seeds_for_observed"] == math.ceil((z * sd / abs(delta)) ** 2)
    assert f"| best | {sd:.3f} | {delta:.3f} | {row['seeds_for_observed']} |" in md


def test_docs_carry_the_reading_guide():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "comparing.md").read_text()
    for phrase in (
        "reached k of n",
        "still improving",
        "range of n",
        "permutation p",
        "2/2^n",
        "not detected at this sample size",
        "((z_0.975 + z_0.8) sigma / delta)^2",
    ):
        assert phrase in doc, phrase
