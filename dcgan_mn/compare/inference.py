"""Small-sample inference over runs or seed pairs: percentile-bootstrap intervals, exact
permutation tests (``scipy.stats.permutation_test``) and the verdict phrase.

* **bootstrap intervals** (percentile, ``BOOTSTRAP_RESAMPLES`` resamples, 95%, fixed seed) for
  every mean from MIN_UNITS_FOR_INTERVAL_VERDICT units on; below, the bracket is the units'
  range, labelled "range of n" (3 units make the percentile interval exactly their range), and
  verdicts rest on a sign count;
* **exact permutation tests** (two-sided): sign flips of the pairs (statistic: the mean
  difference; for accelerations the signed-rank sum), or, unpaired, relabellings of runs
  between the arms;
* an interval containing 0 is "not detected at this sample size", never "no difference".
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

import numpy as np

__all__ = [
    "bootstrap_interval",
    "summarize",
    "signed_rank",
    "paired_permutation_p",
    "independent_permutation_p",
    "verdict",
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
]

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0  # the report is a pure function of the metrics files
MIN_UNITS_FOR_INTERVAL_VERDICT = (
    5  # below: a sign count, not a 95% claim, and the interval is the range
)
PERMUTATION_RESAMPLES = (
    20_000  # exact (every sign flip / relabelling) up to this many, else Monte Carlo
)
PERMUTATION_SEED = 0


def bootstrap_interval(
    values,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
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


def summarize(values, matrix=None, units: Optional[int] = None) -> dict:
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
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
        "ci": interval,
        "ci_label": label,
    }


def signed_rank(x, axis=-1):
    """Wilcoxon's signed-rank sum: sum of sign(x) * rank(|x|). A not-reached pair (-inf) is the
    most extreme pair for the baseline; its flip (+inf) the most extreme for the candidate."""
    import scipy.stats

    x = np.asarray(x, dtype=np.float64)
    return np.sum(np.sign(x) * scipy.stats.rankdata(np.abs(x), axis=axis), axis=axis)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def paired_permutation_p(
    values, *, statistic: str = "mean", resamples: int = PERMUTATION_RESAMPLES
) -> Optional[dict]:
    """Two-sided sign-flip permutation test of per-pair values (``scipy.stats.permutation_test``,
    permutation_type="samples"): under "no difference" each pair's sign is a coin flip. Exact
    (all 2^n flips) when 2^n <= ``resamples``; its smallest p is 2 / 2^n. ``statistic``: "mean"
    (differences) or "signed_rank" (accelerations: a pair that never reached the target is
    -inf, the most extreme pair for the baseline). None below 2 values."""
    import scipy.stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size < 2 or (statistic == "mean" and not np.isfinite(x).all()):
        return None
    fn = signed_rank if statistic == "signed_rank" else _mean
    res = scipy.stats.permutation_test(
        (x,),
        fn,
        permutation_type="samples",
        vectorized=True,
        n_resamples=resamples,
        alternative="two-sided",
        rng=np.random.default_rng(PERMUTATION_SEED),
    )
    return {
        "p": float(res.pvalue),
        "n": int(x.size),
        "exact": 2 ** int(x.size) <= resamples,
        "smallest_p": min(1.0, 2 / 2 ** int(x.size)) if 2 ** int(x.size) <= resamples else None,
        "permutation_type": "samples",
        "statistic": statistic,
    }


def independent_permutation_p(
    n_cand: int, n_base: int, statistic, *, resamples: int = PERMUTATION_RESAMPLES
) -> Optional[dict]:
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
        permutation_type="independent",
        vectorized=False,
        n_resamples=resamples,
        alternative="two-sided",
        rng=np.random.default_rng(PERMUTATION_SEED),
    )
    p = float(res.pvalue)
    if math.isnan(p):
        return None
    return {
        "p": p,
        "n": n_cand + n_base,
        "exact": total <= resamples,
        "smallest_p": min(1.0, 2 / total) if total <= resamples else None,
        "permutation_type": "independent",
        "statistic": "difference of arm means",
    }


def verdict(
    stat: dict,
    better_if_positive: bool,
    values=(),
    noise: Optional[float] = None,
    of: Optional[int] = None,
    p: Optional[float] = None,
    unit: str = "pairs",
) -> str:
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
        never = (
            f"; {censored} never reached the target, counted for the baseline" if censored else ""
        )
        if pos == neg:
            text = (
                f"not detected at this sample size (n = {n}): {pos} {unit if pos != 1 else unit[:-1]} "
                f"favour{'s' if pos == 1 else ''} each arm{never}"
            )
        else:
            sign_p = min(
                1.0, 2 * sum(math.comb(untied, j) for j in range(k, untied + 1)) / 2**untied
            )
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
