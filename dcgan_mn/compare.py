"""Compare runs' metric curves: the paper's acceleration, with statistics a reviewer accepts.

The paper's rule, for one baseline run B and one candidate run C (docs/comparing-notes.md):

* target = B's best value; S_base = the first iteration at which B reaches it;
* S_cand = the first iteration at which C is at least as good as the target (None: never);
  "good" follows the metric's direction (``metrics.metric_direction``): lower FID / kl_modes /
  cfd / KID, higher modes / inception_score / precision / recall / density / coverage;
* acceleration = 1 - S_cand / S_base (0.58: C needed 58% fewer generator updates);
* time_acceleration = the same ratio in training-only seconds (evaluation excluded), which
  charges MN for its extra cost per iteration.

That rule keys on one noisy minimum, so the report adds:

* **evaluation noise** (``eval_seeds`` > 1): every curve point is the mean of the snapshot's
  scores from that many evaluation seeds (``rescore``), its spread their std; sigma_eval pools
  the per-point variances of all runs. The *tolerant* rule counts a point within sigma_eval of
  the target as reaching it (S_base likewise: B's first point within sigma_eval of its best);
* the *smoothed* rule: the same rule on each curve's running median over 3 evaluations
  (centred; the 2 available at either end);
* the *area under the curve* over the iteration range every run covers, as the curve's mean
  value there (trapezoids on the piecewise-linear curve / range length): lower is better for a
  "min" metric, as for the metric itself;
* per run, a **collapse flag**: the largest rebound after the best value (the worst later
  value and where), flagged when it is a factor ``COLLAPSE_FACTOR`` worse than the best;
* **bootstrap intervals** (percentile, ``BOOTSTRAP_RESAMPLES`` resamples, 95%, fixed seed) for
  every mean from MIN_UNITS_FOR_INTERVAL_VERDICT units on; below, the bracket is the units'
  range, labelled "range of n" (3 units make the percentile interval exactly their range), and
  verdicts rest on a sign count. With arms sharing seeds, runs are **paired by seed** and the
  pair is the resampling unit (differences and accelerations are per pair); otherwise every
  candidate is paired with every baseline and each arm's runs are resampled independently.
  Per-arm rows are always resampled by run;
* **censoring**: a pair whose candidate never reaches the target has S_cand = infinity
  (acceleration -inf) and counts against the candidate everywhere: "reached k of n", the median
  over all pairs, the share of pairs reached by each iteration, the sign count and the
  permutation test. The mean acceleration and its interval exist only when every pair reached;
* **exact permutation tests** (``scipy.stats.permutation_test``, two-sided): sign flips of the
  pairs (statistic: the mean difference; for accelerations the signed-rank sum), or, unpaired,
  relabellings of runs between the arms;
* **still improving**: a run whose best value is its last evaluation; its best and a target
  taken from it are bounds;
* final values are compared at the common last iteration; a difference or acceleration whose
  interval contains 0 is "not detected at this sample size", never "no difference"; the report
  ends with the seeds needed for 80% power and a reading guide (``docs/comparing.md``). The
  collapse flag applies to COLLAPSE_METRICS (``MetricSpec.can_collapse``) only.

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

from .fileio import atomic_write
from .metrics.specs import METRICS, MODE_COUNT_KEY, metric_spec
from .runfolder import RunFolder

__all__ = ["CompareError", "RunCurve", "read_run", "pair_runs", "acceleration", "bootstrap_interval",
           "provenance_warnings", "paired_permutation_p", "independent_permutation_p", "READING_GUIDE",
           "running_median", "area_under_curve", "evaluation_noise", "compare_runs",
           "render_markdown", "plot_curves", "write_outputs",
           "BOOTSTRAP_RESAMPLES", "CONFIDENCE", "COLLAPSE_FACTOR", "SMOOTH_WINDOW"]

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0  # the report is a pure function of the metrics files
SMOOTH_WINDOW = 3
COLLAPSE_FACTOR = 2.0  # "min" metric: a later value >= 2x the best; "max": <= half the best
# Metrics whose ratio to their best reads as collapse (``MetricSpec.can_collapse``); kl_modes lives
# near its sampling floor and KID can be <= 0, so for them the rebound is reported but never flagged.
COLLAPSE_METRICS = tuple(m.name for m in METRICS.values() if m.can_collapse)
MIN_UNITS_FOR_INTERVAL_VERDICT = 5  # below: a sign count, not a 95% claim, and the interval is the range
PERMUTATION_RESAMPLES = 20_000  # exact (every sign flip / relabelling) up to this many, else Monte Carlo
PERMUTATION_SEED = 0
POWER = 0.8  # the seed-count table: 80% power at two-sided alpha 1 - CONFIDENCE
NOT_REACHED = -1e9  # an acceleration below any real one (S_cand = infinity) where a test needs a number
LOADED_MACHINE = 1.25  # load_per_core above this: a training second is not a quiet machine's second


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
    provenance: Optional[dict] = None  # what computed the rows used: environments, protocols, weights
    load_per_core: Optional[list[Optional[float]]] = None  # per evaluation (None: not recorded)
    device: Optional[str] = None  # the device it trained on (config.json extra.device, or provenance)

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
        after = self.values[b + 1:]
        out = {"best": self.best, "best_iteration": self.best_iteration, "worst_after": None,
               "worst_after_iteration": None, "ratio": None, "collapsed": False}
        if not after:
            return out
        worst = min(after) if self.direction == "max" else max(after)
        i = b + 1 + after.index(worst)
        out.update(worst_after=worst, worst_after_iteration=self.iterations[i])
        if self.best > 0:
            ratio = worst / self.best
            out["ratio"] = ratio
            if self.metric in COLLAPSE_METRICS:
                out["collapsed"] = ratio <= 1 / COLLAPSE_FACTOR if self.direction == "max" else ratio >= COLLAPSE_FACTOR
        return out

    def summary(self) -> dict:
        return {
            "name": self.name, "path": self.path, "seed": self.seed,
            "evaluations": len(self.values),
            "best": self.best, "best_iteration": self.best_iteration,
            "train_seconds_to_best": self.train_seconds[self.best_index],
            "final": self.values[-1], "final_iteration": self.iterations[-1],
            "still_improving": self.still_improving,
            "rebound": self.rebound(),
        }


def read_run(
    path, *, metric: str = "fid", sample_mode: Optional[str] = None,
    num_samples: Optional[int] = None, eval_seeds: int = 1,
) -> RunCurve:
    """One run folder's curve of ``metric`` against iteration, from ``metrics.jsonl``.

    ``num_samples`` selects rows by the metric's own sample count (``mode_samples`` for the
    mode metrics, ``num_samples`` for the Inception ones). ``eval_seeds`` > 1: each point is the
    mean of the training row's score and the scores from the next evaluation seeds, read from
    ``eval_seeds.jsonl`` (``rescore.rescore_run`` writes them)."""
    from .errors import MetricsError

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
        raise CompareError(f"run {str(path)!r}: no {RunFolder.METRICS} (was it trained with --fid-every > 0?)")
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
        if isinstance(row, dict) and row.get(metric) is not None and row.get("iteration") is not None:
            rows.append(row)
    if not rows:
        raise CompareError(f"run {str(path)!r}: metrics.jsonl has no {metric!r} values")

    mode = sample_mode
    modes = Counter(r.get("sample_mode") for r in rows)
    if mode is None:
        if len(modes) > 1:
            mode = config.get("sample_mode")
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
        raise CompareError(f"run {str(path)!r}: no {metric!r} rows with sample mode {mode!r} and "
                           f"{count} samples")

    by_iteration = {}
    for r in rows:  # the last evaluation of an iteration wins
        by_iteration[int(r["iteration"])] = r
    its = sorted(by_iteration)
    values = [float(by_iteration[i][metric]) for i in its]
    used = [by_iteration[i] for i in its]  # the rows behind the curve (and their seed rows below)
    seed_values = None
    if eval_seeds > 1:
        from .rescore import evaluation_seeds, seed_rows

        matching = [r for r in seed_rows(folder) if r.get(metric) is not None
                    and r.get("sample_mode") == mode and r.get(count_key) == count]
        extra = {(int(r["iteration"]), int(r.get("seed", 0))): float(r[metric]) for r in matching}
        seed_values = []
        for i, v in zip(its, values):
            point = [v]
            for s in evaluation_seeds(int(by_iteration[i].get("seed", 0)), eval_seeds)[1:]:
                if (i, s) not in extra:
                    raise CompareError(
                        f"run {str(path)!r}: iteration {i} has no {metric} score from evaluation "
                        f"seed {s} in {RunFolder.EVAL_SEEDS}; `evaluate.py compare --eval-seeds "
                        f"{eval_seeds}` scores it from the run's snapshots")
                point.append(extra[(i, s)])
            seed_values.append(point)
        values = [statistics.fmean(p) for p in seed_values]
        used = [*used, *matching]
    return RunCurve(
        name=run.name, path=str(run), seed=config.get("seed"), metric=metric,
        sample_mode=mode, num_samples=count, iterations=its, values=values,
        train_seconds=[by_iteration[i].get("train_seconds") for i in its],
        direction=spec.direction, seed_values=seed_values,
        provenance=_provenance(run, used, metric),
        load_per_core=[_float_or_none(by_iteration[i].get("load_per_core")) for i in its],
        device=_training_device(run, config, [by_iteration[i] for i in its]),
    )


def _float_or_none(v) -> Optional[float]:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _training_device(run: Path, config: dict, rows: list[dict]) -> Optional[str]:
    """config.json's ``extra.device``, else the device of the training rows' environments."""
    from .provenance import read_environments

    extra = config.get("extra") if isinstance(config.get("extra"), dict) else {}
    if extra.get("device"):
        return str(extra["device"])
    known = read_environments(run)
    devices = sorted({str(known[r["env_key"]].get("device")) for r in rows
                      if r.get("env_key") in known and known[r["env_key"]].get("device")})
    return ", ".join(devices) if devices else None


def _provenance(run: Path, rows: list[dict], metric: str) -> dict:
    from .provenance import read_environments

    def values(key):
        return sorted({str(r[key]) for r in rows if r.get(key) is not None})

    keys = values("env_key")
    known = read_environments(run)
    # The network behind the compared metric: the mode classifier, or the Inception weights.
    weights_key = "classifier_sha256" if metric_spec(metric).count_key == MODE_COUNT_KEY else "weights_sha256"
    return {"env_keys": keys, "environments": {k: known[k] for k in keys if k in known},
            "rows_without_env_key": sum(r.get("env_key") is None for r in rows),
            "fid_protocols": values("fid_protocol") if weights_key == "weights_sha256" else [],
            "weights": values(weights_key)}


def provenance_warnings(runs: Sequence[RunCurve]) -> list[str]:
    """One line per way the compared numbers were computed differently (protocol, weights or
    classifier, library versions, device, CPU): such numbers may differ for that reason alone."""
    provs = [r.provenance for r in runs if r.provenance]
    warnings = []
    bare = [r.name for r in runs if r.provenance and r.provenance.get("rows_without_env_key")]
    if bare:
        warnings.append(f"run{'s' if len(bare) > 1 else ''} {', '.join(bare)} "
                        f"{'have' if len(bare) > 1 else 'has'} rows without provenance (no env_key: "
                        "which library versions, device and weights computed them is unknown)")
    protocols = sorted({p for pr in provs for p in pr["fid_protocols"]})
    if len(protocols) > 1:
        warnings.append(f"the rows mix FID protocols {protocols}: their numbers are not comparable")
    weights = sorted({w[:12] for pr in provs for w in pr["weights"]})
    if len(weights) > 1:
        warnings.append(f"the rows come from different networks (Inception weights or mode classifier) {weights}")
    envs = [env for pr in provs for env in pr["environments"].values()]
    differ = []
    for field in sorted({f for env in envs for f in env}):
        seen = sorted({str(env.get(field)) for env in envs})
        if len(seen) > 1:
            differ.append(f"{field} ({', '.join(seen)})")
    if differ:
        warnings.append("the rows were computed in environments that differ in " + "; ".join(differ))
    return warnings


# --------------------------------------------------------------------------------------------
# Curve statistics
# --------------------------------------------------------------------------------------------


def running_median(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Centred running median; near the ends the window holds what is there."""
    half = window // 2
    return [float(np.median(values[max(0, i - half):i + half + 1])) for i in range(len(values))]


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
    return {"eval_seeds": runs[0].eval_seeds, "sigma": math.sqrt(statistics.fmean(variances)),
            "max_point_std": math.sqrt(max(variances)), "points": len(variances)}


def bootstrap_interval(
    values, *, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> Optional[list[float]]:
    """Percentile-bootstrap interval of a mean.

    ``values``: [n] (one value per resampling unit: a run, or a seed-paired pair) or
    [n_cand, n_base] (every candidate x baseline pair; candidates and baselines are resampled
    independently and the statistic is the mean over the resampled pairs; both arms need 2 runs). NaN marks an
    undefined entry (a pair that never reached the target); it is left out of each resample's
    mean, and resamples with no defined entry are dropped. None with fewer than 2 units."""
    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if x.ndim == 1:
        if np.isfinite(x).sum() < 2:
            return None
        idx = rng.integers(0, x.shape[0], size=(resamples, x.shape[0]))  # [R, n]
        draws, axes = x[idx], (1,)  # [R, n]
    else:
        if min(x.shape) < 2 or np.isfinite(x).sum() < 2:  # each arm's variation must show
            return None
        ci = rng.integers(0, x.shape[0], size=(resamples, x.shape[0]))  # [R, nc]
        bi = rng.integers(0, x.shape[1], size=(resamples, x.shape[1]))  # [R, nb]
        draws, axes = x[ci[:, :, None], bi[:, None, :]], (1, 2)  # [R, nc, nb]
    defined = np.isfinite(draws)
    counts = defined.sum(axis=axes)  # [R]
    sums = np.where(defined, draws, 0.0).sum(axis=axes)  # [R]
    means = sums[counts > 0] / counts[counts > 0]
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _stat(values, matrix=None, units: Optional[int] = None) -> dict:
    """mean, std (ddof=1), n over the defined values, and an interval of the mean with its label
    (``ci_label``): from MIN_UNITS_FOR_INTERVAL_VERDICT resampling units on (``units``, default
    the values' count) the percentile bootstrap (of ``matrix`` when the resampling is per arm,
    else of ``values``), labelled "95%"; below, the bootstrap is essentially [min, max], so the
    interval is that range, labelled "range of n"."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "ci": None, "ci_label": None}
    units = len(vals) if units is None else units
    if len(vals) < 2:
        interval, label = None, None
    elif units < MIN_UNITS_FOR_INTERVAL_VERDICT:
        interval, label = [min(vals), max(vals)], f"range of {len(vals)}"
    else:
        interval = bootstrap_interval(matrix if matrix is not None else vals)
        label = f"{100 * CONFIDENCE:.0f}%" if interval else None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "ci": interval, "ci_label": label}


def _signed_rank(x, axis=-1):
    """Wilcoxon's signed-rank sum: sum of sign(x) * rank(|x|). A not-reached pair (-inf) is the
    most extreme pair for the baseline; its flip (+inf) the most extreme for the candidate."""
    import scipy.stats

    x = np.asarray(x, dtype=np.float64)
    return np.sum(np.sign(x) * scipy.stats.rankdata(np.abs(x), axis=axis), axis=axis)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def paired_permutation_p(values, *, statistic: str = "mean",
                         resamples: int = PERMUTATION_RESAMPLES) -> Optional[dict]:
    """Two-sided sign-flip permutation test of per-pair values (``scipy.stats.permutation_test``,
    permutation_type="samples"): under "no difference" each pair's sign is a coin flip. Exact
    (all 2^n flips) when 2^n <= ``resamples``; its smallest p is 2 / 2^n. ``statistic``: "mean"
    (differences) or "signed_rank" (accelerations: a pair that never reached the target is
    -inf, the most extreme pair for the baseline). None below 2 values."""
    import scipy.stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size < 2 or (statistic == "mean" and not np.isfinite(x).all()):
        return None
    fn = _signed_rank if statistic == "signed_rank" else _mean
    res = scipy.stats.permutation_test(
        (x,), fn, permutation_type="samples", vectorized=True, n_resamples=resamples,
        alternative="two-sided", rng=np.random.default_rng(PERMUTATION_SEED))
    return {"p": float(res.pvalue), "n": int(x.size), "exact": 2 ** int(x.size) <= resamples,
            "smallest_p": min(1.0, 2 / 2 ** int(x.size)) if 2 ** int(x.size) <= resamples else None,
            "permutation_type": "samples", "statistic": statistic}


def independent_permutation_p(n_cand: int, n_base: int, statistic,
                              *, resamples: int = PERMUTATION_RESAMPLES) -> Optional[dict]:
    """Two-sided permutation test of runs not paired by seed (``scipy.stats.permutation_test``,
    permutation_type="independent"): under "no difference" any n_cand of the runs could have been
    the candidates. ``statistic(cand_idx, base_idx)`` gets index arrays into the runs (the
    candidates are 0..n_cand-1). Exact when C(n, n_cand) <= ``resamples``."""
    import scipy.stats

    if n_cand < 2 or n_base < 2:  # scipy needs two runs per arm
        return None
    total = math.comb(n_cand + n_base, n_cand)
    res = scipy.stats.permutation_test(
        (np.arange(n_cand), np.arange(n_cand, n_cand + n_base)),
        lambda ci, bi: statistic(np.asarray(ci, dtype=int), np.asarray(bi, dtype=int)),
        permutation_type="independent", vectorized=False, n_resamples=resamples,
        alternative="two-sided", rng=np.random.default_rng(PERMUTATION_SEED))
    p = float(res.pvalue)
    if math.isnan(p):
        return None
    return {"p": p, "n": n_cand + n_base, "exact": total <= resamples,
            "smallest_p": min(1.0, 2 / total) if total <= resamples else None,
            "permutation_type": "independent", "statistic": "difference of arm means"}


def pair_runs(candidates: Sequence[RunCurve], baselines: Sequence[RunCurve]) -> tuple[str, list]:
    """("seed", pairs by seed) when both arms hold the same unique seeds, else ("all", every pair)."""
    c_seeds = [c.seed for c in candidates]
    b_seeds = [b.seed for b in baselines]
    if (None not in c_seeds and len(set(c_seeds)) == len(c_seeds)
            and len(set(b_seeds)) == len(b_seeds) and set(c_seeds) == set(b_seeds)):
        by_seed = {b.seed: b for b in baselines}
        return "seed", [(c, by_seed[c.seed]) for c in candidates]
    return "all", [(c, b) for c in candidates for b in baselines]


def acceleration(candidate: RunCurve, baseline: RunCurve, *, tolerance: float = 0.0) -> dict:
    """The paper's acceleration of ``candidate`` over ``baseline`` (module docstring); with a
    ``tolerance``, points within it of the target count as reaching it."""
    target = baseline.best
    j = baseline.first_reaching(target, tolerance)  # == best_index without a tolerance
    s_base, t_base = baseline.iterations[j], baseline.train_seconds[j]
    i = candidate.first_reaching(target, tolerance)
    s_cand = candidate.iterations[i] if i is not None else None
    t_cand = candidate.train_seconds[i] if i is not None else None
    return {
        "candidate": candidate.name, "baseline": baseline.name,
        "target": target, "target_is_bound": baseline.still_improving,
        "s_base": s_base, "s_cand": s_cand, "reached": s_cand is not None,
        "candidate_last_iteration": candidate.iterations[-1],
        "baseline_last_iteration": baseline.iterations[-1],
        "acceleration": (1 - s_cand / s_base) if s_cand is not None and s_base > 0 else None,
        "train_seconds_base": t_base, "train_seconds_cand": t_cand,
        "time_acceleration": (1 - t_cand / t_base) if t_cand is not None and t_base else None,
    }


def _verdict(stat: dict, better_if_positive: bool, values=(), noise: Optional[float] = None,
             of: Optional[int] = None, p: Optional[float] = None, unit: str = "pairs") -> str:
    """One phrase on a mean difference or acceleration (positive = ``better_if_positive``).

    ``values``: one per resampling unit; -inf marks a pair that never reached the target (it
    counts for the baseline in the sign count). With at least MIN_UNITS_FOR_INTERVAL_VERDICT
    units and no such pair the bootstrap interval decides. Below that a percentile interval is no
    95% interval (with 3 units it is exactly [min, max], covering the mean ~75% of the time), so
    the phrase counts signs and gives the two-sided sign-test p instead. An interval containing 0
    is "not detected at this sample size", never "no difference". ``p``: the permutation test's
    p, appended."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return "no value" if not of else f"no value: none of {of} pairs has one"
    if n < 2:
        return "a single pair or run: no interval"
    censored = sum(math.isinf(v) and v < 0 for v in vals)
    if n < MIN_UNITS_FOR_INTERVAL_VERDICT or censored or stat.get("ci") is None:
        pos, neg = sum(v > 0 for v in vals), sum(v < 0 for v in vals)
        untied, k = pos + neg, max(pos, neg)  # the sign test leaves ties out
        side = "candidate" if (pos > neg) == better_if_positive else "baseline"
        never = f"; {censored} never reached the target, counted for the baseline" if censored else ""
        if pos == neg:
            text = (f"not detected at this sample size (n = {n}): {pos} {unit if pos != 1 else unit[:-1]} "
                    f"favour{'s' if pos == 1 else ''} each arm{never}")
        else:
            sign_p = min(1.0, 2 * sum(math.comb(untied, j) for j in range(k, untied + 1)) / 2 ** untied)
            ties = f", {n - untied} tied" if n > untied else ""
            text = f"{k} of {n} {unit} favour the {side}{ties}{never} (sign test p = {sign_p:.2f})"
            if n < MIN_UNITS_FOR_INTERVAL_VERDICT:
                text += ": too few seeds to call a difference"
            elif sign_p >= 1 - CONFIDENCE:
                text += f": not detected at this sample size (n = {n})"
    else:
        ci = stat["ci"]
        if ci[0] <= 0 <= ci[1]:
            text = f"not detected at this sample size (n = {n}): the interval contains 0"
        else:
            better = (ci[0] > 0) == better_if_positive
            text = f"the interval excludes 0: the candidate is {'better' if better else 'worse'}"
    if p is not None:
        text += f"; permutation p = {p:.3g}"
    if noise is not None and stat.get("mean") is not None and abs(stat["mean"]) <= noise:
        text += f"; the mean is within the evaluation noise (sigma_eval {noise:.3g})"
    return text


def compare_runs(
    candidates: Sequence[RunCurve], baselines: Sequence[RunCurve],
    *, candidate_label: str = "candidate", baseline_label: str = "baseline",
) -> dict:
    """Everything the report shows, as one JSON-ready dict."""
    ref = baselines[0]
    metric, direction = ref.metric, ref.direction
    for r in [*candidates, *baselines]:
        if (r.sample_mode, r.num_samples) != (ref.sample_mode, ref.num_samples):
            raise CompareError(
                f"run {r.path!r}: {r.sample_mode}/{r.num_samples} samples, but {ref.path!r} "
                f"has {ref.sample_mode}/{ref.num_samples}: numbers are not comparable"
            )
        if r.eval_seeds != ref.eval_seeds:
            raise CompareError(f"run {r.path!r}: {r.eval_seeds} evaluation seeds, {ref.path!r} "
                               f"{ref.eval_seeds}")
    runs = [*candidates, *baselines]
    noise = evaluation_noise(runs)
    # The rule only sees evaluated iterations: an S is as fine as the evaluation interval.
    gaps = Counter(b - a for r in runs for a, b in zip(r.iterations, r.iterations[1:]))
    interval = gaps.most_common(1)[0][0] if gaps else None  # an extra final evaluation aside
    sigma = noise["sigma"] if noise else 0.0
    pairing, pairs = pair_runs(candidates, baselines)
    c_index = {id(c): i for i, c in enumerate(candidates)}
    b_index = {id(b): i for i, b in enumerate(baselines)}

    # ---- The common iteration range for the area under the curve, and the common last one.
    auc_start = max(r.iterations[0] for r in runs)
    auc_stop = min(r.iterations[-1] for r in runs)
    auc = {id(r): area_under_curve(r, auc_start, auc_stop) for r in runs}
    final_common = {id(r): r.value_at(auc_stop) for r in runs}

    # ---- Per pair: the rule raw, tolerant of evaluation noise, and on smoothed curves.
    smooth = {id(r): r.smoothed() for r in runs}
    results = []
    for c, b in pairs:
        p = acceleration(c, b)
        tol = acceleration(c, b, tolerance=sigma) if noise else None
        sm = acceleration(smooth[id(c)], smooth[id(b)])
        last = min(c.iterations[-1], b.iterations[-1])  # final values compared at one iteration
        p.update(
            resolution=(interval / p["s_base"]) if interval and p["s_base"] else None,
            acceleration_tolerant=tol["acceleration"] if tol else None,
            s_cand_tolerant=tol["s_cand"] if tol else None, s_base_tolerant=tol["s_base"] if tol else None,
            acceleration_smoothed=sm["acceleration"], s_cand_smoothed=sm["s_cand"],
            s_base_smoothed=sm["s_base"], target_smoothed=sm["target"],
            best_difference=c.best - b.best,
            final_difference=c.value_at(last) - b.value_at(last), final_difference_iteration=last,
            auc_difference=(auc[id(c)] - auc[id(b)]) if auc[id(c)] is not None and auc[id(b)] is not None else None,
        )
        results.append(p)

    # ---- Censoring: a pair whose candidate never reached the target counts against it.
    reached_key = {"acceleration": "s_cand", "acceleration_tolerant": "s_cand_tolerant",
                   "acceleration_smoothed": "s_cand_smoothed", "time_acceleration": "s_cand"}

    def censored(p: dict, key: str) -> Optional[float]:
        """The pair's value of ``key``; -inf (S_cand = infinity) when it never reached; None
        when unknown (no training seconds, no tolerant rule without evaluation noise)."""
        if key in reached_key:
            if key == "acceleration_tolerant" and not noise:
                return None
            if p[reached_key[key]] is None:
                return -math.inf
        return p[key]

    def pair_stat(key: str) -> dict:
        """Mean over pairs of ``key`` with its interval: resampling pairs (seed pairing) or
        each arm's runs (all pairs)."""
        vals = [p[key] for p in results]
        if pairing == "seed":
            return _stat(vals, [np.nan if v is None else v for v in vals])
        m = np.full((len(candidates), len(baselines)), np.nan)
        for (c, b), v in zip(pairs, vals):
            if v is not None:
                m[c_index[id(c)], b_index[id(b)]] = v
        return _stat(vals, m, units=min(len(candidates), len(baselines)))

    def units(key: str) -> list:
        """The units the sign count rests on: one per pair (seed pairing), or one per candidate
        run (all pairs): its mean difference over every baseline, or its median acceleration
        (not reached = -inf)."""
        vals = [censored(p, key) for p in results]
        if pairing == "seed":
            return vals
        out = []
        for c in candidates:
            mine = [v for (cc, _), v in zip(pairs, vals) if cc is c and v is not None]
            if mine:
                out.append(float(np.median(mine)) if key in reached_key else statistics.fmean(mine))
        return out

    def accel_stat(key: str) -> dict:
        """The acceleration with its censoring explicit: reached k of n; the mean and interval
        only when every pair reached; the median over all pairs with not reached as -inf; the
        fraction of pairs that reached by each evaluated iteration."""
        vals = [censored(p, key) for p in results]
        known = [v for v in vals if v is not None]
        k = sum(math.isfinite(v) for v in known)
        stat = pair_stat(key) if known and k == len(known) else {
            "mean": None, "std": None, "n": len(known), "ci": None, "ci_label": None}
        med = float(np.median(known)) if known else None
        stat.update(pairs=len(known), reached=k,
                    median=med if med is not None and math.isfinite(med) else None,
                    median_reached=med is not None and math.isfinite(med))
        if key != "time_acceleration" and known:
            s_key = reached_key[key]
            hits = [p[s_key] for p, v in zip(results, vals) if v is not None]
            grid = sorted({it for c in candidates for it in c.iterations})
            stat["reached_by"] = [[it, sum(h is not None and h <= it for h in hits) / len(hits)] for it in grid]
        return stat

    accel = {key: accel_stat(key) for key in reached_key}
    diffs = {key: pair_stat(f"{key}_difference") for key in ("best", "final", "auc")}
    higher_better = direction == "max"

    # ---- Permutation tests: sign flips of pairs, or relabellings of unpaired runs.
    per_run = {"best": {id(r): r.best for r in runs}, "final": final_common, "auc": auc}
    perm = {}
    for key in ("best", "final", "auc"):
        if pairing == "seed":
            perm[f"{key}_difference"] = paired_permutation_p([p[f"{key}_difference"] for p in results])
        else:
            v = np.asarray([np.nan if per_run[key][id(r)] is None else per_run[key][id(r)] for r in runs])
            perm[f"{key}_difference"] = (None if np.isnan(v).any() else independent_permutation_p(
                len(candidates), len(baselines), lambda ci, bi, v=v: v[ci].mean() - v[bi].mean()))
    for key in reached_key:
        if pairing == "seed":
            perm[key] = paired_permutation_p(units(key), statistic="signed_rank")
        elif key != "time_acceleration" and (key != "acceleration_tolerant" or noise):
            matrix = _acceleration_matrix(runs, key, sigma, smooth)
            perm[key] = independent_permutation_p(
                len(candidates), len(baselines), lambda ci, bi, m=matrix: float(np.median(m[np.ix_(ci, bi)])))
            if perm[key]:
                perm[key]["statistic"] = "median acceleration over candidate x baseline pairs"
        else:
            perm[key] = None
    unit_word = "pairs" if pairing == "seed" else "candidate runs"
    verdicts = {key: _verdict(stat, True, units(key), of=len(results), unit=unit_word)
                for key, stat in accel.items()}
    verdicts.update({f"{key}_difference": _verdict(
        stat, higher_better, units(f"{key}_difference"), noise=sigma if noise else None, unit=unit_word)
        for key, stat in diffs.items()})

    def arm_summary(arm: Sequence[RunCurve]) -> dict:
        rows = [r.summary() for r in arm]
        out = {key: _stat([r[key] for r in rows])
               for key in ("best", "best_iteration", "train_seconds_to_best", "final", "final_iteration")}
        out["auc"] = _stat([auc[id(r)] for r in arm])
        out["collapsed"] = sum(r["rebound"]["collapsed"] for r in rows)
        out["still_improving"] = sum(r["still_improving"] for r in rows)
        return out

    warnings = [*provenance_warnings(runs), *_time_warnings(results, {r.name: r for r in runs})]
    warnings = list(dict.fromkeys(warnings))  # each once, however many runs share it
    op = ">=" if higher_better else "<="
    return {
        "metric": metric,
        "direction": direction,
        "better": "higher" if higher_better else "lower",
        "sample_mode": ref.sample_mode,
        "num_samples": ref.num_samples,
        "labels": {"candidate": candidate_label, "baseline": baseline_label},
        "pairing": pairing,
        "definition": (
            "target = baseline best; S_base = first baseline iteration at its best; S_cand = first "
            f"candidate iteration with value {op} target (infinity if never: acceleration -inf); "
            "acceleration = 1 - S_cand / S_base; "
            "time_acceleration likewise in training-only seconds; tolerant: within sigma_eval of "
            f"the target; smoothed: on running medians over {SMOOTH_WINDOW} evaluations; auc: mean "
            "value over the common iteration range; final: values at the common last iteration; "
            "acceleration mean and interval only when every pair reached, else the median over "
            "all pairs with not reached as -inf"
        ),
        "statistics": {
            "bootstrap": {"method": "percentile", "resamples": BOOTSTRAP_RESAMPLES,
                          "confidence": CONFIDENCE, "seed": BOOTSTRAP_SEED,
                          "unit": "seed-paired pair of runs" if pairing == "seed"
                          else "run, resampled within each arm",
                          "arm_unit": "run",
                          "range_below": MIN_UNITS_FOR_INTERVAL_VERDICT},
            "permutation": {"resamples": PERMUTATION_RESAMPLES, "seed": PERMUTATION_SEED,
                            "permutation_type": "samples" if pairing == "seed" else "independent",
                            "tests": perm},
            "smoothing_window": SMOOTH_WINDOW,
            "auc_range": [auc_start, auc_stop],
            "final_iteration": auc_stop,
            "collapse_factor": COLLAPSE_FACTOR,
            "seeds_needed": _seeds_needed(results, diffs, pairing, candidates, baselines,
                                          per_run, noise),
        },
        "evaluation_noise": noise,
        "evaluation_interval": interval,
        "warnings": warnings,
        "runs": {
            "candidate": [{**c.summary(), "auc": auc[id(c)]} for c in candidates],
            "baseline": [{**b.summary(), "auc": auc[id(b)]} for b in baselines],
        },
        "pairs": results,
        "summary": {
            "candidate": arm_summary(candidates),
            "baseline": arm_summary(baselines),
            **accel,
            "difference": diffs,
            "verdicts": verdicts,
            "s_cand": _stat([p["s_cand"] for p in results]),
            "s_base": _stat([p["s_base"] for p in results]),
            "resolution": _stat([p["resolution"] for p in results]),
            "pairs_reached": sum(p["reached"] for p in results),
            "pairs_reached_tolerant": sum(p["s_cand_tolerant"] is not None for p in results) if noise else None,
            "pairs_reached_smoothed": sum(p["s_cand_smoothed"] is not None for p in results),
            "pairs": len(results),
        },
        "curves": {
            arm: [{"name": r.name, "iterations": r.iterations, "values": r.values, "spread": r.spread}
                  for r in arm_runs]
            for arm, arm_runs in (("candidate", candidates), ("baseline", baselines))
        },
    }


def _acceleration_matrix(runs: Sequence[RunCurve], key: str, sigma: float, smooth: dict) -> np.ndarray:
    """[n, n]: the acceleration (rule ``key``) of run i over run j, -inf where i never reached
    j's target: what a relabelling of unpaired runs needs."""
    m = np.zeros((len(runs), len(runs)))
    for i, x in enumerate(runs):
        for j, y in enumerate(runs):
            if i == j:
                continue
            if key == "acceleration_smoothed":
                a = acceleration(smooth[id(x)], smooth[id(y)])
            else:
                a = acceleration(x, y, tolerance=sigma if key == "acceleration_tolerant" else 0.0)
            m[i, j] = -math.inf if a["s_cand"] is None else (a["acceleration"] if a["acceleration"] is not None else 0.0)
    # A finite stand-in below every acceleration: medians order the same, and scipy's tie
    # tolerance (relative to the statistic) stays finite.
    return np.where(np.isinf(m), NOT_REACHED, m)


def _time_warnings(results: list[dict], by_name: dict) -> list[str]:
    """The time acceleration compares training seconds: not comparable from a loaded machine
    (load_per_core > LOADED_MACHINE in a row up to the S it uses) or across devices."""
    out = []
    loaded = {}
    for p in results:
        for name, s in ((p["candidate"], p["s_cand"]), (p["baseline"], p["s_base"])):
            r = by_name[name]
            if s is None or not r.load_per_core:
                continue
            worst = max((v for it, v in zip(r.iterations, r.load_per_core) if it <= s and v is not None),
                        default=None)
            if worst is not None and worst > LOADED_MACHINE:
                loaded[name] = max(worst, loaded.get(name, 0.0))
    if loaded:
        runs = ", ".join(f"{n} (load per core up to {v:.2f})" for n, v in sorted(loaded.items()))
        out.append(f"the time figure is not comparable: training seconds it uses come from a loaded "
                   f"machine (load per core > {LOADED_MACHINE:g}): {runs}")
    devices = {r.device for r in by_name.values() if r.device}
    if len(devices) > 1:
        which = "; ".join(f"{d}: {', '.join(sorted(n for n, r in by_name.items() if r.device == d))}"
                          for d in sorted(devices))
        out.append(f"the time figure is not comparable: the runs were trained on different devices ({which})")
    return out


def _seeds_needed(results, diffs, pairing, candidates, baselines, per_run, noise) -> list[dict]:
    """How many seeds (pairs; per arm when unpaired) a difference of size delta needs for 80%
    power at two-sided 5%: n = ((z_0.975 + z_0.8) sigma / delta)^2, sigma the measured std across
    seeds of the paired differences (unpaired: sqrt(sd_cand^2 + sd_base^2))."""
    z = statistics.NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2) + statistics.NormalDist().inv_cdf(POWER)
    rows = []
    for key in ("best", "final", "auc"):
        if pairing == "seed":
            vals = [p[f"{key}_difference"] for p in results if p[f"{key}_difference"] is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else None
        else:
            c = [per_run[key][id(r)] for r in candidates if per_run[key][id(r)] is not None]
            b = [per_run[key][id(r)] for r in baselines if per_run[key][id(r)] is not None]
            sd = math.sqrt(statistics.variance(c) + statistics.variance(b)) if len(c) > 1 and len(b) > 1 else None
        mean = diffs[key]["mean"]

        def need(delta):
            if sd is None or not delta:
                return None
            return max(2, math.ceil((z * sd / abs(delta)) ** 2))

        rows.append({"quantity": key, "sigma": sd, "observed_delta": mean, "seeds_for_observed": need(mean),
                     "sigma_eval": noise["sigma"] if noise else None,
                     "seeds_for_sigma_eval": need(noise["sigma"]) if noise else None})
    return rows


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _fmt(stat: dict, digits: int = 2, pct: bool = False, interval: bool = False) -> str:
    """'mean ± std' (and ' [lo, hi]' with ``interval``, then '(range of n)' when the interval is
    the units' range, not a 95% interval); '–' without a value."""
    if stat["mean"] is None:
        return "–"
    scale = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    text = f"{stat['mean'] * scale:.{digits}f}{unit}"
    if stat["std"] is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}{unit}"
    if interval and stat.get("ci"):
        lo, hi = stat["ci"]
        text += f" [{lo * scale:.{digits}f}{unit}, {hi * scale:.{digits}f}{unit}]"
        if str(stat.get("ci_label") or "").startswith("range"):
            text += f" ({stat['ci_label']})"
    return text


def _num(v, digits=2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _it(v) -> str:
    return "–" if v is None else f"{v:,}"


def _accel_cell(stat: dict) -> str:
    """Every pair reached: mean ± std [interval]; else the censored median (not reached = -inf)."""
    if stat.get("pairs") and stat.get("reached") == stat.get("pairs"):
        return _fmt(stat, 1, pct=True, interval=True)
    if not stat.get("pairs"):
        return "–"
    if stat.get("median_reached"):
        return f"median {_pct(stat['median'])} (not reached counted as -inf)"
    return "median: not reached (most pairs never reached the target)"


def _not_reached(p: dict, s_key: str = "s_cand") -> str:
    """'not reached by 2,000' or, when the candidate's curve stopped before the baseline's,
    'not reached (ended at 1,500)'."""
    c_last, b_last = p.get("candidate_last_iteration"), p.get("baseline_last_iteration")
    if c_last is not None and b_last is not None and c_last < b_last:
        return f"not reached (ended at {c_last:,})"
    return f"not reached by {_it(c_last)}" if c_last is not None else "not reached"


READING_GUIDE = """### Reading this report

* **reached k of n**: in k of the n pairs the candidate got at least as good as its baseline's
  best value at some evaluation. A pair that never did is *censored*: its S_cand is infinity
  (acceleration -inf), and it counts against the candidate in every count, median and test.
  The acceleration's mean and interval are shown only when every pair reached; otherwise the
  median over all pairs and the fraction of pairs reached by each iteration are the figures.
* **still improving**: a run whose best value is its last evaluation. Its best (and a target
  taken from it) is a bound, not a value, and an acceleration against it is provisional: run
  longer.
* **[lo, hi] (range of n)**: with fewer than 5 units (pairs or runs) a 95% bootstrap interval is
  not available (the bootstrap over 3 units is essentially [min, max]); the bracket is then the
  plain range of the n values. From 5 units on it is the 95% percentile bootstrap interval.
* **permutation p**: the share of the exact permutation null at least as extreme as the observed
  statistic: sign flips of the paired differences (runs paired by seed), or relabellings of runs
  between the arms (unpaired). With n pairs the smallest two-sided p an exact sign-flip test
  can give is 2/2^n (0.25 for 3 pairs, 0.0625 for 5, 0.031 for 6): below 6 pairs no result can
  reach p < 0.05.
* **not detected at this sample size (n = ...)**: the interval contains 0, or the counts are
  even. That is no evidence of "no difference": the seed-count table says how many seeds a
  difference of that size would need.
* **seeds for 80% power**: n = ((z_0.975 + z_0.8) sigma / delta)^2, sigma the std across seeds of
  the paired differences, delta the difference to detect (the observed mean, and one sigma_eval).
"""


# How the report names each kind of permutation test.
PERMUTATION_WORDS = {
    "samples": "sign flips of the seed-paired differences (signed ranks for the accelerations)",
    "independent": "relabellings of the runs between the two arms",
}


def render_markdown(report: dict) -> str:
    """The report as markdown: per-arm summary, differences, accelerations, pairs, runs, the
    seed-count table and a fixed reading guide."""
    m, s, lab = report["metric"].upper(), report["summary"], report["labels"]
    st = report.get("statistics", {})
    boot = st.get("bootstrap", {})
    perm = st.get("permutation", {})
    noise = report.get("evaluation_noise")
    lo_it, hi_it = st.get("auc_range", [None, None])
    better_sign = "≤" if report.get("direction", "min") == "min" else "≥"
    interval_text = (f"{100 * boot.get('confidence', CONFIDENCE):.0f}% "
                     f"{boot.get('method', 'percentile')} bootstrap interval, "
                     f"{boot.get('resamples', BOOTSTRAP_RESAMPLES)} resamples")
    lines = [
        f"## {m}: {lab['candidate']} vs {lab['baseline']} "
        f"({report['num_samples']} samples, sample mode {report['sample_mode']}; "
        f"{report.get('better', 'lower')} is better)",
        "",
        f"Per-arm rows: mean ± std over runs [{interval_text}, unit: {boot.get('arm_unit', 'run')}]. "
        f"Differences and accelerations: mean ± std over pairs [{interval_text}, unit: "
        f"{boot.get('unit', '–')}]. Below {boot.get('range_below', MIN_UNITS_FOR_INTERVAL_VERDICT)} "
        "units the bracket is the range of the values, marked \"(range of n)\", not a 95% interval. "
        + (f"Permutation tests: {PERMUTATION_WORDS.get(perm.get('permutation_type'), perm.get('permutation_type'))} "
           f"(scipy.stats.permutation_test, permutation_type={perm.get('permutation_type')!r}). "
           if perm else "")
        + (f"Evaluation noise: each point is the mean over {noise['eval_seeds']} evaluation seeds; "
           f"sigma_eval = {noise['sigma']:.3g} (largest point std {noise['max_point_std']:.3g}, "
           f"{noise['points']} points)." if noise else "One evaluation seed per point (no evaluation-noise estimate)."),
        "",
        *[f"**Warning:** {w}." for w in report.get("warnings", [])],
        *([""] if report.get("warnings") else []),
        f"| arm | runs | best {m} | best at iteration | final {m} | AUC {lo_it}-{hi_it} | collapsed | still improving |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ("baseline", "candidate"):
        a = s[arm]
        lines.append(
            f"| {lab[arm]} | {a['best']['n']} | {_fmt(a['best'], interval=True)} | "
            f"{_fmt(a['best_iteration'], 0)} | {_fmt(a['final'], interval=True)} | "
            f"{_fmt(a['auc'], interval=True)} | {a['collapsed']} of {a['best']['n']} | "
            f"{a.get('still_improving', 0)} of {a['best']['n']} |"
        )
    improving = [r for arm in ("baseline", "candidate") for r in report["runs"][arm] if r.get("still_improving")]
    if improving:
        lines += ["", f"**Still improving:** {', '.join(r['name'] for r in improving)} "
                      f"{'is' if len(improving) == 1 else 'are'} at {'its' if len(improving) == 1 else 'their'} "
                      "best at the last evaluation: that best, and any target taken from it, is a bound "
                      f"(the run would reach {better_sign} it), not a value. Run longer."]
    tests = perm.get("tests", {})

    def p_cell(key):
        t = tests.get(key)
        if not t:
            return "–"
        return f"{t['p']:.3g}" + (f" (exact; smallest possible {t['smallest_p']:.3g})" if t.get("exact") else " (Monte Carlo)")

    final_at = st.get("final_iteration")
    lines += ["", f"| {lab['candidate']} - {lab['baseline']} | difference | permutation p | verdict |",
              "|---|---|---|---|"]
    for key in ("best", "final", "auc"):
        name = {"final": f"final (at {_it(final_at)})" if final_at else "final"}.get(key, key)
        lines.append(f"| {name} | {_fmt(s['difference'][key], interval=True)} | {p_cell(key + '_difference')} | "
                     f"{s['verdicts'][key + '_difference']} |")
    acc = s["acceleration"]
    lines += [
        "",
        f"**Acceleration** (1 - S_cand / S_base, pairing by {report['pairing']}). Evaluations every "
        f"{report.get('evaluation_interval')} iterations: an acceleration is only as fine as "
        f"interval / S_base = {_fmt(s['resolution'], 1, pct=True)} here.",
        "",
        f"Reached {acc.get('reached', s['pairs_reached'])} of {acc.get('pairs', s['pairs'])}: in "
        f"{acc.get('reached', s['pairs_reached'])} of {acc.get('pairs', s['pairs'])} pairs the "
        f"{lab['candidate']} run got at least as good as its {lab['baseline']} run's best."
        + "".join(
            f" The pair {p['candidate']}/{p['baseline']} never reached {lab['baseline']}'s best"
            + (f" within {_it(p.get('candidate_last_iteration'))} iterations."
               if not str(_not_reached(p)).startswith("not reached (ended")
               else f": its curve ended at {_it(p.get('candidate_last_iteration'))} "
                    f"({lab['baseline']} ran to {_it(p.get('baseline_last_iteration'))}).")
            for p in report["pairs"] if not p["reached"]),
    ]
    if acc.get("reached_by"):
        steps, last = [], None
        for it, frac in acc["reached_by"]:
            if frac != last:
                steps.append(f"{_it(it)}: {100 * frac:.0f}%")
                last = frac
        lines += ["", "Share of pairs reached by iteration (first iteration at each new share): "
                  + ", ".join(steps) + f"; by the end {100 * acc['reached_by'][-1][1]:.0f}%."]
    lines += [
        "",
        "| rule | acceleration | target reached | permutation p | verdict |",
        "|---|---|---|---|---|",
        f"| paper's (raw curve) | {_accel_cell(acc)} | {s['pairs_reached']} of {s['pairs']} | "
        f"{p_cell('acceleration')} | {s['verdicts']['acceleration']} |",
    ]
    if noise:
        lines.append(f"| within sigma_eval of the target | {_accel_cell(s['acceleration_tolerant'])} | "
                     f"{s['pairs_reached_tolerant']} of {s['pairs']} | {p_cell('acceleration_tolerant')} | "
                     f"{s['verdicts']['acceleration_tolerant']} |")
    lines += [
        f"| running median of {st.get('smoothing_window', SMOOTH_WINDOW)} | "
        f"{_accel_cell(s['acceleration_smoothed'])} | "
        f"{s['pairs_reached_smoothed']} of {s['pairs']} | {p_cell('acceleration_smoothed')} | "
        f"{s['verdicts']['acceleration_smoothed']} |",
        f"| training time (raw curve) | {_accel_cell(s['time_acceleration'])} | "
        f"{s['pairs_reached']} of {s['pairs']} | {p_cell('time_acceleration')} | {s['verdicts']['time_acceleration']} |",
        "",
        "| candidate | baseline | target | S_base | S_cand | acceleration | tolerant | smoothed | time acceleration |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["pairs"]:
        acc_p = _pct(p["acceleration"]) if p["reached"] else _not_reached(p)
        tol = _pct(p.get("acceleration_tolerant")) if p.get("s_cand_tolerant") is not None else (
            _not_reached(p) if noise else "–")
        sm = _pct(p.get("acceleration_smoothed")) if p.get("s_cand_smoothed") is not None else _not_reached(p)
        target = _num(p["target"]) + (f" (bound: {lab['baseline']} still improving)" if p.get("target_is_bound") else "")
        lines.append(f"| {p['candidate']} | {p['baseline']} | {target} | {p['s_base']} | "
                     f"{_num(p['s_cand'])} | {acc_p} | {tol} | {sm} | {_pct(p['time_acceleration'])} |")
    lines += ["", "| run | arm | seed | best | best at | final | final at | worst after best (at) | collapse | still improving |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ("baseline", "candidate"):
        for r in report["runs"][arm]:
            rb = r.get("rebound") or {}
            worst = "–" if rb.get("worst_after") is None else (
                f"{_num(rb['worst_after'])} ({rb['worst_after_iteration']})")
            flag = "**yes**" if rb.get("collapsed") else "no"
            improving_flag = "**yes: run longer**" if r.get("still_improving") else "no"
            lines.append(f"| {r['name']} | {lab[arm]} | {_num(r['seed'])} | {_num(r['best'])} | "
                         f"{r['best_iteration']} | {_num(r['final'])} | {r['final_iteration']} | {worst} | {flag} | "
                         f"{improving_flag} |")
    lines += ["", f"Collapse: a value after the best that is {COLLAPSE_FACTOR:g}x worse "
                  f"({'half the best or less' if report['direction'] == 'max' else 'twice the best or more'})."]
    need = st.get("seeds_needed") or []
    if any(r.get("sigma") is not None for r in need):
        unit = "pairs" if report["pairing"] == "seed" else "runs per arm"
        lines += ["", f"**Seeds for 80% power** (two-sided 5%; {unit}): n = ((z_0.975 + z_0.8) sigma / delta)^2, "
                      "sigma = the std across seeds of the differences measured here.", "",
                  f"| difference | sigma | delta = observed mean | {unit} needed | delta = 1 sigma_eval | {unit} needed |",
                  "|---|---|---|---|---|---|"]
        for r in need:
            lines.append(f"| {r['quantity']} | {_num(r['sigma'], 3)} | {_num(r['observed_delta'], 3)} | "
                         f"{_num(r['seeds_for_observed'])} | {_num(r['sigma_eval'], 3)} | "
                         f"{_num(r['seeds_for_sigma_eval'])} |")
        lines += ["", "A normal approximation: an exact sign-flip test also needs at least 6 pairs before "
                      "any p can fall below 0.05 (its smallest p is 2/2^n)."]
    lines += ["", READING_GUIDE.rstrip()]
    return "\n".join(lines) + "\n"


def _curve_figure(report: dict):
    """The compare figure (matplotlib, Agg): every run's curve, its seed spread, the baseline best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"baseline": ("tab:blue", "--"), "candidate": ("tab:red", "-")}
    for arm, (color, ls) in styles.items():
        for c in report["curves"][arm]:
            label = f"{report['labels'][arm]}: {c['name']}"
            ax.plot(c["iterations"], c["values"], ls, color=color, alpha=0.85, marker=".", label=label)
            if c.get("spread"):
                v, sd = np.asarray(c["values"]), np.asarray(c["spread"])
                ax.fill_between(c["iterations"], v - sd, v + sd, color=color, alpha=0.12, lw=0)
    target = report["summary"]["baseline"]["best"]["mean"]
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"baseline best (mean) {target:.2f}")
    noise = report.get("evaluation_noise")
    ax.set_xlabel("iteration (generator updates)")
    # A short axis label; the sample count and noise band go to the title (a long label was cut off).
    ax.set_ylabel(report["metric"])
    ax.set_title(f"{report['metric']}: {report['num_samples']} samples, {report['sample_mode']}"
                 + (f"; mean of {noise['eval_seeds']} eval seeds ± std" if noise else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(report: dict, path) -> None:
    """PNG: every run's curve against iteration (with its evaluation-seed spread as a band);
    the mean baseline best as a dotted line."""
    import matplotlib.pyplot as plt

    fig = _curve_figure(report)
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)


def write_outputs(report: dict, out_dir, stem: str = "compare") -> dict[str, str]:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    md, js, png = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"
    with atomic_write(md, "w") as f:
        f.write(render_markdown(report))
    with atomic_write(js, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    with atomic_write(png, "wb") as f:
        plot_curves(report, f)
    return {"markdown": str(md), "json": str(js), "plot": str(png)}
