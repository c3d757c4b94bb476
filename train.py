#!/usr/bin/env python
"""Train the DCGAN on CIFAR-10 (an image folder, or stacked digits) with BN -> MN in the generator.

    python train.py                                # MN in generator layers 0,1 (K = 3), CIFAR-10
    python train.py --mn-layers none --seed 1      # the BatchNorm baseline
    python train.py --resume checkpoints/RUN       # continue a run exactly where it stopped
    python train.py --dataset stacked-digits       # offline: 1000-mode stacked digits, mode metrics
    python train.py --dry-run                      # print the resolved config and exit

Thin by design: flags -> ``TrainConfig`` -> ``dcgan_mn.launch.decide_launch`` (once) ->
``dcgan_mn.training.train``. Every invalid flag
stops with one line naming the flag and the value, before anything is written.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from dcgan_mn.commands import CLI_SETTINGS
from dcgan_mn.config import AMP_MODES, COMPILE_MODES, STACKED_GRIDS, TrainConfig
from dcgan_mn.data import DATASETS
from dcgan_mn.digits import STACKED_SOURCES
from dcgan_mn.ema import EMA_STATS
from dcgan_mn.features import FEATURE_DIMS, FID_PROTOCOLS
from dcgan_mn.models import G_ARCHS, SAMPLE_MODES
from dcgan_mn.norms import ESTIMATORS, POINTS

DEFAULTS = TrainConfig()  # the defaults shown in --help are the config's own
CPU_FID_SAMPLES = 2000  # --fid-samples when training on a CPU and the flag is not given
EXIT_NONFINITE = 4  # training went non-finite (NaN / Inf losses or D outputs); 130 / 143: signals


def _layers_text(layers) -> str:
    return ",".join(map(str, layers)) or "none"


def everything_missing(first: str, cfg: TrainConfig) -> str:
    """The first offline failure (the Inception weights) with the rest this command lacks (its
    dataset), so one attempt names all of it; and what fetches it all at once."""
    from dcgan_mn.commands import script_command
    from dcgan_mn.data import missing_data

    data = missing_data(cfg)
    also = f"; also missing: {data}" if data else ""
    args = ["prepare", "--dataset", cfg.dataset, "--data-root", cfg.data_root]
    if cfg.ref not in ("cifar10-train",) and cfg.ref != cfg.dataset:
        args += ["--ref", cfg.ref]
    prepare = script_command("evaluate.py", *args)
    return f"{first}{also}; {prepare} (where there is internet) fetches and lists everything this run needs"


def already_finished(launch) -> str:
    """What ``--resume`` of a run already at its ``--iters`` says: where it stands, its best, and
    the command that trains it further."""
    from dcgan_mn.checkpoint import migrate_best
    from dcgan_mn.commands import script_command

    it = launch.start_iteration
    best = migrate_best(launch.payload.get("best"))
    best_text = (
        f", best {best['metric']} {best['value']:.3f} at iteration {best['iteration']}"
        if best.get("value") is not None
        else ""
    )
    further = script_command("train.py", "--resume", launch.folder.path, "--iters", "M")
    return (
        f"{launch.folder.path}: already at --iters {it} ({launch.payload.get('images_seen')} images, "
        f"{launch.checkpoint.name}{best_text}); pass --iters M (M > {it}) to train further: {further}"
    )


@click.command(context_settings=CLI_SETTINGS)
# --- model ---
@click.option(
    "--g-arch",
    default=DEFAULTS.g_arch,
    type=click.Choice(list(G_ARCHS)),
    help="generator: dcgan32 (ConvT 4x4, 3 norm layers) or tf-dcgan (TTUR's TensorFlow "
    "DCGAN for CIFAR-10: Linear then ConvT 5x5, 4 norm layers)",
)
@click.option(
    "--mn-layers",
    default=_layers_text(DEFAULTS.mn_layers),
    help="generator norm layers that use Mixture Normalization: comma list of 0..2 "
    "(0..3 for tf-dcgan; 0 is nearest z), 'none' (all BatchNorm) or 'all'",
)
@click.option(
    "--g-norms",
    default=None,
    metavar="NORMS",
    help="the norm of every generator layer, 0 (nearest z) first, as a comma list of bn, "
    "mn, mode (Mode Normalization), group (GroupNorm), none; e.g. mode,mode,bn. "
    "Overrides --mn-layers  [default: MN in --mn-layers, BN elsewhere]",
)
@click.option(
    "--mode-components",
    default=DEFAULTS.mode_components,
    type=int,
    help="K, modes per Mode Normalization layer (--g-norms ... mode ...)",
)
@click.option(
    "--mn-components",
    default=DEFAULTS.mn_components,
    type=int,
    help="K, mixture components per MN layer",
)
@click.option(
    "--mn-fit-points",
    default=DEFAULTS.mn_fit_points,
    type=int,
    help="points per batch clustered by k-means++ to fit the mixture",
)
@click.option(
    "--mn-kmeans-iters",
    default=DEFAULTS.mn_kmeans_iters,
    type=int,
    help="Lloyd iterations after k-means++ seeding (--mn-estimator kmeans)",
)
@click.option(
    "--mn-estimator",
    default=DEFAULTS.mn_estimator,
    type=click.Choice(ESTIMATORS),
    help="how each batch's mixture is fitted: kmeans (hard k-means++ clusters; our "
    "assumption) or em (EM iterations after k-means++ seeding)",
)
@click.option(
    "--mn-em-iters",
    default=DEFAULTS.mn_em_iters,
    type=int,
    help="EM iterations after seeding (--mn-estimator em)",
)
@click.option(
    "--mn-point",
    default=DEFAULTS.mn_point,
    type=click.Choice(POINTS),
    help="what one MN mixture describes: vector (the C-vector at each position, one "
    "mixture over channels jointly; our reading) or channel (an independent 1-D "
    "mixture per channel)",
)
@click.option(
    "--mn-posterior-grad/--no-mn-posterior-grad",
    default=DEFAULTS.mn_posterior_grad,
    help="gradients flow through MN's posteriors (and lambda), or they are constants",
)
@click.option(
    "--mn-lambda-scale/--no-mn-lambda-scale",
    default=DEFAULTS.mn_lambda_scale,
    help="keep the Fisher-vector factor 1/sqrt(lambda_k) (output second moment ~K for "
    "well-separated components), or drop it",
)
@click.option("--z-dim", default=DEFAULTS.z_dim, type=int, help="latent size")
@click.option("--ngf", default=DEFAULTS.ngf, type=int, help="generator width")
@click.option("--ndf", default=DEFAULTS.ndf, type=int, help="discriminator width")
# --- optimisation ---
@click.option("--lr", default=DEFAULTS.lr, type=float, help="Adam learning rate (G and D)")
@click.option("--beta1", default=DEFAULTS.beta1, type=float, help="Adam beta1")
@click.option("--beta2", default=DEFAULTS.beta2, type=float, help="Adam beta2")
@click.option("--batch-size", default=DEFAULTS.batch_size, type=int, help="images per iteration")
@click.option(
    "--iters",
    default=DEFAULTS.iters,
    type=int,
    help="iterations (generator updates) to train to; may be raised on --resume",
)
@click.option(
    "--seed", default=DEFAULTS.seed, type=int, help="seed of weights, noise and data order"
)
@click.option(
    "--device",
    default=DEFAULTS.device,
    help="auto (cuda if available, else cpu), cpu, cuda, cuda:N",
)
# --- data ---
@click.option(
    "--dataset",
    default=DEFAULTS.dataset,
    type=click.Choice(DATASETS),
    help="cifar10 (downloaded into --data-root on first use), folder (images under "
    "--data-root), stacked-mnist (3 MNIST digits per image, 1000 modes; MNIST is "
    "downloaded into --data-root) or stacked-digits (the same from scikit-learn's "
    "bundled 8x8 digits: offline, CPU-sized)",
)
@click.option(
    "--data-root",
    default=DEFAULTS.data_root,
    help="where CIFAR-10 / MNIST is/goes, or the image folder",
)
@click.option(
    "--stack-size",
    default=None,
    type=int,
    help="stacked datasets: training images drawn  [default: 128000, PacGAN's]",
)
@click.option(
    "--stack-seed",
    default=DEFAULTS.stack_seed,
    type=int,
    help="stacked datasets: seed of the drawn digit triples",
)
@click.option(
    "--hflip/--no-hflip", default=DEFAULTS.hflip, help="random horizontal flips of real images"
)
# --- run folder, logging, checkpoints ---
@click.option("--out", default=DEFAULTS.out, help="folder that holds one sub-folder per run")
@click.option(
    "--run-name",
    default=None,
    help="run folder name under --out  [default: <date>-<time>-<mnLAYERS-kK|bn>-s<seed>]",
)
@click.option(
    "--sample-mode",
    default=DEFAULTS.sample_mode,
    type=click.Choice(SAMPLE_MODES),
    help="how grids and metrics sample G: batch statistics at --batch-size, or running statistics",
)
@click.option(
    "--sample-every",
    default=None,
    type=int,
    help="fixed-noise grid (TensorBoard) every N iterations, and at the end (0: off)  "
    "[default: --iters / 10, at most 1000: ten grids a run]",
)
@click.option(
    "--stacked-grid",
    default=DEFAULTS.stacked_grid,
    type=click.Choice(STACKED_GRIDS),
    help="stacked datasets: draw each sample's three digits side by side, red's first "
    "(digits: reads as the mode), or as trained, one digit per colour channel (rgb)",
)
@click.option(
    "--log-every",
    default=DEFAULTS.log_every,
    type=int,
    help="log losses and D outputs every N iterations (0: off)",
)
@click.option(
    "--ckpt-every",
    default=DEFAULTS.ckpt_every,
    type=int,
    help="full checkpoint every N iterations (0: only at the end)",
)
@click.option("--keep-last", default=DEFAULTS.keep_last, type=int, help="full checkpoints to keep")
# --- periodic evaluation ---
@click.option(
    "--fid-every",
    default=DEFAULTS.fid_every,
    type=int,
    help="evaluate (FID, and mode metrics on stacked datasets) every N iterations (0: off)",
)
@click.option(
    "--fid-samples",
    default=DEFAULTS.fid_samples,
    type=int,
    help=f"generated images per evaluation (on a CPU device the default is {CPU_FID_SAMPLES})",
)
@click.option(
    "--ref",
    default=DEFAULTS.ref,
    show_default=False,
    help="FID reference: cifar10-train, cifar10-test, stacked-mnist, stacked-digits, an "
    "image folder or a pytorch-fid .npz  [default: cifar10-train; a stacked "
    "dataset's own name for stacked runs]",
)
@click.option(
    "--mode-samples",
    default=DEFAULTS.mode_samples,
    type=int,
    help="stacked datasets: samples per mode-metric evaluation (modes, kl_modes, cfd)",
)
@click.option(
    "--inception-weights",
    default=None,
    help="local FID Inception weights file (offline use)  [default: torch hub cache]",
)
@click.option(
    "--inception-metrics/--no-inception-metrics",
    default=DEFAULTS.inception_metrics,
    help="stacked datasets: also compute FID/KID/PRDC/IS, or mode metrics only on every "
    "machine. Not given, they are computed where the Inception weights are found (or "
    "downloaded) and left out without a word where not; given, missing weights stop the run",
)
@click.option(
    "--dims",
    default=str(DEFAULTS.dims),
    type=click.Choice([str(d) for d in FEATURE_DIMS]),
    help="Inception feature block for FID",
)
@click.option(
    "--fid-protocol",
    default=DEFAULTS.fid_protocol,
    type=click.Choice(list(FID_PROTOCOLS)),
    help="image protocol before Inception: pytorch-fid's bilinear resize, or clean-fid's "
    "PIL bicubic (absolute numbers differ; recorded in every row)",
)
@click.option(
    "--best-metric",
    default=None,
    metavar="METRIC",
    help="the metric best.pt follows, in its direction (e.g. modes, cfd_ema)  [default: fid, "
    "or cfd where a stacked run has no Inception metrics]",
)
# --- averaged generator ---
@click.option(
    "--g-ema",
    default=DEFAULTS.g_ema,
    type=click.FloatRange(min=0),
    metavar="HALF_LIFE",
    help="keep an averaged generator G_ema (an exponential moving average of G's weights) "
    "with this half-life in iterations, and score it beside G at every evaluation as "
    "<metric>_ema (0: off). StyleGAN2-ADA's CIFAR-10 setting (500 kimg) is 7812 at "
    "batch 64",
)
@click.option(
    "--g-ema-rampup",
    default=DEFAULTS.g_ema_rampup,
    type=click.FloatRange(min=0),
    metavar="R",
    help="the half-life at iteration t is at most R * (t - --g-ema-start), so the average "
    "forgets fast early on (StyleGAN2-ADA: 0.05; 0: no ramp-up)",
)
@click.option(
    "--g-ema-start",
    default=DEFAULTS.g_ema_start,
    type=click.IntRange(min=0),
    metavar="ITER",
    help="before this iteration G_ema copies G (StudioGAN's g_ema_start)",
)
@click.option(
    "--g-ema-stats",
    default=DEFAULTS.g_ema_stats,
    type=click.Choice(EMA_STATS),
    help="running statistics of G_ema's norm layers (used in --sample-mode running): copy "
    "(G's, as StyleGAN; measured better for MN) or standing (recomputed from G_ema's own "
    "activations before each use, as BigGAN)",
)
@click.option(
    "--g-ema-standing-batches",
    default=DEFAULTS.g_ema_standing_batches,
    type=click.IntRange(min=1),
    help="batches of --batch-size latents in each standing-statistics pass",
)
# --- speed ---
@click.option(
    "--amp",
    default=DEFAULTS.amp,
    type=click.Choice(AMP_MODES),
    help="autocast: bf16 (CPUs with native bf16, Ampere+ GPUs; elsewhere it warns, ~20x "
    "slower), fp16 (CUDA, with loss scaling), or auto (bf16 where the hardware has it)",
)
@click.option(
    "--channels-last/--no-channels-last", default=DEFAULTS.channels_last, help="NHWC memory format"
)
@click.option(
    "--compile/--no-compile",
    default=DEFAULTS.compile,
    help="torch.compile the whole training iteration into one graph (fullgraph; G and D "
    "separately under torchrun or --amp fp16)",
)
@click.option(
    "--compile-mode",
    default=DEFAULTS.compile_mode,
    type=click.Choice(COMPILE_MODES),
    help="torch.compile mode; on a GPU reduce-overhead replays the iteration as a CUDA "
    "graph (MN launches many small kernels: this removes their launch cost)",
)
@click.option(
    "--sync-norm/--no-sync-norm",
    default=DEFAULTS.sync_norm,
    help="synchronize BN/MN statistics across ranks (torchrun)",
)
# --- what to do ---
@click.option(
    "--resume",
    default=None,
    metavar="PATH",
    help="continue a run: its folder (newest checkpoint) or a ckpt-*.pt file; the config "
    "comes from the checkpoint (--iters and logging flags may change); a folder "
    "with no checkpoint yet restarts from iteration 0 with its saved config",
)
@click.option(
    "--resume-if-exists",
    is_flag=True,
    help="with --run-name: continue <out>/<run-name> if it exists, else start it (one "
    "command line for a pre-emptible job)",
)
@click.option("--dry-run", is_flag=True, help="print the resolved config as JSON and exit")
@click.option(
    "--progress/--no-progress",
    default=True,
    help="progress bar on stderr when it is a terminal (elsewhere, and with --no-progress: "
    "one plain line per --log-every)",
)
@click.pass_context
def main(ctx: click.Context, resume, resume_if_exists, dry_run, progress, **flags) -> None:
    """Train a DCGAN whose generator BatchNorm layers can be Mixture Normalization layers."""
    from dcgan_mn.device import resolve_device
    from dcgan_mn.distributed import shutdown_distributed
    from dcgan_mn.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        InceptionWeightsError,
        InceptionWeightsInvalid,
        MetricsError,
        RunFolderBusy,
        WriteError,
    )
    from dcgan_mn.launch import decide_launch
    from dcgan_mn.metrics import build_evaluator
    from dcgan_mn.training import resume_command, train

    flags["dims"] = int(flags["dims"])
    given = {
        name: value
        for name, value in flags.items()
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    }
    launch = None
    if "g_norms" in given and "mn_layers" in given:
        raise click.UsageError(
            f"--g-norms {given['g_norms']!r}: give it or --mn-layers, not both "
            f"(--g-norms names every layer's norm, MN ones included)"
        )
    if resume_if_exists:
        if resume is not None or not flags.get("run_name"):
            raise click.UsageError("--resume-if-exists: give --run-name (and no --resume)")
        folder = Path(flags["out"]).expanduser() / flags["run_name"]
        if folder.exists():
            resume = str(folder)
            given = {k: v for k, v in given.items() if k not in ("out", "run_name")}
    try:
        # Which run is this: decided once (process group, config, folder, checkpoint, device).
        if resume is not None:
            launch = decide_launch(resume=resume, overrides=given)
        else:
            if "ref" not in given and flags["dataset"] in STACKED_SOURCES:
                flags["ref"] = flags["dataset"]  # FID against stacked images, not CIFAR-10
            if "fid_samples" not in given and resolve_device(flags["device"]).type == "cpu":
                # FID Inception runs at ~10 images/s on a CPU: 10k samples per evaluation would
                # cost longer than the training between evaluations.
                flags["fid_samples"] = CPU_FID_SAMPLES
            launch = decide_launch(TrainConfig(**flags))
        cfg = launch.cfg
        if dry_run:
            click.echo(cfg.to_json())
            return
        if launch.payload is not None and launch.start_iteration >= cfg.iters:
            # Nothing to train: say so before building, opening or writing anything (no
            # evaluator, no empty bars, the run folder left as it was).
            if launch.dist_info.is_main:
                click.echo(already_finished(launch), err=True)
            return
        # The periodic evaluator is built before train() opens the run folder, so missing
        # Inception weights or a bad --ref stop the run before anything is written.
        evaluator = None
        if cfg.fid_every > 0:
            # Off a terminal (a redirected log) the evaluation's bars would be nested under the
            # training bar with cursor-up codes: they are shown on a terminal only.
            # On a stacked dataset FID is an extra, quietly left out where the weights are not
            # here, unless asked for: by the flag, or by a resumed run that has been scoring it.
            wants_fid = given.get("inception_metrics") is True or "fid" in cfg.extra.get(
                "evaluated", ()
            )
            try:
                evaluator = build_evaluator(
                    cfg,
                    launch.device,
                    progress=progress and sys.stderr.isatty(),
                    require_inception=wants_fid,
                )
            except InceptionWeightsInvalid:
                raise  # a file that is there but wrong: fetching the rest would not help
            except InceptionWeightsError as e:
                raise InceptionWeightsError(everything_missing(str(e), cfg)) from None
            launch = dataclasses.replace(
                launch,
                cfg=cfg.replace(
                    extra={
                        **cfg.extra,
                        "ref_key": evaluator.ref_key,
                        "evaluated": sorted(evaluator.directions),
                    }
                ),
            )
        result = train(launch.cfg, launch=launch, evaluator=evaluator, progress=progress)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except (DataError, CheckpointError, InceptionWeightsError, MetricsError, RunFolderBusy) as e:
        raise click.ClickException(str(e)) from None
    except WriteError as e:  # full disk, permissions, read-only or over quota
        if launch is not None and launch.folder.config_file.is_file():
            raise click.ClickException(
                f"{e}; the newest complete checkpoint is intact: fix that, then "
                f"{resume_command(launch.folder.path, launch.dist_info)}"
            ) from None
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo("interrupted before training started; nothing was written", err=True)
        sys.exit(128 + signal.SIGINT)
    finally:
        shutdown_distributed()

    summary = (
        f"{result.run_dir}: iteration {result.iteration} ({result.images_seen} images), "
        f"{result.train_seconds:.1f} s training, checkpoint {result.checkpoint}"
    )
    if result.best_value is not None:
        summary += (
            f", best {result.best_metric} {result.best_value:.3f} at iteration "
            f"{result.best_iteration}"
        )
    if launch.dist_info.is_main:
        click.echo(summary, err=True)
    if result.stopped_by == "non-finite":
        sys.exit(EXIT_NONFINITE)
    if result.stopped_by is not None:
        sys.exit(128 + signal.Signals[result.stopped_by].value)  # 130 for SIGINT, 143 for SIGTERM


if __name__ == "__main__":
    main()
