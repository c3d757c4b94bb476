"""A run's curve of one metric against iteration: reading it from the run folder, what it
computed it (provenance), and the curve's own figures (best, still improving, rebound, running
median, area under the curve, evaluation noise).

Each run's curve comes from its ``metrics.jsonl`` (for an iteration evaluated twice, e.g.
around a resume, the last row wins) and, for evaluation seeds beyond the first, from its
``eval_seeds.jsonl``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..metrics.specs import METRICS, MODE_COUNT_KEY, metric_spec, primary_metric
from ..runfolder import RunFolder

__all__ = [
    "CompareError",
    "RunCurve",
    "read_run",
    "headline_metric",
    "provenance_warnings",
    "running_median",
    "area_under_curve",
    "evaluation_noise",
    "SMOOTH_WINDOW",
    "COLLAPSE_FACTOR",
    "COLLAPSE_METRICS",
]

SMOOTH_WINDOW = 3
COLLAPSE_FACTOR = 2.0  # "min" metric: a later value >= 2x the best; "max": <= half the best
# Metrics whose ratio to their best reads as collapse (``MetricSpec.can_collapse``); kl_modes lives
# near its sampling floor and KID can be <= 0, so for them the rebound is reported but never flagged.
COLLAPSE_METRICS = tuple(m.name for m in METRICS.values() if m.can_collapse)


class CompareError(ValueError):
    """A bad compare input; one line naming the run and what is wrong."""


@dataclass
class RunCurve:
    name: str
    path: str
    seed: Optional[int]
    metric: str
    sample_mode: Optional[str]
    num_samples: Optional[int]
    iterations: list[int]
    values: list[float]  # per evaluation; the mean over evaluation seeds when there are several
    train_seconds: list[Optional[float]]
    direction: str = "min"  # "min": lower is better (FID, kl_modes, cfd); "max": higher (modes)
    seed_values: Optional[list[list[float]]] = None  # per evaluation, one score per eval seed
    provenance: Optional[dict] = (
        None  # what computed the rows used: environments, protocols, weights
    )
    load_per_core: Optional[list[Optional[float]]] = None  # per evaluation (None: not recorded)
    device: Optional[str] = (
        None  # the device it trained on (config.json extra.device, or provenance)
    )

    @property
    def eval_seeds(self) -> int:
        return len(self.seed_values[0]) if self.seed_values else 1

    @property
    def spread(self) -> Optional[list[float]]:
        """Per evaluation: the std (ddof=1) of its scores over evaluation seeds."""
        if not self.seed_values or self.eval_seeds < 2:
            return None
        return [statistics.stdev(v) for v in self.seed_values]

    def better(self, a: float, b: float) -> bool:
        """Is ``a`` at least as good as ``b``?"""
        return a >= b if self.direction == "max" else a <= b

    @property
    def best_index(self) -> int:
        best = max(self.values) if self.direction == "max" else min(self.values)
        return self.values.index(best)  # the first iteration reaching the best value

    @property
    def best(self) -> float:
        return self.values[self.best_index]

    @property
    def best_iteration(self) -> int:
        return self.iterations[self.best_index]

    @property
    def still_improving(self) -> bool:
        """Its best value is its last evaluation: the best (and a target taken from it) is a
        bound on what the run would reach, not a value."""
        return self.best_index == len(self.values) - 1

    def value_at(self, iteration: int) -> Optional[float]:
        """The curve's value at ``iteration`` (linear between evaluations; None outside)."""
        if not self.iterations[0] <= iteration <= self.iterations[-1]:
            return None
        return float(np.interp(iteration, self.iterations, self.values))

    def first_reaching(self, target: float, tolerance: float = 0.0) -> Optional[int]:
        """Index of the first value at least as good as ``target`` loosened by ``tolerance``
        (None if never)."""
        loosened = target - tolerance if self.direction == "max" else target + tolerance
        for i, v in enumerate(self.values):
            if self.better(v, loosened):
                return i
        return None

    def smoothed(self, window: int = SMOOTH_WINDOW) -> "RunCurve":
        return replace(self, values=running_median(self.values, window), seed_values=None)

    def rebound(self) -> dict:
        """The largest rebound after the best value, and whether it is a collapse."""
        b = self.best_index
        after = self.values[b + 1 :]
        out = {
            "best": self.best,
            "best_iteration": self.best_iteration,
            "worst_after": None,
            "worst_after_iteration": None,
            "ratio": None,
            "collapsed": False,
        }
        if not after:
            return out
        worst = min(after) if self.direction == "max" else max(after)
        i = b + 1 + after.index(worst)
        out.update(worst_after=worst, worst_after_iteration=self.iterations[i])
        if self.best > 0:
            ratio = worst / self.best
            out["ratio"] = ratio
            if self.metric in COLLAPSE_METRICS:
                out["collapsed"] = (
                    ratio <= 1 / COLLAPSE_FACTOR
                    if self.direction == "max"
                    else ratio >= COLLAPSE_FACTOR
                )
        return out

    def summary(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "seed": self.seed,
            "evaluations": len(self.values),
            "best": self.best,
            "best_iteration": self.best_iteration,
            "train_seconds_to_best": self.train_seconds[self.best_index],
            "final": self.values[-1],
            "final_iteration": self.iterations[-1],
            "still_improving": self.still_improving,
            "rebound": self.rebound(),
        }


def read_run(
    path,
    *,
    metric: str = "fid",
    sample_mode: Optional[str] = None,
    num_samples: Optional[int] = None,
    eval_seeds: int = 1,
) -> RunCurve:
    """One run folder's curve of ``metric`` against iteration, from ``metrics.jsonl``.

    ``num_samples`` selects rows by the metric's own sample count (``mode_samples`` for the
    mode metrics, ``num_samples`` for the Inception ones). ``eval_seeds`` > 1: each point is the
    mean of the training row's score and the scores from the next evaluation seeds, read from
    ``eval_seeds.jsonl`` (``rescore.rescore_run`` writes them)."""
    from ..errors import MetricsError

    try:
        spec = metric_spec(metric)
    except MetricsError as e:
        raise CompareError(f"--metric {metric!r}: {e}") from None
    count_key = spec.count_key
    folder = RunFolder(path)
    run = folder.path
    if not run.is_dir():
        raise CompareError(f"run {str(path)!r}: not a folder")
    if not folder.metrics_file.is_file():
        raise CompareError(
            f"run {str(path)!r}: no {RunFolder.METRICS} (was it trained with --fid-every > 0?)"
        )
    if eval_seeds < 1:
        raise CompareError(f"--eval-seeds {eval_seeds}: must be >= 1")
    try:
        config = folder.read_config() or {}
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"run {str(path)!r}: unreadable {RunFolder.CONFIG} ({e})") from None
    try:  # a cut last line (a run killed mid-write) is reported and skipped
        all_rows = folder.metrics_rows()
    except ValueError as e:  # a malformed line elsewhere
        raise CompareError(f"run {str(path)!r}: {e}") from None
    rows = []
    for row in all_rows:
        if (
            isinstance(row, dict)
            and row.get(metric) is not None
            and row.get("iteration") is not None
        ):
            rows.append(row)
    if not rows:
        scored = _scored(all_rows)
        has = f"it has {', '.join(scored)}" if scored else "it has no metric values at all"
        raise CompareError(
            f"run {str(path)!r}: metrics.jsonl has no {metric!r} values; {has} "
            f"(choose one with --metric)"
        )

    rows, mode, count = _one_protocol(
        rows, path, metric, count_key, config.get("sample_mode"), sample_mode, num_samples
    )

    by_iteration = {}
    for r in rows:  # the last evaluation of an iteration wins
        by_iteration[int(r["iteration"])] = r
    its = sorted(by_iteration)
    values = [float(by_iteration[i][metric]) for i in its]
    used = [by_iteration[i] for i in its]  # the rows behind the curve (and their seed rows below)
    seed_values = None
    if eval_seeds > 1:
        seed_values, matching = _seed_scores(
            folder, path, metric, count_key, mode, count, [by_iteration[i] for i in its], eval_seeds
        )
        values = [statistics.fmean(p) for p in seed_values]
        used = [*used, *matching]
    return RunCurve(
        name=run.name,
        path=str(run),
        seed=config.get("seed"),
        metric=metric,
        sample_mode=mode,
        num_samples=count,
        iterations=its,
        values=values,
        train_seconds=[by_iteration[i].get("train_seconds") for i in its],
        direction=spec.direction,
        seed_values=seed_values,
        provenance=_provenance(run, used, metric),
        load_per_core=[_float_or_none(by_iteration[i].get("load_per_core")) for i in its],
        device=_training_device(run, config, [by_iteration[i] for i in its]),
    )


def _scored(rows: list) -> list[str]:
    """The known metrics with values in ``rows``, in ``METRICS``' order."""
    present = {k for r in rows if isinstance(r, dict) for k, v in r.items() if v is not None}
    return [m for m in METRICS if m in present]


def headline_metric(paths: Sequence) -> str:
    """The metric the runs' ``best.pt`` follows (``--best-metric``, else FID where they scored
    it, else cfd): what ``compare`` compares when no ``--metric`` is given. Runs that follow
    different ones are refused with each named; folders that are no runs are left to
    ``read_run`` to report."""
    chosen: dict[str, list[str]] = {}
    for path in paths:
        folder = RunFolder(path)
        try:
            config = folder.read_config() or {}
            rows = folder.metrics_rows() if folder.metrics_file.is_file() else []
        except (OSError, ValueError):
            continue
        if not rows:
            continue
        metric = config.get("best_metric") or primary_metric(_scored(rows))
        chosen.setdefault(metric, []).append(folder.path.name)
    if len(chosen) > 1:
        each = "; ".join(f"{m}: {', '.join(names)}" for m, names in chosen.items())
        raise CompareError(
            f"the runs' best.pt follow different metrics ({each}): choose one with --metric"
        )
    return next(iter(chosen), "fid")


def _one_protocol(
    rows: list[dict],
    path,
    metric: str,
    count_key: str,
    config_mode: Optional[str],
    sample_mode: Optional[str],
    num_samples: Optional[int],
) -> tuple[list[dict], str, int]:
    """The rows of one sample mode and one sample count (the given ones, else the only ones, else
    for the sample mode the config's): numbers from different protocols are not one curve."""
    mode = sample_mode
    modes = Counter(r.get("sample_mode") for r in rows)
    if mode is None:
        if len(modes) > 1:
            mode = config_mode
            if mode not in modes:
                raise CompareError(
                    f"run {str(path)!r}: metrics.jsonl mixes sample modes {sorted(map(str, modes))}: "
                    f"choose one with --sample-mode"
                )
        else:
            mode = next(iter(modes))
    rows = [r for r in rows if r.get("sample_mode") == mode]
    counts = Counter(r.get(count_key) for r in rows)
    count = num_samples
    if count is None:
        if len(counts) > 1:
            raise CompareError(
                f"run {str(path)!r}: metrics.jsonl mixes sample counts {sorted(map(str, counts))}: "
                f"choose one with --samples"
            )
        count = next(iter(counts))
    rows = [r for r in rows if r.get(count_key) == count]
    if not rows:
        raise CompareError(
            f"run {str(path)!r}: no {metric!r} rows with sample mode {mode!r} and {count} samples"
        )
    return rows, mode, count


def _seed_scores(
    folder: RunFolder,
    path,
    metric: str,
    count_key: str,
    mode: str,
    count: int,
    curve_rows: list[dict],
    eval_seeds: int,
) -> tuple[list[list[float]], list[dict]]:
    """Per curve point, its training row's score then those of the next ``eval_seeds`` - 1
    evaluation seeds (from ``eval_seeds.jsonl``); and the seed rows used."""
    from ..commands import script_command
    from ..rescore import evaluation_seeds, seed_rows

    matching = [
        r
        for r in seed_rows(folder)
        if r.get(metric) is not None and r.get("sample_mode") == mode and r.get(count_key) == count
    ]
    extra = {(int(r["iteration"]), int(r.get("seed", 0))): float(r[metric]) for r in matching}
    seed_values = []
    for row in curve_rows:
        i = int(row["iteration"])
        point = [float(row[metric])]
        for s in evaluation_seeds(int(row.get("seed", 0)), eval_seeds)[1:]:
            if (i, s) not in extra:
                raise CompareError(
                    f"run {str(path)!r}: iteration {i} has no {metric} score from evaluation "
                    f"seed {s} in {RunFolder.EVAL_SEEDS}; "
                    f"{script_command('evaluate.py', 'compare', '--eval-seeds', eval_seeds)} RUN... "
                    f"--baseline RUN... scores it from the run's snapshots"
                )
            point.append(extra[(i, s)])
        seed_values.append(point)
    return seed_values, matching


def _float_or_none(v) -> Optional[float]:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _training_device(run: Path, config: dict, rows: list[dict]) -> Optional[str]:
    """config.json's ``extra.device``, else the device of the training rows' environments."""
    from ..provenance import read_environments

    extra = config.get("extra") if isinstance(config.get("extra"), dict) else {}
    if extra.get("device"):
        return str(extra["device"])
    known = read_environments(run)
    devices = sorted(
        {
            str(known[r["env_key"]].get("device"))
            for r in rows
            if r.get("env_key") in known and known[r["env_key"]].get("device")
        }
    )
    return ", ".join(devices) if devices else None


def _provenance(run: Path, rows: list[dict], metric: str) -> dict:
    from ..provenance import read_environments

    def values(key):
        return sorted({str(r[key]) for r in rows if r.get(key) is not None})

    keys = values("env_key")
    known = read_environments(run)
    # The network behind the compared metric: the mode classifier, or the Inception weights.
    weights_key = (
        "classifier_sha256" if metric_spec(metric).count_key == MODE_COUNT_KEY else "weights_sha256"
    )
    return {
        "env_keys": keys,
        "environments": {k: known[k] for k in keys if k in known},
        "rows_without_env_key": sum(r.get("env_key") is None for r in rows),
        "fid_protocols": values("fid_protocol") if weights_key == "weights_sha256" else [],
        "weights": values(weights_key),
    }


def provenance_warnings(runs: Sequence[RunCurve]) -> list[str]:
    """One line per way the compared numbers were computed differently (protocol, weights or
    classifier, library versions, device, CPU): such numbers may differ for that reason alone."""
    provs = [r.provenance for r in runs if r.provenance]
    warnings = []
    bare = [r.name for r in runs if r.provenance and r.provenance.get("rows_without_env_key")]
    if bare:
        warnings.append(
            f"run{'s' if len(bare) > 1 else ''} {', '.join(bare)} "
            f"{'have' if len(bare) > 1 else 'has'} rows without provenance (no env_key: "
            "which library versions, device and weights computed them is unknown)"
        )
    protocols = sorted({p for pr in provs for p in pr["fid_protocols"]})
    if len(protocols) > 1:
        warnings.append(f"the rows mix FID protocols {protocols}: their numbers are not comparable")
    weights = sorted({w[:12] for pr in provs for w in pr["weights"]})
    if len(weights) > 1:
        warnings.append(
            f"the rows come from different networks (Inception weights or mode classifier) {weights}"
        )
    envs = [env for pr in provs for env in pr["environments"].values()]
    differ = []
    for field in sorted({f for env in envs for f in env}):
        seen = sorted({str(env.get(field)) for env in envs})
        if len(seen) > 1:
            differ.append(f"{field} ({', '.join(seen)})")
    if differ:
        warnings.append(
            "the rows were computed in environments that differ in " + "; ".join(differ)
        )
    return warnings


def running_median(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Centred running median; near the ends the window holds what is there."""
    half = window // 2
    return [float(np.median(values[max(0, i - half) : i + half + 1])) for i in range(len(values))]


def area_under_curve(curve: RunCurve, start: int, stop: int) -> Optional[float]:
    """The curve's mean value over iterations [start, stop]: the trapezoid area of the
    piecewise-linear curve divided by the range (its value there when start == stop)."""
    its = np.asarray(curve.iterations, dtype=np.float64)
    vals = np.asarray(curve.values, dtype=np.float64)
    if start < its[0] or stop > its[-1] or start > stop:
        return None
    if start == stop:
        return float(np.interp(start, its, vals))
    grid = np.unique(np.concatenate([[start, stop], its[(its > start) & (its < stop)]]))
    v = np.interp(grid, its, vals)
    return float(((v[1:] + v[:-1]) / 2 * np.diff(grid)).sum() / (stop - start))


def evaluation_noise(runs: Sequence[RunCurve]) -> Optional[dict]:
    """sigma_eval: the root of the mean per-point variance over evaluation seeds, all runs."""
    variances = [statistics.variance(p) for r in runs if r.eval_seeds > 1 for p in r.seed_values]
    if not variances:
        return None
    return {
        "eval_seeds": runs[0].eval_seeds,
        "sigma": math.sqrt(statistics.fmean(variances)),
        "max_point_std": math.sqrt(max(variances)),
        "points": len(variances),
    }
