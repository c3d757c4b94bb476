"""The paper's acceleration rule, for one baseline run B and one candidate run C:

* target = B's best value; S_base = the first iteration at which B reaches it;
* S_cand = the first iteration at which C is at least as good as the target (None: never);
  "good" follows the metric's direction (``metrics.metric_direction``): lower FID / kl_modes /
  cfd / KID, higher modes / inception_score / precision / recall / density / coverage;
* acceleration = 1 - S_cand / S_base (0.58: C needed 58% fewer generator updates);
* time_acceleration = the same ratio in training-only seconds (evaluation excluded), which
  charges MN for its extra cost per iteration.

With a tolerance (sigma_eval) a point within it of the target counts as reaching it. Runs are
paired by seed when both arms hold the same seeds, else every candidate with every baseline.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .curves import RunCurve

__all__ = ["pair_runs", "acceleration", "acceleration_matrix", "NOT_REACHED"]

# an acceleration below any real one (S_cand = infinity) where a test needs a number
NOT_REACHED = -1e9


def pair_runs(candidates: Sequence[RunCurve], baselines: Sequence[RunCurve]) -> tuple[str, list]:
    """("seed", pairs by seed) when both arms hold the same unique seeds, else ("all", every pair)."""
    c_seeds = [c.seed for c in candidates]
    b_seeds = [b.seed for b in baselines]
    if (
        None not in c_seeds
        and len(set(c_seeds)) == len(c_seeds)
        and len(set(b_seeds)) == len(b_seeds)
        and set(c_seeds) == set(b_seeds)
    ):
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
        "candidate": candidate.name,
        "baseline": baseline.name,
        "target": target,
        "target_is_bound": baseline.still_improving,
        "s_base": s_base,
        "s_cand": s_cand,
        "reached": s_cand is not None,
        "candidate_last_iteration": candidate.iterations[-1],
        "baseline_last_iteration": baseline.iterations[-1],
        "acceleration": (1 - s_cand / s_base) if s_cand is not None and s_base > 0 else None,
        "train_seconds_base": t_base,
        "train_seconds_cand": t_cand,
        "time_acceleration": (1 - t_cand / t_base) if t_cand is not None and t_base else None,
    }


def acceleration_matrix(
    runs: Sequence[RunCurve], key: str, sigma: float, smooth: dict
) -> np.ndarray:
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
            m[i, j] = (
                -math.inf
                if a["s_cand"] is None
                else (a["acceleration"] if a["acceleration"] is not None else 0.0)
            )
    # A finite stand-in below every acceleration: medians order the same, and scipy's tie
    # tolerance (relative to the statistic) stays finite.
    return np.where(np.isinf(m), NOT_REACHED, m)
