"""One comparison of a candidate arm's runs with a baseline arm's: the paper's rule per pair,
tolerant of evaluation noise and on smoothed curves; the best, final and AUC differences; with
intervals, permutation tests, verdicts, censoring and the seeds a difference would need, as one
JSON-ready dict (``compare_runs``), which ``render`` turns into the report.

* **censoring**: a pair whose candidate never reaches the target has S_cand = infinity
  (acceleration -inf) and counts against the candidate everywhere: "reached k of n", the median
  over all pairs, the share of pairs reached by each iteration, the sign count and the
  permutation test. The mean acceleration and its interval exist only when every pair reached;
* with arms sharing seeds, runs are paired by seed and the pair is the resampling unit
  (differences and accelerations are per pair); otherwise every candidate is paired with every
  baseline and each arm's runs are resampled independently. Per-arm rows are always resampled
  by run;
* final values are compared at the common last iteration, the area under the curve over the
  iteration range every run covers;
* the seed-count table: how many seeds a difference needs for 80% power.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .curves import (
    COLLAPSE_FACTOR,
    SMOOTH_WINDOW,
    CompareError,
    RunCurve,
    area_under_curve,
    evaluation_noise,
    provenance_warnings,
)
from .inference import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    MIN_UNITS_FOR_INTERVAL_VERDICT,
    PERMUTATION_RESAMPLES,
    PERMUTATION_SEED,
    independent_permutation_p,
    paired_permutation_p,
    summarize,
    verdict,
)
from ..metrics.specs import EMA_SUFFIX, metric_spec
from .rule import acceleration, acceleration_matrix, pair_runs

__all__ = ["check_metrics", "compare_runs", "PairTable"]

POWER = 0.8  # the seed-count table: 80% power at two-sided alpha 1 - CONFIDENCE
LOADED_MACHINE = 1.25  # load_per_core above this: a training second is not a quiet machine's second
# Each acceleration rule and the pair field that says whether (and where) the candidate reached.
REACHED_KEY = {
    "acceleration": "s_cand",
    "acceleration_tolerant": "s_cand_tolerant",
    "acceleration_smoothed": "s_cand_smoothed",
    "time_acceleration": "s_cand",
}
DIFFERENCES = ("best", "final", "auc")


def compare_runs(
    candidates: Sequence[RunCurve],
    baselines: Sequence[RunCurve],
    *,
    candidate_label: str = "candidate",
    baseline_label: str = "baseline",
) -> dict:
    """Everything the report shows, as one JSON-ready dict."""
    _check_comparable(candidates, baselines)
    ref = baselines[0]
    runs = [*candidates, *baselines]
    noise = evaluation_noise(runs)
    sigma = noise["sigma"] if noise else 0.0
    interval = _evaluation_interval(runs)
    higher_better = ref.direction == "max"

    # ---- The common iteration range for the area under the curve, and the common last one.
    auc_start = max(r.iterations[0] for r in runs)
    auc_stop = min(r.iterations[-1] for r in runs)
    auc = {id(r): area_under_curve(r, auc_start, auc_stop) for r in runs}
    final_common = {id(r): r.value_at(auc_stop) for r in runs}
    per_run = {"best": {id(r): r.best for r in runs}, "final": final_common, "auc": auc}

    # ---- Per pair: the rule raw, tolerant of evaluation noise, and on smoothed curves.
    smooth = {id(r): r.smoothed() for r in runs}
    pairing, pairs = pair_runs(candidates, baselines)
    results = [_pair_result(c, b, noise, smooth, auc, interval) for c, b in pairs]
    table = PairTable(candidates, baselines, pairing, pairs, results, noisy=noise is not None)

    # ---- Over the pairs: accelerations with their censoring, differences, tests, verdicts.
    accel = {key: table.acceleration_stat(key) for key in REACHED_KEY}
    diffs = {key: table.stat(f"{key}_difference") for key in DIFFERENCES}
    perm = _permutation_tests(table, per_run, sigma, smooth)
    unit_word = "pairs" if pairing == "seed" else "candidate runs"
    verdicts = {
        key: verdict(stat, True, table.units(key), of=len(results), unit=unit_word)
        for key, stat in accel.items()
    }
    verdicts.update(
        {
            f"{key}_difference": verdict(
                stat,
                higher_better,
                table.units(f"{key}_difference"),
                noise=sigma if noise else None,
                unit=unit_word,
            )
            for key, stat in diffs.items()
        }
    )

    warnings = [*provenance_warnings(runs), *_time_warnings(results, {r.name: r for r in runs})]
    warnings = list(dict.fromkeys(warnings))  # each once, however many runs share it
    op = ">=" if higher_better else "<="
    # One metric throughout, or G_ema's against G's (``--baseline-metric``): then both names.
    metrics = {"metric": candidates[0].metric}
    if ref.metric != candidates[0].metric:
        metrics["baseline_metric"] = ref.metric
    return {
        **metrics,
        "direction": ref.direction,
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
            "bootstrap": {
                "method": "percentile",
                "resamples": BOOTSTRAP_RESAMPLES,
                "confidence": CONFIDENCE,
                "seed": BOOTSTRAP_SEED,
                "unit": "seed-paired pair of runs"
                if pairing == "seed"
                else "run, resampled within each arm",
                "arm_unit": "run",
                "range_below": MIN_UNITS_FOR_INTERVAL_VERDICT,
            },
            "permutation": {
                "resamples": PERMUTATION_RESAMPLES,
                "seed": PERMUTATION_SEED,
                "permutation_type": "samples" if pairing == "seed" else "independent",
                "tests": perm,
            },
            "smoothing_window": SMOOTH_WINDOW,
            "auc_range": [auc_start, auc_stop],
            "final_iteration": auc_stop,
            "collapse_factor": COLLAPSE_FACTOR,
            "seeds_needed": _seeds_needed(table, diffs, per_run, noise),
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
            "candidate": _arm_summary(candidates, auc),
            "baseline": _arm_summary(baselines, auc),
            **accel,
            "difference": diffs,
            "verdicts": verdicts,
            "s_cand": summarize([p["s_cand"] for p in results]),
            "s_base": summarize([p["s_base"] for p in results]),
            "resolution": summarize([p["resolution"] for p in results]),
            "pairs_reached": sum(p["reached"] for p in results),
            "pairs_reached_tolerant": sum(p["s_cand_tolerant"] is not None for p in results)
            if noise
            else None,
            "pairs_reached_smoothed": sum(p["s_cand_smoothed"] is not None for p in results),
            "pairs": len(results),
        },
        "curves": {
            arm: [
                {"name": r.name, "iterations": r.iterations, "values": r.values, "spread": r.spread}
                for r in arm_runs
            ]
            for arm, arm_runs in (("candidate", candidates), ("baseline", baselines))
        },
    }


def check_metrics(metric: str, baseline_metric: str) -> None:
    """The candidates' metric and the baselines' are one, or one is the other's G_ema twin."""
    cand, base = metric_spec(metric), metric_spec(baseline_metric)
    if cand.plain_name != base.plain_name:
        raise CompareError(
            f"--metric {cand.name!r} against --baseline-metric {base.name!r}: only a metric and "
            f"its G_ema twin can be compared ({base.plain_name!r} or "
            f"{base.plain_name + EMA_SUFFIX!r}), since their values are on one scale"
        )


def _check_comparable(candidates: Sequence[RunCurve], baselines: Sequence[RunCurve]) -> None:
    """Every run's numbers come from the same sample mode, sample count and evaluation seeds,
    and of one metric per arm: the same one, or one arm's G_ema twin of the other's (``cfd_ema``
    against ``cfd``: the same measure, so one target and one evaluation noise serve both)."""
    ref = baselines[0]
    for arm in (candidates, baselines):
        for r in arm:
            if r.metric != arm[0].metric:
                raise CompareError(
                    f"run {r.path!r}: its curve is of {r.metric!r}, {arm[0].path!r}'s of "
                    f"{arm[0].metric!r}: one arm compares one metric"
                )
    check_metrics(candidates[0].metric, ref.metric)
    for r in [*candidates, *baselines]:
        if (r.sample_mode, r.num_samples) != (ref.sample_mode, ref.num_samples):
            raise CompareError(
                f"run {r.path!r}: {r.sample_mode}/{r.num_samples} samples, but {ref.path!r} "
                f"has {ref.sample_mode}/{ref.num_samples}: numbers are not comparable"
            )
        if r.eval_seeds != ref.eval_seeds:
            raise CompareError(
                f"run {r.path!r}: {r.eval_seeds} evaluation seeds, {ref.path!r} {ref.eval_seeds}"
            )


def _evaluation_interval(runs: Sequence[RunCurve]) -> Optional[int]:
    """The usual gap between evaluations (an extra final evaluation aside): the rule only sees
    evaluated iterations, so an S is only as fine as this."""
    gaps = Counter(b - a for r in runs for a, b in zip(r.iterations, r.iterations[1:]))
    return gaps.most_common(1)[0][0] if gaps else None


def _pair_result(
    c: RunCurve,
    b: RunCurve,
    noise: Optional[dict],
    smooth: dict,
    auc: dict,
    interval: Optional[int],
) -> dict:
    """One pair: the paper's rule on the raw curves, within sigma_eval of the target, on the
    smoothed curves; the best, final (at the pair's common last iteration) and AUC differences."""
    p = acceleration(c, b)
    tol = acceleration(c, b, tolerance=noise["sigma"]) if noise else None
    sm = acceleration(smooth[id(c)], smooth[id(b)])
    last = min(c.iterations[-1], b.iterations[-1])  # final values compared at one iteration
    p.update(
        resolution=(interval / p["s_base"]) if interval and p["s_base"] else None,
        acceleration_tolerant=tol["acceleration"] if tol else None,
        s_cand_tolerant=tol["s_cand"] if tol else None,
        s_base_tolerant=tol["s_base"] if tol else None,
        acceleration_smoothed=sm["acceleration"],
        s_cand_smoothed=sm["s_cand"],
        s_base_smoothed=sm["s_base"],
        target_smoothed=sm["target"],
        best_difference=c.best - b.best,
        final_difference=c.value_at(last) - b.value_at(last),
        final_difference_iteration=last,
        auc_difference=(auc[id(c)] - auc[id(b)])
        if auc[id(c)] is not None and auc[id(b)] is not None
        else None,
    )
    return p


@dataclass
class PairTable:
    """The pairs of one comparison, one result dict each (``_pair_result``), and the statistics
    over them: with seed pairing the pair is the unit, else each arm's runs."""

    candidates: Sequence[RunCurve]
    baselines: Sequence[RunCurve]
    pairing: str  # "seed" (pairs by seed) or "all" (every candidate x baseline)
    pairs: list  # [(candidate, baseline)]
    results: list  # per pair, as ``_pair_result`` returns
    noisy: bool  # an evaluation-noise estimate exists (the tolerant rule needs one)

    def censored(self, p: dict, key: str) -> Optional[float]:
        """The pair's value of ``key``; -inf (S_cand = infinity) when it never reached; None
        when unknown (no training seconds, no tolerant rule without evaluation noise)."""
        if key in REACHED_KEY:
            if key == "acceleration_tolerant" and not self.noisy:
                return None
            if p[REACHED_KEY[key]] is None:
                return -math.inf
        return p[key]

    def stat(self, key: str) -> dict:
        """Mean over pairs of ``key`` with its interval: resampling pairs (seed pairing) or
        each arm's runs (all pairs)."""
        vals = [p[key] for p in self.results]
        if self.pairing == "seed":
            return summarize(vals, [np.nan if v is None else v for v in vals])
        c_index = {id(c): i for i, c in enumerate(self.candidates)}
        b_index = {id(b): i for i, b in enumerate(self.baselines)}
        m = np.full((len(self.candidates), len(self.baselines)), np.nan)  # [n_cand, n_base]
        for (c, b), v in zip(self.pairs, vals):
            if v is not None:
                m[c_index[id(c)], b_index[id(b)]] = v
        return summarize(vals, m, units=min(len(self.candidates), len(self.baselines)))

    def units(self, key: str) -> list:
        """The units the sign count rests on: one per pair (seed pairing), or one per candidate
        run (all pairs): its mean difference over every baseline, or its median acceleration
        (not reached = -inf)."""
        vals = [self.censored(p, key) for p in self.results]
        if self.pairing == "seed":
            return vals
        out = []
        for c in self.candidates:
            mine = [v for (cc, _), v in zip(self.pairs, vals) if cc is c and v is not None]
            if mine:
                out.append(float(np.median(mine)) if key in REACHED_KEY else statistics.fmean(mine))
        return out

    def acceleration_stat(self, key: str) -> dict:
        """The acceleration with its censoring explicit: reached k of n; the mean and interval
        only when every pair reached; the median over all pairs with not reached as -inf; the
        fraction of pairs that reached by each evaluated iteration."""
        vals = [self.censored(p, key) for p in self.results]
        known = [v for v in vals if v is not None]
        k = sum(math.isfinite(v) for v in known)
        stat = (
            self.stat(key)
            if known and k == len(known)
            else {"mean": None, "std": None, "n": len(known), "ci": None, "ci_label": None}
        )
        med = float(np.median(known)) if known else None
        stat.update(
            pairs=len(known),
            reached=k,
            median=med if med is not None and math.isfinite(med) else None,
            median_reached=med is not None and math.isfinite(med),
        )
        if key != "time_acceleration" and known:
            s_key = REACHED_KEY[key]
            hits = [p[s_key] for p, v in zip(self.results, vals) if v is not None]
            grid = sorted({it for c in self.candidates for it in c.iterations})
            stat["reached_by"] = [
                [it, sum(h is not None and h <= it for h in hits) / len(hits)] for it in grid
            ]
        return stat


def _permutation_tests(table: PairTable, per_run: dict, sigma: float, smooth: dict) -> dict:
    """Two-sided permutation p of each difference and acceleration: sign flips of the pairs
    (seed pairing), or relabellings of the runs between the arms."""
    runs = [*table.candidates, *table.baselines]
    n_cand, n_base = len(table.candidates), len(table.baselines)
    perm = {}
    for key in DIFFERENCES:
        if table.pairing == "seed":
            perm[f"{key}_difference"] = paired_permutation_p(
                [p[f"{key}_difference"] for p in table.results]
            )
        else:
            v = np.asarray(
                [np.nan if per_run[key][id(r)] is None else per_run[key][id(r)] for r in runs]
            )
            perm[f"{key}_difference"] = (
                None
                if np.isnan(v).any()
                else independent_permutation_p(
                    n_cand, n_base, lambda ci, bi, v=v: v[ci].mean() - v[bi].mean()
                )
            )
    for key in REACHED_KEY:
        if table.pairing == "seed":
            perm[key] = paired_permutation_p(table.units(key), statistic="signed_rank")
        elif key != "time_acceleration" and (key != "acceleration_tolerant" or table.noisy):
            matrix = acceleration_matrix(runs, key, sigma, smooth)  # [n, n]
            perm[key] = independent_permutation_p(
                n_cand, n_base, lambda ci, bi, m=matrix: float(np.median(m[np.ix_(ci, bi)]))
            )
            if perm[key]:
                perm[key]["statistic"] = "median acceleration over candidate x baseline pairs"
        else:
            perm[key] = None
    return perm


def _arm_summary(arm: Sequence[RunCurve], auc: dict) -> dict:
    """One arm's per-run figures over its runs (resampled by run), with its collapse and
    still-improving counts."""
    rows = [r.summary() for r in arm]
    out = {
        key: summarize([r[key] for r in rows])
        for key in ("best", "best_iteration", "train_seconds_to_best", "final", "final_iteration")
    }
    out["auc"] = summarize([auc[id(r)] for r in arm])
    out["collapsed"] = sum(r["rebound"]["collapsed"] for r in rows)
    out["still_improving"] = sum(r["still_improving"] for r in rows)
    return out


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
            worst = max(
                (v for it, v in zip(r.iterations, r.load_per_core) if it <= s and v is not None),
                default=None,
            )
            if worst is not None and worst > LOADED_MACHINE:
                loaded[name] = max(worst, loaded.get(name, 0.0))
    if loaded:
        runs = ", ".join(f"{n} (load per core up to {v:.2f})" for n, v in sorted(loaded.items()))
        out.append(
            f"the time figure is not comparable: training seconds it uses come from a loaded "
            f"machine (load per core > {LOADED_MACHINE:g}): {runs}"
        )
    devices = {r.device for r in by_name.values() if r.device}
    if len(devices) > 1:
        which = "; ".join(
            f"{d}: {', '.join(sorted(n for n, r in by_name.items() if r.device == d))}"
            for d in sorted(devices)
        )
        out.append(
            f"the time figure is not comparable: the runs were trained on different devices ({which})"
        )
    return out


def _seeds_needed(
    table: PairTable, diffs: dict, per_run: dict, noise: Optional[dict]
) -> list[dict]:
    """How many seeds (pairs; per arm when unpaired) a difference of size delta needs for 80%
    power at two-sided 5%: n = ((z_0.975 + z_0.8) sigma / delta)^2, sigma the measured std across
    seeds of the paired differences (unpaired: sqrt(sd_cand^2 + sd_base^2))."""
    z = statistics.NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2) + statistics.NormalDist().inv_cdf(
        POWER
    )
    rows = []
    for key in DIFFERENCES:
        if table.pairing == "seed":
            vals = [
                p[f"{key}_difference"] for p in table.results if p[f"{key}_difference"] is not None
            ]
            sd = statistics.stdev(vals) if len(vals) > 1 else None
        else:
            c = [per_run[key][id(r)] for r in table.candidates if per_run[key][id(r)] is not None]
            b = [per_run[key][id(r)] for r in table.baselines if per_run[key][id(r)] is not None]
            sd = (
                math.sqrt(statistics.variance(c) + statistics.variance(b))
                if len(c) > 1 and len(b) > 1
                else None
            )
        mean = diffs[key]["mean"]
        rows.append(
            {
                "quantity": key,
                "sigma": sd,
                "observed_delta": mean,
                "seeds_for_observed": _seeds_for(z, sd, mean),
                "sigma_eval": noise["sigma"] if noise else None,
                "seeds_for_sigma_eval": _seeds_for(z, sd, noise["sigma"]) if noise else None,
            }
        )
    return rows


def _seeds_for(z: float, sd: Optional[float], delta: Optional[float]) -> Optional[int]:
    """n = (z sd / delta)^2, at least 2; None without a spread or a difference."""
    if sd is None or not delta:
        return None
    return max(2, math.ceil((z * sd / abs(delta)) ** 2))
