"""One process per run folder, with real processes: a live holder stops a second claimant
before it writes anything; a killed holder's lock is taken over; of two runs started with the
same --run-name exactly one gets the folder."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dcgan_mn.runfolder import RunFolder, RunFolderBusy
from dcgan_mn.training import train
from conftest import tiny_cfg, tiny_images

pytestmark = pytest.mark.usefixtures("train_single_thread")
ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from dcgan_mn.runfolder import RunFolder; lock = RunFolder(sys.argv[1]).claim().acquire(); "
    "print('locked', flush=True); time.sleep(120)"
)


def hold(run_dir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_live_holder_stops_a_resume_and_a_killed_one_is_taken_over(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, iters=2, ckpt_every=2)
    first = train(cfg, images=tiny_images(), progress=False)
    run_dir = first.run_dir
    assert RunFolder(run_dir).lock_file.read_text() == ""  # released: no holder recorded
    holder = hold(run_dir)
    try:
        before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
        with pytest.raises(RunFolderBusy, match=f"in use by pid {holder.pid} on "):
            train(cfg.replace(iters=4), images=tiny_images(), progress=False, resume=run_dir)
        after = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
        assert after == before  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    resumed = train(cfg.replace(iters=4), images=tiny_images(), progress=False, resume=run_dir)
    assert resumed.iteration == 4
    err = capsys.readouterr().err
    assert (
        f"taking over the run folder from pid {holder.pid}" in err and "(no longer running)" in err
    )


def test_new_run_folder_is_created_by_one_claimant_only(tmp_path):
    assert RunFolder(tmp_path / "a").create().path.is_dir()
    with pytest.raises(RunFolderBusy, match="already exists"):
        RunFolder(tmp_path / "a").create()
    # Two train.py processes started at once with the same --run-name: exactly one trains.
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *"--ngf 8 --ndf 8 --batch-size 8 --mn-fit-points 64 --iters 2 --fid-every 0 --sample-every 0 --device cpu --dataset stacked-digits --stack-size 64 --no-progress --out".split(),
        str(tmp_path / "runs"),
        "--run-name",
        "same",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "already exists" in loser and "Traceback" not in loser
    assert len(list((tmp_path / "runs" / "same").glob("events.out.tfevents.*"))) == 1


def test_lock_in_process_is_exclusive_and_released(tmp_path):
    with RunFolder(tmp_path).claim():
        with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()}"):
            RunFolder(tmp_path).claim().acquire()
    with RunFolder(tmp_path).claim():  # released on exit
        pass
