"""Submitting a sweep's unfinished runs through submitit: one Slurm job array, or local lanes.

* ``slurm``: one job array (``executor.batch()``), one task per run, with the Slurm options of
  ``ExecutorOptions``; submitit adds ``--signal=USR2@<signal_delay>`` and requeues a preempted or
  timed-out task under the same job id.
* ``local``: submitit's local executor runs jobs as subprocesses of this machine and starts
  every job it is given at once, so the runs are dealt into ``parallel`` lanes (one job each,
  its runs one after another): never more than ``parallel`` runs at once.
* ``auto``: ``slurm`` where ``sbatch`` is on PATH, else ``local``.

``timeout_min`` is always set: submitit's local default would kill a job after 2 minutes.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from .plan import SUBMITIT_DIR, Run, RunEvents, SweepError, SweepRecord
from .task import Lane, TrainRun

__all__ = ["EXECUTORS", "ExecutorOptions", "choose_executor", "parse_time", "submit_runs"]

EXECUTORS = ("auto", "slurm", "local")


def parse_time(text: str) -> float:
    """Slurm's time formats -> minutes: ``90``, ``1:30:00``, ``2-00:00:00``, ``45:00`` (mm:ss)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SweepError(f"--time {text!r}: expected minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    days = int(days or 0)
    if b is None:  # minutes (or D-HH)
        minutes = int(a) * (60 if days else 1)
    elif c is None:  # MM:SS (or D-HH:MM)
        minutes = int(a) * 60 + int(b) if days else int(a) + int(b) / 60
    else:
        minutes = int(a) * 60 + int(b) + int(c) / 60
    minutes += days * 24 * 60
    if minutes <= 0:
        raise SweepError(f"--time {text!r}: must be more than 0")
    return minutes


@dataclass(frozen=True)
class ExecutorOptions:
    """How runs are submitted (the ``sweep.py run`` options)."""

    executor: str = "auto"
    time_min: float = 24 * 60
    partition: Optional[str] = None
    gpus_per_run: int = 0
    cpus_per_run: Optional[int] = None
    nodes: int = 1
    array_parallelism: int = 256
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    sbatch: dict = field(default_factory=dict)  # other #SBATCH options: {"mem": "32G", ...}
    signal_delay_s: int = (
        180  # SIGUSR2 this long before the time limit: time to finish an evaluation
    )
    max_requeues: int = 100  # time-limit requeues per run (preemptions do not count)
    parallel: int = 1  # local: runs at once


def choose_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise SweepError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    if name == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if name == "slurm" and not shutil.which("sbatch"):
        raise SweepError(
            "--executor slurm: no sbatch on PATH (is this a Slurm login node?); "
            "--executor local runs the sweep on this machine"
        )
    return name


def _slurm_executor(folder: Path, opts: ExecutorOptions):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues)
    tasks = max(opts.gpus_per_run, 1)
    params = dict(
        time=max(1, int(round(opts.time_min))),
        nodes=opts.nodes,
        ntasks_per_node=tasks,
        array_parallelism=opts.array_parallelism,
        signal_delay_s=opts.signal_delay_s,
    )
    if opts.gpus_per_run:
        params["gpus_per_node"] = opts.gpus_per_run
    if opts.cpus_per_run:
        params["cpus_per_task"] = opts.cpus_per_run
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    if opts.sbatch:
        params["additional_parameters"] = dict(opts.sbatch)
    executor.update_parameters(**params)
    return executor


def _task(train_script: Path, out: Path, run: Run, **how) -> TrainRun:
    return TrainRun(str(train_script), str(out), run.name, list(run.argv), **how)


def submit_runs(
    record: SweepRecord, runs: list[Run], train_script: Path, opts: ExecutorOptions
) -> list:
    """Submit ``runs`` (each trains from its folder, new or resumed); record the submissions in
    ``sweep.json``; return the submitit jobs."""
    if not runs:
        return []
    executor_name = choose_executor(opts.executor)
    out = record.spec.out
    folder = out / SUBMITIT_DIR
    distributed = opts.gpus_per_run > 1 or opts.nodes > 1
    for run in runs:  # before the job exists: whatever its task says comes after this line
        RunEvents(out, run.name).add("submitted", executor=executor_name)
    # One task a run: train.py's command in-process, then its re-scoring.
    task = partial(_task, train_script, out, eval_seeds=record.spec.eval_seeds)
    if executor_name == "slurm":
        tasks = [task(r, distributed=distributed) for r in runs]
        executor = _slurm_executor(folder, opts)
        with executor.batch():
            jobs = [executor.submit(t) for t in tasks]
        for run, job in zip(runs, jobs):
            record.add(run, "slurm", str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))
        record.save()
        return jobs

    import submitit

    lanes = max(1, min(opts.parallel, len(runs)))
    threads = opts.cpus_per_run or max(1, (os.cpu_count() or 1) // lanes)
    # seed by seed across lanes: pairs finish together
    dealt = [runs[i::lanes] for i in range(lanes)]
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(
        timeout_min=opts.time_min * max(len(d) for d in dealt), gpus_per_node=opts.gpus_per_run
    )
    jobs = []
    for lane in dealt:
        job = executor.submit(Lane([task(r, threads=threads) for r in lane]))
        for run in lane:
            record.add(run, "local", str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))
        jobs.append(job)
    record.save()
    return jobs
