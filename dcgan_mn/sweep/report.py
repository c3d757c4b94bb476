"""A finished sweep's aftermath: re-scoring, ``compare`` reports per metric, sample grids.

* every run's evaluated snapshots are scored with ``eval_seeds`` evaluation seeds (kept in its
  ``eval_seeds.jsonl``, so the small files compare on their own later);
* each arm is compared with the first (the baseline) on every headline metric the runs scored
  (``fid``, ``modes``, ``kl_modes``, ``cfd``; their ``_ema`` twins with ``--g-ema``), written to
  ``<out>/compare/<metric>/`` (two arms) or ``<out>/compare/<arm>-vs-<baseline>/<metric>/``;
* with ``--g-ema``, each arm's G_ema against its own G as well (``<metric>_ema`` against
  ``<metric>``, runs paired with themselves: what averaging does for that arm), written to
  ``<out>/compare/averaging/<arm>-<metric>/``;
* one 8x8 sample grid per arm (``<out>/samples-<arm>.png``, and ``-ema`` for G_ema): the final
  generators of the first seed whose runs in every arm still hold their snapshots.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from ..runfolder import RunFolder
from .plan import SweepError, SweepRecord, run_progress

__all__ = [
    "REPORT_METRICS",
    "averaged_metrics",
    "averaging_dir",
    "report_metrics",
    "write_averaging_reports",
    "write_report",
]

REPORT_METRICS = ("fid", "modes", "kl_modes", "cfd")  # compared when the runs scored them
GRID_SEED = 0  # latents of the per-arm sample grids


def report_metrics(config: dict) -> list[str]:
    """The metrics a run of this config scored that the report compares."""
    from ..metrics.specs import EMA_SUFFIX

    evaluated = set(config.get("extra", {}).get("evaluated") or ())
    chosen = [m for m in REPORT_METRICS if m in evaluated]
    if (config.get("g_ema") or 0) > 0:
        chosen += [f"{m}{EMA_SUFFIX}" for m in chosen]
    return chosen


def averaged_metrics(metrics: Sequence[str]) -> list[str]:
    """The metrics of ``metrics`` whose G_ema twin (``<metric>_ema``) is there too: each gets,
    per arm, a report of G_ema against G (``averaging_dir``)."""
    from ..metrics.specs import EMA_SUFFIX

    return [m for m in metrics if f"{m}{EMA_SUFFIX}" in metrics]


def averaging_dir(arm: str, metric: str) -> str:
    """Where under ``compare/`` the report of ``arm``'s G_ema against its G on ``metric`` goes."""
    return f"averaging/{arm}-{metric}"


def write_averaging_reports(
    out: Path, arms: dict, metrics: Sequence[str], *, eval_seeds: int = 1, log=print
) -> dict:
    """Each arm's G_ema against its own G, for every metric of ``metrics`` whose ``_ema`` twin is
    there too: ``{"averaging/<arm>-<metric>": paths}``, reports in ``out/compare/averaging/``.
    ``arms``: {arm name: its run folders}."""
    from .. import compare as C
    from ..metrics.specs import EMA_SUFFIX

    written = {}
    for name, folders in arms.items():
        for metric in averaged_metrics(metrics):
            where = averaging_dir(name, metric)
            curves = {
                m: [C.read_run(f, metric=m, eval_seeds=eval_seeds) for f in folders]
                for m in (f"{metric}{EMA_SUFFIX}", metric)
            }
            report = C.compare_runs(
                *curves.values(), candidate_label=f"{name} G_ema", baseline_label=f"{name} G"
            )
            written[where] = C.write_outputs(report, out / "compare" / where)
            log(
                f"compare {metric}_ema vs {metric}: {name}'s G_ema vs its G -> {out / 'compare' / where}"
            )
    return written


def grid_seed(spec) -> Optional[int]:
    """The first seed whose runs in every arm still hold their snapshots (the grids show one
    seed, the same in every arm); None when none does (a clone keeps only the small files)."""
    runs = spec.runs()
    return next(
        (
            s
            for s in spec.seeds
            if all(RunFolder(r.folder).snapshots() for r in runs if r.seed == s)
        ),
        None,
    )


def write_sample_grid(snapshot: Path, path: Path, ema: bool = False) -> None:
    """8x8 grid of a generator snapshot (``ema``: its G_ema) from fixed latents, in its run's sample mode."""
    import torch
    from torchvision.utils import save_image

    from ..checkpoint import load_generator

    G, cfg, _ = load_generator(snapshot, ema=ema)
    z = torch.randn(64, G.z_dim, generator=torch.Generator().manual_seed(GRID_SEED))  # [64, z_dim]
    with torch.random.fork_rng():
        torch.manual_seed(GRID_SEED)  # MN's k-means++ draws in batch mode
        # [64, 3, 32, 32] in [-1, 1]
        images = G.sample(z, mode=cfg.sample_mode, batch_size=cfg.batch_size)
    save_image(images * 0.5 + 0.5, str(path), nrow=8, padding=2)


def write_report(
    out: Path,
    *,
    metrics: Optional[Sequence[str]] = None,
    device="cpu",
    cache_dir=None,
    progress: bool = False,
    log=print,
) -> dict:
    """Re-score, compare and draw the sweep in ``out``; {"compare": {name: paths}, "grids": [...]}.
    Refused (one line) while a run has not reached ``--iters``."""
    from .. import compare as C
    from ..rescore import rescore_runs

    record = SweepRecord.load(out)
    spec = record.spec
    runs = spec.runs()
    unfinished = [r.name for r in runs if run_progress(r.folder) < spec.iters]
    if unfinished:
        raise SweepError(
            f"{out}: {len(unfinished)} run(s) have not reached --iters {spec.iters} "
            f"({', '.join(unfinished[:6])}{' ...' if len(unfinished) > 6 else ''}); "
            f"`sweep.py status {out}` says why"
        )
    config = RunFolder(runs[0].folder).read_config() or {}
    metrics = list(metrics or report_metrics(config))
    if not metrics:
        raise SweepError(
            f"{out}: the runs scored none of {', '.join(REPORT_METRICS)}; name one with --metric"
        )
    if spec.eval_seeds > 1:
        log(
            f"re-scoring {len(runs)} runs' snapshots with {spec.eval_seeds} evaluation seeds (once; kept in each "
            f"run's eval_seeds.jsonl)"
        )
        rescore_runs(
            [r.folder for r in runs],
            metrics[0],
            spec.eval_seeds,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
        )
    baseline = spec.arms[0].name
    written: dict = {"compare": {}, "grids": []}
    read = dict(eval_seeds=spec.eval_seeds)
    for arm in spec.arms[1:]:
        for metric in metrics:
            dest = (
                out
                / "compare"
                / (metric if len(spec.arms) == 2 else f"{arm.name}-vs-{baseline}/{metric}")
            )
            cands = [C.read_run(r.folder, metric=metric, **read) for r in runs if r.arm == arm.name]
            bases = [C.read_run(r.folder, metric=metric, **read) for r in runs if r.arm == baseline]
            report = C.compare_runs(cands, bases, candidate_label=arm.name, baseline_label=baseline)
            for warning in report["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)
            written["compare"][str(dest.relative_to(out / "compare"))] = C.write_outputs(
                report, dest
            )
            log(f"compare {metric}: {arm.name} vs {baseline} -> {dest}")
    written["compare"].update(
        write_averaging_reports(
            out,
            {a.name: [r.folder for r in runs if r.arm == a.name] for a in spec.arms},
            metrics,
            eval_seeds=spec.eval_seeds,
            log=log,
        )
    )
    seed = grid_seed(spec)
    if seed is None:
        log("sample grids: no seed has every arm's snapshots on disk; grids left as they are")
        return written
    averaged = (config.get("g_ema") or 0) > 0
    for arm in spec.arms:
        run = next(r for r in runs if r.arm == arm.name and r.seed == seed)
        snapshot = RunFolder(run.folder).snapshots()[-1][1]
        for ema, suffix in ((False, ""), *(((True, "-ema"),) if averaged else ())):
            path = out / f"samples-{arm.name}{suffix}.png"
            write_sample_grid(snapshot, path, ema=ema)
            written["grids"].append(str(path))
            log(
                f"sample grid {arm.name}{' (G_ema)' if ema else ''}: {path} ({run.name}'s final generator)"
            )
    return written
