"""experiments/stacked_digits.py on tiny runs: new runs, cut runs resumed, finished runs
skipped, a folder without a checkpoint restarted, other settings refused, and the compare
stage (evaluation seeds, one report per metric, a sample grid per arm). Commands run in-process
through the script's ``run_command`` seam."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import load_script
from dcgan_mn.runfolder import RunFolder

pytestmark = pytest.mark.usefixtures("train_single_thread")

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_stacked_digits", ROOT / "experiments" / "stacked_digits.py")
experiment = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = experiment  # dataclasses look their module up there
spec.loader.exec_module(experiment)
CLIS = {"train.py": load_script("train.py", "main"), "evaluate.py": load_script("evaluate.py", "cli")}
TINY = ["--iters", "2", "--eval-every", "2", "--mode-samples", "40", "--batch-size", "8",
        "--device", "cpu", "--no-progress", "--seeds", "0",
        "--train-flags", "--ngf 8 --ndf 8 --mn-fit-points 64 --stack-size 64",
        "--arm", "bn=--mn-layers none", "--arm", "mn=--mn-layers 0"]


rescored_before: dict[str, list[str]] = {}


@pytest.fixture
def launched(monkeypatch, offline_hub):
    """Every command the script launches, run in this process."""
    commands = []

    def run_command(command, env=None):
        commands.append(command)
        if command[1].endswith("train.py") and "--run-name" in command:  # which runs were re-scored by now
            out = Path(command[command.index("--out") + 1])
            rescored_before[command[command.index("--run-name") + 1]] = sorted(
                p.parent.name for p in out.glob("*/eval_seeds.jsonl"))
        result = CliRunner().invoke(CLIS[Path(command[1]).name], command[2:])
        assert result.exit_code == 0, result.output
        return result.exit_code

    monkeypatch.setattr(experiment, "run_command", run_command)
    return commands


def invoke(*args):
    return CliRunner().invoke(experiment.main, [str(a) for a in args])


def test_runs_new_then_resumes_cut_runs_then_skips_done_ones(launched, tmp_path):
    out = tmp_path / "exp"
    res = invoke(*TINY, "--out", out, "--no-compare")
    assert res.exit_code == 0, res.output
    assert "bn-s0: new" in res.output and "mn-s0: new" in res.output
    assert [c[1].endswith("train.py") for c in launched] == [True, True]
    for name in ("bn-s0", "mn-s0"):
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [2] and "modes" in rows[0]
    assert json.loads((out / "mn-s0" / "config.json").read_text())["mn_layers"] == [0]
    assert json.loads((out / "bn-s0" / "config.json").read_text())["mn_layers"] == []

    # Raising --iters leaves both runs cut at 2: they resume from their checkpoints.
    launched.clear()
    res = invoke(*TINY, "--out", out, "--no-compare", "--iters", "4")
    assert res.exit_code == 0, res.output
    assert "bn-s0: resume (at iteration 2)" in res.output
    assert all("--resume" in c and c[c.index("--iters") + 1] == "4" for c in launched) and len(launched) == 2
    assert [i for i, _ in RunFolder(out / "mn-s0").checkpoints()][-1] == 4
    rows = [json.loads(x) for x in (out / "mn-s0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4]
    assert len(list((out / "mn-s0" / "hparams").glob("events.out.tfevents.*"))) == 1  # rewritten whole

    # Everything done: nothing runs.
    launched.clear()
    res = invoke(*TINY, "--out", out, "--no-compare", "--iters", "4")
    assert res.exit_code == 0 and "bn-s0: done (at iteration 4)" in res.output and launched == []

    # Another arm definition under the same name is refused, not mixed in.
    res = invoke(*[a if a != "mn=--mn-layers 0" else "mn=--mn-layers 1" for a in TINY], "--out", out, "--iters", "4")
    assert res.exit_code != 0 and "mn-s0: trained with other settings (mn_layers: [0] there, [1] here)" in res.output


def test_restarts_a_run_without_checkpoint_and_compares(launched, tmp_path):
    out = tmp_path / "exp"
    (out / "mn-s0").mkdir(parents=True)  # died before its first checkpoint
    (out / "mn-s0" / "stray.txt").write_text("x")
    res = invoke(*TINY, "--out", out, "--eval-seeds", "2")
    assert res.exit_code == 0, res.output
    # Each run is re-scored as soon as it is trained, before the next one trains: bn-s0's
    # extra seed is already on disk when mn-s0's train.py starts.
    assert [c[1].endswith("train.py") for c in launched][:2] == [True, True]
    assert launched[1][1].endswith("train.py") and rescored_before["mn-s0"] == ["bn-s0"]
    assert "mn-s0: restart" in res.output and "starting it again" in res.output
    assert not (out / "mn-s0" / "stray.txt").exists()
    assert "evaluation)" in res.output  # the evaluation's share is printed
    for metric in ("modes", "kl_modes", "cfd"):
        report = json.loads((out / "compare" / metric / "compare.json").read_text())
        assert report["labels"] == {"candidate": "mn", "baseline": "bn"}
        assert report["evaluation_noise"]["eval_seeds"] == 2
    for run in ("bn-s0", "mn-s0"):
        seeds = [json.loads(x)["seed"] for x in (out / run / "eval_seeds.jsonl").read_text().splitlines()]
        assert seeds == [1]  # one extra seed at the one evaluated iteration, scored once for all metrics
        assert (out / run / "hparams").is_dir()
    for arm in ("bn", "mn"):
        assert (out / f"samples-{arm}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments():
    assert "expected NAME=FLAGS" in invoke("--arm", "nonsense", "--arm", "b=").output
    assert "at least two arms" in invoke("--arm", "a=--mn-layers 0").output
    assert "seeds must be distinct" in invoke("--seeds", "1,1").output
    assert "expected e.g. 0,1,2 or 0-4" in invoke("--seeds", "x").output
    assert experiment.parse_seeds("0-2,7") == [0, 1, 2, 7]


def test_a_clone_of_the_committed_experiment_is_done_not_restarted(tmp_path):
    """A clone keeps metrics.jsonl but no checkpoints: finished runs count as done; a
    half-evaluated run without a checkpoint is refused, never deleted."""
    run = experiment.Run("bn", 0, (), tmp_path / "bn-s0")
    run.folder.mkdir()
    rows = "".join(json.dumps({"iteration": i, "modes": 900}) + "\n" for i in (200, 400))
    (run.folder / "metrics.jsonl").write_text(rows)
    assert experiment.run_state(run, 400) == ("done", 400)
    with pytest.raises(experiment.click.ClickException, match="no checkpoint to resume from"):
        experiment.run_state(run, 600)
    assert (run.folder / "metrics.jsonl").read_text() == rows
    (run.folder / "metrics.jsonl").unlink()
    assert experiment.run_state(run, 600) == ("restart", 0)


def test_sample_grids_show_one_seed_that_every_arm_still_has(tmp_path):
    """A sweep continued from a clone has no snapshots for its earlier runs: the grids come
    from the first seed whose runs in every arm hold theirs, the same seed for every arm."""
    runs = [experiment.Run(arm, seed, (), tmp_path / f"{arm}-s{seed}") for seed in (0, 1, 2) for arm in ("bn", "mn")]
    for name in ("bn-s0", "bn-s1", "mn-s2", "bn-s2"):  # seed 0: bn only; seed 1: bn only; seed 2: both
        snap = RunFolder(tmp_path / name).snapshot_file(200)
        snap.parent.mkdir(parents=True)
        snap.write_bytes(b"")
    assert experiment.grid_seed(runs, [0, 1, 2]) == 2
    assert experiment.grid_seed(runs, [0, 1]) is None


class FakeTraining:
    """A run_command that 'trains' a run by writing its last metrics row, after ``seconds``;
    it records each run's start, its environment's thread count and the most runs at once.
    Runs named in ``fail`` exit with 1."""

    def __init__(self, seconds=0.2, fail=()):
        import threading

        self.seconds, self.fail = seconds, set(fail)
        self.lock = threading.Lock()
        self.started, self.threads, self.running, self.most = [], {}, 0, 0

    def __call__(self, command, env=None):
        import time

        if "--run-name" not in command:  # evaluate.py compare: nothing to do here
            return 0
        name = command[command.index("--run-name") + 1]
        with self.lock:
            self.started.append(name)
            self.threads[name] = (env or {}).get("OMP_NUM_THREADS")
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0 if name in self.fail else self.seconds)
        with self.lock:
            self.running -= 1
        if name in self.fail:
            return 1
        folder = Path(command[command.index("--out") + 1]) / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"iteration": 2, "train_seconds": 1.0}) + "\n")
        return 0


FAKE = [a for a in TINY if a not in ("--seeds", "0")] + ["--no-compare"]


def test_jobs_train_seed_by_seed_with_their_share_of_threads(monkeypatch, tmp_path):
    fake = FakeTraining()
    monkeypatch.setattr(experiment, "run_command", fake)
    res = invoke(*FAKE, "--seeds", "0-2", "--jobs", "2", "--threads", "3", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert sorted(fake.started) == sorted(f"{a}-s{s}" for s in range(3) for a in ("bn", "mn"))
    assert set(fake.started[:2]) == {"bn-s0", "mn-s0"} and set(fake.started[-2:]) == {"bn-s2", "mn-s2"}
    assert fake.most == 2 and set(fake.threads.values()) == {"3"}
    assert "2 runs at a time, 3 CPU threads each" in res.output
    # One job: one run at a time, in the environment the script was started in.
    fake = FakeTraining(seconds=0)
    monkeypatch.setattr(experiment, "run_command", fake)
    res = invoke(*FAKE, "--seeds", "3", "--out", tmp_path)
    assert res.exit_code == 0 and fake.started == ["bn-s3", "mn-s3"] and fake.most == 1
    assert fake.threads == {"bn-s3": None, "mn-s3": None}


def test_a_failed_job_stops_the_runs_not_yet_started(monkeypatch, tmp_path):
    fake = FakeTraining(seconds=0.5, fail={"mn-s0"})
    monkeypatch.setattr(experiment, "run_command", fake)
    res = invoke(*FAKE, "--seeds", "0-2", "--jobs", "2", "--out", tmp_path)
    assert res.exit_code == 1 and "mn-s0: train.py exited with 1" in res.output
    assert "mn-s2" not in fake.started and (tmp_path / "bn-s0" / "metrics.jsonl").is_file()
    # The same command again: the finished runs are skipped, the rest train.
    fake = FakeTraining(seconds=0)
    monkeypatch.setattr(experiment, "run_command", fake)
    res = invoke(*FAKE, "--seeds", "0-2", "--jobs", "2", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert "bn-s0" not in fake.started and "mn-s0" in fake.started
    assert invoke(*FAKE, "--jobs", "0", "--out", tmp_path).exit_code == 2
    res = invoke(*FAKE, "--jobs", "2", "--threads", "0", "--out", tmp_path)
    assert res.exit_code == 2 and "--threads" in res.output


def test_jobs_rescore_one_run_at_a_time(monkeypatch, tmp_path):
    """Re-scoring seeds the global RNG per generator batch: two threads of this process must
    never score at once, however many runs train at once."""
    import threading
    import time

    lock, state = threading.Lock(), {"now": 0, "most": 0, "runs": []}

    def rescore(run, eval_seeds, device, progress):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["runs"].append(run.name)
        time.sleep(0.3)
        with lock:
            state["now"] -= 1

    monkeypatch.setattr(experiment, "run_command", FakeTraining(seconds=0))
    monkeypatch.setattr(experiment, "rescore", rescore)
    args = [a for a in FAKE if a != "--no-compare"]
    res = invoke(*args, "--seeds", "0-1", "--jobs", "4", "--eval-seeds", "3", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert sorted(state["runs"]) == ["bn-s0", "bn-s1", "mn-s0", "mn-s1"] and state["most"] == 1
