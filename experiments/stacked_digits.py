#!/usr/bin/env python
"""The shipped experiment: BatchNorm vs Mixture Normalization on stacked digits, on a CPU.

    python experiments/stacked_digits.py                      # bn vs mn, seeds 0-5, then compare
    python experiments/stacked_digits.py --seeds 0-4          # more seeds (finished runs are kept)
    python experiments/stacked_digits.py --arm bn="--mn-layers none" \\
        --arm mn-all="--mn-layers all" --arm mn-k5="--mn-layers 0,1 --mn-components 5"
    python experiments/stacked_digits.py --dry-run            # print the plan and exit
    python experiments/stacked_digits.py --jobs 4             # 4 runs at once (cores / 4 threads each)

Each run is ``train.py`` in a subprocess: the shared flags (``--dataset stacked-digits``, the
iterations, the evaluation cadence) plus its arm's flags and ``--seed``, in ``<out>/<arm>-s<seed>``.
The arms differ only by their flags (the defaults: ``--mn-layers none`` vs ``--mn-layers 0,1``,
i.e. K = 3 and every other MN setting at train.py's defaults); nothing is tuned per arm.

The sweep can be stopped at any time (Ctrl-C) and started again with the same command: a run
that reached ``--iters`` is skipped, a cut run resumes from its newest checkpoint (exactly, as
``train.py --resume`` does), and a run folder that was trained with other settings stops the
script rather than being mixed in. When every run is done the script re-scores each evaluated
snapshot with ``--eval-seeds`` evaluation seeds and writes ``evaluate.py compare`` reports for
``modes``, ``kl_modes`` and ``cfd`` (and, with ``--train-flags "--g-ema ..."``, the averaged
generator's ``modes_ema``, ``kl_modes_ema`` and ``cfd_ema``) under ``<out>/compare/<metric>/``, plus one sample grid per
arm (``<out>/samples-<arm>.png``: the final generators of the first seed whose runs still hold
their snapshots, the same seed in every arm).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dcgan_mn.config import RESUME_FIXED, config_from_dict  # noqa: E402
from dcgan_mn.runfolder import RunFolder  # noqa: E402

DEFAULT_ARMS = ("bn=--mn-layers none", "mn=--mn-layers 0,1")
METRICS = ("modes", "kl_modes", "cfd")
GRID_SEED = 0  # latents of the per-arm sample grids
EXIT_NONFINITE = 4  # train.py's exit code for a run that went non-finite
RESCORE_LOCK = threading.Lock()  # --jobs: re-scorings in this process run one at a time


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    flags: tuple[str, ...]  # the arm's own train.py flags
    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name


def parse_arm(text: str) -> tuple[str, tuple[str, ...]]:
    """``NAME=FLAGS`` -> (NAME, the flags split as a shell would)."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise click.BadParameter(f"{text!r}: expected NAME=FLAGS, e.g. mn=\"--mn-layers 0,1\" "
                                 f"(NAME: letters, digits, - and _)", param_hint="--arm")
    return name, tuple(shlex.split(flags))


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or a mix: ``0-2,7``)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected e.g. 0,1,2 or 0-4", param_hint="--seeds") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"{text!r}: seeds must be distinct and >= 0", param_hint="--seeds")
    return seeds


def shared_flags(iters: int, eval_every: int, mode_samples: int, batch_size: int, device: str,
                 extra: tuple[str, ...]) -> list[str]:
    """train.py flags every run gets. Checkpoints at every evaluation, so a cut run loses at
    most one evaluation interval; every evaluated snapshot is kept for re-scoring."""
    # Mode metrics only, whether or not this machine has the FID Inception weights: the same
    # evaluation (and cost) everywhere.
    return ["--dataset", "stacked-digits", "--no-inception-metrics", "--iters", str(iters), "--fid-every", str(eval_every),
            "--ckpt-every", str(eval_every), "--mode-samples", str(mode_samples),
            "--batch-size", str(batch_size), "--device", device, "--log-every", "50",
            "--sample-every", str(eval_every), *extra]


def train_command(run: Run, shared: list[str], progress: bool) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *shared, *run.flags, "--seed", str(run.seed),
            "--out", str(run.folder.parent), "--run-name", run.name,
            "--progress" if progress else "--no-progress"]


@functools.lru_cache(maxsize=1)
def _train_cli():
    """train.py as a module, loaded once (every run's plan uses its flag parsing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def planned_config(command: list[str]) -> dict:
    """The config train.py would use for ``command`` (its --dry-run output, computed in this
    process: the same flag parsing, without a second interpreter per run). The dry run names
    its folder under a scratch --out, since train.py refuses a new run in an existing folder."""
    import contextlib
    import io
    import tempfile

    module = _train_cli()
    out = io.StringIO()
    args = list(command[2:])
    try:
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(out):
            args[args.index("--out") + 1] = scratch
            module.main.main(args=[*args, "--dry-run"], standalone_mode=False)
    except click.ClickException as e:
        raise click.ClickException(f"train.py refused {shlex.join(command[2:])}: {e.format_message()}") from None
    return json.loads(out.getvalue())


def run_command(command: list[str], env: dict | None = None) -> int:
    """Run one train.py / evaluate.py command line (``env``: its environment, default ours); its
    exit status (tests run it in-process).

    Ctrl-C reaches the child too (same process group); we then wait for it to finish its
    iteration and write its checkpoint (``subprocess.call`` would kill it after 0.25 s)."""
    proc = subprocess.Popen(command, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the child got the signal as well: let it save and exit


def run_state(run: Run, iters: int) -> tuple[str, int]:
    """("new" | "done" | "resume" | "restart", iteration reached).

    A folder's checkpoints say how far it got; without them (a clone of the committed
    experiment keeps only the small files) its ``metrics.jsonl`` does. A folder with neither
    died before its first checkpoint and evaluation: it is restarted."""
    if not run.folder.exists():
        return "new", 0
    checkpoints = RunFolder(run.folder).checkpoints()
    rows = RunFolder(run.folder).metrics_rows()
    evaluated = max((int(r["iteration"]) for r in rows if "iteration" in r), default=0)
    if not checkpoints:
        if evaluated >= iters:
            return "done", evaluated
        if rows:
            raise click.ClickException(
                f"{run.folder}: evaluated up to iteration {evaluated} but has no checkpoint to "
                f"resume from (were the checkpoints removed?); move the folder away to retrain it")
        return "restart", 0
    reached = checkpoints[-1][0]
    return ("done" if reached >= iters else "resume"), reached


def check_same_settings(run: Run, planned: dict) -> None:
    """A run folder trained with other settings (another arm's flags, another cadence) must not
    be mixed into this experiment."""
    saved = RunFolder(run.folder).read_config()
    if saved is None:
        return
    # Through TrainConfig, so a key an older version did not write reads as its default.
    saved = config_from_dict(saved).to_dict()
    keys = [*RESUME_FIXED, "fid_every"]
    differ = [f"{k}: {saved.get(k)!r} there, {planned.get(k)!r} here" for k in keys
              if saved.get(k) != planned.get(k)]
    if differ:
        raise click.ClickException(f"{run.folder}: trained with other settings ({'; '.join(differ)}); "
                                   f"use another --out or remove that folder")


def evaluation_share(run: Run) -> dict:
    """Training and evaluation seconds of a run, from its metrics rows."""
    rows = RunFolder(run.folder).metrics_rows()
    train_s = max((r.get("train_seconds") or 0.0 for r in rows), default=0.0)
    eval_s = sum(r.get("eval_seconds") or 0.0 for r in rows)
    return {"train_seconds": train_s, "eval_seconds": eval_s,
            "eval_share": eval_s / (train_s + eval_s) if train_s + eval_s else None}


def rescore(run: Run, eval_seeds: int, device: str, progress: bool) -> None:
    """Score the run's evaluated snapshots with every evaluation seed as soon as it is trained,
    so a finished run's small files (``eval_seeds.jsonl`` included) are complete without its
    snapshots: a sweep cut between runs and continued elsewhere, from a clone of the committed
    outputs, compares without retraining. All mode metrics are stored by one re-scoring."""
    from dcgan_mn.rescore import rescore_run
    from dcgan_mn.device import resolve_device

    rescore_run(run.folder, METRICS[0], eval_seeds, device=resolve_device(device), progress=progress)


def grid_seed(runs: list[Run], seeds: list[int]) -> int | None:
    """The first training seed whose runs in every arm still hold their snapshots (the sample
    grids show one seed, the same in every arm); None when no seed does (a clone of the
    committed experiment keeps only the small files)."""
    for seed in seeds:
        if all(RunFolder(r.folder).snapshots() for r in runs if r.seed == seed):
            return seed
    return None


def write_sample_grid(folder: Path, path: Path, sample_mode: str, batch_size: int, ema: bool = False) -> None:
    """8x8 grid of the run's final generator snapshot (``ema``: its averaged generator), from
    fixed latents (GRID_SEED)."""
    import torch
    from torchvision.utils import save_image

    from dcgan_mn.checkpoint import load_generator

    G, _, _ = load_generator(RunFolder(folder).snapshots()[-1][1], ema=ema)
    z = torch.randn(64, G.z_dim, generator=torch.Generator().manual_seed(GRID_SEED))  # [64, z_dim]
    torch.manual_seed(GRID_SEED)  # MN's k-means++ draws in batch mode
    with torch.no_grad():
        images = G.sample(z, mode=sample_mode, batch_size=batch_size)  # [64, 3, 32, 32] in [-1, 1]
    save_image(images * 0.5 + 0.5, str(path), nrow=8, padding=2)


def train_run(i: int, total: int, run: Run, command: list[str], state: str, reached: int, iters: int,
              progress: bool, env: dict | None, eval_seeds: int, device: str) -> None:
    """Train (or resume, or restart) one run, then re-score its snapshots with ``eval_seeds``
    evaluation seeds so that its small files are complete on their own."""
    if state == "restart":
        click.echo(f"[{i}/{total}] {run.name}: no checkpoint to resume from; starting it again")
        shutil.rmtree(run.folder)
    if state == "resume":  # the run's settings come from its checkpoint
        command = [sys.executable, str(ROOT / "train.py"), "--resume", str(run.folder),
                   "--iters", str(iters), "--progress" if progress else "--no-progress"]
    click.echo(f"[{i}/{total}] {run.name}: {'resuming at ' + str(reached) if state == 'resume' else 'training'}"
               f" ({time.strftime('%H:%M:%S')})")
    t0 = time.perf_counter()
    code = run_command(command, env=env)
    if code == EXIT_NONFINITE:
        raise click.ClickException(f"{run.name}: training went non-finite (see above); resuming "
                                   f"would repeat it: inspect {run.folder}")
    if code != 0:
        raise click.ClickException(f"{run.name}: train.py exited with {code}; run the same "
                                   f"command again to resume")
    if eval_seeds > 1:
        # In this process, one run at a time: evaluation seeds the global RNG per generator batch
        # (MN's k-means++ draws), which two threads scoring at once would interleave.
        with RESCORE_LOCK:
            rescore(run, eval_seeds, device, progress)
    share = evaluation_share(run)
    click.echo(f"[{i}/{total}] {run.name}: done in {time.perf_counter() - t0:.0f} s "
               f"({share['train_seconds']:.0f} s training, {share['eval_seconds']:.0f} s evaluation)")


def train_all(tasks: list, jobs: int) -> None:
    """Call each task (in order: seed by seed), ``jobs`` at a time. A failed task stops the ones
    not yet started; those running finish (a Ctrl-C reaches their train.py, which saves a
    checkpoint), then the first failure is raised."""
    if jobs == 1:
        for task in tasks:
            task()
        return
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(task) for task in tasks]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    except KeyboardInterrupt:  # the running train.py processes got it too: let them save
        pool.shutdown(wait=True, cancel_futures=True)
        raise click.ClickException("interrupted: run the same command again to resume") from None
    pool.shutdown(wait=True, cancel_futures=True)  # every future not cancelled is now done
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                 "max_content_width": 100})
@click.option("--out", default="experiments/stacked-digits", type=click.Path(file_okay=False),
              help="folder of the runs (<arm>-s<seed>) and of compare/")
@click.option("--arm", "arms", multiple=True, default=DEFAULT_ARMS,
              help="NAME=FLAGS: one arm and its train.py flags (repeat); the first is the baseline")
@click.option("--seeds", default="0-5", help="training seeds, paired across arms: 0,1,2 or 0-4")
@click.option("--iters", default=2000, type=int, help="iterations (generator updates) per run")
@click.option("--eval-every", default=200, type=int, help="evaluate (modes, kl_modes, cfd) every N iterations")
@click.option("--mode-samples", default=10_000, type=int, help="generated samples per evaluation")
@click.option("--eval-seeds", default=3, type=int,
              help="evaluation latent seeds per snapshot for compare (1: the training rows only)")
@click.option("--batch-size", default=64, type=int, help="images per iteration")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N")
@click.option("--train-flags", default="", help="more train.py flags for every arm, e.g. '--amp bf16'")
@click.option("--compare/--no-compare", "run_compare", default=True,
              help="re-score and write the compare reports when every run is done")
@click.option("--dry-run", is_flag=True, help="print the plan (what runs, what is skipped) and exit")
@click.option("--progress/--no-progress", default=True, help="train.py's progress bars (off with --jobs > 1)")
@click.option("--jobs", default=1, type=int,
              help="runs trained at once (seed by seed), each with --threads CPU threads: for a machine "
                   "with more cores than one small run uses, or a GPU that one run leaves idle")
@click.option("--threads", type=int, default=None,
              help="CPU threads per run with --jobs > 1  [default: the cores / --jobs]")
def main(out, arms, seeds, iters, eval_every, mode_samples, eval_seeds, batch_size, device,
         train_flags, run_compare, dry_run, progress, jobs, threads) -> None:
    """Run BN vs MN (or any list of arms) on stacked digits over seeds, then compare them."""
    out = Path(out)
    parsed = [parse_arm(a) for a in arms]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"arm names repeat: {names}", param_hint="--arm")
    if len(parsed) < 2:
        raise click.BadParameter("give at least two arms (the first is the baseline)", param_hint="--arm")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    for flag, value in (("--iters", iters), ("--eval-every", eval_every), ("--eval-seeds", eval_seeds),
                        ("--jobs", jobs), ("--threads", threads)):
        if value < 1:
            raise click.BadParameter(f"{value}: must be >= 1", param_hint=flag)
    seed_list = parse_seeds(seeds)
    progress = progress and jobs == 1  # several bars from several processes would garble each other
    shared = shared_flags(iters, eval_every, mode_samples, batch_size, device,
                          tuple(shlex.split(train_flags)))
    # Seed by seed (bn-s0, mn-s0, bn-s1, ...): a sweep cut part-way leaves whole pairs.
    runs = [Run(name, seed, flags, out / f"{name}-s{seed}") for seed in seed_list for name, flags in parsed]

    # ---- Plan: what each run needs, checked against what its folder already holds.
    click.echo(f"experiment: {len(parsed)} arms x {len(seed_list)} seeds, {iters} iterations each, "
               f"mode metrics on {mode_samples} samples every {eval_every} iterations, in {out}")
    for name, flags in parsed:
        click.echo(f"  arm {name}: {shlex.join(flags) or '(train.py defaults)'}")
    plan = []
    for run in runs:
        command = train_command(run, shared, progress)
        planned = planned_config(command)
        check_same_settings(run, planned)
        state, reached = run_state(run, iters)
        plan.append((run, command, state, reached))
        click.echo(f"  {run.name}: {state}" + (f" (at iteration {reached})" if reached else ""))
    if dry_run:
        for run, command, state, _ in plan:
            if state != "done":
                click.echo("  $ " + shlex.join(command))
        return

    # ---- Train what is not done: one run at a time, or --jobs at once.
    t_start = time.perf_counter()
    todo = [(i, *entry) for i, entry in enumerate(plan, 1) if entry[2] != "done"]
    env = None
    if jobs > 1:  # each run gets its share of the cores (and our own re-scoring likewise)
        import torch

        torch.set_num_threads(threads)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        click.echo(f"{min(jobs, len(todo))} runs at a time, {threads} CPU thread{'s' * (threads > 1)} each")
    train_all([functools.partial(train_run, i, len(plan), run, command, state, reached, iters, progress,
                                 env, eval_seeds if run_compare else 1, device)
               for i, run, command, state, reached in todo], jobs)
    total = {k: sum(evaluation_share(r)[k] for r in runs) for k in ("train_seconds", "eval_seconds")}
    click.echo(f"all runs done ({time.perf_counter() - t_start:.0f} s in this session); over the sweep: "
               f"{total['train_seconds']:.0f} s training, {total['eval_seconds']:.0f} s evaluation "
               f"({100 * total['eval_seconds'] / max(sum(total.values()), 1e-9):.0f}% of the two)")
    if not run_compare:
        return

    # ---- Compare every arm with the baseline, per metric; one sample grid per arm.
    baseline = parsed[0][0]
    base_runs = [str(r.folder) for r in runs if r.arm == baseline]
    averaged = planned_config(plan[0][1]).get("g_ema", 0) > 0  # --g-ema: G_ema's metrics too
    metrics = (*METRICS, *(f"{m}_ema" for m in METRICS)) if averaged else METRICS
    for name, _ in parsed[1:]:
        cand_runs = [str(r.folder) for r in runs if r.arm == name]
        for metric in metrics:
            dest = out / "compare" / (metric if len(parsed) == 2 else f"{name}-vs-{baseline}" + f"/{metric}")
            command = [sys.executable, str(ROOT / "evaluate.py"), "compare", *cand_runs,
                       *[x for b in base_runs for x in ("--baseline", b)], "--metric", metric,
                       "--eval-seeds", str(eval_seeds), "--label", name, "--baseline-label", baseline,
                       "--out", str(dest), "--device", device]
            click.echo(f"compare {metric}: {name} vs {baseline} -> {dest}")
            t0 = time.perf_counter()
            if run_command(command) != 0:
                raise click.ClickException(f"evaluate.py compare failed for {metric}")
            click.echo(f"  ({time.perf_counter() - t0:.0f} s)")
    sample_mode = planned_config(plan[0][1]).get("sample_mode", "batch")
    seed = grid_seed(runs, seed_list)
    if seed is None:  # a clone of the committed experiment: keep the committed grids
        click.echo("sample grids: no seed has every arm's snapshots on disk; the grids are left as they are")
        return
    for name, _ in parsed:
        run = next(r for r in runs if r.arm == name and r.seed == seed)
        path = out / f"samples-{name}.png"
        write_sample_grid(run.folder, path, sample_mode, batch_size)
        click.echo(f"sample grid {name}: {path} ({run.name}'s final generator)")
        if averaged:
            path = out / f"samples-{name}-ema.png"
            write_sample_grid(run.folder, path, sample_mode, batch_size, ema=True)
            click.echo(f"sample grid {name} (G_ema): {path} ({run.name}'s final averaged generator)")

if __name__ == "__main__":
    main()
