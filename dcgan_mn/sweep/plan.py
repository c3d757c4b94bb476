"""What a sweep is: arms (a name and its ``train.py`` flags) x seeds, shared flags, one folder.

Every run lives in a fixed folder ``<out>/<arm>-s<seed>``, never named by a job id, so a requeued
or resubmitted task finds its run. The sweep's record, ``<out>/sweep.json``, holds the spec (so
``status`` and ``report`` need nothing but the folder) and every submission (executor, job id,
log files); ``<out>/.sweep/<run>.jsonl`` holds what each task said while it ran (started, stopped
for a requeue, finished, failed). Both are written by this process and the tasks, atomically.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..config import RESUME_FIXED, config_from_dict
from ..errors import ConfigError
from ..fileio import append_jsonl, read_jsonl, write_json_atomic
from ..runfolder import RunFolder

__all__ = [
    "Arm",
    "Run",
    "SweepSpec",
    "SweepError",
    "parse_arm",
    "parse_seeds",
    "SweepRecord",
    "RunEvents",
    "run_progress",
    "load_train_cli",
    "planned_config",
]

RECORD = "sweep.json"
EVENTS_DIR = ".sweep"
SUBMITIT_DIR = ".submitit"


class SweepError(ConfigError):
    """A sweep that cannot be planned or continued as asked; one line naming the cause."""


@dataclass(frozen=True)
class Arm:
    name: str
    flags: tuple[str, ...]  # its own train.py flags

    def spelled(self) -> str:
        return f"{self.name}={shlex.join(self.flags)}"


def parse_arm(text: str) -> Arm:
    """``NAME=FLAGS`` -> Arm (the flags split as a shell would)."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SweepError(
            f'--arm {text!r}: expected NAME=FLAGS, e.g. mn="--mn-layers 0,1" '
            f"(NAME: letters, digits, - and _)"
        )
    return Arm(name, tuple(shlex.split(flags)))


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or a mix: ``0-2,7``)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected e.g. 0,1,2 or 0-4") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {text!r}: seeds must be distinct and >= 0")
    return seeds


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    folder: Path
    argv: tuple[str, ...]  # the train.py flags of a new run (shared + arm + seed + folder)

    @property
    def name(self) -> str:
        return self.folder.name


@dataclass(frozen=True)
class SweepSpec:
    """Arms x seeds of ``train.py`` runs in ``out``; the first arm is the baseline."""

    out: Path
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    iters: int
    shared: tuple[str, ...] = ()  # train.py flags every run gets
    eval_seeds: int = 3  # evaluation seeds per snapshot in the reports (1: the training rows only)

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(self.arms) < 1:
            raise SweepError("--arm: give at least one arm")
        if len(set(names)) != len(names):
            raise SweepError(f"--arm: arm names repeat: {names}")
        if self.iters < 1:
            raise SweepError(f"--iters {self.iters}: must be >= 1")
        if self.eval_seeds < 1:
            raise SweepError(f"--eval-seeds {self.eval_seeds}: must be >= 1")
        for flag in ("--seed", "--out", "--run-name", "--resume", "--iters"):
            for arm in self.arms:
                if flag in arm.flags or flag in self.shared:
                    raise SweepError(
                        f"{flag} in the flags of {arm.name if flag in arm.flags else 'every run'}: "
                        f"the sweep sets it (--seeds, --out, --iters; runs are <out>/<arm>-s<seed>)"
                    )

    def runs(self) -> list[Run]:
        """Seed by seed (bn-s0, mn-s0, bn-s1, ...): a sweep cut part-way leaves whole pairs."""
        return [
            Run(
                arm.name,
                seed,
                self.out / f"{arm.name}-s{seed}",
                (
                    *self.shared,
                    *arm.flags,
                    "--iters",
                    str(self.iters),
                    "--seed",
                    str(seed),
                    "--out",
                    str(self.out),
                    "--run-name",
                    f"{arm.name}-s{seed}",
                ),
            )
            for seed in self.seeds
            for arm in self.arms
        ]

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "arms": [a.spelled() for a in self.arms],
            "seeds": list(self.seeds),
            "iters": self.iters,
            "shared": list(self.shared),
            "eval_seeds": self.eval_seeds,
        }

    @classmethod
    def from_dict(cls, d: dict, out: Optional[Path] = None) -> "SweepSpec":
        return cls(
            out=Path(out or d["out"]),
            arms=tuple(parse_arm(a) for a in d["arms"]),
            seeds=tuple(d["seeds"]),
            iters=int(d["iters"]),
            shared=tuple(d["shared"]),
            eval_seeds=int(d.get("eval_seeds", 3)),
        )


# --------------------------------------------------------------------------------------------
# The record of submissions and each run's events
# --------------------------------------------------------------------------------------------


@dataclass
class SweepRecord:
    """``<out>/sweep.json``: the spec and every submission, newest last."""

    spec: SweepSpec
    # {"run", "executor", "job_id", "stdout", "stderr", "at"}
    submissions: list = field(default_factory=list)

    @staticmethod
    def path(out: Path) -> Path:
        return Path(out) / RECORD

    @classmethod
    def load(cls, out: Path) -> "SweepRecord":
        path = cls.path(out)
        if not path.is_file():
            raise SweepError(
                f"{out}: not a sweep folder (no {RECORD}); start one with `sweep.py run --out {out} ...`"
            )
        d = json.loads(path.read_text())
        return cls(SweepSpec.from_dict(d["spec"], out=Path(out)), d.get("submissions", []))

    def save(self) -> None:
        write_json_atomic(
            self.path(self.spec.out), {"spec": self.spec.to_dict(), "submissions": self.submissions}
        )

    def add(self, run: Run, executor: str, job_id: str, stdout: str, stderr: str) -> None:
        self.submissions.append(
            {
                "run": run.name,
                "executor": executor,
                "job_id": job_id,
                "stdout": stdout,
                "stderr": stderr,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )

    def last_submission(self, run_name: str) -> Optional[dict]:
        return next((s for s in reversed(self.submissions) if s["run"] == run_name), None)


class RunEvents:
    """``<out>/.sweep/<run>.jsonl``: what the task running a run said (appended, one line each)."""

    def __init__(self, out: Path, run_name: str) -> None:
        self.file = Path(out) / EVENTS_DIR / f"{run_name}.jsonl"
        # the run's own stderr, every attempt appended
        self.log = Path(out) / EVENTS_DIR / f"{run_name}.log"

    def add(self, event: str, **facts) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.file, {"event": event, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **facts})

    def rows(self) -> list[dict]:
        return read_jsonl(self.file) if self.file.is_file() else []

    def last(self) -> Optional[dict]:
        rows = self.rows()
        return rows[-1] if rows else None


def run_progress(folder: Path) -> int:
    """How far a run got: its newest checkpoint's iteration, or (a folder that kept only its small
    files) its last evaluated iteration; 0 for none."""
    rf = RunFolder(folder)
    if not folder.exists():
        return 0
    checkpoints = rf.checkpoints()
    if checkpoints:
        return checkpoints[-1][0]
    return max((int(r["iteration"]) for r in rf.metrics_rows() if "iteration" in r), default=0)


# --------------------------------------------------------------------------------------------
# Planning: the config train.py would use for each run, checked against its folder
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_train_cli(train_script: str):
    """train.py's click command, loaded once from its file (the runs' flags mean what they mean
    on the command line, parsed by the same code)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sweep_train_cli", train_script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def planned_config(train_script: str, argv: tuple[str, ...]) -> dict:
    """The config train.py would use for ``argv`` (its ``--dry-run``, in this process). The dry
    run names its folder under a scratch ``--out``: train.py refuses a new run in an existing one."""
    import click

    main = load_train_cli(str(train_script))
    args = list(argv)
    out = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(out):
            args[args.index("--out") + 1] = scratch
            main.main(args=[*args, "--dry-run"], standalone_mode=False)
    except click.ClickException as e:
        raise SweepError(f"train.py refused {shlex.join(argv)}: {e.format_message()}") from None
    return json.loads(out.getvalue())


def check_resumable(run: Run, iters: int) -> None:
    """A folder that was evaluated but kept no checkpoint (a clone of committed small files, or
    checkpoints removed) cannot continue: training it again would drop its rows. Refused."""
    rf = RunFolder(run.folder)
    if not run.folder.exists() or rf.checkpoints():
        return
    evaluated = max((int(r["iteration"]) for r in rf.metrics_rows() if "iteration" in r), default=0)
    if 0 < evaluated < iters:
        raise SweepError(
            f"{run.folder}: evaluated up to iteration {evaluated} but has no checkpoint to resume from "
            f"(were the checkpoints removed?); move the folder away to retrain it"
        )
    if evaluated == 0 and not rf.config_file.is_file() and any(run.folder.iterdir()):
        raise SweepError(
            f"{run.folder}: not a run folder (no {RunFolder.CONFIG}); move it away to train {run.name}"
        )


def check_same_settings(run: Run, planned: dict) -> None:
    """A run folder trained with other settings (another arm's flags, another cadence) is not
    mixed into this sweep."""
    saved = RunFolder(run.folder).read_config()
    if saved is None:
        return
    # a key an older version did not write reads as its default
    saved = config_from_dict(saved).to_dict()
    keys = [*RESUME_FIXED, "fid_every"]
    differ = [
        f"{k}: {saved.get(k)!r} there, {planned.get(k)!r} here"
        for k in keys
        if saved.get(k) != planned.get(k)
    ]
    if differ:
        raise SweepError(
            f"{run.folder}: trained with other settings ({'; '.join(differ)}); use another --out "
            f"or remove that folder"
        )


def record_dict(run: Run) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items()}
