"""The one-node Slurm cluster of ``.ci/slurm-up`` takes a batch job and runs it to COMPLETED.

Skipped where Slurm is not up (a developer's machine without it), but failed under CI
(``CI=true``), where ``.ci/run`` is expected to have brought the cluster up first.
"""

from __future__ import annotations

import subprocess
import time

import pytest

FAILED_STATES = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
}


def _run(*cmd: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _state(job_id: str) -> str:
    """The job's state from sacct (accounting), else from squeue, else ''."""
    r = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State")
    states = [s.split()[0] for s in r.stdout.split("\n") if s.strip()] if r.returncode == 0 else []
    if states:
        return states[-1]  # the last record: a requeued job's latest run
    r = _run("squeue", "-h", "-j", job_id, "-o", "%T")
    return r.stdout.strip() if r.returncode == 0 else ""


def test_sbatch_job_completes(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    r = _run(
        "sbatch",
        "--parsable",
        "--job-name",
        "dcgan-slurm-up-check",
        "--output",
        str(out),
        "--chdir",
        str(tmp_path),
        "--wrap",
        "echo ok",
    )
    assert r.returncode == 0, f"sbatch failed: {r.stderr.strip()}"
    job_id = r.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch --parsable printed {r.stdout!r}"

    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        state = _state(job_id)
        if state == "COMPLETED" or state in FAILED_STATES:
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job_id], capture_output=True)
        pytest.fail(f"job {job_id} not COMPLETED after 60 s (last state {state or 'unknown'!r})")
    assert state == "COMPLETED", (
        f"job {job_id} ended {state}: {out.read_text() if out.exists() else ''}"
    )

    # The output file is written by slurmd; allow a moment for it to land.
    for _ in range(20):
        if out.exists() and out.read_text().strip():
            break
        time.sleep(0.25)
    assert out.read_text().strip() == "ok"
