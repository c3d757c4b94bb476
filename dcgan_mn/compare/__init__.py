"""Compare runs' metric curves: the paper's acceleration, with statistics a reviewer accepts.

One module per concern, imports pointing down the list:

* ``curves``: a run's curve of one metric (``read_run`` -> ``RunCurve``): best, still improving,
  rebound and collapse flag, running median, area under the curve, evaluation noise, and the
  provenance of its rows;
* ``inference``: bootstrap intervals, exact permutation tests (scipy), the verdict phrase;
* ``rule``: the paper's acceleration of one candidate run over one baseline run, and how runs
  pair (by seed, else all pairs);
* ``report``: one comparison of two arms as a JSON-ready dict (``compare_runs``): every rule per
  pair, differences, censoring, tests, verdicts, warnings, the seeds a difference needs;
* ``render``: that dict as markdown, a plot, and the files ``evaluate.py compare`` writes.

The rules and the reading guide for users: ``docs/comparing.md`` and ``docs/comparing-notes.md``.
The names below are the package's public API (``from dcgan_mn.compare import ...``).
"""

from .curves import (
    COLLAPSE_FACTOR,
    COLLAPSE_METRICS,
    SMOOTH_WINDOW,
    CompareError,
    RunCurve,
    area_under_curve,
    evaluation_noise,
    headline_metric,
    provenance_warnings,
    read_run,
    running_median,
)
from .inference import (
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    bootstrap_interval,
    independent_permutation_p,
    paired_permutation_p,
    signed_rank,
    summarize,
    verdict,
)
from .rule import acceleration, pair_runs
from .report import check_metrics, compare_runs
from .render import READING_GUIDE, curve_figure, plot_curves, render_markdown, write_outputs

__all__ = [
    "CompareError",
    "RunCurve",
    "read_run",
    "headline_metric",
    "pair_runs",
    "acceleration",
    "bootstrap_interval",
    "provenance_warnings",
    "paired_permutation_p",
    "independent_permutation_p",
    "READING_GUIDE",
    "running_median",
    "area_under_curve",
    "evaluation_noise",
    "summarize",
    "signed_rank",
    "verdict",
    "check_metrics",
    "compare_runs",
    "render_markdown",
    "curve_figure",
    "plot_curves",
    "write_outputs",
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
    "COLLAPSE_FACTOR",
    "COLLAPSE_METRICS",
    "SMOOTH_WINDOW",
]
