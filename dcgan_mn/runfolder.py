"""The run folder: one owner for its layout, creation and claim, writes, pruning and reading back.

Everything a run leaves on disk lives under ``<out>/<run_name>/``:

    config.json                      the run's TrainConfig (written whole, atomically)
    metrics.jsonl                    one JSON line per evaluation (appended, fsync'd)
    eval_seeds.jsonl                 re-scored evaluations (``evaluate.py compare``)
    provenance.jsonl                 the environments the rows were computed in
    run.lock                         the exclusive claim of the process running it
    events.out.tfevents.*            TensorBoard
    hparams/                         TensorBoard's HParams session of the run
    ckpt-{iteration:08d}.pt          full checkpoints, the newest --keep-last kept
    best.pt                          generator of the best evaluation
    snapshots/G-{iteration:08d}.pt   generator-only, at every evaluation (or checkpoint)

Training, ``evaluate.py``, ``compare`` and the experiment scripts build none of these paths
themselves: they ask a ``RunFolder``. Writes are atomic (a temporary file then ``os.replace``;
checkpoints fsync'd) and fail with ``fileio.WriteError`` naming the file and the OS reason; a
checkpoint is pruned only after its successor is durably written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Union

from .errors import CheckpointError, OutFolderError
from .fileio import (
    append_jsonl,
    atomic_write,
    read_jsonl,
    save_torch_atomic,
    write_failure,
    write_json_atomic,
)

__all__ = ["RunFolder", "RunFolderBusy", "resolve_resume", "as_run_folder"]

PathLike = Union[str, Path]
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
_SNAP_RE = re.compile(r"^G-(\d{8,})\.pt$")


from .errors import RunFolderBusy  # noqa: E402
from .runlock import RunLock  # noqa: E402


def _numbered(folder: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


class _Entry:
    """A ``RunFolder`` attribute that reads as the path of one named entry of the folder."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, folder: RunFolder | None, owner: Any = None) -> Any:
        return self if folder is None else folder.path / self.name


class RunFolder:
    """One run's folder. Cheap to construct (touches nothing); ``create`` and ``claim`` act."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    EVAL_SEEDS = "eval_seeds.jsonl"
    PROVENANCE = "provenance.jsonl"
    LOCK = "run.lock"
    HPARAMS = "hparams"
    BEST = "best.pt"
    SNAPSHOTS = "snapshots"

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ---- layout ------------------------------------------------------------------------------

    config_file = _Entry(CONFIG)
    metrics_file = _Entry(METRICS)
    eval_seeds_file = _Entry(EVAL_SEEDS)
    provenance_file = _Entry(PROVENANCE)
    lock_file = _Entry(LOCK)
    hparams_dir = _Entry(HPARAMS)
    best_file = _Entry(BEST)
    snapshots_dir = _Entry(SNAPSHOTS)

    def checkpoint_file(self, iteration: int) -> Path:
        return self.path / f"ckpt-{iteration:08d}.pt"

    def snapshot_file(self, iteration: int) -> Path:
        return self.snapshots_dir / f"G-{iteration:08d}.pt"

    def is_run(self) -> bool:
        """Does this look like a run folder (a config, or snapshots)?"""
        return self.config_file.is_file() or self.snapshots_dir.is_dir()

    # ---- creation and the exclusive claim ------------------------------------------------------

    def create(self) -> "RunFolder":
        """Create a new run's folder with one ``mkdir`` (never "check, then create"): of two
        runs racing for a name, exactly one gets it; the other is refused. A folder that cannot
        be made (a file in the way, a read-only, immutable or virtual filesystem) is one
        ``OutFolderError`` naming ``--out`` (the parent), the folder and the reason."""
        out = self.path.parent
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # mkdir(exist_ok) on a file, or on a path through one
            raise OutFolderError(
                out, self.path, "a file is in the way (--out must be a folder)"
            ) from None
        except OSError as e:
            raise OutFolderError(out, self.path, write_failure(out, e).reason, e.errno) from None
        try:
            self.path.mkdir()
        except FileExistsError:
            raise RunFolderBusy(
                f"{self.path}: already exists (another run took this --run-name); continue "
                f"it with --resume {self.path}, or choose another --run-name"
            ) from None
        except OSError as e:
            raise OutFolderError(
                out, self.path, write_failure(self.path, e).reason, e.errno
            ) from None
        return self

    def claim(self):
        """The folder's exclusive lock (``runlock.RunLock``, not yet acquired)."""
        return RunLock(self.lock_file)

    # ---- reading back ----------------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, Path]]:
        """[(iteration, path)] of the full checkpoints, oldest first."""
        return _numbered(self.path, _CKPT_RE)

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest full checkpoint, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def snapshots(self) -> list[tuple[int, Path]]:
        """[(iteration, path)] of the generator snapshots, oldest first."""
        return _numbered(self.snapshots_dir, _SNAP_RE)

    def read_config(self) -> Optional[dict]:
        """The saved config as a dict, or None when there is none."""
        if not self.config_file.is_file():
            return None
        return json.loads(self.config_file.read_text())

    def metrics_rows(self) -> list[dict]:
        """The evaluation rows (a cut last line is reported and skipped; see ``read_jsonl``)."""
        return read_jsonl(self.metrics_file)

    def eval_seed_rows(self) -> list[dict]:
        return read_jsonl(self.eval_seeds_file)

    def provenance_rows(self) -> list[dict]:
        return read_jsonl(self.provenance_file)

    # ---- writes ------------------------------------------------------------------------------------

    def write_config(self, config: dict) -> Path:
        return write_json_atomic(self.config_file, config)

    def append_metrics(self, row: dict) -> None:
        append_jsonl(self.metrics_file, row)

    def append_eval_seed_row(self, row: dict) -> None:
        append_jsonl(self.eval_seeds_file, row)

    def append_provenance(self, row: dict) -> None:
        append_jsonl(self.provenance_file, row)

    def drop_metrics_after(self, iteration: int) -> int:
        """Remove the metrics rows past ``iteration`` (written after the checkpoint a run resumes
        from, so the resumed run will write them again); returns how many."""
        path = self.metrics_file
        if not path.is_file():
            return 0
        rows = read_jsonl(path)
        kept = [r for r in rows if r.get("iteration", 0) <= iteration]
        if len(kept) == len(rows) and path.read_text().endswith("\n"):
            return 0
        with atomic_write(path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        return len(rows) - len(kept)

    # Payloads arrive whole (``checkpoint`` builds them, header included): the folder only
    # decides where they go and writes them atomically and durably.
    def save_checkpoint(self, iteration: int, payload: dict) -> Path:
        return save_torch_atomic(self.checkpoint_file(iteration), payload)

    def save_snapshot(self, iteration: int, payload: dict) -> Path:
        return save_torch_atomic(self.snapshot_file(iteration), payload)

    def save_best(self, payload: dict) -> Path:
        return save_torch_atomic(self.best_file, payload)

    def set_aside(self, path: Path) -> Path:
        """Rename an unreadable checkpoint ``X`` to ``X.corrupt`` (``X.corrupt-2``, ... when that
        is taken): out of the run's way, never deleted. Returns the new path."""
        target = path.with_name(path.name + ".corrupt")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{n}")
        try:
            path.rename(target)
        except OSError as e:
            raise write_failure(target, e) from None
        return target

    def prune_checkpoints(self, keep_last: int) -> list[Path]:
        """Delete all but the newest ``keep_last`` full checkpoints (call after the newest is
        durably written); returns the deleted paths."""
        doomed = [p for _, p in self.checkpoints()[:-keep_last]] if keep_last > 0 else []
        for p in doomed:
            p.unlink(missing_ok=True)
        return doomed


def resolve_resume(target: PathLike) -> tuple[RunFolder, Path]:
    """(run folder, checkpoint file) for ``--resume TARGET`` (a run folder or a checkpoint)."""
    p = Path(target).expanduser()
    if p.is_dir():
        folder = RunFolder(p)
        ckpt = folder.latest_checkpoint()
        if ckpt is None:
            raise CheckpointError(
                f"--resume {str(target)!r}: no full checkpoints (ckpt-*.pt) in this folder"
            )
        return folder, ckpt
    if p.is_file():
        return RunFolder(p.parent), p
    raise CheckpointError(f"--resume {str(target)!r}: no such file or folder")


def as_run_folder(run: Any) -> RunFolder:
    """A RunFolder from a RunFolder or a path."""
    return run if isinstance(run, RunFolder) else RunFolder(run)
