"""sweep.py without Slurm: the plan, idempotent resubmission, the local executor's cap on
parallel runs, the auto executor, status of failed runs, and refusing a folder trained
otherwise. Tasks run a fake train.py (the task's injected script) that records when it ran."""

from __future__ import annotations

import json
import stat
import textwrap
from pathlib import Path

import pytest

from conftest import invoker, load_script, write_run
from dcgan_mn import sweep as S
from dcgan_mn.sweep.plan import RunEvents, planned_config
from dcgan_mn.sweep.task import EXIT_PREEMPTED, RunFailed, TrainRun

ROOT = Path(__file__).resolve().parents[1]

FAKE_TRAIN = textwrap.dedent('''
    """A stand-in for train.py: the flags the sweep passes, a run folder, a record of when it ran."""
    import json, os, sys, time
    from pathlib import Path
    import click

    @click.command(context_settings={"ignore_unknown_options": True})
    @click.option("--out")
    @click.option("--run-name")
    @click.option("--iters", type=int)
    @click.option("--seed", type=int)
    @click.option("--sleep", type=float, default=0.0)
    @click.option("--exit-code", type=int, default=0)
    @click.option("--dry-run", is_flag=True)
    @click.option("--resume-if-exists", is_flag=True)
    @click.option("--progress/--no-progress", default=True)
    @click.argument("rest", nargs=-1, type=click.UNPROCESSED)
    def main(out, run_name, iters, seed, sleep, exit_code, dry_run, resume_if_exists, progress, rest):
        if dry_run:
            click.echo(json.dumps({"seed": seed, "iters": iters}))
            return
        folder = Path(out) / run_name
        folder.mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "spans.jsonl", "a") as f:
            f.write(json.dumps({"run": run_name, "start": time.time()}) + "\\n")
        time.sleep(sleep)
        if exit_code:
            print("something went wrong in " + run_name, file=sys.stderr)
            sys.exit(exit_code)
        (folder / "metrics.jsonl").write_text(json.dumps({"iteration": iters, "modes": 7}) + "\\n")
        with open(Path(out) / "spans.jsonl", "a") as f:
            f.write(json.dumps({"run": run_name, "end": time.time()}) + "\\n")
''')


@pytest.fixture
def fake_train(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return path


def spec(out, arms=("a=", "b="), seeds="0-1", iters=5, shared=()):
    return S.SweepSpec(
        out=Path(out),
        arms=tuple(S.parse_arm(a) for a in arms),
        seeds=tuple(S.parse_seeds(seeds)),
        iters=iters,
        shared=tuple(shared),
    )


def quiet(*_):
    pass


def test_plan_names_every_run_by_arm_and_seed(tmp_path):
    s = spec(
        tmp_path / "sw",
        arms=("bn=--mn-layers none", "mn=--mn-layers 0,1"),
        seeds="0-1",
        iters=10,
        shared=("--dataset", "stacked-digits"),
    )
    runs = s.runs()
    assert [r.name for r in runs] == ["bn-s0", "mn-s0", "bn-s1", "mn-s1"]
    assert runs[1].folder == tmp_path / "sw" / "mn-s0"
    assert runs[1].argv == (
        *"--dataset stacked-digits --mn-layers 0,1 --iters 10 --seed 0".split(),
        *["--out", str(tmp_path / "sw"), "--run-name", "mn-s0"],
    )
    assert S.SweepSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: S.parse_arm("no-equals"), "--arm 'no-equals': expected NAME=FLAGS"),
        (lambda: S.parse_seeds("3-x"), "--seeds '3-x'"),
        (lambda: S.parse_seeds("1,1"), "distinct"),
        (
            lambda: spec("/tmp/x", arms=("a=--seed 3",)),
            "--seed in the flags of a: the sweep sets it",
        ),
        (lambda: spec("/tmp/x", arms=("a=", "a=")), "arm names repeat"),
        (lambda: S.parse_time("soon"), "--time 'soon'"),
    ],
)
def test_bad_input_is_one_line(make, message):
    with pytest.raises(S.SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("1:30:00", 90), ("45:30", 45.5), ("2-00:00:00", 2880), ("1-12", 2160)],
)
def test_slurm_time_formats(text, minutes):
    assert S.parse_time(text) == minutes


def test_auto_picks_local_without_sbatch_and_slurm_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    assert S.choose_executor("auto") == "local"
    with pytest.raises(S.SweepError, match="--executor slurm: no sbatch on PATH"):
        S.choose_executor("slurm")
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\nexit 0\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    assert S.choose_executor("auto") == "slurm"


def _max_overlap(spans_file: Path) -> int:
    starts, ends = {}, {}
    for row in map(json.loads, spans_file.read_text().splitlines()):
        (starts if "start" in row else ends)[row["run"]] = row.get("start", row.get("end"))
    events = sorted([(t, 1) for t in starts.values()] + [(t, -1) for t in ends.values()])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_local_executor_never_runs_more_than_parallel(tmp_path, fake_train):
    out = tmp_path / "sw"
    s = spec(out, arms=("a=--sleep 1.0", "b=--sleep 1.0", "c=--sleep 1.0"), seeds="0-1")
    S.start_sweep(
        s, fake_train, S.ExecutorOptions(executor="local", parallel=2, time_min=5), log=quiet
    )
    rows = S.wait_for_sweep(out, poll_s=0.3, progress=False)
    assert [r["state"] for r in rows] == ["finished"] * 6
    assert _max_overlap(out / "spans.jsonl") == 2  # two lanes: at most two at once, and two at once


def test_same_command_again_skips_finished_and_resubmits_failed(tmp_path, fake_train):
    out = tmp_path / "sw"
    opts = S.ExecutorOptions(executor="local", parallel=2, time_min=5)
    S.start_sweep(
        spec(out, arms=("ok=", "bad=--exit-code 4"), seeds="0"), fake_train, opts, log=quiet
    )
    rows = {r["run"]: r for r in S.wait_for_sweep(out, poll_s=0.3, progress=False)}
    assert rows["ok-s0"]["state"] == "finished"
    bad = rows["bad-s0"]
    assert bad["state"] == "failed" and "exited with 4" in bad["reason"]
    assert any("something went wrong in bad-s0" in line for line in bad["stderr_tail"])
    rendered = S.render_status(list(rows.values()))
    assert "--- bad-s0: last lines of" in rendered and "something went wrong" in rendered
    said = []
    S.start_sweep(
        spec(out, arms=("ok=", "bad=--exit-code 4"), seeds="0"), fake_train, opts, log=said.append
    )
    assert "  ok-s0: finished, skipped" in said
    assert any(line.startswith("  bad-s0: new (was failed") for line in said)
    S.wait_for_sweep(out, poll_s=0.3, progress=False)
    starts = [
        json.loads(x)["run"] for x in (out / "spans.jsonl").read_text().splitlines() if "start" in x
    ]
    assert starts.count("ok-s0") == 1 and starts.count("bad-s0") == 2


def test_a_preempted_task_outside_submitit_is_a_failure_not_a_hang(tmp_path, fake_train):
    out = tmp_path / "sw"
    task = TrainRun(
        str(fake_train),
        str(out),
        "a-s0",
        ["--out", str(out), *f"--run-name a-s0 --iters 3 --exit-code {EXIT_PREEMPTED}".split()],
    )
    with pytest.raises(RunFailed, match="a-s0: train.py exited with 140"):
        task()
    assert [e["event"] for e in RunEvents(out, "a-s0").rows()] == ["started", "failed"]


def test_status_and_report_of_a_folder_that_is_not_a_sweep(tmp_path):
    sweep = invoker(load_script("sweep.py", "cli"))
    result = sweep("status", tmp_path)
    assert result.exit_code == 1 and "not a sweep folder (no sweep.json)" in result.output


def test_a_folder_trained_with_other_flags_is_refused_with_one_line(tmp_path):
    """Real train.py: a tiny stacked-digits run, then a sweep whose arm asks for other norms in it."""
    out = tmp_path / "sw"
    shared = "--dataset stacked-digits --no-inception-metrics --ngf 8 --ndf 8 --batch-size 8 --fid-every 0 --sample-every 0 --device cpu --stack-size 64".split()
    train_main = invoker(load_script("train.py", "main"))
    made = train_main(
        *shared,
        *"--iters 2 --seed 0".split(),
        *["--out", out],
        *"--run-name mn-s0 --mn-layers none --no-progress".split(),
    )
    assert made.exit_code == 0, made.output
    sweep = invoker(load_script("sweep.py", "cli"))
    result = sweep(
        *["run", "--out", out, "--arm", "mn=--mn-layers 0,1"],
        *"--seeds 0 --iters 2".split(),
        *["--train-flags", " ".join(shared)],
        *"--executor local --dry-run".split(),
    )
    assert result.exit_code == 2
    assert "mn-s0: trained with other settings (mn_layers: [] there, [0, 1] here" in result.output
    assert "Traceback" not in result.output and not (out / "sweep.json").exists()
    # the planned config is train.py's own (its dry run, in this process)
    assert planned_config(
        str(ROOT / "train.py"),
        S.SweepSpec(out, (S.parse_arm("x=--mn-layers 0"),), (0,), 2, tuple(shared)).runs()[0].argv,
    )["mn_layers"] == [0]


def test_sweep_help_explains_every_option():
    sweep = invoker(load_script("sweep.py", "cli"))
    text = sweep("run", "--help").output
    for flag in tuple(
        "--executor --partition --time --gpus-per-run --cpus-per-run --nodes --array-parallelism --account --qos --constraint --sbatch --parallel --wait".split()
    ):
        assert flag in text, flag


def test_a_trained_run_whose_task_still_rescores_is_not_finished():
    # wait_for_sweep returns when no run is active, and the report then re-scores what lacks
    # seeds: had a trained run counted as finished while its own task was still re-scoring it,
    # both would have scored the same snapshots (seen under load as eval_seeds [1, 1]).
    import os
    import socket

    from dcgan_mn.sweep.status import _state

    local = {"executor": "local", "job_id": "1"}
    here = {"event": "started", "pid": os.getpid(), "host": socket.gethostname()}
    assert _state(10, 10, local, here, {}) == ("running", "re-scoring")
    assert _state(10, 10, local, {**here, "pid": 2**22 + 12345}, {}) == ("finished", "")  # gone
    assert _state(10, 10, local, {"event": "finished"}, {}) == ("finished", "")
    assert _state(10, 10, None, None, {}) == ("finished", "")  # trained outside the sweep
    on_slurm = {"executor": "slurm", "job_id": "7"}
    assert _state(10, 10, on_slurm, here, {"7": "RUNNING"}) == ("running", "re-scoring")
    assert _state(10, 10, on_slurm, here, {"7": "COMPLETED"}) == ("finished", "")


def test_averaging_reports_pair_each_runs_g_ema_with_its_g(tmp_path):
    """A --g-ema sweep's report adds, per arm, G_ema against G of the same runs (seed-paired)."""
    from dcgan_mn.sweep.report import write_averaging_reports

    curves = {  # (modes, modes_ema, cfd, cfd_ema) at iterations 100, 200, 300
        "bn-s0": ([500, 900, 950], [520, 930, 940], [900.0, 500, 450], [800.0, 480, 430]),
        "bn-s1": ([400, 880, 960], [450, 900, 970], [950.0, 520, 470], [900.0, 500, 460]),
        "mn-s0": ([800, 960, 970], [820, 950, 975], [600.0, 440, 420], [590.0, 450, 425]),
        "mn-s1": ([790, 940, 980], [800, 955, 978], [610.0, 430, 415], [600.0, 420, 410]),
    }
    for name, (modes, modes_ema, cfd, cfd_ema) in curves.items():
        rows = [
            {"iteration": 100 * (i + 1), "modes": a, "modes_ema": b, "cfd": c, "cfd_ema": d}
            | {"mode_samples": 1000, "sample_mode": "batch", "train_seconds": i + 1.0}
            for i, (a, b, c, d) in enumerate(zip(modes, modes_ema, cfd, cfd_ema))
        ]
        write_run(tmp_path, name, rows, {"seed": int(name[-1]), "g_ema": 10.0})
    arms = {a: [tmp_path / f"{a}-s{s}" for s in (0, 1)] for a in ("bn", "mn")}
    written = write_averaging_reports(
        tmp_path, arms, ["modes", "cfd", "modes_ema", "cfd_ema"], log=lambda *_: None
    )
    assert sorted(written) == [f"averaging/{a}-{m}" for a in ("bn", "mn") for m in ("cfd", "modes")]
    for arm in ("bn", "mn"):
        for metric, column, best in (("modes", 0, max), ("cfd", 2, min)):
            report = json.loads(
                (
                    tmp_path / "compare" / "averaging" / f"{arm}-{metric}" / "compare.json"
                ).read_text()
            )
            assert (report["metric"], report["baseline_metric"]) == (f"{metric}_ema", metric)
            assert report["labels"] == {"candidate": f"{arm} G_ema", "baseline": f"{arm} G"}
            by_hand = [
                best(curves[f"{arm}-s{s}"][column + 1]) - best(curves[f"{arm}-s{s}"][column])
                for s in (0, 1)
            ]
            assert [p["best_difference"] for p in report["pairs"]] == pytest.approx(by_hand)
    # without --g-ema's twins there is nothing to pair
    assert write_averaging_reports(tmp_path, arms, ["modes", "cfd"], log=lambda *_: None) == {}
