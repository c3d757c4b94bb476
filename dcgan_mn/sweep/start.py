"""Starting (or continuing) a sweep: plan every run, submit what is neither done nor queued.

Running the same ``sweep.py run`` command again is idempotent: a run that reached ``--iters`` is
skipped, one still queued or running under its last job is left alone, and every other one
(new, failed, cancelled) is submitted again, to resume from its newest readable checkpoint. A run
folder trained with other settings stops the command before anything is submitted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .plan import SweepRecord, SweepSpec, check_resumable, check_same_settings, planned_config
from .status import sweep_status
from .submit import ExecutorOptions, choose_executor, submit_runs

__all__ = ["start_sweep", "wait_for_sweep", "ACTIVE_STATES"]

ACTIVE_STATES = ("pending", "running", "requeued")


def start_sweep(
    spec: SweepSpec,
    train_script: Path,
    opts: ExecutorOptions,
    *,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> list:
    """Plan, check and submit; returns the submitit jobs (none for a dry run)."""
    executor = choose_executor(opts.executor)
    log(
        f"sweep: {len(spec.arms)} arms x {len(spec.seeds)} seeds, {spec.iters} iterations each, in {spec.out} "
        f"(executor {executor}{f', {opts.parallel} at once' if executor == 'local' else ''})"
    )
    for arm in spec.arms:
        log(f"  arm {arm.name}: {' '.join(arm.flags) or '(train.py defaults)'}")
    runs = spec.runs()
    # every run's flags parse, and no folder was trained otherwise: before any submission
    for run in runs:
        check_same_settings(run, planned_config(str(train_script), run.argv))
        check_resumable(run, spec.iters)
    known = (
        {r["run"]: r for r in sweep_status(spec.out)}
        if SweepRecord.path(spec.out).is_file()
        else {}
    )
    todo = []
    for run in runs:
        row = known.get(run.name)
        state = row["state"] if row else "new"
        if state == "finished":
            log(f"  {run.name}: finished, skipped")
        elif state in ACTIVE_STATES:
            log(f"  {run.name}: {state} as job {row['job_id']}, left alone")
        else:
            todo.append(run)
            log(
                f"  {run.name}: {'resume at ' + str(row['iteration']) if row and row['iteration'] else 'new'}"
                + (
                    f" (was {state}{': ' + row['reason'] if row and row['reason'] else ''})"
                    if row and state != "new"
                    else ""
                )
            )
    if dry_run:
        return []
    spec.out.mkdir(parents=True, exist_ok=True)
    record = (
        SweepRecord.load(spec.out) if SweepRecord.path(spec.out).is_file() else SweepRecord(spec)
    )
    record.spec = (
        spec  # the command as given now (its runs were checked against their folders above)
    )
    record.save()
    jobs = submit_runs(record, todo, train_script, opts)
    if jobs:
        ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
        log(
            f"submitted {len(todo)} run(s) as {executor} job{'s' * (len(ids) > 1)} {', '.join(ids)}; "
            f"`sweep.py status {spec.out}` shows where they stand"
        )
    else:
        log("nothing to submit")
    return jobs


def wait_for_sweep(out: Path, *, poll_s: float = 10.0, progress: bool = True) -> list[dict]:
    """Block until no run is pending, running or requeued, with a bar over finished runs; the
    final status rows."""
    from tqdm import tqdm

    rows = sweep_status(out)
    bar = tqdm(total=len(rows), desc="runs finished", unit="run", disable=not progress)
    with bar:
        while True:
            done = sum(r["state"] == "finished" for r in rows)
            bar.update(done - bar.n)
            active = [r for r in rows if r["state"] in ACTIVE_STATES]
            bar.set_postfix_str(
                ", ".join(f"{r['run']} {r['iteration']}" for r in active if r["state"] == "running")
            )
            if not active:
                return rows
            time.sleep(poll_s)
            rows = sweep_status(out)
