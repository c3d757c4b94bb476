#!/usr/bin/env python
"""Score generators and compare runs.

    python evaluate.py fid TARGET        # TARGET: a checkpoint, a run folder, or an image folder
    python evaluate.py modes TARGET      # mode collapse on stacked digits (no Inception needed)
    python evaluate.py stats --ref REF   # precompute (and export) reference statistics
    python evaluate.py compare RUN... --baseline RUN...   # acceleration report

FID follows pytorch-fid exactly (same Inception, same weights, same resizing, PNG-exact uint8
images); see docs/evaluation.md. Results go to stdout as JSON (and to --out); progress and
tables go to stderr. Bad input stops with one line and a non-zero exit, writing nothing.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import click

from dcgan_mn import features, metrics, scoring
from dcgan_mn.checkpoint import load_generator
from dcgan_mn.commands import CLI_SETTINGS
from dcgan_mn.compare import (
    CompareError,
    check_metrics,
    compare_runs,
    headline_metric,
    read_run,
    render_markdown,
    write_outputs,
)
from dcgan_mn.data import CIFAR10_FOLDER, DATASETS, find_images, load_cifar10
from dcgan_mn.device import resolve_device
from dcgan_mn.digits import STACKED_SOURCES, load_digit_split
from dcgan_mn.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InceptionWeightsError,
    MetricsError,
)
from dcgan_mn.features import FEATURE_DIMS, FID_PROTOCOLS, WEIGHTS_ENV_VAR
from dcgan_mn.fileio import write_json_atomic
from dcgan_mn.metrics import BUILTIN_REFS, SAMPLE_FORMATS
from dcgan_mn.metrics.classifier import load_mode_classifier
from dcgan_mn.metrics.modes import ModeMetrics
from dcgan_mn.metrics.specs import metric_spec
from dcgan_mn.models import SAMPLE_MODES
from dcgan_mn.provenance import environment
from dcgan_mn.rescore import RescoreError, rescore_runs
from dcgan_mn.runfolder import RunFolder

# The exception types that mean bad user input (reported as one line).
USER_ERRORS = (
    MetricsError,
    InceptionWeightsError,
    CompareError,
    ConfigError,
    DataError,
    CheckpointError,
)


def _progress_on_a_terminal(ctx, param, progress: bool) -> bool:
    """Progress bars redraw a line with carriage returns: a log file would fill with them."""
    return progress and sys.stderr.isatty()


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


def _device(spec: str):
    try:
        return resolve_device(spec)
    except ConfigError as e:
        _fail(str(e))


def _extractor(
    dims: int, weights, device, feature_batch_size, progress, fid_protocol="pytorch-fid"
):
    try:
        return features.InceptionFeatureExtractor(
            dims,
            weights,
            device=device,
            batch_size=feature_batch_size,
            progress=progress,
            fid_protocol=fid_protocol,
        )
    except InceptionWeightsError as e:
        _fail(str(e))


def _standard(extractor):
    """Whether the features come from pytorch-fid's published weights (None: unknown)."""
    return getattr(getattr(extractor, "weights", None), "standard", None)


def _with_options(options: list, command):
    """``command`` under the click options ``options`` (listed in --help order)."""
    for option in reversed(options):
        command = option(command)
    return command


def _progress_option(
    text: str = "progress bars on stderr (on a terminal; a redirected stderr gets none)",
):
    return click.option(
        "--progress/--no-progress", default=True, callback=_progress_on_a_terminal, help=text
    )


def _feature_options(command):
    """The Inception and reference-cache options shared by ``fid``, ``stats`` and ``prepare``."""
    return _with_options(
        [
            click.option(
                "--dims",
                default="2048",
                type=click.Choice([str(d) for d in FEATURE_DIMS]),
                help="Inception feature block",
            ),
            click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N"),
            click.option(
                "--inception-weights",
                default=None,
                type=click.Path(dir_okay=False),
                help="local FID Inception weights (else $DCGAN_MN_INCEPTION_WEIGHTS, else the "
                "torch hub cache)",
            ),
            click.option(
                "--data-root", default="data", help="where CIFAR-10 is (downloaded on first use)"
            ),
            click.option(
                "--cache-dir",
                default=None,
                help="reference-statistics cache (default ~/.cache/dcgan_mn)",
            ),
            click.option(
                "--feature-batch-size",
                default=None,
                type=click.IntRange(min=1),
                help="images per Inception pass (default 500 on CUDA, 50 on CPU)",
            ),
            click.option(
                "--fid-protocol",
                default="pytorch-fid",
                type=click.Choice(list(FID_PROTOCOLS)),
                help="pytorch-fid's bilinear resize inside the network, or clean-fid's PIL "
                "bicubic resize first (absolute numbers differ between the two)",
            ),
        ],
        command,
    )


def _generator_options(command):
    """How ``fid`` and ``modes`` sample a generator TARGET."""
    return _with_options(
        [
            click.option(
                "--batch-size",
                default=None,
                type=click.IntRange(min=1),
                help="generator batch size (default: the run's training batch size)",
            ),
            click.option(
                "--sample-modes",
                default=None,
                help="comma list of batch,running: scored side by side (default: the run's mode)",
            ),
        ],
        command,
    )


def _report_options(command):
    """The latents, the generator and where the report goes, for ``fid`` and ``modes``."""
    return _with_options(
        [
            click.option("--seed", default=0, type=int, help="seed of the evaluation latents"),
            click.option(
                "--ema",
                is_flag=True,
                help="score the averaged generator G_ema (runs trained with --g-ema)",
            ),
            click.option(
                "--out",
                default=None,
                type=click.Path(dir_okay=False),
                help="also write the JSON here",
            ),
            _progress_option(),
        ],
        command,
    )


@click.group(context_settings=CLI_SETTINGS)
def cli() -> None:
    """FID / KID / precision-recall / density-coverage and stacked-digit mode metrics for dcgan_mn."""


# --------------------------------------------------------------------------------------------
# fid and modes: one scoring skeleton
# --------------------------------------------------------------------------------------------


def _said_fid(row: dict) -> None:
    print(
        f"iteration {row['iteration']}: FID {row['fid']:.3f} ({row['sample_mode']})",
        file=sys.stderr,
    )


def _said_modes(row: dict) -> None:
    print(
        f"iteration {row['iteration']}: modes {row['modes']}, kl_modes {row['kl_modes']:.3f}, "
        f"cfd {row['cfd']:.2f} ({row['sample_mode']})",
        file=sys.stderr,
    )


class _Rows(NamedTuple):
    """How one scoring command counts, tags, tells and tables its rows."""

    tag: str  # rows are tagged <tag>_<samples>
    count_key: str  # the row's own sample count, copied to num_samples
    columns: tuple[str, ...]  # a run's curve on stderr
    said: Callable[[dict], None]  # each row as it comes, with --progress


FID_ROWS = _Rows("fid", "num_samples", ("fid",), _said_fid)
MODE_ROWS = _Rows("modes", "mode_samples", ("modes", "kl_modes", "cfd"), _said_modes)


class _Generating(NamedTuple):
    """The generator options that fid and modes share."""

    device: object
    sample_modes: tuple[str, ...]
    batch_size: int | None
    ema: bool
    progress: bool


def _scored_rows(
    target: scoring.Target, evaluator, how: _Rows, image_batch_size: int, gen: _Generating
) -> list[dict]:
    """Every row of TARGET (one per generator snapshot and sample mode, or the image folder's
    one), its ``num_samples`` from ``how.count_key`` and tagged ``<how.tag>_<samples>``; a run's
    curve of ``how.columns`` printed on stderr."""
    rows = scoring.score(
        target,
        evaluator,
        device=gen.device,
        sample_modes=gen.sample_modes,
        batch_size=gen.batch_size,
        image_batch_size=image_batch_size,
        on_row=how.said if gen.progress else None,
        ema=gen.ema,
    )
    for row in rows:
        row["num_samples"] = row[how.count_key]
        row["tag"] = f"{how.tag}_{metrics.sample_count_tag(row['num_samples'])}"
    if target.kind == "run":
        print(scoring.curve_table(rows, how.columns), file=sys.stderr)
    return rows


def _write_report(report: dict, out) -> None:
    """The report as JSON on stdout, and atomically to ``--out`` when given."""
    if out:
        write_json_atomic(Path(out), report)
    click.echo(json.dumps(report, indent=2))


# --------------------------------------------------------------------------------------------
# fid
# --------------------------------------------------------------------------------------------


@cli.command()
@click.argument("target")
@click.option(
    "--ref",
    default="cifar10-train",
    help=f"{', '.join([*BUILTIN_REFS, *STACKED_SOURCES])}, an image folder, "
    "or a pytorch-fid/TTUR .npz",
)
@click.option(
    "--samples",
    default=50_000,
    type=int,
    help="generated images per score (ignored for an image-folder TARGET: all images)",
)
@_generator_options
@_feature_options
@click.option("--no-cache", is_flag=True, help="compute the reference statistics without the cache")
@_report_options
def fid(
    target,
    ref,
    samples,
    batch_size,
    sample_modes,
    dims,
    device,
    inception_weights,
    data_root,
    cache_dir,
    no_cache,
    seed,
    feature_batch_size,
    fid_protocol,
    ema,
    out,
    progress,
):
    """FID (+ KID, precision/recall, density/coverage) of TARGET against --ref.

    TARGET is a checkpoint file, a run folder (every generator snapshot is scored and the curve
    printed), or a folder of images.
    """

    dims = int(dims)
    if samples < 2:
        _fail(f"--samples {samples}: FID needs at least 2 samples")
    try:
        report = _fid(
            target,
            ref,
            samples,
            batch_size,
            sample_modes,
            dims,
            _device(device),
            inception_weights,
            data_root,
            cache_dir,
            no_cache,
            seed,
            feature_batch_size,
            progress,
            fid_protocol,
            ema,
        )
    except USER_ERRORS as e:
        _fail(str(e))
    _write_report(report, out)


def _fid(
    target,
    ref,
    samples,
    batch_size,
    sample_modes,
    dims,
    dev,
    weights,
    data_root,
    cache_dir,
    no_cache,
    seed,
    feature_batch_size,
    progress,
    fid_protocol="pytorch-fid",
    ema=False,
) -> dict:
    sample_modes = scoring.parse_sample_modes(sample_modes)
    target = scoring.parse_target(target, ema=ema)
    _check_ref(ref, dims, data_root)
    extractor = _extractor(dims, weights, dev, feature_batch_size, progress, fid_protocol)
    reference = metrics.load_reference(
        ref,
        extractor,
        data_root=data_root,
        cache_dir=cache_dir,
        progress=progress,
        use_cache=not no_cache,
    )
    evaluator = metrics.Evaluator(
        extractor, reference, num_samples=samples, seed=seed, progress=progress
    )
    gen = _Generating(dev, sample_modes, batch_size, ema, progress)
    rows = _scored_rows(target, evaluator, FID_ROWS, extractor.batch_size, gen)
    return {
        **target.describe(),
        "ref": ref,
        "ref_key": reference.key,
        "dims": dims,
        "weights_sha256": extractor.weights_sha256,
        "weights_standard": _standard(extractor),
        "fid_protocol": getattr(extractor, "fid_protocol", "pytorch-fid"),
        "environment": environment(dev),
        "results": rows,
    }


def _check_ref(ref: str, dims: int, data_root) -> None:
    """Cheap checks of --ref before the Inception network is built."""
    identity = metrics.reference_identity(ref, data_root)
    if identity["kind"] == "npz":
        stats = metrics.load_stats_npz(ref)
        if stats.dims != dims:
            raise MetricsError(
                f"--ref {ref!r}: statistics are {stats.dims}-d but the features are {dims}-d (--dims {dims})"
            )


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------


@cli.command()
@click.argument("target")
@click.option(
    "--source",
    default=None,
    type=click.Choice(STACKED_SOURCES),
    help="which digits the classifier knows  [default: the run's --dataset; required "
    "for an image folder]",
)
@click.option(
    "--samples",
    default=26_000,
    type=int,
    help="generated images per score (PacGAN: 26,000; ignored for an image folder: all images)",
)
@_generator_options
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N")
@click.option(
    "--data-root",
    default="data",
    help="where MNIST is / goes (stacked-mnist; scikit-learn's digits need nothing)",
)
@click.option(
    "--cache-dir",
    default=None,
    help="where the mode classifier is cached (default ~/.cache/dcgan_mn)",
)
@_report_options
def modes(
    target,
    source,
    samples,
    batch_size,
    sample_modes,
    device,
    data_root,
    cache_dir,
    seed,
    ema,
    out,
    progress,
):
    """Mode collapse on stacked digits: modes (of 1000), kl_modes and cfd of TARGET.

    TARGET is a checkpoint file, a run folder (every generator snapshot: the curve), or a folder
    of 32x32 RGB images. Each channel of each image is labelled by the source's digit classifier
    (trained and cached on first use, refused below its accuracy bar); modes counts the distinct
    digit triples, kl_modes is KL(samples || uniform over 1000) in nats, cfd the Fréchet distance
    to real stacked images in the classifier's feature space. Needs no Inception weights.
    """
    if samples < 2:
        _fail(f"--samples {samples}: mode metrics need at least 2 samples")
    try:
        report = _modes(
            target,
            source,
            samples,
            batch_size,
            sample_modes,
            _device(device),
            data_root,
            cache_dir,
            seed,
            progress,
            ema,
        )
    except USER_ERRORS as e:
        _fail(str(e))
    _write_report(report, out)


def _modes(
    target,
    source,
    samples,
    batch_size,
    sample_modes,
    dev,
    data_root,
    cache_dir,
    seed,
    progress,
    ema=False,
) -> dict:
    sample_modes = scoring.parse_sample_modes(sample_modes)
    target = scoring.parse_target(target, ema=ema)
    source = source or _stacked_source_of(target)
    classifier = load_mode_classifier(
        source, data_root=data_root, cache_dir=cache_dir, device=dev, progress=progress
    )
    evaluator = metrics.Evaluator(
        families=[ModeMetrics(classifier, num_samples=samples)], seed=seed, progress=progress
    )
    gen = _Generating(dev, sample_modes, batch_size, ema, progress)
    rows = _scored_rows(target, evaluator, MODE_ROWS, classifier.batch_size, gen)
    report = {
        **target.describe(),
        "source": source,
        "classifier_sha256": classifier.sha256,
        "classifier_accuracy": classifier.accuracy,
        "environment": environment(dev),
        "results": rows,
    }
    if len(rows) == 1:  # one score: its numbers at the top level too
        report.update({k: v for k, v in rows[0].items() if k not in report})
    return report


def _stacked_source_of(target: scoring.Target) -> str:
    """The stacked digits a generator TARGET was trained on (what ``--source`` defaults to)."""
    if target.kind == "images":
        _fail(f"TARGET {target.text!r}: an image folder needs --source {'|'.join(STACKED_SOURCES)}")
    if target.config.dataset not in STACKED_SOURCES:
        _fail(
            f"TARGET {target.text!r}: trained on --dataset {target.config.dataset}, not stacked digits; "
            f"pass --source to score it anyway"
        )
    return target.config.dataset


# --------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--ref", default="cifar10-train", help=f"{', '.join(BUILTIN_REFS)}, an image folder, or a .npz"
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="also write pytorch-fid's .npz (mu, sigma; plus meta and real features) here",
)
@click.option("--stats-only", is_flag=True, help="with --out: write only mu and sigma")
@click.option("--force", is_flag=True, help="with --out: replace an existing file")
@_feature_options
@_progress_option()
def stats(
    ref,
    out,
    stats_only,
    force,
    dims,
    device,
    inception_weights,
    data_root,
    cache_dir,
    feature_batch_size,
    fid_protocol,
    progress,
):
    """Compute (or find in the cache) the reference statistics of --ref."""
    if out and Path(out).exists() and not force:
        _fail(f"--out {out!r}: file exists (pass --force to replace it)")
    try:
        _check_ref(ref, int(dims), data_root)
        extractor = _extractor(
            int(dims),
            inception_weights,
            _device(device),
            feature_batch_size,
            progress,
            fid_protocol,
        )
        reference = metrics.load_reference(
            ref, extractor, data_root=data_root, cache_dir=cache_dir, progress=progress
        )
        if out:
            metrics.save_stats_npz(out, reference, with_features=not stats_only)
    except USER_ERRORS as e:
        _fail(str(e))
    click.echo(
        json.dumps(
            {
                "ref": ref,
                "ref_key": reference.key,
                "dims": reference.dims,
                "num_images": reference.meta.get("num_images"),
                "weights_sha256": extractor.weights_sha256,
                "weights_standard": _standard(extractor),
                "fid_protocol": getattr(extractor, "fid_protocol", "pytorch-fid"),
                "cache_path": str(reference.path) if reference.path else None,
                "out": out,
            },
            indent=2,
        )
    )


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--dataset",
    default="cifar10",
    type=click.Choice(DATASETS),
    help="the training data a run will read",
)
@click.option(
    "--ref",
    default=None,
    help="FID reference to compute and cache  [default: cifar10-train; a stacked dataset's own name]",
)
@click.option(
    "--no-inception",
    is_flag=True,
    help="skip the Inception weights and the reference (stacked runs evaluated by mode metrics only)",
)
@_feature_options
@_progress_option()
def prepare(
    dataset,
    ref,
    no_inception,
    dims,
    device,
    inception_weights,
    data_root,
    cache_dir,
    feature_batch_size,
    fid_protocol,
    progress,
):
    """Fetch and verify everything a run needs (dataset, FID Inception weights, reference
    statistics, mode classifier) so that a compute node without internet never needs the
    network; say where each lies and how to point a node at it. Exits 1 naming what failed."""
    stacked = dataset in STACKED_SOURCES
    ref = ref or (dataset if stacked else "cifar10-train")
    cache = Path(cache_dir).expanduser() if cache_dir else metrics.default_cache_dir()
    # (what, where, why)
    steps = [(f"dataset {dataset}", *_attempt(_fetch_dataset, dataset, data_root))]
    weights = None
    if not no_inception:
        weights, why = _attempt(
            features.resolve_inception_weights, inception_weights, progress=progress
        )
        steps.append(
            ("FID Inception weights", None if weights is None else _weights_line(weights), why)
        )
        if weights is not None:
            steps.append(
                (
                    f"reference statistics {ref}",
                    *_attempt(
                        _fetch_reference,
                        ref,
                        weights,
                        int(dims),
                        device,
                        feature_batch_size,
                        progress,
                        fid_protocol,
                        data_root,
                        cache,
                    ),
                )
            )
        else:
            steps.append((f"reference statistics {ref}", None, "needs the Inception weights"))
    if stacked:
        steps.append(
            (
                f"mode classifier {dataset}",
                *_attempt(_fetch_classifier, dataset, data_root, cache, device, progress),
            )
        )
    _say_prepared(steps, data_root, cache, weights)


def _attempt(fetch: Callable, *args, **kwargs) -> tuple:
    """(what ``fetch(*args, **kwargs)`` gave, None), or (None, why it failed): one step of
    ``prepare`` that fails leaves the others to run."""
    try:
        return fetch(*args, **kwargs), None
    except (*USER_ERRORS, OSError, ValueError) as e:
        return None, str(e)
    except click.ClickException as e:  # from a helper that fails the command itself
        return None, e.format_message()


def _fetch_dataset(dataset: str, data_root) -> str:
    """Download (or find) the training data ``dataset``; where it lies."""
    if dataset == "cifar10":
        for split in ("train", "test"):
            load_cifar10(data_root, split, download=True)  # MD5-checked archive
        return f"{Path(data_root) / CIFAR10_FOLDER} (--data-root {data_root})"
    if dataset == "folder":
        return f"{len(find_images(data_root))} images under {data_root} (--data-root {data_root})"
    for split in ("train", "test"):
        load_digit_split(dataset, split, data_root, download=True)
    if dataset == "stacked-digits":
        return "scikit-learn's bundled digits (nothing to download)"
    return f"{Path(data_root) / 'MNIST' / 'raw'} (--data-root {data_root})"


def _weights_line(weights) -> str:
    standard = "pytorch-fid" if weights.standard else "NOT pytorch-fid"
    return f"{weights.path} (sha256 {weights.sha256[:12]}..., {standard}'s file)"


def _fetch_reference(
    ref: str,
    weights,
    dims: int,
    device: str,
    feature_batch_size,
    progress,
    fid_protocol,
    data_root,
    cache: Path,
) -> str:
    """Compute (or find) and cache the reference statistics of ``ref``; where they lie."""
    extractor = _extractor(
        dims, weights, _device(device), feature_batch_size, progress, fid_protocol
    )
    reference = metrics.load_reference(
        ref, extractor, data_root=data_root, cache_dir=cache, progress=progress
    )
    return f"{cache / 'ref_stats'} (key {reference.key[:16]}, {dims}-d, {fid_protocol})"


def _fetch_classifier(dataset: str, data_root, cache: Path, device: str, progress) -> str:
    """Train (or find) and cache the mode classifier of ``dataset``; where it lies."""
    classifier = load_mode_classifier(
        dataset, data_root=data_root, cache_dir=cache, device=_device(device), progress=progress
    )
    return f"{classifier.path} (held-out accuracy {classifier.accuracy:.3f})"


def _say_prepared(steps: list, data_root, cache: Path, weights) -> None:
    """What ``prepare`` got and where, what it could not get and why, and how to point a compute
    node at it; exits 1 naming what failed. ``steps``: (what, where, why), why None when it worked."""
    failed = [(what, why) for what, _, why in steps if why is not None]
    for what, where, why in steps:
        if why is None:
            click.echo(f"ok      {what}: {where}")
    for what, why in failed:
        click.echo(f"FAILED  {what}: {why}")
    click.echo("\nOn a compute node without internet, copy these and point the run at them:")
    click.echo(f"  --data-root {data_root}")
    click.echo(
        f"  export {metrics.CACHE_ENV_VAR}={cache}      # reference statistics and mode classifiers"
    )
    if weights is not None:
        click.echo(
            f"  export {WEIGHTS_ENV_VAR}={weights.path}  # or --inception-weights {weights.path}"
            + ("" if os.environ.get(WEIGHTS_ENV_VAR) else "; or keep the torch hub cache as it is")
        )
    if failed:
        _fail("could not get: " + ", ".join(what for what, _ in failed))


# --------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------


@cli.command()
@click.argument("target")
@click.option("--num", default=10_000, type=click.IntRange(min=1), help="images to write")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="a new (or empty) folder for the images",
)
@click.option(
    "--format",
    "fmt",
    default="png",
    type=click.Choice(SAMPLE_FORMATS),
    help="png: one file per image; npz: one samples.npz holding images, uint8 [N, 32, 32, 3]",
)
@click.option(
    "--which",
    default="best",
    type=click.Choice(["best", "latest"]),
    help="for a run folder: best.pt, or the newest snapshot",
)
@click.option(
    "--seed", default=0, type=int, help="seed of the evaluation latents (0: what training scored)"
)
@click.option(
    "--sample-mode",
    default=None,
    type=click.Choice(SAMPLE_MODES),
    help="how G is sampled  [default: the run's]",
)
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(min=1),
    help="generator batch  [default: the run's]",
)
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N")
@click.option(
    "--ema", is_flag=True, help="the averaged generator G_ema (runs trained with --g-ema)"
)
@_progress_option("progress bar on stderr (on a terminal; a redirected stderr gets none)")
def samples(target, num, out, fmt, which, seed, sample_mode, batch_size, device, ema, progress):
    """Write a generator's samples exactly as the evaluator scores them (same latents for the
    same --seed, same sample mode, same uint8 quantization), e.g. for torch-fidelity, clean-fid
    or TensorFlow code. TARGET: a checkpoint, or a run folder (--which best|latest)."""
    try:
        path = scoring.generator_file(target, which)
        gen, cfg, iteration = load_generator(path, _device(device), ema=ema)
        mode, batch = sample_mode or cfg.sample_mode, batch_size or cfg.batch_size
        batches = (
            images
            for _, images in metrics.generated_images(
                gen, num_samples=num, seed=seed, sample_mode=mode, batch_size=batch, shard=False
            )
        )
        written = metrics.write_samples(batches, out, fmt, total=num, progress=progress)
    except USER_ERRORS as e:
        _fail(str(e))
    print(
        f"wrote {num} samples of {path}{' (G_ema)' if ema else ''} (iteration {iteration}, sample mode {mode}, seed {seed}) "
        f"to {written}",
        file=sys.stderr,
    )


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


@cli.command()
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "--baseline",
    "baselines",
    multiple=True,
    required=True,
    help="a baseline run folder (repeat the flag for several seeds)",
)
@click.option("--out", default="compare", help="folder for compare.md, compare.json, compare.png")
@click.option(
    "--metric",
    default=None,
    help="the metrics.jsonl column to compare: fid, kid, kl_modes, cfd (lower is better); "
    "inception_score, precision, recall, density, coverage, modes (higher is better); "
    "<metric>_ema for G_ema  [default: the runs' headline metric, the one their best.pt "
    "follows: --best-metric, else fid, else cfd for runs scored by mode metrics only]",
)
@click.option(
    "--baseline-metric",
    default=None,
    help="the --baseline runs' column, when not --metric: a metric against its G_ema twin, "
    "e.g. --metric cfd_ema --baseline-metric cfd with the same runs as RUN... and --baseline "
    "(what averaging does for them)  [default: --metric]",
)
@click.option("--sample-mode", default=None, help="which rows to use when a run has several")
@click.option(
    "--samples",
    default=None,
    type=int,
    help="which rows to use when a run has several sample counts (the metric's own count)",
)
@click.option("--label", default="candidate", help="name of the RUN... arm")
@click.option("--baseline-label", default="baseline", help="name of the --baseline arm")
@click.option(
    "--eval-seeds",
    default=3,
    type=click.IntRange(min=1),
    help="evaluation seeds per curve point: seeds beyond the training row's are scored "
    "from the run's snapshots once and kept in <run>/eval_seeds.jsonl, which takes "
    "about as long as the runs' own evaluations did (said before it starts); 1: the "
    "training rows only, no re-scoring and no evaluation-noise estimate",
)
@click.option("--device", default="auto", help="device for re-scoring: auto, cpu, cuda, cuda:N")
@click.option(
    "--cache-dir",
    default=None,
    help="cache of reference statistics and mode classifiers  [default: ~/.cache/dcgan_mn]",
)
@_progress_option()
def compare(
    runs,
    baselines,
    out,
    metric,
    baseline_metric,
    sample_mode,
    samples,
    label,
    baseline_label,
    eval_seeds,
    device,
    cache_dir,
    progress,
):
    """Acceleration (1 - S_cand / S_base), best, final and area under the curve of RUN...
    against --baseline, with seed-bootstrap intervals, evaluation noise, a smoothed rule and a
    collapse flag per run (how to read it: docs/comparing.md)."""
    try:
        if metric is None:
            metric = headline_metric([*runs, *baselines])
            print(
                f"comparing {metric}, what the runs' best.pt follows (--metric chooses another)",
                file=sys.stderr,
            )
        baseline_metric = baseline_metric or metric
        for flag, name in (("--metric", metric), ("--baseline-metric", baseline_metric)):
            try:
                metric_spec(name)
            except MetricsError as e:
                raise CompareError(f"{flag} {name!r}: {e}") from None
        check_metrics(metric, baseline_metric)  # before any re-scoring
        if eval_seeds > 1:  # score what the runs lack (nothing when eval_seeds.jsonl has it all)
            dev = _device(device)  # one evaluator for runs evaluated alike; each warning once
            by_metric = {metric: list(runs)}  # one call (one evaluator) when the metrics agree
            by_metric.setdefault(baseline_metric, []).extend(baselines)
            for arm_metric, arm in by_metric.items():
                rescore_runs(
                    # else read_run says what is wrong
                    [r for r in arm if RunFolder(r).metrics_file.is_file()],
                    arm_metric,
                    eval_seeds,
                    device=dev,
                    cache_dir=cache_dir,
                    progress=progress,
                )
        read = dict(sample_mode=sample_mode, num_samples=samples, eval_seeds=eval_seeds)
        cands = [read_run(r, metric=metric, **read) for r in runs]
        bases = [read_run(r, metric=baseline_metric, **read) for r in baselines]
        report = compare_runs(cands, bases, candidate_label=label, baseline_label=baseline_label)
    except (*USER_ERRORS, RescoreError) as e:
        _fail(str(e))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    paths = write_outputs(report, out)
    click.echo(render_markdown(report))
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}", file=sys.stderr)


if __name__ == "__main__":
    cli()
