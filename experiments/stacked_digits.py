#!/usr/bin/env python
"""The shipped experiment's preset: BN vs MN (or any arms) on stacked digits, CPU-sized.

    python experiments/stacked_digits.py                      # bn vs mn, seeds 0-5, then the reports
    python experiments/stacked_digits.py --parallel 2         # two runs at a time on this machine
    python experiments/stacked_digits.py --arm bn="--mn-layers none" --arm mn-all="--mn-layers all"
    python experiments/stacked_digits.py --train-flags "--g-ema 7812.5 --g-ema-rampup 0.05"
    python experiments/stacked_digits.py --dry-run            # print the sweep.py command and the plan

A preset of ``sweep.py run`` (docs/sweeps.md), which it prints and runs: the stacked-digits
flags every run shares (``--dataset stacked-digits``, mode metrics only on every machine, an
evaluation, a checkpoint and a grid every ``--eval-every`` iterations, every snapshot kept for
re-scoring) plus the arms' own flags. The runs live in ``<out>/<arm>-s<seed>``; the command is
resumable (finished runs skipped, cut ones resumed exactly) and, with ``--wait`` (the default),
ends with the reports: ``compare`` per metric under ``<out>/compare/`` and one sample grid per arm.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dcgan_mn.commands import CLI_SETTINGS  # noqa: E402

DEFAULT_ARMS = ("bn=--mn-layers none", "mn=--mn-layers 0,1")


def shared_flags(
    eval_every: int, mode_samples: int, batch_size: int, device: str, extra: str
) -> list[str]:
    """train.py flags every run gets. Mode metrics only, whether or not this machine has the FID
    Inception weights: the same evaluation (and cost) everywhere; a checkpoint at every
    evaluation, so a cut run loses at most one interval."""
    every = f"--fid-every {eval_every} --ckpt-every {eval_every} --sample-every {eval_every}"
    return [
        *"--dataset stacked-digits --no-inception-metrics".split(),
        *every.split(),
        *f"--mode-samples {mode_samples} --batch-size {batch_size} --device {device}".split(),
        *"--log-every 50".split(),
        *shlex.split(extra),
    ]


def sweep_argv(
    *,
    out,
    arms,
    seeds,
    iters,
    eval_every,
    mode_samples,
    eval_seeds,
    batch_size,
    device,
    train_flags,
    executor,
    parallel,
    wait,
    dry_run,
) -> list[str]:
    """The ``sweep.py`` arguments of this preset (its options, by name)."""
    shared = shared_flags(eval_every, mode_samples, batch_size, device, train_flags)
    return [
        *["run", "--out", str(out), "--seeds", seeds, "--iters", str(iters)],
        *["--eval-seeds", str(eval_seeds), "--train-flags", shlex.join(shared)],
        *[x for arm in arms for x in ("--arm", arm)],
        *["--executor", executor, "--parallel", str(parallel), "--device", device],
        *(["--wait"] if wait else []),
        *(["--dry-run"] if dry_run else []),
    ]


@click.command(context_settings=CLI_SETTINGS)
@click.option(
    "--out",
    default="experiments/stacked-digits",
    help="folder of the runs (<arm>-s<seed>) and of compare/",
)
@click.option(
    "--arm",
    "arms",
    multiple=True,
    default=DEFAULT_ARMS,
    help="NAME=FLAGS: one arm and its train.py flags (repeat); the first is the baseline",
)
@click.option("--seeds", default="0-5", help="training seeds, paired across arms: 0,1,2 or 0-5")
@click.option(
    "--iters",
    default=2000,
    type=click.IntRange(min=1),
    help="iterations (generator updates) per run",
)
@click.option(
    "--eval-every",
    default=200,
    type=click.IntRange(min=1),
    help="evaluate (modes, kl_modes, cfd), checkpoint and draw a grid every N iterations",
)
@click.option(
    "--mode-samples",
    default=10_000,
    type=click.IntRange(min=2),
    help="generated samples per evaluation",
)
@click.option(
    "--eval-seeds",
    default=3,
    type=click.IntRange(min=1),
    help="evaluation latent seeds per snapshot for the reports (1: the training rows only)",
)
@click.option("--batch-size", default=64, type=click.IntRange(min=2), help="images per iteration")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N")
@click.option(
    "--train-flags", default="", help="more train.py flags for every arm, e.g. '--amp bf16'"
)
@click.option(
    "--executor",
    default="local",
    type=click.Choice(["auto", "slurm", "local"]),
    help="where the runs go (sweep.py's --executor)",
)
@click.option("--parallel", default=1, type=click.IntRange(min=1), help="local: runs at once")
@click.option(
    "--wait/--no-wait", default=True, help="block until every run ends, then write the reports"
)
@click.option("--dry-run", is_flag=True, help="print the sweep.py command and the plan, and exit")
def main(**preset) -> None:
    """Run BN vs MN (or any list of arms) on stacked digits over seeds, then compare them."""
    import importlib.util

    argv = sweep_argv(**preset)
    click.echo(
        f"$ {shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'sweep.py'))} {shlex.join(argv)}",
        err=True,
    )
    spec = importlib.util.spec_from_file_location("_sweep_cli", ROOT / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.cli.main(args=argv, prog_name="sweep.py")


if __name__ == "__main__":
    main()
