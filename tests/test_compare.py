"""Acceleration and the compare report on synthetic run folders (metrics.jsonl + config.json)."""

import json
import statistics

import pytest

from conftest import write_run
from dcgan_mn import compare as C

ITERS = [1000, 2000, 3000, 4000, 5000]


def make_run(root, name, fids, seed=0, seconds=None, extra_rows=(), sample_mode="batch", n=10_000):
    seconds = seconds or [10.0 * (i + 1) for i in range(len(fids))]
    rows = [
        {
            "iteration": it,
            "images_seen": 64 * it,
            "fid": f,
            "num_samples": n,
            "sample_mode": sample_mode,
            "train_seconds": t,
        }
        for it, f, t in zip(ITERS, fids, seconds)
    ]
    rows += list(extra_rows)
    return write_run(root, name, rows, {"seed": seed, "sample_mode": sample_mode})


@pytest.fixture
def arms(tmp_path):
    base = [
        make_run(tmp_path, "bn-s0", [80, 60, 50, 45, 47], seed=0),  # best 45 @ 4000, 40 s
        make_run(tmp_path, "bn-s1", [90, 70, 55, 50, 48], seed=1),  # best 48 @ 5000, 50 s
    ]
    cand = [
        make_run(tmp_path, "mn-s0", [70, 50, 44, 40, 38], seed=0, seconds=[12, 24, 36, 48, 60]),
        make_run(tmp_path, "mn-s1", [85, 60, 48, 46, 45], seed=1, seconds=[12, 24, 36, 48, 60]),
    ]
    return cand, base


def test_acceleration_single_pair_by_hand(arms):
    cand, base = arms
    p = C.acceleration(C.read_run(cand[0]), C.read_run(base[0]))
    assert (p["target"], p["s_base"], p["s_cand"]) == (45, 4000, 3000)
    assert p["acceleration"] == pytest.approx(0.25)  # 1 - 3000 / 4000
    assert p["time_acceleration"] == pytest.approx(0.1)  # 1 - 36 s / 40 s


def test_seed_pairing_mean_and_std(arms):
    cand, base = arms
    report = C.compare_runs([C.read_run(r) for r in cand], [C.read_run(r) for r in base])
    assert report["pairing"] == "seed"
    assert [(p["candidate"], p["baseline"]) for p in report["pairs"]] == [
        ("mn-s0", "bn-s0"),
        ("mn-s1", "bn-s1"),
    ]
    acc = report["summary"]["acceleration"]
    assert acc["mean"] == pytest.approx(0.325)  # mean of 0.25 and 1 - 3000 / 5000
    assert acc["std"] == pytest.approx(statistics.stdev([0.25, 0.4]))
    assert report["summary"]["baseline"]["best"]["mean"] == pytest.approx(46.5)
    assert report["summary"]["candidate"]["final"]["mean"] == pytest.approx(41.5)
    assert report["summary"]["pairs_reached"] == 2


def test_all_pairs_when_seeds_differ_and_not_reached(tmp_path):
    base = [C.read_run(make_run(tmp_path, "bn", [80, 60, 50, 45, 47], seed=0))]
    cand = [
        C.read_run(make_run(tmp_path, "mn-a", [70, 50, 44, 40, 38], seed=5)),
        C.read_run(make_run(tmp_path, "mn-b", [90, 80, 70, 60, 50], seed=6)),
    ]
    report = C.compare_runs(cand, base)
    assert report["pairing"] == "all" and len(report["pairs"]) == 2
    missed = report["pairs"][1]
    assert not missed["reached"] and missed["acceleration"] is None and missed["s_cand"] is None
    s = report["summary"]
    assert (s["pairs_reached"], s["pairs"]) == (1, 2)
    # The pair that never reached counts against the candidate: no mean over the one that did,
    # the median over both (not reached = -inf) is "not reached".
    acc = s["acceleration"]
    assert (acc["mean"], acc["reached"], acc["pairs"], acc["median"], acc["median_reached"]) == (
        None,
        1,
        2,
        None,
        False,
    )
    assert "not reached" in C.render_markdown(report)


def test_curve_reading_rules(tmp_path):
    # a resumed run re-evaluated iteration 3000 (the last row wins); other modes and counts and
    # rows without a FID are ignored; a truncated last line is skipped
    extra = [
        {
            "iteration": 3000,
            "fid": 41.0,
            "num_samples": 10_000,
            "sample_mode": "batch",
            "train_seconds": 31,
        },
        {"iteration": 6000, "fid": 1.0, "num_samples": 10_000, "sample_mode": "running"},
        {"iteration": 7000, "loss_d": 0.3},
    ]
    run = make_run(tmp_path, "r", [80, 60, 50, 45, 47], extra_rows=extra)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 80')
    curve = C.read_run(run)
    assert curve.iterations == ITERS and curve.values == [80, 60, 41.0, 45, 47]
    assert (curve.best, curve.best_iteration, curve.sample_mode) == (41.0, 3000, "batch")
    assert C.read_run(run, sample_mode="running").values == [1.0]


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CompareError, match="no metrics.jsonl"):
        C.read_run(tmp_path / "empty")
    with pytest.raises(C.CompareError, match="not a folder"):
        C.read_run(tmp_path / "missing")
    (tmp_path / "nofid").mkdir()
    (tmp_path / "nofid" / "metrics.jsonl").write_text('{"iteration": 1, "loss_d": 0.1}\n')
    with pytest.raises(C.CompareError, match="no 'fid' values"):
        C.read_run(tmp_path / "nofid")
    mixed = make_run(
        tmp_path,
        "mixed",
        [1, 2, 3, 4, 5],
        extra_rows=[{"iteration": 1, "fid": 3.0, "num_samples": 50_000, "sample_mode": "batch"}],
    )
    with pytest.raises(C.CompareError, match="mixes sample counts .*--samples"):
        C.read_run(mixed)
    a = C.read_run(make_run(tmp_path, "a", [1, 2, 3, 4, 5], n=10_000))
    b = C.read_run(make_run(tmp_path, "b", [1, 2, 3, 4, 5], n=5_000))
    with pytest.raises(C.CompareError, match="not comparable"):
        C.compare_runs([a], [b])


def test_outputs_markdown_json_png(arms, tmp_path):
    cand, base = arms
    report = C.compare_runs(
        [C.read_run(r) for r in cand],
        [C.read_run(r) for r in base],
        candidate_label="MN",
        baseline_label="BN",
    )
    paths = C.write_outputs(report, tmp_path / "out")
    md = (tmp_path / "out" / "compare.md").read_text()
    # Two units: the bracket is their range, and says so (it was presented as a 95% interval).
    assert "32.5% ± 10.6% [25.0%, 40.0%] (range of 2)" in md
    assert "| BN | 2 | 46.50 ± 2.12 [45.00, 48.00] (range of 2) |" in md
    back = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert back["summary"]["acceleration"]["mean"] == pytest.approx(0.325)
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "compare.json",
        "compare.md",
        "compare.png",
    ]
    assert set(paths) == {"markdown", "json", "plot"}


def test_one_arm_compares_one_metric(tmp_path):
    rows = [
        {"iteration": i, "cfd": 9.0 - i, "cfd_ema": 8.0 - i, "mode_samples": 10} for i in (1, 2)
    ]
    for name in ("a", "b"):
        write_run(tmp_path, name, rows)
    a, b = C.read_run(tmp_path / "a", metric="cfd"), C.read_run(tmp_path / "b", metric="cfd_ema")
    with pytest.raises(C.CompareError, match="one arm compares one metric"):
        C.compare_runs([a, b], [a])
    with pytest.raises(C.CompareError, match="only a metric and its G_ema twin"):
        C.check_metrics("cfd", "modes_ema")
    C.check_metrics("cfd", "cfd_ema")  # either way round
    C.check_metrics("cfd_ema", "cfd")
