"""Scoring a target: one path that ``evaluate.py fid``, ``modes`` and ``samples`` share.

A target is parsed once (``parse_target``): a checkpoint file, a run folder (its generator
snapshots: a curve) or a folder of images. ``score`` then runs one evaluator over it: every
generator in every requested sample mode, or every image of the folder, one row each. What
is scored (FID's Inception features, or the mode classifier's) is the evaluator's business.
Bad input is one line (``MetricsError`` / ``CheckpointError``) before any network is built.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .checkpoint import load_generator
from .config import TrainConfig
from .errors import MetricsError
from .metrics import image_folder_files, iter_image_batches
from .models import SAMPLE_MODES
from .runfolder import RunFolder

__all__ = ["Target", "parse_target", "parse_sample_modes", "generator_file", "score", "curve_table"]

KINDS = ("checkpoint", "run", "images")


@dataclass(frozen=True)
class Target:
    """What TARGET names: ``kind`` is "checkpoint", "run" or "images"."""

    text: str  # as the user wrote it (every message names it so)
    kind: str
    generators: tuple[tuple[int, Path], ...] = ()  # (iteration, file) to score, oldest first
    images: tuple[Path, ...] = ()  # the image files of an image folder
    config: Optional[TrainConfig] = None  # the newest generator's training config

    def describe(self) -> dict:
        return {"target": self.text, "kind": self.kind}


def parse_target(text: str, *, min_images: int = 2, ema: bool = False) -> Target:
    """Classify TARGET and check it: every generator is loaded once on the CPU, so a bad file
    fails in seconds and names itself; an image folder has at least ``min_images`` images.
    ``ema``: the averaged generators (``--ema``), which every checkpoint must hold."""
    p = Path(text)
    if p.is_file():
        files = [p]
    elif not p.is_dir():
        raise MetricsError(f"TARGET {text!r}: no such file or folder")
    elif RunFolder(p).is_run():
        files = [path for _, path in RunFolder(p).snapshots()]
        if not files:
            raise MetricsError(
                f"TARGET {text!r}: run folder has no generator snapshots (snapshots/G-*.pt)"
            )
    else:
        images = image_folder_files(p)
        if not images:
            raise MetricsError(
                f"TARGET {text!r}: no images in this folder (and it is not a run folder)"
            )
        if len(images) < min_images:
            raise MetricsError(
                f"TARGET {text!r}: FID needs at least {min_images} images, found {len(images)}"
            )
        return Target(text, "images", images=tuple(images))
    generators, cfg = [], None
    for path in files:
        _, cfg, iteration = load_generator(path, "cpu", ema=ema)
        generators.append((iteration, path))
    return Target(
        text, "checkpoint" if p.is_file() else "run", generators=tuple(generators), config=cfg
    )


def parse_sample_modes(text: Optional[str]) -> Optional[list[str]]:
    """``--sample-modes batch,running`` -> ["batch", "running"]; None -> None (the run's own)."""
    if not text:
        return None
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in SAMPLE_MODES for m in modes):
        raise MetricsError(
            f"--sample-modes {text!r}: expected a comma list of {', '.join(SAMPLE_MODES)}"
        )
    return modes


def generator_file(text: str, which: str = "best") -> Path:
    """The one generator file of TARGET: the file itself, or a run folder's ``best.pt``
    (``which="best"``, when it has one) or newest snapshot."""
    path = Path(text)
    if path.is_file():
        return path
    if not path.is_dir():
        raise MetricsError(f"TARGET {text!r}: no such file or folder")
    folder = RunFolder(path)
    if which == "best" and folder.best_file.is_file():
        return folder.best_file
    snapshots = folder.snapshots()
    if not snapshots:
        raise MetricsError(f"TARGET {text!r}: no best.pt and no snapshots in this run folder")
    return snapshots[-1][1]


def score(
    target: Target,
    evaluator,
    *,
    device,
    sample_modes: Optional[Sequence[str]] = None,
    batch_size: Optional[int] = None,
    image_batch_size: int = 50,
    on_row: Optional[Callable[[dict], None]] = None,
    ema: bool = False,
) -> list[dict]:
    """One evaluator row per (generator, sample mode), or one for the whole image folder.

    Generators are sampled in their run's sample mode unless ``sample_modes`` says otherwise,
    in their run's batch size unless ``batch_size`` does; each row gains ``iteration`` and
    ``checkpoint``. ``on_row`` sees each row as it is scored (progress lines). ``ema``: score
    each checkpoint's averaged generator G_ema (rows say ``"generator": "G_ema"``)."""
    if target.kind == "images":
        rows = [
            evaluator.score_images(
                iter_image_batches(list(target.images), image_batch_size), total=len(target.images)
            )
        ]
    else:
        rows = []
        for _, path in target.generators:
            gen, cfg, iteration = load_generator(path, device, ema=ema)
            for mode in sample_modes or [cfg.sample_mode]:
                row = evaluator(gen, sample_mode=mode, batch_size=batch_size or cfg.batch_size)
                row.update(
                    iteration=iteration, checkpoint=str(path), generator="G_ema" if ema else "G"
                )
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def curve_table(rows: list[dict], metrics: Sequence[str]) -> str:
    """A run's curve as text: one line per iteration, one column per metric and sample mode."""
    modes = sorted({r["sample_mode"] for r in rows})
    cols = [(m, mode) for m in metrics for mode in modes]
    table: dict[int, dict] = {}
    for r in rows:
        for m in metrics:
            table.setdefault(r["iteration"], {})[(m, r["sample_mode"])] = r[m]
    lines = ["iteration  " + "  ".join(f"{m + ' ' + mode:>16}" for m, mode in cols)]
    for it in sorted(table):
        cells = "  ".join(f"{table[it][c]:16.3f}" if c in table[it] else f"{'-':>16}" for c in cols)
        lines.append(f"{it:9d}  {cells}")
    return "\n".join(lines)


def print_progress(text: str, enabled: bool) -> None:
    if enabled:
        print(text, file=sys.stderr)
