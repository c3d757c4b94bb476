"""Compare runs' metric curves: the paper's acceleration, with statistics a reviewer accepts.

The paper's rule, for one baseline run B and one candidate run C (DESIGN, "Evaluation protocol"):

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
  every mean (verdicts rest on them from MIN_UNITS_FOR_INTERVAL_VERDICT units on; below, on a
  sign count, since 3 units make the interval exactly their range): with arms sharing seeds, runs are **paired by seed** and the pair is the
  resampling unit (differences and accelerations are per pair); otherwise every candidate is
  paired with every baseline and each arm's runs are resampled independently. An acceleration
  is averaged over the pairs that reached the target (the count is reported next to it).
  A difference or acceleration whose interval contains 0 is reported as within noise. The
  collapse flag applies to COLLAPSE_METRICS only.

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
           "provenance_warnings",
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
MIN_UNITS_FOR_INTERVAL_VERDICT = 5  # below: a sign count, not a 95% claim


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
    )


def _provenance(run: Path, rows: list[dict], metric: str) -> dict:
    from .provenance import read_environments

    def values(key):
        return sorted({str(r[key]) for r in rows if r.get(key) is not None})

    keys = values("env_key")
    known = read_environments(run)
    # The network behind the compared metric: the mode classifier, or the Inception weights.
    weights_key = "classifier_sha256" if metric_spec(metric).count_key == MODE_COUNT_KEY else "weights_sha256"
    return {"env_keys": keys, "environments": {k: known[k] for k in keys if k in known},
            "fid_protocols": values("fid_protocol") if weights_key == "weights_sha256" else [],
            "weights": values(weights_key)}


def provenance_warnings(runs: Sequence[RunCurve]) -> list[str]:
    """One line per way the compared numbers were computed differently (protocol, weights or
    classifier, library versions, device, CPU): such numbers may differ for that reason alone."""
    provs = [r.provenance for r in runs if r.provenance]
    warnings = []
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


def _stat(values, matrix=None) -> dict:
    """mean, std (ddof=1), n over the defined values, and the bootstrap interval of the mean
    (of ``matrix`` when the resampling is per arm, else of ``values``)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "ci": None}
    interval = bootstrap_interval(matrix if matrix is not None else vals)
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "ci": interval}


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
        "target": target, "s_base": s_base, "s_cand": s_cand, "reached": s_cand is not None,
        "acceleration": (1 - s_cand / s_base) if s_cand is not None and s_base > 0 else None,
        "train_seconds_base": t_base, "train_seconds_cand": t_cand,
        "time_acceleration": (1 - t_cand / t_base) if t_cand is not None and t_base else None,
    }


def _verdict(stat: dict, better_if_positive: bool, values=(), noise: Optional[float] = None,
             of: Optional[int] = None) -> str:
    """One phrase on a mean difference or acceleration (positive = ``better_if_positive``).

    With at least MIN_UNITS_FOR_INTERVAL_VERDICT pairs (or runs per arm) the bootstrap
    interval decides. Below that a percentile interval is no 95% interval (with 3 units it is
    exactly [min, max], covering the mean ~75% of the time), so the phrase counts signs and
    gives the two-sided sign-test p instead."""
    if stat["mean"] is None:
        return "no value" if not of else f"no value: none of {of} pairs reached the target"
    vals = [v for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n < 2:
        return ("a single pair or run: no interval" if not of or of < 2
                else f"only {n} of {of} pairs reached the target: no interval")
    if n < MIN_UNITS_FOR_INTERVAL_VERDICT:
        pos, neg = sum(v > 0 for v in vals), sum(v < 0 for v in vals)
        untied, k = pos + neg, max(pos, neg)  # the sign test leaves ties out
        side = "candidate" if (pos > neg) == better_if_positive else "baseline"
        if pos == neg:
            text = f"within noise: of {n} pairs, {pos} favour each arm"
        else:
            p = min(1.0, 2 * sum(math.comb(untied, j) for j in range(k, untied + 1)) / 2 ** untied)
            ties = f", {n - untied} tied" if n > untied else ""
            text = (f"{k} of {n} pairs favour the {side}{ties} (sign test p = {p:.2f}): too few "
                    f"seeds to call a difference")
    else:
        ci = stat.get("ci")
        if ci is None or ci[0] <= 0 <= ci[1]:
            text = "within noise (the interval contains 0)"
        else:
            better = (ci[0] > 0) == better_if_positive
            text = f"the interval excludes 0: the candidate is {'better' if better else 'worse'}"
    if noise is not None and abs(stat["mean"]) <= noise:
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
    warnings = provenance_warnings(runs)
    noise = evaluation_noise(runs)
    # The rule only sees evaluated iterations: an S is as fine as the evaluation interval.
    gaps = Counter(b - a for r in runs for a, b in zip(r.iterations, r.iterations[1:]))
    interval = gaps.most_common(1)[0][0] if gaps else None  # an extra final evaluation aside
    sigma = noise["sigma"] if noise else 0.0
    pairing, pairs = pair_runs(candidates, baselines)
    c_index = {id(c): i for i, c in enumerate(candidates)}
    b_index = {id(b): i for i, b in enumerate(baselines)}

    # ---- The common iteration range for the area under the curve.
    auc_start = max(r.iterations[0] for r in runs)
    auc_stop = min(r.iterations[-1] for r in runs)
    auc = {id(r): area_under_curve(r, auc_start, auc_stop) for r in runs}

    # ---- Per pair: the rule raw, tolerant of evaluation noise, and on smoothed curves.
    smooth = {id(r): r.smoothed() for r in runs}
    results = []
    for c, b in pairs:
        p = acceleration(c, b)
        tol = acceleration(c, b, tolerance=sigma) if noise else None
        sm = acceleration(smooth[id(c)], smooth[id(b)])
        p.update(
            resolution=(interval / p["s_base"]) if interval and p["s_base"] else None,
            acceleration_tolerant=tol["acceleration"] if tol else None,
            s_cand_tolerant=tol["s_cand"] if tol else None, s_base_tolerant=tol["s_base"] if tol else None,
            acceleration_smoothed=sm["acceleration"], s_cand_smoothed=sm["s_cand"],
            s_base_smoothed=sm["s_base"], target_smoothed=sm["target"],
            best_difference=c.best - b.best, final_difference=c.values[-1] - b.values[-1],
            auc_difference=(auc[id(c)] - auc[id(b)]) if auc[id(c)] is not None and auc[id(b)] is not None else None,
        )
        results.append(p)

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
        return _stat(vals, m)

    def arm_summary(arm: Sequence[RunCurve]) -> dict:
        rows = [r.summary() for r in arm]
        out = {key: _stat([r[key] for r in rows])
               for key in ("best", "best_iteration", "train_seconds_to_best", "final", "final_iteration")}
        out["auc"] = _stat([auc[id(r)] for r in arm])
        out["collapsed"] = sum(r["rebound"]["collapsed"] for r in rows)
        return out

    accel = {key: pair_stat(key) for key in
             ("acceleration", "acceleration_tolerant", "acceleration_smoothed", "time_acceleration")}
    diffs = {key: pair_stat(f"{key}_difference") for key in ("best", "final", "auc")}
    higher_better = direction == "max"

    def units(key: str) -> list:
        """The resampling units' values: one per pair (seed pairing), or the smaller arm's
        count of them (all pairs: the per-arm variation is what the verdict can rest on)."""
        vals = [p[key] for p in results]
        if pairing == "seed":
            return vals
        defined = [v for v in vals if v is not None]
        return defined[:min(len(candidates), len(baselines))] if defined else []

    verdicts = {key: _verdict(stat, True, units(key), of=len(results)) for key, stat in accel.items()}
    verdicts.update({f"{key}_difference": _verdict(stat, higher_better, units(f"{key}_difference"),
                                                   noise=sigma if noise else None)
                     for key, stat in diffs.items()})
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
            f"candidate iteration with value {op} target; acceleration = 1 - S_cand / S_base; "
            "time_acceleration likewise in training-only seconds; tolerant: within sigma_eval of "
            f"the target; smoothed: on running medians over {SMOOTH_WINDOW} evaluations; auc: mean "
            "value over the common iteration range; means over pairs that reached the target"
        ),
        "statistics": {
            "bootstrap": {"method": "percentile", "resamples": BOOTSTRAP_RESAMPLES,
                          "confidence": CONFIDENCE, "seed": BOOTSTRAP_SEED,
                          "unit": "seed-paired pair of runs" if pairing == "seed"
                          else "run, resampled within each arm"},
            "smoothing_window": SMOOTH_WINDOW,
            "auc_range": [auc_start, auc_stop],
            "collapse_factor": COLLAPSE_FACTOR,
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


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _fmt(stat: dict, digits: int = 2, pct: bool = False, interval: bool = False) -> str:
    """'mean ± std' (and ' [lo, hi]' with ``interval``); '–' without a value."""
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
    return text


def _num(v, digits=2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def render_markdown(report: dict) -> str:
    """The report as markdown: per-arm summary, differences, accelerations, pairs, runs."""
    m, s, lab = report["metric"].upper(), report["summary"], report["labels"]
    st = report.get("statistics", {})
    boot = st.get("bootstrap", {})
    noise = report.get("evaluation_noise")
    lo_it, hi_it = st.get("auc_range", [None, None])
    lines = [
        f"## {m}: {lab['candidate']} vs {lab['baseline']} "
        f"({report['num_samples']} samples, sample mode {report['sample_mode']}; "
        f"{report.get('better', 'lower')} is better)",
        "",
        f"Values are mean ± std over runs (or pairs) [{100 * boot.get('confidence', CONFIDENCE):.0f}% "
        f"{boot.get('method', 'percentile')} bootstrap interval, {boot.get('resamples', BOOTSTRAP_RESAMPLES)} "
        f"resamples, unit: {boot.get('unit', '–')}]. "
        + (f"Evaluation noise: each point is the mean over {noise['eval_seeds']} evaluation seeds; "
           f"sigma_eval = {noise['sigma']:.3g} (largest point std {noise['max_point_std']:.3g}, "
           f"{noise['points']} points)." if noise else "One evaluation seed per point (no evaluation-noise estimate)."),
        "",
        *[f"**Warning:** {w}." for w in report.get("warnings", [])],
        *([""] if report.get("warnings") else []),
        f"| arm | runs | best {m} | best at iteration | final {m} | AUC {lo_it}-{hi_it} | collapsed |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("baseline", "candidate"):
        a = s[arm]
        lines.append(
            f"| {lab[arm]} | {a['best']['n']} | {_fmt(a['best'], interval=True)} | "
            f"{_fmt(a['best_iteration'], 0)} | {_fmt(a['final'], interval=True)} | "
            f"{_fmt(a['auc'], interval=True)} | {a['collapsed']} of {a['best']['n']} |"
        )
    lines += ["", f"| {lab['candidate']} - {lab['baseline']} | difference | verdict |", "|---|---|---|"]
    for key in ("best", "final", "auc"):
        lines.append(f"| {key} | {_fmt(s['difference'][key], interval=True)} | {s['verdicts'][key + '_difference']} |")
    lines += [
        "",
        f"**Acceleration** (1 - S_cand / S_base, pairing by {report['pairing']}). Evaluations every "
        f"{report.get('evaluation_interval')} iterations: an acceleration is only as fine as "
        f"interval / S_base = {_fmt(s['resolution'], 1, pct=True)} here.",
        "",
        "| rule | acceleration | target reached | verdict |",
        "|---|---|---|---|",
        f"| paper's (raw curve) | {_fmt(s['acceleration'], 1, pct=True, interval=True)} | "
        f"{s['pairs_reached']} of {s['pairs']} | {s['verdicts']['acceleration']} |",
    ]
    if noise:
        lines.append(f"| within sigma_eval of the target | {_fmt(s['acceleration_tolerant'], 1, pct=True, interval=True)} | "
                     f"{s['pairs_reached_tolerant']} of {s['pairs']} | {s['verdicts']['acceleration_tolerant']} |")
    lines += [
        f"| running median of {st.get('smoothing_window', SMOOTH_WINDOW)} | "
        f"{_fmt(s['acceleration_smoothed'], 1, pct=True, interval=True)} | "
        f"{s['pairs_reached_smoothed']} of {s['pairs']} | {s['verdicts']['acceleration_smoothed']} |",
        f"| training time (raw curve) | {_fmt(s['time_acceleration'], 1, pct=True, interval=True)} | "
        f"{s['pairs_reached']} of {s['pairs']} | {s['verdicts']['time_acceleration']} |",
        "",
        "| candidate | baseline | target | S_base | S_cand | acceleration | tolerant | smoothed | time acceleration |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["pairs"]:
        acc = _pct(p["acceleration"]) if p["reached"] else "not reached"
        tol = _pct(p.get("acceleration_tolerant")) if p.get("s_cand_tolerant") is not None else (
            "not reached" if noise else "–")
        sm = _pct(p.get("acceleration_smoothed")) if p.get("s_cand_smoothed") is not None else "not reached"
        lines.append(f"| {p['candidate']} | {p['baseline']} | {_num(p['target'])} | {p['s_base']} | "
                     f"{_num(p['s_cand'])} | {acc} | {tol} | {sm} | {_pct(p['time_acceleration'])} |")
    lines += ["", "| run | arm | seed | best | best at | final | final at | worst after best (at) | collapse |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arm in ("baseline", "candidate"):
        for r in report["runs"][arm]:
            rb = r.get("rebound") or {}
            worst = "–" if rb.get("worst_after") is None else (
                f"{_num(rb['worst_after'])} ({rb['worst_after_iteration']})")
            flag = "**yes**" if rb.get("collapsed") else "no"
            lines.append(f"| {r['name']} | {lab[arm]} | {_num(r['seed'])} | {_num(r['best'])} | "
                         f"{r['best_iteration']} | {_num(r['final'])} | {r['final_iteration']} | {worst} | {flag} |")
    lines += ["", f"Collapse: a value after the best that is {COLLAPSE_FACTOR:g}x worse "
                  f"({'half the best or less' if report['direction'] == 'max' else 'twice the best or more'})."]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, path) -> None:
    """PNG: every run's curve against iteration (with its evaluation-seed spread as a band);
    the mean baseline best as a dotted line."""
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
    ax.set_ylabel(f"{report['metric']} ({report['num_samples']} samples, {report['sample_mode']})"
                  + (f", mean of {noise['eval_seeds']} eval seeds ± std" if noise else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
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
