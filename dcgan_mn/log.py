"""What a run writes while it trains: TensorBoard events, ``metrics.jsonl``, the progress bar.

``RunLogger`` is the one object the training loop talks to. It takes host numbers (the loop
reads its device accumulators only at log time), so nothing here forces a device sync.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional, Union

from torch import Tensor

from .runfolder import RunFolder, as_run_folder

__all__ = ["write_hparams", "run_hparams", "run_outcome", "RunLogger"]

PathLike = Union[str, Path]


def write_hparams(run: Union[RunFolder, PathLike], hparams: dict, metrics: dict) -> Path:
    """TensorBoard's HParams summary of one run in ``<run>/hparams``: its settings and its
    outcome (e.g. best and final metrics), so the HParams dashboard over a sweep shows runs
    side by side. Replaced whole on each call (a resumed run rewrites it when it ends), so the
    folder always holds exactly one session."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    folder = as_run_folder(run).hparams_dir
    if folder.exists():
        shutil.rmtree(folder)
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    experiment, session_start, session_end = hparams_summary(hparams, metrics)
    with SummaryWriter(log_dir=str(folder)) as writer:
        for summary in (experiment, session_start, session_end):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():  # the dashboard reads each metric's last scalar
            writer.add_scalar(tag, value, 0)
    return folder


def run_hparams(cfg, generator) -> dict:
    """What the HParams dashboard shows of a run's settings: the generator's norm per layer
    (``norms``: "mn,mn,bn", layer 0 first), K, the seed and the dataset, then MN's readings
    (estimator, point, posterior_grad, lambda_scale). Few on purpose: TensorBoard's table shows the
    first hparams only until more are ticked."""
    return {
        "dataset": cfg.dataset,
        "mn_components": cfg.mn_components,
        "norms": generator.norm_kinds,
        "seed": cfg.seed,
        "mn_estimator": cfg.mn_estimator,
        "mn_point": cfg.mn_point,
        "mn_posterior_grad": cfg.mn_posterior_grad,
        "mn_lambda_scale": cfg.mn_lambda_scale,
    }


def run_outcome(rows: list[dict], directions: dict, iteration: int) -> dict:
    """``{"hparams/best_<m>": ..., "hparams/final_<m>": ...}`` for every evaluated metric m, over
    the run's ``metrics.jsonl`` rows up to ``iteration`` (best by the metric's direction), plus
    the iteration reached."""
    out: dict[str, float] = {"hparams/iteration": float(iteration)}
    rows = [r for r in rows if r.get("iteration", 0) <= iteration]
    for metric, direction in directions.items():
        values = [
            float(r[metric])
            for r in rows
            if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])
        ]
        if values:
            out[f"hparams/best_{metric}"] = max(values) if direction == "max" else min(values)
            out[f"hparams/final_{metric}"] = values[-1]
    return out


def _after_existing_event_files(run_dir: Path) -> None:
    """Wait (at most a second) until the clock is past the newest event file's timestamp.
    TensorBoard reads a folder's event files in name order, ``...tfevents.<unix seconds>.<host>
    .<pid>.<counter>``; a resumed run's file written in the same second as the one before it
    could sort first (the counter compares as text: "10" < "9"), and TensorBoard would then
    drop the earlier steps as out of order."""
    import time

    stamps = []
    for f in run_dir.glob("events.out.tfevents.*"):
        parts = f.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class RunLogger:
    """The one writer of a running run: TensorBoard events, ``metrics.jsonl`` and a tqdm progress
    bar, and the evaluation's snapshots, ``best.pt`` and the full checkpoints. The training loop
    asks for a record (``scalars``, ``metrics_row``, ``evaluated``, ``checkpoint``, ...); this
    class decides the files, and that only rank 0 (``enabled``) writes them.

    ``purge_step``: on resume, events a crashed run wrote at or after this step are hidden by
    TensorBoard, so a resumed curve has no doubled segment. ``progress``: the bar, on a terminal;
    off one (stderr redirected to a file) a bar is a stream of carriage returns, so there the
    logger prints the plain lines of ``--no-progress`` instead.
    """

    def __init__(
        self,
        run: Union[RunFolder, PathLike],
        *,
        total_iters: int,
        start_iter: int = 0,
        purge_step: Optional[int] = None,
        progress: bool = True,
        enabled: bool = True,
    ) -> None:
        from tqdm import tqdm

        self.folder = as_run_folder(run)
        self.run_dir = self.folder.path
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if purge_step is not None:
                _after_existing_event_files(self.run_dir)
            self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
        bar = progress and enabled and sys.stderr.isatty()
        self.bar = tqdm(
            total=total_iters,
            initial=start_iter,
            disable=not bar,
            unit="it",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5,
        )
        self.postfix: dict[str, str] = {}
        self.total_iters = total_iters
        self.plain = enabled and not bar  # no bar: a plain line per log window instead
        self.pending: Optional[tuple[int, float]] = None  # the window's line, until emit_line()

    # --- TensorBoard ---

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                if v is not None:
                    self.writer.add_scalar(tag, v, step)

    def image(self, tag: str, image_chw: Tensor, step: int) -> None:
        """One image [3, H, W] with values in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image_chw, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    # --- metrics.jsonl ---

    def metrics_row(self, row: dict) -> None:
        if self.enabled:
            self.folder.append_metrics(row)

    # --- progress bar ---

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def show(self, **values: str) -> None:
        """Replace some of the bar's postfix fields (e.g. losses at log time, fid at evaluation)."""
        self.postfix.update(values)
        self.bar.set_postfix(self.postfix, refresh=False)

    def plain_line(self, iteration: int, images_per_s: float) -> None:
        """With the bar off (``--no-progress``, or stderr not a terminal: a cluster job's log),
        one plain line per ``--log-every`` window: iteration/total, images/s, the window's
        losses and D outputs and the last evaluation (what the bar's postfix shows). Held until
        ``emit_line()``, so that an evaluation of the same iteration is in it: the line at the
        last iteration then agrees with the run's final summary."""
        if self.plain:
            self.pending = (iteration, images_per_s)

    def emit_line(self) -> None:
        """Print the held plain line, if any."""
        if self.pending is None:
            return
        iteration, images_per_s = self.pending
        self.pending = None
        width = len(str(self.total_iters))
        pct = 100.0 * iteration / self.total_iters if self.total_iters else 100.0
        fields = "  ".join(f"{k} {v}" for k, v in self.postfix.items())
        print(
            f"iteration {iteration:>{width}}/{self.total_iters} ({pct:5.1f}%)  {images_per_s:8.1f} img/s  {fields}",
            file=sys.stderr,
            flush=True,
        )

    def message(self, text: str) -> None:
        """A line above the bar (or on stderr when the bar is off)."""
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    # --- the generator's files ---

    def outcome(self, settings: dict, directions: dict, iteration: int) -> None:
        """The run's HParams session as it ends: its ``settings`` (``run_hparams``) beside each
        scored metric's best and final value over its ``metrics.jsonl`` (``directions``: metric
        -> "min" | "max") up to ``iteration``."""
        if self.enabled:
            rows = self.folder.metrics_rows()
            write_hparams(self.folder, settings, run_outcome(rows, directions, iteration))

    def evaluated(self, iteration: int, snapshot: dict, best: bool) -> None:
        """An evaluation's generator snapshot, and ``best.pt`` when it is the best so far (the
        metrics row went first, through ``metrics_row``)."""
        if self.enabled:
            self.folder.save_snapshot(iteration, snapshot)
            if best:
                self.folder.save_best(snapshot)

    def checkpoint(
        self, iteration: int, payload: Optional[dict], snapshot: Optional[dict], keep_last: int
    ) -> Path:
        """A full checkpoint (rank 0's ``payload``; the other ranks have None and get its path),
        the snapshot of a run without evaluation, then the pruning of older checkpoints (after
        their successor is durably written)."""
        if not self.enabled or payload is None:
            return self.folder.checkpoint_file(iteration)
        path = self.folder.save_checkpoint(iteration, payload)
        if snapshot is not None:
            self.folder.save_snapshot(iteration, snapshot)
        self.folder.prune_checkpoints(keep_last)
        return path

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
