"""The comparison as a report: markdown (``render_markdown``), a plot of every run's curve
(``plot_curves``), and the three files ``evaluate.py compare`` writes (``write_outputs``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..fileio import atomic_write
from .curves import COLLAPSE_FACTOR, SMOOTH_WINDOW
from .inference import BOOTSTRAP_RESAMPLES, CONFIDENCE, MIN_UNITS_FOR_INTERVAL_VERDICT

__all__ = ["render_markdown", "curve_figure", "plot_curves", "write_outputs", "READING_GUIDE"]


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
    lines = [
        *_header(report),
        *_arm_table(report),
        *_difference_table(report),
        *_acceleration_section(report),
        *_pair_table(report),
        *_run_table(report),
        *_seeds_table(report),
        "",
        READING_GUIDE.rstrip(),
    ]
    return "\n".join(lines) + "\n"


def compared_metric(report: dict) -> str:
    """What the report compares: ``cfd``, or ``cfd_ema vs cfd`` (a ``--baseline-metric``)."""
    other = report.get("baseline_metric")
    return report["metric"] + (f" vs {other}" if other else "")


def _header(report: dict) -> list[str]:
    """Title, what the brackets and tests are, the evaluation noise, and the warnings."""
    m, lab = compared_metric(report).upper(), report["labels"]
    st = report.get("statistics", {})
    boot = st.get("bootstrap", {})
    perm = st.get("permutation", {})
    noise = report.get("evaluation_noise")
    interval_text = (
        f"{100 * boot.get('confidence', CONFIDENCE):.0f}% "
        f"{boot.get('method', 'percentile')} bootstrap interval, "
        f"{boot.get('resamples', BOOTSTRAP_RESAMPLES)} resamples"
    )
    return [
        f"## {m}: {lab['candidate']} vs {lab['baseline']} "
        f"({report['num_samples']} samples, sample mode {report['sample_mode']}; "
        f"{report.get('better', 'lower')} is better)",
        "",
        f"Per-arm rows: mean ± std over runs [{interval_text}, unit: {boot.get('arm_unit', 'run')}]. "
        f"Differences and accelerations: mean ± std over pairs [{interval_text}, unit: "
        f"{boot.get('unit', '–')}]. Below {boot.get('range_below', MIN_UNITS_FOR_INTERVAL_VERDICT)} "
        'units the bracket is the range of the values, marked "(range of n)", not a 95% interval. '
        + (
            f"Permutation tests: {PERMUTATION_WORDS.get(perm.get('permutation_type'), perm.get('permutation_type'))} "
            f"(scipy.stats.permutation_test, permutation_type={perm.get('permutation_type')!r}). "
            if perm
            else ""
        )
        + (
            f"Evaluation noise: each point is the mean over {noise['eval_seeds']} evaluation seeds; "
            f"sigma_eval = {noise['sigma']:.3g} (largest point std {noise['max_point_std']:.3g}, "
            f"{noise['points']} points)."
            if noise
            else "One evaluation seed per point (no evaluation-noise estimate)."
        ),
        "",
        *[f"**Warning:** {w}." for w in report.get("warnings", [])],
        *([""] if report.get("warnings") else []),
    ]


def _arm_table(report: dict) -> list[str]:
    """One row per arm (best, where, final, AUC, collapsed, still improving), then the runs
    still improving by name."""
    m, s, lab = compared_metric(report).upper(), report["summary"], report["labels"]
    lo_it, hi_it = report.get("statistics", {}).get("auc_range", [None, None])
    lines = [
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
    # A run in both arms (G_ema against G of the same runs) is named with its arm.
    shared = {r["name"] for r in report["runs"]["baseline"]} & {
        r["name"] for r in report["runs"]["candidate"]
    }
    improving = [
        r["name"] + (f" ({lab[arm]})" if r["name"] in shared else "")
        for arm in ("baseline", "candidate")
        for r in report["runs"][arm]
        if r.get("still_improving")
    ]
    if improving:
        better_sign = "≤" if report.get("direction", "min") == "min" else "≥"
        lines += [
            "",
            f"**Still improving:** {', '.join(improving)} "
            f"{'is' if len(improving) == 1 else 'are'} at {'its' if len(improving) == 1 else 'their'} "
            "best at the last evaluation: that best, and any target taken from it, is a bound "
            f"(the run would reach {better_sign} it), not a value. Run longer.",
        ]
    return lines


def _p_cell(report: dict, key: str) -> str:
    """The permutation p of ``key`` (exact, with the smallest p possible, or Monte Carlo)."""
    t = report.get("statistics", {}).get("permutation", {}).get("tests", {}).get(key)
    if not t:
        return "–"
    return f"{t['p']:.3g}" + (
        f" (exact; smallest possible {t['smallest_p']:.3g})" if t.get("exact") else " (Monte Carlo)"
    )


def _difference_table(report: dict) -> list[str]:
    """Candidate minus baseline: best, final (at the common last iteration) and AUC."""
    s, lab = report["summary"], report["labels"]
    final_at = report.get("statistics", {}).get("final_iteration")
    lines = [
        "",
        f"| {lab['candidate']} - {lab['baseline']} | difference | permutation p | verdict |",
        "|---|---|---|---|",
    ]
    for key in ("best", "final", "auc"):
        name = {"final": f"final (at {_it(final_at)})" if final_at else "final"}.get(key, key)
        lines.append(
            f"| {name} | {_fmt(s['difference'][key], interval=True)} | {_p_cell(report, key + '_difference')} | "
            f"{s['verdicts'][key + '_difference']} |"
        )
    return lines


def _acceleration_section(report: dict) -> list[str]:
    """Reached k of n (naming each pair that never reached), the share reached by iteration,
    and one row per rule."""
    s, lab = report["summary"], report["labels"]
    st = report.get("statistics", {})
    acc = s["acceleration"]
    lines = [
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
            + (
                f" within {_it(p.get('candidate_last_iteration'))} iterations."
                if not str(_not_reached(p)).startswith("not reached (ended")
                else f": its curve ended at {_it(p.get('candidate_last_iteration'))} "
                f"({lab['baseline']} ran to {_it(p.get('baseline_last_iteration'))})."
            )
            for p in report["pairs"]
            if not p["reached"]
        ),
    ]
    if acc.get("reached_by"):
        steps, last = [], None
        for it, frac in acc["reached_by"]:
            if frac != last:
                steps.append(f"{_it(it)}: {100 * frac:.0f}%")
                last = frac
        lines += [
            "",
            "Share of pairs reached by iteration (first iteration at each new share): "
            + ", ".join(steps)
            + f"; by the end {100 * acc['reached_by'][-1][1]:.0f}%.",
        ]
    lines += [
        "",
        "| rule | acceleration | target reached | permutation p | verdict |",
        "|---|---|---|---|---|",
        f"| paper's (raw curve) | {_accel_cell(acc)} | {s['pairs_reached']} of {s['pairs']} | "
        f"{_p_cell(report, 'acceleration')} | {s['verdicts']['acceleration']} |",
    ]
    if report.get("evaluation_noise"):
        lines.append(
            f"| within sigma_eval of the target | {_accel_cell(s['acceleration_tolerant'])} | "
            f"{s['pairs_reached_tolerant']} of {s['pairs']} | {_p_cell(report, 'acceleration_tolerant')} | "
            f"{s['verdicts']['acceleration_tolerant']} |"
        )
    lines += [
        f"| running median of {st.get('smoothing_window', SMOOTH_WINDOW)} | "
        f"{_accel_cell(s['acceleration_smoothed'])} | "
        f"{s['pairs_reached_smoothed']} of {s['pairs']} | {_p_cell(report, 'acceleration_smoothed')} | "
        f"{s['verdicts']['acceleration_smoothed']} |",
        f"| training time (raw curve) | {_accel_cell(s['time_acceleration'])} | "
        f"{s['pairs_reached']} of {s['pairs']} | {_p_cell(report, 'time_acceleration')} | "
        f"{s['verdicts']['time_acceleration']} |",
    ]
    return lines


def _pair_table(report: dict) -> list[str]:
    """One row per pair: target, S_base, S_cand and each rule's acceleration."""
    lab, noise = report["labels"], report.get("evaluation_noise")
    lines = [
        "",
        "| candidate | baseline | target | S_base | S_cand | acceleration | tolerant | smoothed | time acceleration |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["pairs"]:
        acc_p = _pct(p["acceleration"]) if p["reached"] else _not_reached(p)
        tol = (
            _pct(p.get("acceleration_tolerant"))
            if p.get("s_cand_tolerant") is not None
            else (_not_reached(p) if noise else "–")
        )
        sm = (
            _pct(p.get("acceleration_smoothed"))
            if p.get("s_cand_smoothed") is not None
            else _not_reached(p)
        )
        target = _num(p["target"]) + (
            f" (bound: {lab['baseline']} still improving)" if p.get("target_is_bound") else ""
        )
        lines.append(
            f"| {p['candidate']} | {p['baseline']} | {target} | {p['s_base']} | "
            f"{_num(p['s_cand'])} | {acc_p} | {tol} | {sm} | {_pct(p['time_acceleration'])} |"
        )
    return lines


def _run_table(report: dict) -> list[str]:
    """One row per run: best, final, the worst value after the best, collapse, still improving."""
    lab = report["labels"]
    lines = [
        "",
        "| run | arm | seed | best | best at | final | final at | worst after best (at) | collapse | still improving |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ("baseline", "candidate"):
        for r in report["runs"][arm]:
            rb = r.get("rebound") or {}
            worst = (
                "–"
                if rb.get("worst_after") is None
                else (f"{_num(rb['worst_after'])} ({rb['worst_after_iteration']})")
            )
            flag = "**yes**" if rb.get("collapsed") else "no"
            improving_flag = "**yes: run longer**" if r.get("still_improving") else "no"
            lines.append(
                f"| {r['name']} | {lab[arm]} | {_num(r['seed'])} | {_num(r['best'])} | "
                f"{r['best_iteration']} | {_num(r['final'])} | {r['final_iteration']} | {worst} | {flag} | "
                f"{improving_flag} |"
            )
    lines += [
        "",
        f"Collapse: a value after the best that is {COLLAPSE_FACTOR:g}x worse "
        f"({'half the best or less' if report['direction'] == 'max' else 'twice the best or more'}).",
    ]
    return lines


def _seeds_table(report: dict) -> list[str]:
    """How many seeds the observed difference, and one sigma_eval, would need for 80% power."""
    need = report.get("statistics", {}).get("seeds_needed") or []
    if not any(r.get("sigma") is not None for r in need):
        return []
    unit = "pairs" if report["pairing"] == "seed" else "runs per arm"
    lines = [
        "",
        f"**Seeds for 80% power** (two-sided 5%; {unit}): n = ((z_0.975 + z_0.8) sigma / delta)^2, "
        "sigma = the std across seeds of the differences measured here.",
        "",
        f"| difference | sigma | delta = observed mean | {unit} needed | delta = 1 sigma_eval | {unit} needed |",
        "|---|---|---|---|---|---|",
    ]
    for r in need:
        lines.append(
            f"| {r['quantity']} | {_num(r['sigma'], 3)} | {_num(r['observed_delta'], 3)} | "
            f"{_num(r['seeds_for_observed'])} | {_num(r['sigma_eval'], 3)} | "
            f"{_num(r['seeds_for_sigma_eval'])} |"
        )
    lines += [
        "",
        "A normal approximation: an exact sign-flip test also needs at least 6 pairs before "
        "any p can fall below 0.05 (its smallest p is 2/2^n).",
    ]
    return lines


def curve_figure(report: dict):
    """The compare figure (matplotlib, Agg): every run's curve, its seed spread, the baseline best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"baseline": ("tab:blue", "--"), "candidate": ("tab:red", "-")}
    for arm, (color, ls) in styles.items():
        for c in report["curves"][arm]:
            label = f"{report['labels'][arm]}: {c['name']}"
            ax.plot(
                c["iterations"], c["values"], ls, color=color, alpha=0.85, marker=".", label=label
            )
            if c.get("spread"):
                v, sd = np.asarray(c["values"]), np.asarray(c["spread"])
                ax.fill_between(c["iterations"], v - sd, v + sd, color=color, alpha=0.12, lw=0)
    target = report["summary"]["baseline"]["best"]["mean"]
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"baseline best (mean) {target:.2f}")
    noise = report.get("evaluation_noise")
    ax.set_xlabel("iteration (generator updates)")
    # A short axis label; the sample count and noise band go to the title (a long label was cut off).
    ax.set_ylabel(compared_metric(report))
    ax.set_title(
        f"{compared_metric(report)}: {report['num_samples']} samples, {report['sample_mode']}"
        + (f"; mean of {noise['eval_seeds']} eval seeds ± std" if noise else ""),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(report: dict, path) -> None:
    """PNG: every run's curve against iteration (with its evaluation-seed spread as a band);
    the mean baseline best as a dotted line."""
    import matplotlib.pyplot as plt

    fig = curve_figure(report)
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
