"""Sweeps: arms x seeds of ``train.py`` runs on submitit (Slurm job arrays, or local lanes).

One module per concern, imports pointing down the list:

* ``plan``: what a sweep is (arms, seeds, shared flags, ``<out>/<arm>-s<seed>``), its record
  ``sweep.json`` and each run's events, the config train.py would use for each run;
* ``task``: one run as a submitit ``Checkpointable`` that trains in-process and is requeued on
  preemption after saving through the ordinary stop path;
* ``submit``: executors (``slurm``, ``local`` capped at ``--parallel``, ``auto``) and submission;
* ``status``: one row per run from its folder, its events and ``sacct``;
* ``start``: plan, check, submit what is neither done nor queued (idempotent), wait;
* ``report``: re-scoring, ``compare`` per metric and sample grids once every run is done.

``sweep.py`` (beside ``train.py``) is the command line; ``docs/sweeps.md`` the guide.
"""

from .plan import Arm, Run, SweepError, SweepRecord, SweepSpec, parse_arm, parse_seeds
from .report import report_metrics, write_report
from .start import start_sweep, wait_for_sweep
from .status import STATES, render_status, sweep_status
from .submit import EXECUTORS, ExecutorOptions, choose_executor, parse_time

__all__ = [
    "Arm",
    "Run",
    "SweepError",
    "SweepRecord",
    "SweepSpec",
    "parse_arm",
    "parse_seeds",
    "report_metrics",
    "write_report",
    "start_sweep",
    "wait_for_sweep",
    "STATES",
    "render_status",
    "sweep_status",
    "EXECUTORS",
    "ExecutorOptions",
    "choose_executor",
    "parse_time",
]
