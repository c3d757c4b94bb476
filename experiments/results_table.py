#!/usr/bin/env python
"""The results table of an experiment's README, made from its ``compare/<metric>/compare.json``.

    python experiments/results_table.py experiments/stacked-digits-weak-d           # print it
    python experiments/results_table.py experiments/stacked-digits-weak-d --write   # into README.md

    python experiments/results_table.py experiments/stacked-digits-norms --per-arm  # one seed, many arms

One row per metric the runs scored and a sweep's report compares (``sweep.report_metrics``:
``modes``, ``kl_modes``, ``cfd``, ``fid`` where scored, then G_ema's ``_ema`` twins of the same
metrics for runs with ``--g-ema``): each arm's best, the candidate minus the
baseline at the best, at the common final iteration and over the curve (AUC), each with its
bracket (a 95% bootstrap interval, or the range of n below 5 pairs) and exact permutation p, the
paper's acceleration (median over all pairs, a pair that never reached counted against the
candidate, and how many reached), and how many runs per arm were still improving. ``--write``
replaces the block between ``<!-- results-table -->`` and ``<!-- /results-table -->`` in the
folder's README.md, so the README's table is what ``compare`` says (tests check that it is);
``--per-arm --write`` fills the ``<!-- per-arm-table -->`` block instead. A ``--g-ema``
experiment's README may hold a second block, ``<!-- averaging-table -->``: each arm's G_ema
against its own G (``compare/averaging/<arm>-<metric>/``, ``compare --baseline-metric``), which
``--write`` fills too.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's package first
from dcgan_mn.commands import CLI_SETTINGS  # noqa: E402

BEGIN, END = "<!-- results-table -->", "<!-- /results-table -->"
# A one-seed many-arm sweep's table has its own block: no compare stands behind it.
PER_ARM_BEGIN, PER_ARM_END = "<!-- per-arm-table -->", "<!-- /per-arm-table -->"
# A --g-ema experiment's second table: each arm's G_ema against its own G (compare/averaging/).
AVERAGING_BEGIN, AVERAGING_END = "<!-- averaging-table -->", "<!-- /averaging-table -->"


def number(v: float | None) -> str:
    """Four significant figures, without exponents for the values these metrics take."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    text = f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return text.replace("-", "−")


def spread(stat: dict) -> str:
    """``mean [lo, hi]`` with the bracket's label when it is a range."""
    text = number(stat.get("mean"))
    ci = stat.get("ci")
    if ci:
        label = stat.get("ci_label") or ""
        text += f" [{number(ci[0])}, {number(ci[1])}]" + (
            f" ({label})" if label.startswith("range") else ""
        )
    return text


def p_value(test: dict | None) -> str:
    return "p –" if not test or test.get("p") is None else f"p = {test['p']:.3g}"


def acceleration(acc: dict, test: dict | None) -> str:
    """Median over all pairs (not reached = -inf) and how many pairs reached the target."""
    k, n = acc.get("reached", 0), acc.get("pairs", 0)
    if acc.get("median_reached") and acc.get("median") is not None:
        median = f"median {100 * acc['median']:.0f}%"
    else:
        median = "median: not reached"
    return f"{median} (reached {k} of {n}), {p_value(test)}"


def row(report: dict, first: str | None = None) -> str:
    """One metric's cells; ``first``: the first cell (default: the metric and its direction)."""
    s = report["summary"]
    labels = report["labels"]
    tests = report.get("statistics", {}).get("permutation", {}).get("tests", {})
    noise = report.get("evaluation_noise") or {}
    sigma = f"; σ_eval {number(noise['sigma'])}" if noise.get("sigma") is not None else ""
    diff = s["difference"]
    final_at = s["candidate"].get("final_iteration", {}).get("mean")
    first = first or f"`{report['metric']}`"
    cells = [
        f"{first} ({report.get('better', 'lower')}{sigma})",
        spread(s["baseline"]["best"]),
        spread(s["candidate"]["best"]),
        f"{spread(diff['best'])}, {p_value(tests.get('best_difference'))}",
        f"{spread(diff['final'])}, {p_value(tests.get('final_difference'))}"
        + (f" (at {final_at:,.0f})" if final_at else ""),
        f"{spread(diff['auc'])}, {p_value(tests.get('auc_difference'))}",
        acceleration(s["acceleration"], tests.get("acceleration")),
        acceleration(s["acceleration_smoothed"], tests.get("acceleration_smoothed")),
        f"{labels['baseline']} {s['baseline'].get('still_improving', 0)} of {s['baseline']['best']['n']}, "
        f"{labels['candidate']} {s['candidate'].get('still_improving', 0)} of {s['candidate']['best']['n']}",
    ]
    return "| " + " | ".join(cells) + " |"


def compared_metrics(folder: Path) -> list[str]:
    """The metrics the runs in ``folder`` scored that a sweep's report compares, in its order
    (read from the first run's config; every run of an experiment shares its evaluation)."""
    from dcgan_mn.sweep.report import report_metrics

    configs = sorted(folder.glob("*/config.json"))
    if not configs:
        raise click.ClickException(f"{folder}: no run folder with a config.json")
    return report_metrics(json.loads(configs[0].read_text()))


def results_table(folder: Path, compare_dir: Path | None = None) -> str:
    """The markdown table of the folder's compare reports, ``compare_dir`` (default
    ``<folder>/compare``), one row per compared metric found there."""
    compare_dir = compare_dir or folder / "compare"
    reports = [
        json.loads(p.read_text())
        for m in compared_metrics(folder)
        if (p := compare_dir / m / "compare.json").is_file()
    ]
    if not reports:
        raise click.ClickException(
            f"{folder}: no compare/<metric>/compare.json (run the experiment's compare first)"
        )
    cand, base = reports[0]["labels"]["candidate"], reports[0]["labels"]["baseline"]
    header = (
        f"| metric (better) | {base} best | {cand} best | {cand} − {base}: best | final | AUC "
        f"| acceleration (paper's rule) | smoothed rule | still improving |"
    )
    return "\n".join([header, "|" + "---|" * 9, *[row(r) for r in reports]])


def averaged_pairs(folder: Path) -> list[tuple[str, str]]:
    """(arm, metric) for each arm of ``folder`` (its run folders ``<arm>-s<seed>``) and each
    compared metric whose G_ema twin is compared too: the ``compare/averaging/<arm>-<metric>``
    reports of a --g-ema experiment, in table order."""
    from dcgan_mn.sweep.report import averaged_metrics

    arms = sorted({p.parent.name.rsplit("-s", 1)[0] for p in folder.glob("*-s*/config.json")})
    return [(a, m) for a in arms for m in averaged_metrics(compared_metrics(folder))]


def averaging_table(folder: Path, compare_dir: Path | None = None) -> str:
    """The markdown table of each arm's G_ema against its own G, from
    ``compare_dir/averaging/<arm>-<metric>/compare.json`` (default ``<folder>/compare``)."""
    from dcgan_mn.sweep.report import averaging_dir

    compare_dir = compare_dir or folder / "compare"
    rows = []
    for arm, metric in averaged_pairs(folder):
        path = compare_dir / averaging_dir(arm, metric) / "compare.json"
        if not path.is_file():
            raise click.ClickException(f"{path}: missing (run the experiment's compare first)")
        rows.append(row(json.loads(path.read_text()), first=f"{arm}: `{metric}_ema` vs `{metric}`"))
    header = (
        "| arm: metric (better) | G best | G_ema best | G_ema − G: best | final | AUC "
        "| acceleration (paper's rule) | smoothed rule | still improving |"
    )
    return "\n".join([header, "|" + "---|" * 9, *rows])


def per_arm_table(folder: Path, iterations: tuple[int, ...] = (400, 1000, 2000)) -> str:
    """One row per run (an exploratory one-seed sweep): each metric at ``iterations`` and its
    best (with the iteration of the best), straight from the runs' ``metrics.jsonl`` (the
    training evaluation: one evaluation seed); runs by name."""
    from dcgan_mn.runfolder import RunFolder
    from dcgan_mn.metrics.specs import metric_spec

    runs = sorted(p for p in folder.iterdir() if (p / "metrics.jsonl").is_file())
    metrics = compared_metrics(folder)
    header = (
        ["run"]
        + [f"{m} at {i:,}" for m in metrics for i in iterations]
        + [f"best {m} (at)" for m in metrics]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        rows = {int(r["iteration"]): r for r in RunFolder(run).metrics_rows() if "iteration" in r}
        cells = [run.name] + [number(rows.get(i, {}).get(m)) for m in metrics for i in iterations]
        for m in metrics:
            scored = [(r[m], i) for i, r in rows.items() if r.get(m) is not None]
            pick = max if metric_spec(m).direction == "max" else min
            best = pick(scored, key=lambda t: t[0]) if scored else None
            cells.append("–" if best is None else f"{number(best[0])} ({best[1]:,})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, table: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with the content of its ``begin`` ... ``end`` block replaced by ``table``."""
    if begin not in text or end not in text:
        raise click.ClickException(f"no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def block(text: str, begin: str = BEGIN, end: str = END) -> str:
    """The content of ``text``'s ``begin`` ... ``end`` block, stripped."""
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


@click.command(context_settings=CLI_SETTINGS)
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--write", is_flag=True, help="replace the table block in FOLDER/README.md")
@click.option(
    "--per-arm",
    is_flag=True,
    help="one row per run, from metrics.jsonl (a one-seed sweep over many arms)",
)
def main(folder: Path, write: bool, per_arm: bool) -> None:
    """Print (or --write) the results table of the experiment in FOLDER."""
    table = per_arm_table(folder) if per_arm else results_table(folder)
    if not write:
        click.echo(table)
        if not per_arm and (folder / "compare" / "averaging").is_dir():
            click.echo("\n" + averaging_table(folder))
        return
    readme = folder / "README.md"
    markers = (PER_ARM_BEGIN, PER_ARM_END) if per_arm else (BEGIN, END)
    text = replace_block(readme.read_text(), table, *markers)
    if not per_arm and AVERAGING_BEGIN in text:  # a --g-ema experiment's second table
        text = replace_block(text, averaging_table(folder), AVERAGING_BEGIN, AVERAGING_END)
    readme.write_text(text)
    click.echo(f"wrote the results table{'s' * (AVERAGING_BEGIN in text)} into {readme}")


if __name__ == "__main__":
    main()
