"""The training loop: ``train(cfg)`` trains the DCGAN and leaves a run folder.

One iteration = one discriminator step then one generator step on ``cfg.batch_size`` images;
progress is counted in iterations (generator updates, the paper's unit) and images seen.

The loop never waits for the device except when it has to: losses and D outputs are summed
into a device tensor and read once per ``--log-every`` iterations; MN telemetry is read at the
same time. Evaluation, sample grids and checkpoint writes pause the training clock, so
``train_seconds`` is training time only, carried across resumes.

A run stopped at iteration t (by ``--iters``, SIGINT or SIGTERM) and resumed from its checkpoint
continues exactly as if it had not stopped: the checkpoint holds every random-number state, the
data order, the optimizers and the half-filled logging window (``state.TrainingState``).

Under ``torchrun`` the same loop runs on every rank with G and D wrapped in DDP: ``--batch-size``
is the global batch (each rank takes its slice), each rank has its own noise and k-means random
stream, rank 0 alone writes files, all ranks evaluate together and agree on when a signal stops
the run; checkpoints hold every rank's RNG states and running statistics.

Where things live: which run this is (``launch``), what a checkpoint holds (``state``), one
iteration (``step``), stopping early (``stopping``), what is written (``log``, ``runfolder``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .commands import python_command, script_command, script_path
from .config import TrainConfig
from .data import load_dataset
from .device import autocast
from .distributed import all_reduce_sum_
from .errors import ConfigError
from .launch import Launch, decide_launch
from .metrics import METRICS, sample_count_tag
from .metrics.specs import EMA_SUFFIX, averaged_result
from .log import RunLogger, run_hparams
from .provenance import environment, record_environment
from .runfolder import RunFolder
from .state import TrainingState
from .step import TrainStep
from .stopping import StopOnSignals, agreed_stop, first_nonfinite

__all__ = ["EvaluateFn", "TrainResult", "train"]

# evaluate(generator, *, sample_mode, batch_size) -> {"fid": float, "num_samples": int, ...};
# ``metrics.Evaluator`` is the real one, tests inject small ones.
EvaluateFn = Callable[..., dict]


@dataclass
class TrainResult:
    run_dir: Path
    config: TrainConfig
    iteration: int
    images_seen: int
    train_seconds: float
    stopped_by: Optional[str]  # "SIGINT" / "SIGTERM" / "non-finite" when the run ended early
    checkpoint: Optional[Path]  # the last full checkpoint written
    best_metric: str  # "fid", or "cfd" for a run evaluated with mode metrics only
    best_value: Optional[float]
    best_iteration: Optional[int]
    last_log: dict  # the last logged window's means (losses, D outputs)

    @property
    def best_fid(self) -> Optional[float]:
        return self.best_value if self.best_metric == "fid" else None

    @classmethod
    def of(
        cls, state: TrainingState, io: RunIO, cfg: TrainConfig, stopped_by: Optional[str]
    ) -> TrainResult:
        """Where the run stands at its end."""
        best = state.best
        return cls(
            run_dir=io.folder.path,
            config=cfg,
            iteration=state.iteration,
            images_seen=state.images_seen,
            train_seconds=io.clock.seconds(),
            stopped_by=stopped_by,
            checkpoint=io.last_checkpoint,
            best_metric=best["metric"],
            best_value=best["value"],
            best_iteration=best["iteration"],
            last_log=io.last_log,
        )


class Clock:
    """Training-only wall time: runs from the start, paused while we evaluate or write files."""

    def __init__(self, already: float = 0.0) -> None:
        self.already = already
        self.started = time.perf_counter()
        self.paused_for = 0.0

    def seconds(self) -> float:
        return self.already + (time.perf_counter() - self.started) - self.paused_for

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_for += time.perf_counter() - t0


@dataclass
class RunIO:
    """What this process writes a run through, and the loop's record of what it wrote."""

    folder: RunFolder
    logger: RunLogger
    clock: Clock
    lock: Any  # runlock.RunLock, held by rank 0 for the run's lifetime
    evaluator: Optional[EvaluateFn]
    env_key: Optional[str]  # the environment every metrics row of this process points to
    window_start: tuple[float, int]  # (perf_counter, iteration) of the log window's start
    last_log: dict = field(default_factory=dict)
    last_checkpoint: Optional[Path] = None


def due(every: int, iteration: int) -> bool:
    return every > 0 and iteration % every == 0


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(
    cfg: Optional[TrainConfig] = None,
    *,
    launch: Optional[Launch] = None,
    evaluator: Optional[EvaluateFn] = None,
    resume: Union[str, Path, None] = None,
    images: Optional[Tensor] = None,
    progress: bool = True,
    step_hook: Optional[Callable[[int, Any, Any], None]] = None,
    compile_backend: str = "inductor",
) -> TrainResult:
    """Train per ``cfg`` (or a decided ``launch``) and return where the run stands.

    ``evaluator(generator, *, sample_mode, batch_size) -> {"fid": ..., "num_samples": ..., ...}``
    is called every ``cfg.fid_every`` iterations (and at the end); without one, nothing is
    evaluated. ``resume``: a run folder or full checkpoint to continue (``cfg`` must agree with
    its config on everything in ``config.RESUME_FIXED``). ``images``: uint8 [N, 3, 32, 32]
    training images, instead of loading ``cfg.dataset``. ``step_hook(iteration, G, D)`` runs after
    every iteration (tests inject faults with it, e.g. a NaN weight). ``compile_backend``: the
    ``torch.compile`` backend of ``--compile`` (e.g. "aot_eager" traces without building kernels).

    Non-finite losses or D outputs stop the run (``stopped_by="non-finite"``) at the next log
    window, evaluation or checkpoint, whichever comes first (the check reads one device flag
    there, never per iteration): nothing is written from the non-finite state, so every
    checkpoint on disk stays finite and none is pruned.
    """
    # ---- Decide which run this is. Nothing is written yet: a refused launch leaves every run as it was.
    launch = launch or decide_launch(cfg, resume)
    dist_info, device = launch.dist_info, launch.device
    if dist_info.is_main:
        for warning in ((launch.amp_warning,) if launch.amp_warning else ()) + launch.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    images = training_images(launch, images)  # uint8 [N, 3, 32, 32]
    cfg = launch.cfg.replace(extra={**launch.cfg.extra, **run_facts(launch, images)})

    # ---- Build the models, optimizers, data order and grid noise; restore the run we resume.
    best_metric = getattr(evaluator, "primary_metric", "fid") if evaluator is not None else "fid"
    check_best_metric(cfg, evaluator)
    state = TrainingState(
        cfg, device, images, amp=launch.amp, dist_info=dist_info, best_metric=best_metric
    )
    if launch.payload is not None:
        state.load_payload(launch.payload)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels

    # ---- Open the run folder (claim, config, provenance, TensorBoard) and build the step.
    io = open_run(launch, state, evaluator, progress)
    train_step = build_train_step(state, launch, compile_backend)
    evaluating = evaluator is not None and cfg.fid_every > 0
    start_iteration = state.iteration
    stopping: Optional[str] = None
    nonfinite_at: Optional[int] = None

    # ---- Train: one D step then one G step per iteration, until cfg.iters or a signal.
    try:
        with StopOnSignals(keep_deferring=dist_info.enabled) as stop:
            stopping = agreed_stop(stop, dist_info, device)
            while state.iteration < cfg.iters and stopping is None:
                # D step, G step (, G_ema); on device
                out = train_step(*next_batch(state), state.iteration)
                state.iteration += 1
                it = state.iteration
                stopping = agreed_stop(stop, dist_info, device)
                if step_hook is not None:
                    step_hook(it, state.G, state.D)
                state.window.add(out, it)  # summed on the device; read every --log-every
                io.logger.advance()
                # The last iteration is graded (grid, evaluation) before its checkpoint, as any other:
                # a run killed between the two redoes the evaluation on resume instead of losing it.
                last = it == cfg.iters and stopping is None
                evaluate_now = evaluating and (due(cfg.fid_every, it) or last)
                # Before anything reads or writes this state: is it still finite?
                writes = evaluate_now or due(cfg.ckpt_every, it) or stopping is not None
                if writes or due(cfg.log_every, it):
                    checked = (state.G, state.D) if writes else ()
                    nonfinite_at = first_nonfinite(state.window, checked, it, dist_info)
                    if nonfinite_at is not None:
                        break
                if due(cfg.log_every, it):
                    write_logs(state, io)
                if due(cfg.sample_every, it) or (last and cfg.sample_every > 0):
                    write_grid(state, io)
                if evaluate_now:
                    evaluate(state, io)
                if due(cfg.ckpt_every, it) or stopping is not None:
                    save(state, io, evaluating)
                if it < cfg.iters:  # the last iteration's line waits for the end-of-run evaluation
                    io.logger.emit_line()

            # ---- The end of the run: a last checkpoint where it is due.
            nonfinite_at = final_checkpoint(
                state, io, launch, start_iteration, evaluating, nonfinite_at
            )
            stopping = "non-finite" if nonfinite_at is not None else stopping
            io.logger.emit_line()

            # ---- Say how it ended: the HParams session (settings, best and final metrics).
            if evaluating:
                directions = scored_directions(evaluator, state.ema is not None)
                io.logger.outcome(run_hparams(cfg, state.G), directions, state.iteration)
    finally:
        io.logger.close()
        io.lock.release()

    if stopping is not None:
        io.logger.message(ending_message(state, io, stopping, nonfinite_at))
    return TrainResult.of(state, io, cfg, stopping)


def final_checkpoint(
    state: TrainingState,
    io: RunIO,
    launch: Launch,
    start_iteration: int,
    evaluating: bool,
    nonfinite_at: Optional[int],
) -> Optional[int]:
    """The run's last checkpoint, unless it is on disk already, the state went non-finite (the
    iteration where it did is returned), or a resumed run trained nothing."""
    if nonfinite_at is None:
        nonfinite_at = first_nonfinite(
            state.window, (state.G, state.D), state.iteration, state.dist_info
        )
    it = state.iteration
    unsaved = io.last_checkpoint is None or io.folder.checkpoint_file(it) != io.last_checkpoint
    if nonfinite_at is None and unsaved and (it > start_iteration or launch.payload is None):
        save(state, io, evaluating)
    return nonfinite_at


def ending_message(
    state: TrainingState, io: RunIO, stopping: str, nonfinite_at: Optional[int]
) -> str:
    """Why a run stopped before its --iters, and how to go on."""
    if nonfinite_at is not None:
        return (
            f"non-finite losses or D outputs at iteration {nonfinite_at} (noticed at "
            f"{state.iteration}): stopped without writing; newest finite checkpoint: "
            f"{io.folder.latest_checkpoint()}"
        )
    return (
        f"{stopping}: stopped at iteration {state.iteration}; checkpoint {io.last_checkpoint}; "
        f"continue with: {resume_command(io.folder.path, state.dist_info)}"
    )


def resume_command(run_dir: Path, dist_info) -> str:
    """The command that continues this run, as it was launched (under torchrun: as many processes)."""
    if dist_info.enabled:
        return python_command(
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            dist_info.world_size,
            script_path("train.py"),
            "--resume",
            run_dir,
        )
    return script_command("train.py", "--resume", run_dir)


# --------------------------------------------------------------------------------------------
# Set-up: the training images, the run folder, the step
# --------------------------------------------------------------------------------------------


def training_images(launch: Launch, images: Optional[Tensor]) -> Tensor:
    """The training set as uint8 [N, 3, 32, 32]: given, or loaded per the config."""
    if images is None:
        images = load_dataset(launch.cfg)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ConfigError(
            f"training images must be uint8 [N, 3, 32, 32], got {images.dtype} {tuple(images.shape)}"
        )
    return images


def check_best_metric(cfg: TrainConfig, evaluator: Optional[EvaluateFn]) -> None:
    """``--best-metric`` must be something this run's evaluator scores (before anything is written)."""
    scored = getattr(evaluator, "directions", None)
    if cfg.best_metric is None or not scored or cfg.fid_every == 0:
        return
    scored = [*scored, *([f"{m}{EMA_SUFFIX}" for m in scored] if cfg.g_ema > 0 else [])]
    if cfg.best_metric not in scored:
        raise ConfigError(
            f"--best-metric {cfg.best_metric!r}: this run's evaluation scores {', '.join(scored)}"
        )


def scored_directions(evaluator: EvaluateFn, averaged: bool) -> dict:
    """{metric: "min" / "max"} of what the run scored (every known metric for an injected
    evaluator that does not say), with the averaged generator's ``_ema`` twins."""
    directions = getattr(evaluator, "directions", None) or {
        m: s.direction for m, s in METRICS.items()
    }
    if averaged:
        directions = {**directions, **{f"{m}{EMA_SUFFIX}": d for m, d in directions.items()}}
    return directions


def run_facts(launch: Launch, images: Tensor) -> dict:
    """What the config records of where and on what the run trains (its ``extra``)."""
    facts = {
        "device": str(launch.device),
        "torch": str(torch.__version__),
        "amp": launch.amp,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_train_images": int(images.shape[0]),
    }
    if launch.dist_info.enabled:
        facts["world_size"] = launch.dist_info.world_size
    return facts


def open_run(
    launch: Launch, state: TrainingState, evaluator: Optional[EvaluateFn], progress: bool
) -> RunIO:
    """Claim the run folder (rank 0 alone writes files), write its config and provenance, drop
    metrics rows a crashed run wrote past its checkpoint, and start TensorBoard and the bar."""
    cfg, folder, dist_info = state.cfg, launch.folder, launch.dist_info
    dropped = 0
    env_key = None
    lock = folder.claim()  # held by rank 0 until the run ends; a second process stops here
    if dist_info.is_main:
        if not launch.continuing:
            folder.create()  # one mkdir: of two runs racing for a name, one wins
        lock.acquire()
        # unreadable newer checkpoints (load_resume's warning names them)
        for path in launch.set_aside:
            if path.exists():
                folder.set_aside(path)
        folder.write_config(cfg.to_dict())
        if launch.continuing:
            dropped = folder.drop_metrics_after(state.iteration)
        env_key = record_environment(folder, environment(launch.device), state.iteration)
    logger = RunLogger(
        folder,
        total_iters=cfg.iters,
        start_iter=state.iteration,
        purge_step=state.iteration + 1 if launch.continuing else None,
        progress=progress,
        enabled=dist_info.is_main,
    )
    drop_note = (
        f" (dropped {dropped} metrics rows written after that checkpoint)" if dropped else ""
    )
    if launch.payload is not None:
        logger.message(f"resuming {folder.path} at iteration {state.iteration}{drop_note}")
    else:
        if launch.restarting:
            logger.message(
                f"{folder.path} has no checkpoint yet: restarting it from iteration 0 with its "
                f"saved config" + (f" (dropped {dropped} metrics rows)" if dropped else "")
            )
        logger.text("config", "    " + cfg.to_json().replace("\n", "\n    "))  # markdown code block
    return RunIO(
        folder=folder,
        logger=logger,
        clock=Clock(state.train_seconds),
        lock=lock,
        evaluator=evaluator,
        env_key=env_key,
        window_start=(time.perf_counter(), state.iteration),
    )


def build_train_step(state: TrainingState, launch: Launch, compile_backend: str) -> TrainStep:
    """One iteration as one function; ``--compile`` makes it one graph (G and D separately where
    DDP or fp16 loss scaling need ``backward()``). The step may run DDP-wrapped G and D;
    sampling, state dicts, telemetry and evaluation use the plain ones."""
    G_train, D_train = state.G, state.D
    if launch.dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # forward_sync_buffers=False: each rank keeps the running statistics of its own batches
        # (rank 0's are checkpointed); --sync-norm makes them agree.
        device_ids = [launch.device.index] if launch.device.type == "cuda" else None
        G_train = DDP(state.G, device_ids=device_ids, forward_sync_buffers=False)
        D_train = DDP(state.D, device_ids=device_ids, forward_sync_buffers=False)
        if launch.payload is not None:  # DDP copied rank 0's buffers: put back this rank's own
            state.restore_rank_buffers(launch.payload)
    step = TrainStep(
        state.G,
        state.D,
        state.opt_g,
        state.opt_d,
        autocast=lambda: autocast(launch.device, launch.amp),
        scaler=state.scaler,
        capturable=not launch.dist_info.enabled,
        G_forward=G_train,
        D_forward=D_train,
        D_frozen=state.D if launch.dist_info.enabled else None,
        ema=state.ema,
    )
    if state.cfg.compile:
        step.compile(state.cfg.compile_mode, backend=compile_backend)
    return step


def next_batch(state: TrainingState) -> tuple[Tensor, Tensor]:
    """(real images [b, 3, 32, 32] in [-1, 1], latents [b, z_dim]) on the device; b = B / world size."""
    real = state.sampler.next()
    if state.cfg.channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    z = torch.randn(state.sampler.local_batch, state.cfg.z_dim, device=state.device)
    return real, z


def local_norms(state: TrainingState) -> contextlib.AbstractContextManager:
    """Grids and evaluation run G on some ranks only or on uneven shares: no collectives there."""
    if state.cfg.sync_norm:
        from .sync import unsynchronized

        return unsynchronized(state.G)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# What the loop writes: logs, grids, evaluations, checkpoints
# --------------------------------------------------------------------------------------------


def write_logs(state: TrainingState, io: RunIO) -> None:
    """Read the window's device sums (the one sync per --log-every) and log them."""
    window_means = state.window.take_means()  # [4]
    if state.dist_info.enabled:  # the mean over ranks (every rank gets here at the same iteration)
        window_means = all_reduce_sum_(window_means) / state.dist_info.world_size
    loss_d, loss_g, d_real, d_fake = window_means.tolist()
    now, it = time.perf_counter(), state.iteration
    it_per_s = (it - io.window_start[1]) / max(now - io.window_start[0], 1e-9)
    io.window_start = (now, it)
    io.last_log = {"loss_D": loss_d, "loss_G": loss_g, "D_x": d_real, "D_G_z": d_fake}
    values = {
        "loss/D": loss_d,
        "loss/G": loss_g,
        "D/real": d_real,
        "D/fake": d_fake,
        "time/it_per_s": it_per_s,
        "time/images_per_s": it_per_s * state.cfg.batch_size,
        "time/train_seconds": io.clock.seconds(),
        "progress/images_seen": state.images_seen,
        "progress/epoch": state.sampler.epoch_progress,
        **state.G.norm_telemetry(),
    }
    io.logger.scalars(values, it)
    io.logger.show(D=f"{loss_d:.3f}", G=f"{loss_g:.3f}", Dx=f"{d_real:.2f}", DGz=f"{d_fake:.2f}")
    io.logger.plain_line(it, it_per_s * state.cfg.batch_size)  # when the bar is off (--no-progress)


def write_grid(state: TrainingState, io: RunIO) -> None:
    """The fixed-noise 8x8 grid in the configured sample mode (buffers and RNG untouched); on a
    stacked dataset each sample's three digits side by side (``--stacked-grid digits``), so the
    grid shows the modes the metrics count, on grey lines that keep the samples apart."""
    from torchvision.utils import make_grid

    from .digits import STACKED_SOURCES, side_by_side

    if not state.dist_info.is_main:
        return
    cfg = state.cfg
    with io.clock.paused(), local_norms(state):
        for tag, G in (
            ("samples", state.G),
            ("samples_ema", state.ema.G_ema if state.ema else None),
        ):
            if G is None:
                continue
            if G is not state.G and cfg.sample_mode == "running":
                state.ema.ready_for_use()  # its running statistics (batch mode needs none)
            # [64, 3, 32, 32]
            fake = G.sample(state.fixed_noise, mode=cfg.sample_mode, batch_size=cfg.batch_size)
            fake = fake.float().cpu() * 0.5 + 0.5
            if cfg.dataset in STACKED_SOURCES and cfg.stacked_grid == "digits":
                # [3, 274, 786]
                grid = make_grid(side_by_side(fake), nrow=8, padding=2, pad_value=0.5)
            else:
                grid = make_grid(fake, nrow=8, padding=2)  # [3, 274, 274]
            io.logger.image(f"{tag}/{cfg.sample_mode}", grid.clamp(0, 1), state.iteration)


def evaluate(state: TrainingState, io: RunIO) -> None:
    """Score G, append a metrics.jsonl row, snapshot G, keep best.pt."""
    cfg, it = state.cfg, state.iteration
    train_s = io.clock.seconds()
    with io.clock.paused():
        t0 = time.perf_counter()
        # Evaluation must not move training's RNG. Every rank calls the evaluator (it shards
        # the samples across ranks and gathers the features).
        cuda_devices = [state.device] if state.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices), local_norms(state):
            result = dict(
                io.evaluator(state.G, sample_mode=cfg.sample_mode, batch_size=cfg.batch_size)
            )
            generators = state.generator_payloads()  # G_ema made ready (normalization state) first
            if state.ema is not None:  # the same evaluation of G_ema: its own <metric>_ema columns
                result.update(
                    averaged_result(
                        io.evaluator(
                            state.ema.G_ema, sample_mode=cfg.sample_mode, batch_size=cfg.batch_size
                        )
                    )
                )
        row = {
            "iteration": it,
            "images_seen": state.images_seen,
            "sample_mode": cfg.sample_mode,
            "train_seconds": round(train_s, 3),
            **{
                k: v
                for k, v in result.items()
                if k not in ("iteration", "images_seen", "train_seconds")
            },
            "eval_seconds": round(time.perf_counter() - t0, 3),
            "env_key": io.env_key,
            "load_per_core": load_per_core(),
        }
        io.logger.metrics_row(row)
        names = _metric_names(io.evaluator, result)  # e.g. fid -> fid_10k, modes -> modes_26k
        io.logger.scalars(
            {
                f"metrics/{names[k]}": float(v)
                for k, v in result.items()
                if k in names and isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            it,
        )
        io.logger.scalars({"time/eval_seconds": row["eval_seconds"]}, it)
        snapshot = ckpt.generator_payload(
            state.G, cfg, it, state.images_seen, metrics=row, **generators
        )
        value = result.get(state.best["metric"])
        best = state.improves_best(value)
        if best:
            state.best.update(value=float(value), iteration=it)
        io.logger.evaluated(it, snapshot, best)
        io.logger.show(
            **{
                k: f"{v:.2f}" if isinstance(v, float) else str(v)
                for k, v in result.items()
                if k in METRICS and METRICS[k].headline and v is not None
            }
        )


def load_per_core() -> Optional[float]:
    """How busy the machine is: the 1-minute load average per CPU core (2 decimals), or None
    where the platform has no load average. ``compare`` warns about time figures from a loaded
    machine by it."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
    except (AttributeError, OSError):
        return None


def save(state: TrainingState, io: RunIO, evaluating: bool) -> None:
    """A full checkpoint (and a snapshot when there is no evaluation); prune old ones."""
    train_s = io.clock.seconds()
    with io.clock.paused():
        payload = state.checkpoint_payload(train_s)  # a collective under DDP; None off rank 0
        snapshot = None
        if payload is not None and not evaluating:  # no evaluation: the checkpoint's snapshot
            ema = {k: payload[k] for k in ("generator_ema",) if k in payload}
            snapshot = ckpt.generator_payload(
                state.G, state.cfg, state.iteration, state.images_seen, **ema
            )
        io.last_checkpoint = io.logger.checkpoint(
            state.iteration, payload, snapshot, state.cfg.keep_last
        )


def _metric_names(evaluator, result: dict) -> dict:
    """{result key: TensorBoard name with its sample count}: the evaluator's own names, or for an
    injected evaluator without them, every known metric (``metrics.METRICS``) of the result
    tagged with its sample count column."""
    if hasattr(evaluator, "metric_names"):
        return evaluator.metric_names(result)
    names = {}
    for k in (k for k in result if k in METRICS):
        suffix = EMA_SUFFIX if METRICS[k].averaged else ""
        names[k] = (
            f"{METRICS[k].plain_name}_{sample_count_tag(int(result.get(METRICS[k].count_key, 0)))}{suffix}"
        )
    return names
