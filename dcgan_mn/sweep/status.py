"""Where a sweep stands: one row per run, from its folder, its events and the scheduler.

A run's state, in this order of evidence:

* ``finished``: its folder reached ``--iters`` (whatever any scheduler says) and its task, if
  it still lives, has finished re-scoring it (until then it is ``running``, "re-scoring");
* ``new``: never submitted;
* on Slurm, the job's state from ``sacct``: PENDING is ``pending`` (``requeued`` when the run's
  last event says it stopped for a requeue), RUNNING ``running``, REQUEUED ``requeued``, any end
  state (FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...) before ``--iters`` is ``failed`` with that
  state as its reason;
* locally (or when ``sacct`` knows nothing), the run's events and whether their process lives:
  ``running``, ``failed`` (its train.py ended with an error, or its process is gone), or
  ``pending`` while its lane has not reached it.

A failed run's row carries the last lines of its stderr.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Optional

from ..metrics.specs import METRICS
from ..runfolder import RunFolder
from .plan import RunEvents, SweepRecord, run_progress

__all__ = ["STATES", "sweep_status", "render_status", "slurm_states"]

STATES = ("new", "pending", "running", "requeued", "finished", "failed")
STDERR_TAIL = 12  # lines of a failed run's stderr in its row
_SLURM_ENDED = (
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "COMPLETED",
)


def _expand(job_id: str) -> list[str]:
    """``123_[0-2,5]`` (a pending array's line) -> 123_0, 123_1, 123_2, 123_5."""
    if "[" not in job_id:
        return [job_id]
    base, _, rest = job_id.partition("_[")
    ids = []
    for part in rest.rstrip("]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: Slurm state} from ``sacct`` (the newest record of each), and ``squeue`` for what
    accounting has not recorded yet; {} where neither answers."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if shutil.which("sacct"):
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-D", "-o", "JobID,State", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
        )
        for line in out.stdout.splitlines():
            job, _, state = line.partition("|")
            for j in _expand(job.strip()):
                states[j] = state.split()[0] if state.strip() else "UNKNOWN"
    if shutil.which("squeue"):
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
        )
        for line in out.stdout.splitlines():  # squeue knows the live state best
            job, _, state = line.partition("|")
            for j in _expand(job.strip()):
                states[j] = state.strip()
    return states


def _alive(pid: Optional[int], host: Optional[str]) -> bool:
    if pid is None or (host and host != socket.gethostname()):
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def _tail(path: Optional[str], lines: int = STDERR_TAIL) -> list[str]:
    if not path or not Path(path).is_file():
        return []
    text = Path(path).read_text(errors="replace").replace("\r", "\n")
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def _still_rescoring(submission: Optional[dict], event: Optional[dict], slurm: dict) -> bool:
    """A trained run whose task has not said "finished" and still lives: it is re-scoring its
    snapshots, and a report that re-scored them too would score them twice."""
    if submission is None or event is None or event["event"] != "started":
        return False
    if submission["executor"] == "slurm" and submission["job_id"] in slurm:
        return slurm[submission["job_id"]] in ("RUNNING", "COMPLETING")
    return _alive(event.get("pid"), event.get("host"))


def _state(
    reached: int,
    iters: int,
    submission: Optional[dict],
    event: Optional[dict],
    slurm: dict[str, str],
) -> tuple[str, str]:
    """(state, reason) of one run."""
    if reached >= iters:  # trained; its task re-scores it before it says "finished"
        if _still_rescoring(submission, event, slurm):
            return "running", "re-scoring"
        return "finished", ""
    if submission is None:
        return "new", ""
    last = event["event"] if event else None
    if submission["executor"] == "slurm" and submission["job_id"] in slurm:
        s = slurm[submission["job_id"]]
        if s in ("PENDING", "CONFIGURING"):
            return ("requeued" if last == "preempted" else "pending"), ""
        if s in ("RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"):
            return "running", ""
        if s in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            return "requeued", ""
        if s in _SLURM_ENDED:  # the task's own word on why is better than Slurm's FAILED
            return "failed", (
                f"train.py exited with {event.get('code')}" if last == "failed" else s
            )
    if last == "failed":
        return "failed", f"train.py exited with {event.get('code')}"
    if last == "submitted" and submission["executor"] == "local":
        alive = _alive(int(submission["job_id"]), socket.gethostname())
        return ("pending", "") if alive else ("failed", "its lane ended before it started")
    if last == "started":
        return (
            ("running", "")
            if _alive(event.get("pid"), event.get("host"))
            else ("failed", "its process is gone")
        )
    if last == "preempted":
        return "requeued", ""
    return "pending", ""


def sweep_status(out: Path) -> list[dict]:
    """One dict per run of the sweep in ``out`` (seed by seed, arms in order)."""
    record = SweepRecord.load(out)
    spec = record.spec
    submissions = {run.name: record.last_submission(run.name) for run in spec.runs()}
    slurm = slurm_states(
        [s["job_id"] for s in submissions.values() if s and s["executor"] == "slurm"]
    )
    rows = []
    for run in spec.runs():
        reached = run_progress(run.folder)
        sub, events = submissions[run.name], RunEvents(out, run.name)
        event = events.last()
        state, reason = _state(reached, spec.iters, sub, event, slurm)
        metrics_rows = RunFolder(run.folder).metrics_rows() if run.folder.exists() else []
        last_row = metrics_rows[-1] if metrics_rows else {}
        log = (event or {}).get("stderr") or (sub or {}).get("stderr")
        row = {
            "run": run.name,
            "arm": run.arm,
            "seed": run.seed,
            "state": state,
            "reason": reason,
            "iteration": reached,
            "iters": spec.iters,
            "metrics": {k: v for k, v in last_row.items() if k in METRICS and v is not None},
            "job_id": (sub or {}).get("job_id"),
            "executor": (sub or {}).get("executor"),
            "log": log,
            "restarts": sum(1 for e in events.rows() if e["event"] == "preempted"),
        }
        # the run's own stderr, else its job's (a run that never started its train.py)
        if state == "failed":
            row["stderr_tail"] = _tail(str(events.log)) or _tail(log)
        rows.append(row)
    return rows


def render_status(rows: list[dict]) -> str:
    """The rows as a plain table, a failed run's stderr tail under it."""

    def metric_text(m: dict) -> str:
        shown = {k: v for k, v in m.items() if METRICS[k].headline} or m
        return " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
        )

    header = ("run", "state", "iteration", "metrics", "job", "log")
    table = [header] + [
        (
            r["run"],
            r["state"]
            + (f" ({r['reason']})" if r["reason"] else "")
            + (f", requeued {r['restarts']}x" if r["restarts"] else ""),
            f"{r['iteration']}/{r['iters']}",
            metric_text(r["metrics"]) or "-",
            r["job_id"] or "-",
            r["log"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for r in rows:
        if r.get("stderr_tail"):
            lines += [f"--- {r['run']}: last lines of {r['log']}"] + [
                f"    {ln}" for ln in r["stderr_tail"]
            ]
    return "\n".join(lines)
