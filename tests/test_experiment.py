"""experiments/stacked_digits.py, a preset of sweep.py: the command it runs, tiny real runs on
the local executor to their reports, a clone of the committed experiment counted as done (not
retrained), a half-evaluated folder without checkpoints refused, and sample grids from the one
seed every arm still has."""

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dcgan_mn import sweep as S
from dcgan_mn.runfolder import RunFolder

pytestmark = pytest.mark.usefixtures("train_single_thread")

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "_stacked_digits", ROOT / "experiments" / "stacked_digits.py"
)
experiment = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = experiment
spec.loader.exec_module(experiment)
TINY = [
    *"--iters 2 --eval-every 2 --mode-samples 40 --batch-size 8 --device cpu --seeds 0 --train-flags".split(),
    "--ngf 8 --ndf 8 --mn-fit-points 64 --stack-size 64",
    "--arm",
    "bn=--mn-layers none",
    "--arm",
    "mn=--mn-layers 0",
]


def invoke(*args):
    return CliRunner().invoke(experiment.main, [str(a) for a in args])


def test_it_prints_and_plans_the_sweep_command(tmp_path):
    res = invoke(*TINY, "--out", tmp_path / "exp", "--dry-run")
    assert res.exit_code == 0, res.output
    command = next(line for line in res.output.splitlines() if line.startswith("$ "))
    args = shlex.split(command[2:])
    assert args[1].endswith("sweep.py") and args[2] == "run"
    shared = args[args.index("--train-flags") + 1]
    for flag in (
        "--dataset stacked-digits",
        "--no-inception-metrics",
        "--fid-every 2",
        "--ckpt-every 2",
        "--mode-samples 40",
        "--ngf 8",
    ):
        assert flag in shared, flag
    assert "bn-s0: new" in res.output and "mn-s0: new" in res.output
    assert not (tmp_path / "exp" / "sweep.json").exists()  # a dry run writes nothing


def test_tiny_runs_to_their_reports(tmp_path, offline_hub):
    out = tmp_path / "exp"
    res = invoke(*TINY, "--out", out, "--eval-seeds", "2")
    assert res.exit_code == 0, res.output
    for run in ("bn-s0", "mn-s0"):
        rows = RunFolder(out / run).metrics_rows()
        assert [r["iteration"] for r in rows] == [2] and "modes" in rows[0]
        seeds = [
            json.loads(x)["seed"] for x in (out / run / "eval_seeds.jsonl").read_text().splitlines()
        ]
        assert seeds == [1]  # re-scored by its own task once trained, for every metric at once
    assert json.loads((out / "mn-s0" / "config.json").read_text())["mn_layers"] == [0]
    for metric in ("modes", "kl_modes", "cfd"):
        report = json.loads((out / "compare" / metric / "compare.json").read_text())
        assert report["labels"] == {"candidate": "mn", "baseline": "bn"}
        assert report["evaluation_noise"]["eval_seeds"] == 2
    for arm in ("bn", "mn"):
        assert (out / f"samples-{arm}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same command again: everything is done, nothing trains.
    res = invoke(*TINY, "--out", out, "--eval-seeds", "2")
    assert res.exit_code == 0 and "bn-s0: finished, skipped" in res.output
    # Another arm definition under the same name is refused, not mixed in.
    res = invoke(
        *[a if a != "mn=--mn-layers 0" else "mn=--mn-layers 1" for a in TINY], "--out", out
    )
    assert (
        res.exit_code != 0
        and "mn-s0: trained with other settings (mn_layers: [0] there, [1] here)" in res.output
    )


def test_a_clone_of_the_committed_experiment_is_done_not_restarted(tmp_path):
    """A clone keeps metrics.jsonl but no checkpoints: finished runs count as done; a
    half-evaluated run without a checkpoint is refused, never retrained over."""
    s = S.SweepSpec(tmp_path, (S.parse_arm("bn="),), (0,), 400)
    run = s.runs()[0]
    run.folder.mkdir()
    rows = "".join(json.dumps({"iteration": i, "modes": 900}) + "\n" for i in (200, 400))
    (run.folder / "metrics.jsonl").write_text(rows)
    assert S.plan.run_progress(run.folder) == 400
    S.plan.check_resumable(run, 400)  # done: nothing to resume
    with pytest.raises(
        S.SweepError, match="evaluated up to iteration 400 but has no checkpoint to resume from"
    ):
        S.plan.check_resumable(run, 600)
    assert (run.folder / "metrics.jsonl").read_text() == rows


def test_sample_grids_show_one_seed_that_every_arm_still_has(tmp_path):
    """A sweep continued from a clone has no snapshots for its earlier runs: the grids come
    from the first seed whose runs in every arm hold theirs, the same seed for every arm."""
    from dcgan_mn.sweep.report import grid_seed

    s = S.SweepSpec(tmp_path, (S.parse_arm("bn="), S.parse_arm("mn=")), (0, 1, 2), 200)
    # seed 0: bn only; seed 1: bn only; seed 2: both
    for name in ("bn-s0", "bn-s1", "mn-s2", "bn-s2"):
        snap = RunFolder(tmp_path / name).snapshot_file(200)
        snap.parent.mkdir(parents=True)
        snap.write_bytes(b"")
    assert grid_seed(s) == 2
    assert grid_seed(S.SweepSpec(tmp_path, s.arms, (0, 1), 200)) is None
