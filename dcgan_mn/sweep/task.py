"""One sweep run as a submitit task that trains in-process and survives preemption.

``TrainRun`` is a ``submitit.helpers.Checkpointable``. It calls ``train.py``'s own command in
this process with ``--resume-if-exists``, so a new run starts and a requeued one continues from
its newest *readable* checkpoint, looked up when the task starts (never a path pickled at
submission). On Slurm's preemption / time-limit signal (SIGUSR2, sent ``--signal-delay``
seconds early), training stops at the end of the iteration and saves a checkpoint through the
same stop path as Ctrl-C and SIGTERM (``stopping.StopOnSignals``); only then is the signal
handed on to submitit's own handler, which requeues the job under the same job id (its
``checkpoint()`` returns this task unchanged) and exits. A run preempted any number of times
therefore ends bitwise identical to an uninterrupted one (exact resume, same device kind).

A job of several tasks (``--gpus-per-run N``, ``--nodes``) exports torchrun's variables from
``submitit.helpers.TorchDistributedEnvironment`` first, so ``train.py`` runs DDP exactly as
under ``torchrun`` (rank 0 writes, every rank trains).

``Lane`` runs several ``TrainRun``s one after the other: the local executor starts every job it
is given at once, so ``--parallel N`` submits N lanes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Iterator, Optional

import submitit

from .plan import RunEvents, load_train_cli, run_progress

__all__ = ["TrainRun", "Lane", "RunFailed", "run_train_cli", "EXIT_PREEMPTED"]

EXIT_PREEMPTED = 128 + signal.SIGUSR2  # train.py's exit status after a SIGUSR2 stop


class RunFailed(RuntimeError):
    """A run's train.py ended with an error status (bad flags, data, a non-finite run: exit 4)."""


def run_train_cli(train_script: str, argv: list[str]) -> int:
    """``train.py ARGV`` in this process; its exit status (click's errors printed as train.py prints them)."""
    import click

    main = load_train_cli(train_script)
    try:
        main.main(args=argv, standalone_mode=False)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        return 130


class TrainRun(submitit.helpers.Checkpointable):
    """Train (or continue) the run in ``folder`` with ``argv`` until ``--iters``."""

    def __init__(
        self,
        train_script: str,
        out: str,
        name: str,
        argv: list[str],
        threads: Optional[int] = None,
        distributed: bool = False,
        eval_seeds: int = 1,
    ) -> None:
        self.train_script = train_script
        self.eval_seeds = eval_seeds
        self.out = out
        self.name = name
        self.argv = list(argv)
        self.threads = threads
        self.distributed = distributed

    def __call__(self) -> dict:
        env = _job_environment()
        if self.distributed:  # torchrun's RANK, WORLD_SIZE, MASTER_ADDR, ... for train.py's DDP
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        threads = self.threads or _slurm_cpus()
        if threads:
            import torch

            torch.set_num_threads(threads)
        main_rank = env is None or env.global_rank == 0
        events = RunEvents(Path(self.out), self.name)
        folder = Path(self.out) / self.name
        if main_rank:
            events.add(
                "started",
                job_id=env.job_id if env else None,
                host=socket.gethostname(),
                pid=os.getpid(),
                restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                from_iteration=run_progress(folder),
                stderr=str(env.paths.stderr) if env else None,
            )
        with _tee_stderr(events.log if main_rank else None):
            code = run_train_cli(
                self.train_script, [*self.argv, "--resume-if-exists", "--no-progress"]
            )
        reached = run_progress(folder)
        if code == 0:
            if main_rank:
                with _tee_stderr(events.log):
                    rescored = self.rescore(folder)
                events.add("finished", iteration=reached, rescored=rescored)
            return {"run": self.name, "iteration": reached}
        if code == EXIT_PREEMPTED and env is not None:
            if main_rank:
                events.add("preempted", iteration=reached)
            # The checkpoint is on disk: now let submitit's handler requeue this job and exit.
            signal.raise_signal(signal.SIGUSR2)
        if main_rank:
            events.add("failed", code=code, iteration=reached)
        raise RunFailed(
            f"{self.name}: train.py exited with {code}"
            + (" (non-finite losses: resuming would repeat it)" if code == 4 else "")
            + f" at iteration {reached}"
        )

    def rescore(self, folder: Path) -> int:
        """Score the finished run's snapshots with the sweep's evaluation seeds now, on this
        job's device, so that its small files are complete on their own (a sweep whose machine
        goes away keeps what it finished; the report later re-scores nothing)."""
        if self.eval_seeds <= 1:
            return 0
        from ..config import config_from_dict
        from ..device import resolve_device
        from ..rescore import rescore_run
        from ..runfolder import RunFolder
        from .report import report_metrics

        saved = RunFolder(folder).read_config() or {}
        metrics = report_metrics(saved)
        if not metrics or not RunFolder(folder).snapshots():
            return 0
        device = resolve_device(config_from_dict(saved).device)
        return rescore_run(folder, metrics[0], self.eval_seeds, device=device)


class Lane:
    """Several runs one after another in one job (the local executor's cap on parallel runs). A
    failed run does not stop the lane; the lane fails at the end, naming the failed runs."""

    def __init__(self, runs: list[TrainRun]) -> None:
        self.runs = runs

    def __call__(self) -> list[dict]:
        done, failed = [], []
        for run in self.runs:
            try:
                done.append(run())
            except RunFailed as e:
                print(f"sweep: {e}", file=sys.stderr)
                failed.append(str(e))
        if failed:
            raise RunFailed("; ".join(failed))
        return done


class _Tee:
    """A text stream that writes to two."""

    def __init__(self, a, b) -> None:
        self.a, self.b = a, b

    def write(self, text: str) -> int:
        self.b.write(text)
        self.b.flush()
        return self.a.write(text)

    def flush(self) -> None:
        self.a.flush()
        self.b.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.a, name)


@contextlib.contextmanager
def _tee_stderr(path: Optional[Path]) -> Iterator[None]:
    """What the run writes to stderr (train.py's lines and errors) also goes to its own log
    file: a job's log can hold several runs (a local lane) and submitit's own traceback."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        saved = sys.stderr
        sys.stderr = _Tee(saved, log)
        try:
            yield
        finally:
            sys.stderr = saved


def _job_environment() -> Optional["submitit.JobEnvironment"]:
    """submitit's view of this job, or None outside a submitit job (tests call tasks directly)."""
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


def _slurm_cpus() -> Optional[int]:
    value = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(value) if value and value.isdigit() else None
