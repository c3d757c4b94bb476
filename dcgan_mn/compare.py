"""Compare runs' FID curves: the paper's acceleration, best / final FID, time to target.

Definitions (DESIGN, "Evaluation protocol"), for one baseline run B and one candidate run C:

* target = B's best FID; S_base = the first iteration at which B reaches it;
* S_cand = the first iteration at which C's FID is at or below the target (None if never);
  for a metric where higher is better (``modes``, precision, recall, density, coverage): best
  is the maximum and S_cand the first iteration at or above it. Each metric's direction comes
  from its metric family (``metrics.metric_direction``) and is stated in the report;
* acceleration = 1 - S_cand / S_base (0.58 means C needed 58% fewer generator updates);
* time_acceleration = the same ratio in training-only seconds (evaluation time excluded),
  which charges MN for its extra cost per iteration.

Several runs per arm: runs are **paired by seed** when both arms hold the same seeds (one pair per
seed: same data order and initial noise, so the pair differs only by the normalization), else
**every candidate is paired with every baseline**. The acceleration is reported per pair and as
mean ± std (sample std, ddof=1) over the pairs in which the candidate reached the target, with
the count of pairs that did; per-arm best / final FID and their iterations are mean ± std over
runs. Each run's curve comes from its ``metrics.jsonl`` (one row per evaluation; for an
iteration evaluated twice, e.g. around a resume, the last row wins).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .fileio import atomic_write

__all__ = ["CompareError", "RunCurve", "read_run", "pair_runs", "acceleration", "compare_runs",
           "render_markdown", "plot_curves", "write_outputs"]


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
    values: list[float]
    train_seconds: list[Optional[float]]
    direction: str = "min"  # "min": lower is better (FID, kl_modes, cfd); "max": higher (modes)

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

    def first_reaching(self, target: float) -> Optional[int]:
        """Index of the first value at least as good as ``target`` (None if never)."""
        for i, v in enumerate(self.values):
            if (v >= target) if self.direction == "max" else (v <= target):
                return i
        return None

    def summary(self) -> dict:
        return {
            "name": self.name, "path": self.path, "seed": self.seed,
            "evaluations": len(self.values),
            "best": self.best, "best_iteration": self.best_iteration,
            "train_seconds_to_best": self.train_seconds[self.best_index],
            "final": self.values[-1], "final_iteration": self.iterations[-1],
        }


def read_run(
    path, *, metric: str = "fid", sample_mode: Optional[str] = None,
    num_samples: Optional[int] = None,
) -> RunCurve:
    """One run folder's curve of ``metric`` against iteration, from ``metrics.jsonl``.

    ``num_samples`` selects rows by the metric's own sample count (``mode_samples`` for the
    mode metrics, ``num_samples`` for the Inception ones)."""
    from .metrics import metric_count_key, metric_direction

    count_key = metric_count_key(metric)
    run = Path(path)
    metrics_file = run / "metrics.jsonl"
    if not run.is_dir():
        raise CompareError(f"run {str(path)!r}: not a folder")
    if not metrics_file.is_file():
        raise CompareError(f"run {str(path)!r}: no metrics.jsonl (was it trained with --fid-every > 0?)")
    config = {}
    if (run / "config.json").is_file():
        try:
            config = json.loads((run / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CompareError(f"run {str(path)!r}: unreadable config.json ({e})") from None
    rows = []
    lines = metrics_file.read_text().splitlines()
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write can leave a truncated last line; anything else is an error.
            if line_no == len(lines):
                print(f"warning: {metrics_file}: ignoring a truncated last line", file=sys.stderr)
                continue
            raise CompareError(f"run {str(path)!r}: metrics.jsonl line {line_no} is not JSON") from None
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
    return RunCurve(
        name=run.name, path=str(run), seed=config.get("seed"), metric=metric,
        sample_mode=mode, num_samples=count, iterations=its,
        values=[float(by_iteration[i][metric]) for i in its],
        train_seconds=[by_iteration[i].get("train_seconds") for i in its],
        direction=metric_direction(metric),
    )


def pair_runs(candidates: Sequence[RunCurve], baselines: Sequence[RunCurve]) -> tuple[str, list]:
    """("seed", pairs by seed) when both arms hold the same unique seeds, else ("all", every pair)."""
    c_seeds = [c.seed for c in candidates]
    b_seeds = [b.seed for b in baselines]
    if (None not in c_seeds and len(set(c_seeds)) == len(c_seeds)
            and len(set(b_seeds)) == len(b_seeds) and set(c_seeds) == set(b_seeds)):
        by_seed = {b.seed: b for b in baselines}
        return "seed", [(c, by_seed[c.seed]) for c in candidates]
    return "all", [(c, b) for c in candidates for b in baselines]


def acceleration(candidate: RunCurve, baseline: RunCurve) -> dict:
    """The paper's acceleration of ``candidate`` over ``baseline`` (module docstring)."""
    target = baseline.best
    s_base = baseline.best_iteration
    t_base = baseline.train_seconds[baseline.best_index]
    i = candidate.first_reaching(target)
    s_cand = candidate.iterations[i] if i is not None else None
    t_cand = candidate.train_seconds[i] if i is not None else None
    return {
        "candidate": candidate.name, "baseline": baseline.name,
        "target": target, "s_base": s_base, "s_cand": s_cand, "reached": s_cand is not None,
        "acceleration": (1 - s_cand / s_base) if s_cand is not None and s_base > 0 else None,
        "train_seconds_base": t_base, "train_seconds_cand": t_cand,
        "time_acceleration": (1 - t_cand / t_base) if t_cand is not None and t_base else None,
    }


def _mean_std(values) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals)}


def _arm_summary(runs: Sequence[RunCurve]) -> dict:
    rows = [r.summary() for r in runs]
    return {key: _mean_std(r[key] for r in rows)
            for key in ("best", "best_iteration", "train_seconds_to_best", "final", "final_iteration")}


def compare_runs(
    candidates: Sequence[RunCurve], baselines: Sequence[RunCurve],
    *, candidate_label: str = "candidate", baseline_label: str = "baseline",
) -> dict:
    """Everything the report shows, as one JSON-ready dict."""
    metric = baselines[0].metric
    for r in [*candidates, *baselines]:
        if (r.sample_mode, r.num_samples) != (baselines[0].sample_mode, baselines[0].num_samples):
            raise CompareError(
                f"run {r.path!r}: {r.sample_mode}/{r.num_samples} samples, but {baselines[0].path!r} "
                f"has {baselines[0].sample_mode}/{baselines[0].num_samples}: numbers are not comparable"
            )
    pairing, pairs = pair_runs(candidates, baselines)
    results = [acceleration(c, b) for c, b in pairs]
    reached = [p for p in results if p["reached"]]
    return {
        "metric": metric,
        "direction": baselines[0].direction,
        "better": "higher" if baselines[0].direction == "max" else "lower",
        "sample_mode": baselines[0].sample_mode,
        "num_samples": baselines[0].num_samples,
        "labels": {"candidate": candidate_label, "baseline": baseline_label},
        "pairing": pairing,
        "definition": (
            "target = baseline best; S_base = first baseline iteration at its best; S_cand = first "
            f"candidate iteration with value {'>=' if baselines[0].direction == 'max' else '<='} "
            "target; acceleration = 1 - S_cand / S_base; "
            "time_acceleration likewise in training-only seconds; mean ± std (ddof=1) over pairs "
            "that reached the target"
        ),
        "runs": {
            "candidate": [c.summary() for c in candidates],
            "baseline": [b.summary() for b in baselines],
        },
        "pairs": results,
        "summary": {
            "candidate": _arm_summary(candidates),
            "baseline": _arm_summary(baselines),
            "acceleration": _mean_std(p["acceleration"] for p in reached),
            "time_acceleration": _mean_std(p["time_acceleration"] for p in reached),
            "s_cand": _mean_std(p["s_cand"] for p in reached),
            "s_base": _mean_std(p["s_base"] for p in results),
            "pairs_reached": len(reached),
            "pairs": len(results),
        },
        "curves": {
            arm: [{"name": r.name, "iterations": r.iterations, "values": r.values}
                  for r in runs]
            for arm, runs in (("candidate", candidates), ("baseline", baselines))
        },
    }


def _fmt(stat: dict, digits: int = 2, pct: bool = False) -> str:
    if stat["mean"] is None:
        return "–"
    scale = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    text = f"{stat['mean'] * scale:.{digits}f}{unit}"
    if stat["std"] is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}{unit}"
    return text


def _num(v, digits=2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_markdown(report: dict) -> str:
    """The report as markdown: a per-arm summary, then per-run and per-pair tables."""
    m, s, lab = report["metric"].upper(), report["summary"], report["labels"]
    lines = [
        f"## {m}: {lab['candidate']} vs {lab['baseline']} "
        f"({report['num_samples']} samples, sample mode {report['sample_mode']}; "
        f"{report.get('better', 'lower')} is better)",
        "",
        f"| arm | runs | best {m} | best at iteration | train s to best | final {m} |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ("baseline", "candidate"):
        a = s[arm]
        lines.append(
            f"| {lab[arm]} | {a['best']['n']} | {_fmt(a['best'])} | {_fmt(a['best_iteration'], 0)} | "
            f"{_fmt(a['train_seconds_to_best'], 0)} | {_fmt(a['final'])} |"
        )
    lines += [
        "",
        f"**Acceleration** (1 - S_cand / S_base, pairing by {report['pairing']}): "
        f"{_fmt(s['acceleration'], 1, pct=True)} in iterations, "
        f"{_fmt(s['time_acceleration'], 1, pct=True)} in training time; "
        f"target reached in {s['pairs_reached']} of {s['pairs']} pairs.",
        "",
        "| candidate | baseline | target | S_base | S_cand | acceleration | time acceleration |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["pairs"]:
        acc = "not reached" if not p["reached"] else _num(
            None if p["acceleration"] is None else 100 * p["acceleration"], 1) + "%"
        tacc = "–" if p["time_acceleration"] is None else f"{100 * p['time_acceleration']:.1f}%"
        lines.append(f"| {p['candidate']} | {p['baseline']} | {_num(p['target'])} | {p['s_base']} | "
                     f"{_num(p['s_cand'])} | {acc} | {tacc} |")
    lines += ["", "| run | arm | seed | best | best at | final | final at |", "|---|---|---|---|---|---|---|"]
    for arm in ("baseline", "candidate"):
        for r in report["runs"][arm]:
            lines.append(f"| {r['name']} | {lab[arm]} | {_num(r['seed'])} | {_num(r['best'])} | "
                         f"{r['best_iteration']} | {_num(r['final'])} | {r['final_iteration']} |")
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, path) -> None:
    """PNG: every run's curve against iteration; the mean baseline target as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"baseline": ("tab:blue", "--"), "candidate": ("tab:red", "-")}
    for arm, (color, ls) in styles.items():
        for i, c in enumerate(report["curves"][arm]):
            label = f"{report['labels'][arm]}: {c['name']}"
            ax.plot(c["iterations"], c["values"], ls, color=color, alpha=0.85, marker=".", label=label)
    target = report["summary"]["baseline"]["best"]["mean"]
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"baseline best (mean) {target:.2f}")
    ax.set_xlabel("iteration (generator updates)")
    ax.set_ylabel(f"{report['metric'].upper()} ({report['num_samples']} samples, {report['sample_mode']})")
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
