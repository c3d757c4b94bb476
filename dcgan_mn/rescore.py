"""Evaluation noise: re-score a run's evaluated snapshots with more evaluation seeds.

A training run scores each snapshot once, from the evaluator's seed (0): one draw of latents,
MN k-means draws and KID subsets. Scoring the same snapshot from seeds 0, 1, ..., N-1 measures
how much of a curve's wiggle is the evaluation itself. The extra scores go to
``<run>/eval_seeds.jsonl`` (rows shaped like ``metrics.jsonl``'s, plus their ``seed``), so
``compare --eval-seeds N`` computes each one once, and a run folder shipped without its
snapshots (the committed experiment) still compares from the file.

Seed s's scored latents are disjoint from seed 0's (each seed has its own latent stream), and
re-scoring with the training seed reproduces the training row exactly (tested).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .checkpoint import load_generators
from .config import config_from_dict
from .runfolder import RunFolder, as_run_folder

__all__ = [
    "RescoreError",
    "RescorePlan",
    "evaluation_seeds",
    "seed_rows",
    "plan_rescore",
    "describe_plans",
    "rescore_run",
    "rescore_runs",
]


class RescoreError(ValueError):
    """A run that cannot be re-scored; one line naming the run and what is missing."""


def evaluation_seeds(training_seed: int, count: int) -> list[int]:
    """The ``count`` evaluation seeds of a curve point whose training row used ``training_seed``."""
    return [training_seed + j for j in range(count)]


def seed_rows(run: Union[RunFolder, str, Path]) -> list[dict]:
    """The run's re-scored rows (empty when it was never re-scored)."""
    try:
        return as_run_folder(run).eval_seed_rows()
    except ValueError as e:  # a malformed line: name it, no traceback
        raise RescoreError(str(e)) from None


def _has(rows: list[dict], metric: str) -> set[tuple[int, int, Optional[str]]]:
    return {
        (int(r["iteration"]), int(r.get("seed", 0)), r.get("sample_mode"))
        for r in rows
        if r.get(metric) is not None and r.get("iteration") is not None
    }


def _evaluation_setup(cfg, device) -> tuple:
    """What an evaluator is built from: runs that agree on it share one evaluator."""
    return (
        cfg.dataset,
        cfg.ref,
        cfg.dims,
        cfg.inception_weights,
        cfg.fid_protocol,
        cfg.fid_samples,
        cfg.mode_samples,
        getattr(cfg, "inception_metrics", True),
        str(cfg.data_root),
        str(device),
    )


@dataclass
class RescorePlan:
    """What re-scoring one run for ``metric`` would do, decided before anything is scored."""

    folder: RunFolder
    cfg: Any  # the run's TrainConfig
    metric: str
    samples: int  # per scoring: the run's own count for the metric's family
    todo: list  # [(iteration, evaluation seed)] still to score
    seconds: Optional[float]  # estimate: the training evaluations' eval_seconds at those iterations

    @property
    def run(self) -> Path:
        return self.folder.path


def plan_rescore(run_dir: Union[RunFolder, str, Path], metric: str, count: int) -> RescorePlan:
    """Which of ``run_dir``'s evaluated snapshots lack ``metric`` for one of their ``count``
    evaluation seeds, and about how long scoring them takes (each scoring costs what the
    training evaluation of that snapshot cost, G_ema included). Refuses, naming the run, what
    cannot be re-scored alike (rows of another protocol, missing snapshots)."""
    folder = as_run_folder(run_dir)
    run = folder.path
    saved = folder.read_config()
    if saved is None:
        raise RescoreError(f"run {str(run)!r}: no {RunFolder.CONFIG} to re-score with")
    cfg = config_from_dict(saved)
    from .metrics.specs import MODE_COUNT_KEY, metric_spec

    count_key = metric_spec(metric).count_key  # a MetricsError names the known metrics
    samples = cfg.mode_samples if count_key == MODE_COUNT_KEY else cfg.fid_samples
    rows = folder.metrics_rows()
    # the rows the run's own evaluator wrote
    trained = [
        r
        for r in rows
        if r.get(metric) is not None
        and r.get("sample_mode") == cfg.sample_mode
        and r.get(count_key) == samples
    ]
    if not trained and any(r.get(metric) is not None for r in rows):
        raise RescoreError(
            f"run {str(run)!r}: its {metric} rows were not scored with the {samples} samples and sample "
            f"mode {cfg.sample_mode!r} of its config.json, so they cannot be re-scored alike "
            f"(use --eval-seeds 1)"
        )
    have = _has(trained, metric) | _has(
        [r for r in seed_rows(folder) if r.get(count_key) == samples], metric
    )
    todo = []  # (iteration, seed)
    cost: dict[int, Optional[float]] = {}
    for row in trained:
        it = int(row["iteration"])
        cost[it] = (
            row.get("eval_seconds") if isinstance(row.get("eval_seconds"), (int, float)) else None
        )
        for s in evaluation_seeds(int(row.get("seed", 0)), count):
            if (it, s, cfg.sample_mode) not in have and (it, s) not in todo:
                todo.append((it, s))
    if todo:
        snapshots = dict(folder.snapshots())
        missing = sorted({it for it, _ in todo if it not in snapshots})
        if missing:
            raise RescoreError(
                f"run {str(run)!r}: no generator snapshot for iteration(s) {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} to score with {count} evaluation seeds "
                f"(use --eval-seeds 1 to compare the training rows only)"
            )
    known = [cost[it] for it, _ in todo]
    seconds = float(sum(known)) if todo and all(c is not None for c in known) else None
    return RescorePlan(folder, cfg, metric, samples, todo, seconds)


def _duration(seconds: float) -> str:
    """45 s, 2 min 14 s, 1 h 05 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def describe_plans(plans: list[RescorePlan], count: int) -> Optional[str]:
    """One line saying what re-scoring will do, where it writes and about how long it takes, and
    how to skip it; None when there is nothing to score."""
    busy = [p for p in plans if p.todo]
    if not busy:
        return None
    n = sum(len(p.todo) for p in busy)
    known = [p.seconds for p in busy if p.seconds is not None]
    if len(known) == len(busy):
        how_long = f"about {_duration(sum(known))}, as long as the runs' own evaluations took"
    else:
        how_long = "how long is unknown (rows without eval_seconds)"
    runs = f"{len(busy)} run{'s' if len(busy) != 1 else ''}"
    return (
        f"re-scoring the evaluated snapshots with more evaluation seeds (--eval-seeds {count}: {n} "
        f"scoring{'s' if n != 1 else ''} in {runs}) to measure the evaluation noise: {how_long}; kept in "
        f"<run>/{RunFolder.EVAL_SEEDS}, so done once; --eval-seeds 1 skips it"
    )


def rescore_runs(
    runs, metric: str, count: int, *, device="cpu", cache_dir=None, progress: bool = False
) -> int:
    """``rescore_run`` for each of ``runs``, planned first (every run checked, and one line on
    stderr saying what it will do and about how long, before anything is scored), with one
    evaluator per distinct evaluation setup (built once, so its networks and references load
    once and what it warns about, e.g. non-standard Inception weights, is said once, not once
    per run); each distinct warning is shown once. Returns how many scores it added."""
    import warnings

    # a run named twice is scored once
    unique = {Path(r).resolve(): r for r in reversed(list(runs))}
    plans = [plan_rescore(r, metric, count) for r in reversed(unique.values())]
    said = describe_plans(plans, count)
    if said:
        print(said, file=sys.stderr)
    evaluators: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        return sum(
            rescore_run(
                p.folder,
                metric,
                count,
                device=device,
                cache_dir=cache_dir,
                progress=progress,
                evaluators=evaluators,
                plan=p,
            )
            for p in plans
        )


def rescore_run(
    run_dir: Union[RunFolder, str, Path],
    metric: str,
    count: int,
    *,
    device="cpu",
    evaluator=None,
    cache_dir=None,
    progress: bool = False,
    evaluators: Optional[dict] = None,
    plan: Optional[RescorePlan] = None,
) -> int:
    """Score every evaluated snapshot of ``run_dir`` that lacks ``metric`` for one of its
    ``count`` evaluation seeds; returns how many (snapshot, seed) scores it added.

    ``evaluator``: the run's evaluator (default: ``build_evaluator`` from the run's config, as
    training built it; tests inject a small one; ``evaluators``: a cache of built ones by
    evaluation setup, shared across runs by ``rescore_runs``). ``plan``: ``plan_rescore``'s,
    when already made. All metrics of the evaluator are stored, so one re-scoring serves
    ``compare`` for each of them."""
    plan = plan or plan_rescore(run_dir, metric, count)
    folder, cfg, todo, run = plan.folder, plan.cfg, plan.todo, plan.run
    if not todo:
        return 0
    from .metrics.specs import averaged_result, metric_spec

    snapshots = dict(folder.snapshots())
    if evaluator is None:
        from . import metrics as M

        setup = _evaluation_setup(cfg, device)
        evaluator = (evaluators or {}).get(setup)
        if evaluator is None:
            evaluator = M.build_evaluator(cfg, device, cache_dir=cache_dir, progress=progress)
            if evaluators is not None:
                evaluators[setup] = evaluator
    scorable = metric_spec(metric).plain_name  # an _ema metric is scored beside G's
    if scorable not in getattr(evaluator, "directions", {scorable: None}):
        raise RescoreError(
            f"run {str(run)!r}: its evaluator here cannot score --metric {metric!r} (it scores "
            f"{sorted(evaluator.directions)}; e.g. no Inception weights on this machine)"
        )
    estimate = f", about {_duration(plan.seconds)}" if plan.seconds is not None else ""
    print(
        f"{run.name}: {len(todo)} re-scorings of {plan.samples} samples each{estimate}",
        file=sys.stderr,
    )
    from .provenance import environment, record_environment

    key = record_environment(folder, environment(device), max(it for it, _ in todo))
    loaded: tuple = (None, None, None)  # (iteration, G, G_ema or None)
    for it, s in todo:
        if loaded[0] != it:
            loaded = (it, *load_generators(snapshots[it], device)[:2])
        seeded = evaluator.with_seed(s)
        result = seeded(loaded[1], sample_mode=cfg.sample_mode, batch_size=cfg.batch_size)
        if loaded[2] is not None:  # the averaged generator, scored alike: its <metric>_ema columns
            result.update(
                averaged_result(
                    seeded(loaded[2], sample_mode=cfg.sample_mode, batch_size=cfg.batch_size)
                )
            )
        folder.append_eval_seed_row(
            {
                "iteration": it,
                "images_seen": it * cfg.batch_size,
                "sample_mode": cfg.sample_mode,
                **{k: v for k, v in result.items() if k not in ("iteration", "images_seen")},
                "env_key": key,
            }
        )
    return len(todo)
