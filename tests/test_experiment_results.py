"""The committed experiments' README tables are what ``evaluate.py compare`` says when it is run
again on the committed small files (no retraining): the results cannot drift from the data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "_results_table", ROOT / "experiments" / "results_table.py"
)
results_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_table)

EXPERIMENTS = sorted(
    p.parent
    for p in (ROOT / "experiments").glob("*/README.md")
    if results_table.BEGIN in p.read_text()
)


AVERAGING = sorted(
    p.parent
    for p in (ROOT / "experiments").glob("*/README.md")
    if results_table.AVERAGING_BEGIN in p.read_text()
)


PER_ARM = sorted(
    p.parent
    for p in (ROOT / "experiments").glob("*/README.md")
    if results_table.PER_ARM_BEGIN in p.read_text()
)


def test_every_results_experiment_is_found():
    # A README whose markers were mistyped would drop out of the checks below silently.
    names = {p.name for p in EXPERIMENTS}
    assert {
        "stacked-digits",
        "stacked-digits-weak-d",
        "stacked-digits-6seeds",
        "stacked-digits-ema",
    } <= names, names
    assert {"stacked-digits-norms"} <= {p.name for p in PER_ARM}, PER_ARM
    assert {"stacked-digits-ema"} <= {p.name for p in AVERAGING}, AVERAGING


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=lambda p: p.name)
def test_readme_table_is_what_compare_says_on_the_committed_runs(folder, tmp_path):
    cli = load_script("evaluate.py", "cli")
    from click.testing import CliRunner

    cand = sorted(str(p) for p in folder.glob("mn-s*") if p.is_dir())
    base = sorted(str(p) for p in folder.glob("bn-s*") if p.is_dir())
    assert len(cand) == len(base) >= 3
    for metric in results_table.compared_metrics(folder):
        res = CliRunner().invoke(
            cli,
            [
                "compare",
                *cand,
                *[x for b in base for x in ("--baseline", b)],
                "--metric",
                metric,
                *"--eval-seeds 3 --label mn --baseline-label bn --out".split(),
                str(tmp_path / "compare" / metric),
                "--device",
                "cpu",
            ],
        )
        assert res.exit_code == 0, res.output
    table = results_table.results_table(folder, tmp_path / "compare")
    readme = (folder / "README.md").read_text()
    assert results_table.block(readme) == table


@pytest.mark.parametrize("folder", AVERAGING, ids=lambda p: p.name)
def test_readme_averaging_table_is_what_compare_says_on_the_committed_runs(folder, tmp_path):
    # Each arm's G_ema against its own G (--baseline-metric), run again on the committed files.
    from dcgan_mn.sweep.report import averaging_dir

    cli = load_script("evaluate.py", "cli")
    from click.testing import CliRunner

    pairs = results_table.averaged_pairs(folder)
    assert {arm for arm, _ in pairs} == {"bn", "mn"} and len(pairs) >= 2
    for arm, metric in pairs:
        runs = sorted(str(p) for p in folder.glob(f"{arm}-s*") if p.is_dir())
        res = CliRunner().invoke(
            cli,
            [
                "compare",
                *runs,
                *[x for r in runs for x in ("--baseline", r)],
                *["--metric", f"{metric}_ema", "--baseline-metric", metric],
                *["--eval-seeds", "3", "--label", f"{arm} G_ema", "--baseline-label", f"{arm} G"],
                *["--out", str(tmp_path / "compare" / averaging_dir(arm, metric))],
                *["--device", "cpu"],
            ],
        )
        assert res.exit_code == 0, res.output
    table = results_table.averaging_table(folder, tmp_path / "compare")
    readme = (folder / "README.md").read_text()
    assert (
        results_table.block(readme, results_table.AVERAGING_BEGIN, results_table.AVERAGING_END)
        == table
    )


@pytest.mark.parametrize("folder", PER_ARM, ids=lambda p: p.name)
def test_readme_per_arm_table_is_what_the_committed_runs_say(folder):
    readme = (folder / "README.md").read_text()
    table = results_table.per_arm_table(folder)
    assert (
        results_table.block(readme, results_table.PER_ARM_BEGIN, results_table.PER_ARM_END) == table
    )


def test_replace_block_keeps_the_rest_and_refuses_a_readme_without_one():
    text = f"head\n{results_table.BEGIN}\nold\n{results_table.END}\ntail\n"
    assert (
        results_table.replace_block(text, "new")
        == f"head\n{results_table.BEGIN}\nnew\n{results_table.END}\ntail\n"
    )
    with pytest.raises(Exception, match="no .* block"):
        results_table.replace_block("no block here", "new")
    # The per-arm block is its own: writing it leaves a results table alone.
    both = text + f"{results_table.PER_ARM_BEGIN}\nold\n{results_table.PER_ARM_END}\n"
    out = results_table.replace_block(
        both, "arms", results_table.PER_ARM_BEGIN, results_table.PER_ARM_END
    )
    assert results_table.block(out) == "old"
    assert (
        results_table.block(out, results_table.PER_ARM_BEGIN, results_table.PER_ARM_END) == "arms"
    )


def test_numbers_use_a_true_minus_and_no_exponent():
    assert results_table.number(-1084.2) == "−1084" and results_table.number(0.0123456) == "0.01235"
    assert results_table.number(None) == "–" and results_table.number(12345.6) == "12346"


def test_per_arm_table_reads_each_runs_metrics(tmp_path):
    from dcgan_mn.fileio import append_jsonl

    config = {"extra": {"evaluated": ["cfd", "kl_modes", "modes"]}}
    for name, modes in (("a-s0", [10, 500, 400]), ("b-s0", [30, 20, 900])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        for it, m in zip((400, 1000, 2000), modes):
            append_jsonl(
                tmp_path / name / "metrics.jsonl",
                {"iteration": it, "modes": m, "kl_modes": 1.0 / m, "cfd": 9000 / m},
            )
    lines = results_table.per_arm_table(tmp_path).splitlines()
    assert lines[2].startswith("| a-s0 | 10 | 500 | 400 |") and lines[2].endswith(
        "| 500 (1,000) | 0.002 (1,000) | 18 (1,000) |"
    )
    assert lines[3].startswith("| b-s0 | 30 | 20 | 900 |") and lines[3].endswith(
        "| 900 (2,000) | 0.001111 (2,000) | 10 (2,000) |"
    )


def test_compared_metrics_are_what_the_runs_scored_with_g_emas_twins(tmp_path):
    # The table's rows follow the runs' own evaluation: an averaged-generator experiment gets
    # G_ema's rows after G's, an experiment without --g-ema none, and FID only where scored.
    for name, config, expected in (
        (
            "plain",
            {"extra": {"evaluated": ["cfd", "kl_modes", "modes"]}},
            ["modes", "kl_modes", "cfd"],
        ),
        (
            "averaged",
            {"g_ema": 7812.5, "extra": {"evaluated": ["modes", "fid"]}},
            ["fid", "modes", "fid_ema", "modes_ema"],
        ),
    ):
        (tmp_path / name / "bn-s0").mkdir(parents=True)
        (tmp_path / name / "bn-s0" / "config.json").write_text(json.dumps(config))
        assert results_table.compared_metrics(tmp_path / name) == expected
    with pytest.raises(Exception, match="no run folder"):
        results_table.compared_metrics(tmp_path)
