#!/usr/bin/env python
"""Sweeps of train.py runs (arms x seeds) on a Slurm cluster or this machine, through submitit.

    python sweep.py run --out sweeps/bn-vs-mn --arm bn="--mn-layers none" --arm mn="--mn-layers 0,1" \\
        --seeds 0-5 --iters 100000 --executor slurm --partition gpu --gpus-per-run 1 --time 24:00:00
    python sweep.py status sweeps/bn-vs-mn          # one row per run; a failed run's stderr tail
    python sweep.py report sweeps/bn-vs-mn          # re-scoring, compare per metric, sample grids

Every run lives in <out>/<arm>-s<seed>. Preempted or timed-out runs save a checkpoint and are
requeued, resuming exactly where they stopped. Running the same `run` command again skips
finished runs, leaves queued ones alone and resubmits the rest. Guide: docs/sweeps.md.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from dcgan_mn.commands import CLI_SETTINGS

ROOT = Path(__file__).resolve().parent
TRAIN_SCRIPT = ROOT / "train.py"


def _sbatch_options(values) -> dict:
    options = {}
    for text in values:
        key, sep, value = text.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise click.BadParameter(
                f"{text!r}: expected NAME=VALUE, e.g. mem=32G", param_hint="--sbatch"
            )
        options[key.replace("-", "_")] = value if sep else True
    return options


@click.group(context_settings=CLI_SETTINGS)
def cli() -> None:
    """Arms x seeds of train.py runs on submitit: Slurm job arrays (preemption-safe) or local."""


@cli.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="the sweep folder: one <arm>-s<seed> folder per run, sweep.json, compare/, grids",
)
@click.option(
    "--arm",
    "arms",
    multiple=True,
    required=True,
    metavar="NAME=FLAGS",
    help='one arm and its own train.py flags, e.g. mn="--mn-layers 0,1" (repeat; the first '
    "is the baseline of the reports)",
)
@click.option(
    "--seeds",
    default="0-5",
    show_default=True,
    help="training seeds, paired across arms: 0,1,2 or 0-5",
)
@click.option(
    "--iters",
    required=True,
    type=click.IntRange(min=1),
    help="iterations (generator updates) per run",
)
@click.option(
    "--train-flags",
    default="",
    help="train.py flags every run gets, e.g. '--dataset stacked-digits'",
)
@click.option(
    "--eval-seeds",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="evaluation seeds per snapshot in the reports (1: the training rows only)",
)
@click.option(
    "--executor",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "slurm", "local"]),
    help="slurm (one job array), local (subprocesses here) or auto (slurm where sbatch is on PATH)",
)
@click.option(
    "--parallel",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="local: runs at once (each gets cores / N threads, or --cpus-per-run)",
)
@click.option(
    "--time",
    "time_limit",
    default="24:00:00",
    show_default=True,
    help="time limit of one job (minutes, HH:MM:SS or D-HH:MM:SS); a run that needs longer "
    "checkpoints at the limit and is requeued",
)
@click.option("--partition", default=None, help="Slurm partition")
@click.option(
    "--gpus-per-run",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="GPUs of one run (> 1: DDP over them, as torchrun)",
)
@click.option(
    "--cpus-per-run",
    default=None,
    type=click.IntRange(min=1),
    help="CPU cores of one run (Slurm cpus-per-task; its torch threads)",
)
@click.option(
    "--nodes", default=1, show_default=True, type=click.IntRange(min=1), help="nodes of one run"
)
@click.option(
    "--array-parallelism",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Slurm: tasks of the array running at once",
)
@click.option("--account", default=None, help="Slurm account")
@click.option("--qos", default=None, help="Slurm quality of service")
@click.option("--constraint", default=None, help="Slurm node constraint, e.g. a100")
@click.option(
    "--sbatch",
    "sbatch",
    multiple=True,
    metavar="NAME=VALUE",
    help="any other #SBATCH option, e.g. --sbatch mem=32G --sbatch exclude=node7 (repeat)",
)
@click.option(
    "--signal-delay",
    default=180,
    show_default=True,
    type=click.IntRange(min=10),
    help="Slurm sends the preemption signal this many seconds before the time limit "
    "(time to finish an evaluation and write the checkpoint)",
)
@click.option(
    "--wait",
    is_flag=True,
    help="block until every run ends (a bar over runs), then write the report",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="print the plan (what is submitted, skipped, left alone) and exit",
)
@click.option(
    "--device", default="auto", show_default=True, help="device of the report's re-scoring (--wait)"
)
def run(
    out,
    arms,
    seeds,
    iters,
    train_flags,
    eval_seeds,
    executor,
    parallel,
    time_limit,
    partition,
    gpus_per_run,
    cpus_per_run,
    nodes,
    array_parallelism,
    account,
    qos,
    constraint,
    sbatch,
    signal_delay,
    wait,
    dry_run,
    device,
):
    """Submit the sweep's runs that are neither finished nor queued (returns once they are queued)."""
    from dcgan_mn import sweep as S

    try:
        spec = S.SweepSpec(
            out=out,
            arms=tuple(S.parse_arm(a) for a in arms),
            seeds=tuple(S.parse_seeds(seeds)),
            iters=iters,
            shared=tuple(shlex.split(train_flags)),
            eval_seeds=eval_seeds,
        )
        opts = S.ExecutorOptions(
            executor=executor,
            time_min=S.parse_time(time_limit),
            partition=partition,
            gpus_per_run=gpus_per_run,
            cpus_per_run=cpus_per_run,
            nodes=nodes,
            array_parallelism=array_parallelism,
            account=account,
            qos=qos,
            constraint=constraint,
            sbatch=_sbatch_options(sbatch),
            signal_delay_s=signal_delay,
            parallel=parallel,
        )
        S.start_sweep(
            spec, TRAIN_SCRIPT, opts, dry_run=dry_run, log=lambda m: click.echo(m, err=True)
        )
    except S.SweepError as e:
        raise click.UsageError(str(e)) from None
    if wait and not dry_run:
        _wait_and_report(out, device)


def _wait_and_report(out: Path, device: str) -> None:
    from dcgan_mn import sweep as S
    from dcgan_mn.device import resolve_device

    rows = S.wait_for_sweep(out, progress=sys.stderr.isatty())
    click.echo(S.render_status(rows), err=True)
    if any(r["state"] != "finished" for r in rows):
        raise click.ClickException(
            f"not every run finished; fix what `sweep.py status {out}` shows and run the "
            f"same command again"
        )
    S.write_report(out, device=resolve_device(device), log=lambda m: click.echo(m, err=True))


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="one JSON list of rows on stdout, for scripts"
)
def status(out, as_json):
    """One row per run: state (new, pending, running, requeued, finished, failed), iteration of
    --iters, last metrics, job id, log file; the last lines of a failed run's stderr."""
    from dcgan_mn import sweep as S

    try:
        rows = S.sweep_status(out)
    except S.SweepError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(rows, indent=1) if as_json else S.render_status(rows))


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="compare this metric (repeat)  [default: fid, modes, kl_modes, cfd where the runs scored "
    "them, and their _ema twins with --g-ema]",
)
@click.option("--device", default="auto", show_default=True, help="device of the re-scoring")
@click.option(
    "--cache-dir",
    default=None,
    help="reference statistics and mode classifiers [default: ~/.cache/dcgan_mn]",
)
def report(out, metrics, device, cache_dir):
    """Once every run is done: re-score each snapshot with the sweep's evaluation seeds, write
    compare reports per metric (each arm vs the first) and one sample grid per arm."""
    from dcgan_mn import sweep as S
    from dcgan_mn.compare import CompareError
    from dcgan_mn.device import resolve_device
    from dcgan_mn.rescore import RescoreError

    try:
        S.write_report(
            out,
            metrics=metrics or None,
            device=resolve_device(device),
            cache_dir=cache_dir,
            log=lambda m: click.echo(m, err=True),
        )
    except (S.SweepError, CompareError, RescoreError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    cli()
