"""The training loop: ``train(cfg)`` trains the DCGAN and leaves a run folder.

One iteration = one discriminator step then one generator step on ``cfg.batch_size`` images;
progress is counted in iterations (generator updates, the paper's unit) and images seen.

The loop never waits for the device except when it has to: losses and D outputs are summed
into a device tensor and read once per ``--log-every`` iterations; MN telemetry is read at the
same time. Evaluation, sample grids and checkpoint writes pause the training clock, so
``train_seconds`` is training time only, carried across resumes.

A run stopped at iteration t (by ``--iters``, SIGINT or SIGTERM) and resumed from its checkpoint
continues exactly as if it had not stopped: the checkpoint holds every random-number state, the
data order, the optimizers and the half-filled logging window.

Under ``torchrun`` the same loop runs on every rank with G and D wrapped in DDP: ``--batch-size``
is the global batch (each rank takes its slice), each rank has its own noise and k-means random
stream, rank 0 alone writes files, all ranks evaluate together and agree on when a signal stops
the run; checkpoints hold every rank's RNG states and running statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, default_run_name, resume_config
from .data import BatchSampler, load_dataset
from . import distributed as dist_utils
from .device import AMP_DTYPES, launched_with_torchrun, resolve_amp, resolve_device
from .distributed import DistInfo
from .log import RunLogger, write_hparams
from .models import Discriminator, Generator
from .norms import MixtureNorm2d
from .step import StepWindow, TrainStep
from .provenance import environment, record_environment
from .runfolder import RunFolder, resolve_resume

__all__ = [
    "Evaluator",
    "TrainResult",
    "resolve_device",
    "resolve_run_dir",
    "load_resume",
    "check_launch",
    "check_world_size",
    "decided_on_main",
    "train",
]

# --compile uses TorchInductor; DCGAN_MN_COMPILE_BACKEND picks another torch.compile backend
# (e.g. "aot_eager" to check a model traces without building kernels, or "cudagraphs").

# evaluator(generator, *, sample_mode, batch_size) -> {"fid": float, "num_samples": int, ...}
Evaluator = Callable[..., dict]

GRID_SIZE = 64  # the fixed-noise sample grid is 8 x 8
# Evaluator keys that are bookkeeping, not curves worth a TensorBoard scalar.
_NOT_METRICS = {"num_samples", "metric_samples", "batch_size", "seed", "dims", "prdc_k",
                "eval_seconds", "iteration", "images_seen", "train_seconds"}


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


# --------------------------------------------------------------------------------------------
# Set-up helpers (nothing here writes a file)
# --------------------------------------------------------------------------------------------


def resolve_run_dir(cfg: TrainConfig) -> tuple[TrainConfig, Path]:
    """(cfg with its run name filled in, the new run's folder), refusing an existing run."""
    out = Path(cfg.out).expanduser()
    if cfg.run_name is None:
        base = default_run_name(cfg)
        name, n = base, 1
        while (out / name).exists():  # two runs started in the same second
            n += 1
            name = f"{base}-{n}"
        cfg = cfg.replace(run_name=name)
    if not cfg.run_name or Path(cfg.run_name).name != cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(f"--run-name {cfg.run_name!r}: must be a plain folder name")
    run_dir = out / cfg.run_name
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(
            f"--run-name {cfg.run_name!r}: {run_dir} already exists; continue that run with "
            f"--resume {run_dir}, or choose another --run-name"
        )
    return cfg, run_dir


def load_resume(target: Union[str, Path]) -> tuple[Path, Optional[Path], Optional[dict], TrainConfig]:
    """(run folder, checkpoint path, checkpoint dict, its config) for ``--resume TARGET``.

    A run folder with its ``config.json`` but no checkpoint yet (a run killed before its first
    one) gives (folder, None, None, that config): the run restarts from iteration 0."""
    folder = RunFolder(Path(target).expanduser())
    if folder.path.is_dir() and not folder.checkpoints() and folder.config_file.is_file():
        from .config import config_from_dict

        try:
            cfg = config_from_dict(folder.read_config())
        except (ValueError, ConfigError) as e:
            raise ckpt.CheckpointError(f"--resume {str(target)!r}: no checkpoint, and its {RunFolder.CONFIG} "
                                       f"is unreadable ({e})") from None
        return folder.path, None, None, cfg
    folder, path = resolve_resume(target)
    payload = ckpt.load_checkpoint(path, map_location="cpu")
    if payload["kind"] != "full":
        raise ckpt.CheckpointError(
            f"--resume {str(target)!r}: a generator-only snapshot cannot be resumed; use a "
            f"full checkpoint (ckpt-*.pt) or the run folder"
        )
    newer = [p.name for i, p in folder.checkpoints() if i > payload["iteration"]]
    if newer:
        raise ckpt.CheckpointError(
            f"--resume {str(target)!r}: the run folder has newer checkpoints ({', '.join(newer)}); "
            f"resume the folder itself, or copy this checkpoint into a new folder to branch off"
        )
    cfg = ckpt.checkpoint_config(payload, path)
    ckpt.build_generator(cfg, payload["generator"], path)  # weights that fit the config's model
    ckpt.check_discriminator(cfg, payload["discriminator"], path)
    return folder.path, path, payload, cfg


def check_launch(cfg: TrainConfig, dist: DistInfo) -> None:
    """Flags that depend on how the processes were launched (one line naming the flag)."""
    if cfg.sync_norm and not launched_with_torchrun():
        raise ConfigError("--sync-norm: synchronizing norm statistics needs a distributed launch "
                          "(torchrun --nproc_per_node N train.py ...)")
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size}: not divisible by the world size "
                          f"{dist.world_size} (torchrun processes); it is the global batch")


def decided_on_main(dist: DistInfo, decide: Callable[[], Any]) -> Any:
    """``decide()`` on rank 0, its result (or its error) on every rank.

    Used for what must agree and may race: the run folder's name (it holds the start time) and
    the check that it does not exist yet (rank 0 creates it)."""
    if not dist.enabled:
        return decide()
    outcome = None
    if dist.is_main:
        try:
            outcome = ("ok", decide())
        except (ConfigError, ckpt.CheckpointError) as e:
            outcome = ("error", e)
    kind, value = dist_utils.broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def check_world_size(payload: Optional[dict], dist: DistInfo, target: Union[str, Path]) -> None:
    """A checkpoint resumes exactly only on the world size that wrote it (per-rank RNG states
    and running statistics, per-rank batch slices)."""
    if payload is None:  # restarting from iteration 0: any world size
        return
    saved = int(payload.get("world_size", 1))
    if saved != dist.world_size:
        raise ConfigError(
            f"--resume {str(target)!r}: the run was trained on world size {saved} (processes), "
            f"this launch has {dist.world_size}; resume it with torchrun --nproc_per_node {saved} "
            f"(or without torchrun when it is 1)"
        )


def _metric_names(evaluator, result: dict) -> dict:
    """{result key: TensorBoard name with its sample count}: the evaluator's own names, or for an
    injected evaluator without them, every numeric key tagged with ``num_samples``."""
    if hasattr(evaluator, "metric_names"):
        return evaluator.metric_names(result)
    from .metrics import sample_count_tag  # e.g. 10000 -> "10k"

    tag = sample_count_tag(int(result.get("num_samples", 0)))
    return {k: f"{k}_{tag}" for k in result if k not in _NOT_METRICS}


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _fixed_noise(cfg: TrainConfig, device: torch.device) -> Tensor:
    """The grid's latents [64, z_dim]: from their own generator, so no other draw moves them."""
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    return torch.randn(GRID_SIZE, cfg.z_dim, generator=gen).to(device)


class _Clock:
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


def run_hparams(cfg: TrainConfig, generator: Generator) -> dict:
    """What the HParams dashboard shows of a run's settings: the generator's norm per layer
    (``norms``: "mn,mn,bn", layer 0 first), K, the seed and the dataset, then MN's readings
    (estimator, point, posterior_grad, lambda_scale). Few on purpose: TensorBoard's table shows the
    first hparams only until more are ticked."""
    norms = ",".join("mn" if isinstance(layer, MixtureNorm2d) else "bn" for layer in generator.norm_layers)
    return {"dataset": cfg.dataset, "mn_components": cfg.mn_components, "norms": norms, "seed": cfg.seed,
            "mn_estimator": cfg.mn_estimator, "mn_point": cfg.mn_point, "mn_posterior_grad": cfg.mn_posterior_grad,
            "mn_lambda_scale": cfg.mn_lambda_scale}


def run_outcome(rows: list[dict], directions: dict, iteration: int) -> dict:
    """``{"hparams/best_<m>": ..., "hparams/final_<m>": ...}`` for every evaluated metric m, over
    the run's ``metrics.jsonl`` rows up to ``iteration`` (best by the metric's direction), plus
    the iteration reached."""
    out: dict[str, float] = {"hparams/iteration": float(iteration)}
    rows = [r for r in rows if r.get("iteration", 0) <= iteration]
    for metric, direction in directions.items():
        values = [float(r[metric]) for r in rows if isinstance(r.get(metric), (int, float))
                  and math.isfinite(r[metric])]
        if values:
            out[f"hparams/best_{metric}"] = max(values) if direction == "max" else min(values)
            out[f"hparams/final_{metric}"] = values[-1]
    return out


class _StopOnSignals:
    """SIGINT / SIGTERM set a flag that the loop checks after each iteration; the loop then
    saves a checkpoint and returns. A second signal acts as usual (KeyboardInterrupt / exit),
    except under torchrun (``keep_deferring``): Ctrl-C reaches a worker twice there (from the
    terminal and forwarded by torchrun), and torchrun itself escalates to SIGKILL if need be."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, keep_deferring: bool = False) -> None:
        self.received: Optional[str] = None
        self.keep_deferring = keep_deferring
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and self.keep_deferring:
            return
        self.received = signal.Signals(signum).name
        if not self.keep_deferring:
            for sig, handler in self._previous.items():  # the next one is not deferred
                signal.signal(sig, handler)

    def __enter__(self) -> "_StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _agreed_stop(stop: "_StopOnSignals", dist: DistInfo, device: torch.device) -> Optional[str]:
    """The signal that stops the run; under DDP the ranks agree (a 1-number all-reduce per
    iteration), so that all of them stop, and save, at the same iteration."""
    if not dist.enabled:
        return stop.received
    signum = signal.Signals[stop.received].value if stop.received else 0
    agreed = dist_utils.all_reduce_max(torch.tensor([signum], device=device))
    return signal.Signals(int(agreed.item())).name if agreed.item() else None


def _first_nonfinite(window: StepWindow, models: tuple, iteration: int, dist: DistInfo) -> Optional[int]:
    """The first iteration whose losses or D outputs were not finite, or None (one host read).
    With ``models``: also their parameters (before an evaluation or a checkpoint reads them),
    counted as non-finite at ``iteration``. Under DDP any rank's counts."""
    flag = window.first_nonfinite
    if models:
        params = [p for m in models for p in m.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
        flag = torch.where(finite | (flag >= 0), flag, iteration)
    if dist.enabled:
        flag = dist_utils.all_reduce_max(flag.reshape(1))[0]
    value = int(flag.item())
    return value if value >= 0 else None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    evaluator: Optional[Evaluator] = None,
    resume: Union[str, Path, None] = None,
    images: Optional[Tensor] = None,
    progress: bool = True,
    step_hook: Optional[Callable[[int, Any, Any], None]] = None,
) -> TrainResult:
    """Train per ``cfg`` and return where the run stands.

    ``evaluator(generator, *, sample_mode, batch_size) -> {"fid": ..., "num_samples": ..., ...}``
    is called every ``cfg.fid_every`` iterations (and at the end); without one, nothing is
    evaluated. ``resume``: a run folder or full checkpoint to continue (``cfg`` must agree with
    its config on everything in ``config.RESUME_FIXED``). ``images``: uint8 [N, 3, 32, 32]
    training images, instead of loading ``cfg.dataset``. ``step_hook(iteration, G, D)`` runs after
    every iteration (tests inject faults with it, e.g. a NaN weight).

    Non-finite losses or D outputs stop the run (``stopped_by="non-finite"``) at the next log
    window, evaluation or checkpoint, whichever comes first (the check reads one device flag
    there, never per iteration): nothing is written from the non-finite state, so every
    checkpoint on disk stays finite and none is pruned.
    """
    # ---- Decide the run folder and read what we resume from. Nothing is written yet, so any
    # ---- bad input below leaves existing runs untouched.
    payload = None
    restarting = False  # --resume of a claimed folder that never wrote a checkpoint
    dist = dist_utils.init_distributed(resolve_device(cfg.device))  # DistInfo() without torchrun
    if resume is not None:
        run_dir, _, payload, saved = load_resume(resume)
        restarting = payload is None
        check_world_size(payload, dist, resume)
        if payload is not None and cfg.iters < payload["iteration"]:
            raise ConfigError(f"--iters {cfg.iters}: the resumed run is already at iteration "
                              f"{payload['iteration']}")
        changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                   if f.name not in ("out", "run_name", "extra")
                   and getattr(cfg, f.name) != getattr(saved, f.name)}
        cfg = resume_config(saved, changed).replace(out=str(run_dir.parent), run_name=run_dir.name)
    else:
        cfg, run_dir = decided_on_main(dist, lambda: resolve_run_dir(cfg))
    device = resolve_device(cfg.device)
    check_launch(cfg, dist)
    amp, amp_warning = resolve_amp(cfg.amp, device)
    if amp_warning and dist.is_main:
        print(f"warning: {amp_warning}", file=sys.stderr)
    if images is None:
        images = load_dataset(cfg)  # uint8 [N, 3, 32, 32]
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ConfigError(f"training images must be uint8 [N, 3, 32, 32], got {images.dtype} {tuple(images.shape)}")
    # Under DDP every rank takes its slice of the same global batch (--batch-size is global).
    sampler = BatchSampler(images.to(device), cfg.batch_size, seed=cfg.seed, hflip=cfg.hflip,
                           rank=dist.rank, world_size=dist.world_size)
    cfg = cfg.replace(extra={**cfg.extra, "device": str(device), "torch": str(torch.__version__),
                             "amp": amp, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "num_train_images": int(images.shape[0])})
    if dist.enabled:
        cfg = cfg.replace(extra={**cfg.extra, "world_size": dist.world_size})

    # ---- Build the models, the optimizers and the fixed grid noise, all from cfg.seed.
    _seed_everything(cfg.seed)
    G = Generator(**cfg.model_kwargs()).to(device)
    D = Discriminator(cfg.ndf).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    G.to(memory_format=memory_format)
    D.to(memory_format=memory_format)
    # capturable: Adam's step counter lives on the GPU, as a CUDA graph (--compile) needs.
    capturable = cfg.compile and device.type == "cuda"
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), capturable=capturable)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), capturable=capturable)
    amp_dtype = AMP_DTYPES[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    fixed_noise = _fixed_noise(cfg, device)  # [64, z_dim]
    if cfg.sync_norm:  # before DDP wraps them; parameters are shared, so the optimizers stay valid
        from .sync import convert_sync_norms

        G, D = convert_sync_norms(G), convert_sync_norms(D)
    if dist.enabled:  # same weights everywhere, but each rank its own noise and k-means draws
        _seed_everything(cfg.seed * 1_000_003 + 104_729 + dist.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels

    # ---- Restore the state of the run we resume (weights, optimizers, RNGs, data order).
    iteration = 0
    # The snapshot kept as best.pt: by FID, or by the mode classifier's cfd when the evaluator
    # has no Inception metrics (a stacked run without Inception weights).
    best_metric = getattr(evaluator, "primary_metric", "fid") if evaluator is not None else "fid"
    best = {"metric": best_metric, "value": None, "iteration": None}
    window = StepWindow(device)  # loss_D, loss_G, D(x), D(G(z)) summed over the log window
    train_seconds = 0.0
    if payload is not None:
        G.load_state_dict(payload["generator"])
        D.load_state_dict(payload["discriminator"])
        opt_g.load_state_dict(payload["opt_g"])
        opt_d.load_state_dict(payload["opt_d"])
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        sampler.load_state_dict(payload["data"])
        fixed_noise = payload["fixed_noise"].to(device)
        saved_best = dict(payload.get("best") or {})
        if "fid" in saved_best and "value" not in saved_best:  # checkpoints before best_metric
            saved_best = {"metric": "fid", "value": saved_best["fid"], "iteration": saved_best["iteration"]}
        if saved_best.get("metric", best_metric) == best_metric:
            best = {**best, **saved_best}
        iteration = int(payload["iteration"])
        train_seconds = float(payload.get("train_seconds", 0.0))
        # Every rank's own RNG streams and logging window under DDP.
        window.load_state_dict(payload["ranks"][dist.rank]["log_window"] if dist.enabled
                               else payload.get("log_window") or {})
        rng = payload["ranks"][dist.rank]["rng"] if dist.enabled else payload["rng"]
        ckpt.restore_rng_state(rng, device)  # last: set-up above drew random numbers

    # ---- Open the run folder: config, TensorBoard, metrics.jsonl, progress bar.
    # ---- Rank 0 alone writes files; the other ranks' logger is silent.
    dropped = 0
    env_key = None  # the environment every metrics row of this process points to
    folder = RunFolder(run_dir)
    lock = folder.claim()  # held by rank 0 until the run ends; a second process stops here
    if dist.is_main:
        if payload is None and not restarting:
            folder.create()  # one mkdir: of two runs racing for a name, one wins
        lock.acquire()
        folder.write_config(cfg.to_dict())
        if payload is not None or restarting:
            dropped = folder.drop_metrics_after(iteration)
        env_key = record_environment(folder, environment(device), iteration)
    logger = RunLogger(folder, total_iters=cfg.iters, start_iter=iteration,
                       purge_step=iteration + 1 if payload is not None or restarting else None, progress=progress,
                       enabled=dist.is_main)
    if payload is not None:
        logger.message(f"resuming {run_dir} at iteration {iteration}"
                       + (f" (dropped {dropped} metrics rows written after that checkpoint)" if dropped else ""))
    elif restarting:
        logger.message(f"{run_dir} has no checkpoint yet: restarting it from iteration 0 with its saved config"
                       + (f" (dropped {dropped} metrics rows)" if dropped else ""))
        logger.text("config", "    " + cfg.to_json().replace("\n", "\n    "))
    else:
        logger.text("config", "    " + cfg.to_json().replace("\n", "\n    "))  # markdown code block

    # The step functions may be DDP-wrapped and compiled; sampling, state dicts, telemetry and
    # evaluation use the plain G and D. forward_sync_buffers=False: each rank keeps the running
    # statistics of its own batches (rank 0's are checkpointed); --sync-norm makes them agree.
    G_train, D_train = G, D
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [device.index] if device.type == "cuda" else None
        G_train = DDP(G, device_ids=device_ids, forward_sync_buffers=False)
        D_train = DDP(D, device_ids=device_ids, forward_sync_buffers=False)
        if payload is not None:  # DDP copied rank 0's buffers: put back this rank's own
            saved_buffers = payload["ranks"][dist.rank]["buffers"]
            with torch.no_grad():
                for model, part in ((G, "generator"), (D, "discriminator")):
                    for name, buf in model.named_buffers():
                        buf.copy_(saved_buffers[part][name])

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # One iteration as one function; --compile makes it one graph (G and D separately where
    # DDP or fp16 loss scaling need backward()).
    train_step = TrainStep(G, D, opt_g, opt_d, autocast=autocast, scaler=scaler,
                           capturable=not dist.enabled, G_forward=G_train, D_forward=D_train,
                           D_frozen=D if dist.enabled else None)
    if cfg.compile:
        train_step.compile(cfg.compile_mode, backend=os.environ.get("DCGAN_MN_COMPILE_BACKEND", "inductor"))
    # Grids and evaluation run G on some ranks only or on uneven shares: no collectives there.
    if cfg.sync_norm:
        from .sync import unsynchronized as local_norms
    else:
        local_norms = contextlib.nullcontext
    evaluating = evaluator is not None and cfg.fid_every > 0
    cuda_devices = [device] if device.type == "cuda" else []
    clock = _Clock(train_seconds)
    last_ckpt: Optional[Path] = None
    last_log: dict = {}
    window_start = (time.perf_counter(), iteration)

    def due(every: int) -> bool:
        return every > 0 and iteration % every == 0

    def write_logs() -> None:
        """Read the window's device sums (the one sync per --log-every) and log them."""
        nonlocal window_start, last_log
        window_means = window.take_means()  # [4]
        if dist.enabled:  # the mean over ranks (every rank gets here at the same iteration)
            window_means = dist_utils.all_reduce_sum(window_means) / dist.world_size
        loss_d, loss_g, d_real, d_fake = window_means.tolist()
        now = time.perf_counter()
        it_per_s = (iteration - window_start[1]) / max(now - window_start[0], 1e-9)
        window_start = (now, iteration)
        last_log = {"loss_D": loss_d, "loss_G": loss_g, "D_x": d_real, "D_G_z": d_fake}
        values = {"loss/D": loss_d, "loss/G": loss_g, "D/real": d_real, "D/fake": d_fake,
                  "time/it_per_s": it_per_s, "time/images_per_s": it_per_s * cfg.batch_size,
                  "time/train_seconds": clock.seconds(), "progress/images_seen": iteration * cfg.batch_size,
                  "progress/epoch": sampler.epoch}
        for i, layer in enumerate(G.norm_layers):  # MN telemetry, per MN layer
            if isinstance(layer, MixtureNorm2d):
                t = layer.telemetry()
                if t:
                    values[f"mn/layer{i}/posterior_entropy"] = t["posterior_entropy"].item()
                    values[f"mn/layer{i}/effective_components"] = t["effective_components"].item()
                    weights = sorted(t["mixture_weight"].tolist(), reverse=True)  # unlabelled: sort
                    for k, w in enumerate(weights):
                        values[f"mn/layer{i}/weight_sorted_{k}"] = w
        logger.scalars(values, iteration)
        logger.show(D=f"{loss_d:.3f}", G=f"{loss_g:.3f}", Dx=f"{d_real:.2f}", DGz=f"{d_fake:.2f}")

    def write_grid() -> None:
        """The fixed-noise 8x8 grid in the configured sample mode (buffers and RNG untouched)."""
        from torchvision.utils import make_grid

        if not dist.is_main:
            return
        with clock.paused(), local_norms(G):
            fake = G.sample(fixed_noise, mode=cfg.sample_mode, batch_size=cfg.batch_size)  # [64, 3, 32, 32]
            grid = make_grid(fake.float().cpu() * 0.5 + 0.5, nrow=8, padding=2)  # [3, 274, 274]
            logger.image(f"samples/{cfg.sample_mode}", grid.clamp(0, 1), iteration)

    def evaluate() -> None:
        """Score G, append a metrics.jsonl row, snapshot G, keep best.pt."""
        train_s = clock.seconds()
        with clock.paused():
            t0 = time.perf_counter()
            # Evaluation must not move training's RNG. Every rank calls the evaluator (it shards
            # the samples across ranks and gathers the features).
            with torch.random.fork_rng(devices=cuda_devices), local_norms(G):
                result = dict(evaluator(G, sample_mode=cfg.sample_mode, batch_size=cfg.batch_size))
            row = {"iteration": iteration, "images_seen": iteration * cfg.batch_size,
                   "sample_mode": cfg.sample_mode, "train_seconds": round(train_s, 3),
                   **{k: v for k, v in result.items() if k not in ("iteration", "images_seen", "train_seconds")},
                   "eval_seconds": round(time.perf_counter() - t0, 3), "env_key": env_key}
            logger.metrics_row(row)
            names = _metric_names(evaluator, result)  # e.g. fid -> fid_10k, modes -> modes_26k
            logger.scalars({f"metrics/{names[k]}": float(v) for k, v in result.items() if k in names
                            and isinstance(v, (int, float)) and not isinstance(v, bool)}, iteration)
            logger.scalars({"time/eval_seconds": row["eval_seconds"]}, iteration)
            snapshot = ckpt.generator_payload(G, cfg, iteration, iteration * cfg.batch_size, metrics=row)
            if dist.is_main:
                folder.save_snapshot(iteration, snapshot)
            value = result.get(best_metric)
            if value is not None and math.isfinite(value) and (best["value"] is None or value < best["value"]):
                best.update(value=float(value), iteration=iteration)
                if dist.is_main:
                    folder.save_best(snapshot)
            for key in ("fid", "modes", "cfd"):
                if result.get(key) is not None:
                    logger.show(**{key: f"{result[key]:.2f}" if key != "modes" else str(result[key])})

    def save() -> Path:
        """A full checkpoint (and a snapshot when there is no evaluation); prune old ones."""
        train_s = clock.seconds()
        with clock.paused():
            path = folder.checkpoint_file(iteration)
            rng = ckpt.capture_rng_state(device)
            log_window = window.state_dict()
            ranks = None
            if dist.enabled:  # every rank's RNG and logging window, so that resume is exact
                # Running statistics are each rank's own (buffers are not synchronized).
                buffers = {"generator": {n: b.cpu() for n, b in G.named_buffers()},
                           "discriminator": {n: b.cpu() for n, b in D.named_buffers()}}
                ranks = dist_utils.all_gather_objects(
                    {"rng": rng, "log_window": log_window, "buffers": buffers})
                if not dist.is_main:
                    return path
            payload = ckpt.generator_payload(G, cfg, iteration, iteration * cfg.batch_size)
            payload.update(
                kind="full", discriminator=D.state_dict(), opt_g=opt_g.state_dict(),
                opt_d=opt_d.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else None,
                rng=rng, data=sampler.state_dict(),
                fixed_noise=fixed_noise.cpu(), best=dict(best), train_seconds=train_s,
                log_window=log_window,
            )
            if dist.enabled:
                payload.update(world_size=dist.world_size, ranks=ranks)
            path = folder.save_checkpoint(iteration, payload)
            if not evaluating:
                folder.save_snapshot(iteration, ckpt.generator_payload(G, cfg, iteration,
                                                                       iteration * cfg.batch_size))
            folder.prune_checkpoints(cfg.keep_last)  # after its successor is durably written
            return path

    # ---- Train: one D step then one G step per iteration, until cfg.iters or a signal.
    start_iteration = iteration
    stop = _StopOnSignals(keep_deferring=dist.enabled)

    stopping: Optional[str] = None
    nonfinite_at: Optional[int] = None
    try:
        with stop:
            stopping = _agreed_stop(stop, dist, device)
            while iteration < cfg.iters and stopping is None:
                real = sampler.next()  # [b, 3, 32, 32] in [-1, 1], on device; b = B / world size
                if cfg.channels_last:
                    real = real.contiguous(memory_format=torch.channels_last)
                z = torch.randn(sampler.local_batch, cfg.z_dim, device=device)  # [b, z_dim]

                # One D step then one G step (dcgan_mn.step); the outputs stay on the device.
                out = train_step(real, z)
                iteration += 1
                stopping = _agreed_stop(stop, dist, device)
                if step_hook is not None:
                    step_hook(iteration, G, D)
                window.add(out, iteration)  # summed on the device; read every --log-every
                logger.advance()
                # Before anything reads or writes this state: is it still finite?
                writes = (evaluating and due(cfg.fid_every)) or due(cfg.ckpt_every) or stopping is not None
                if writes or due(cfg.log_every):
                    nonfinite_at = _first_nonfinite(window, (G, D) if writes else (), iteration, dist)
                    if nonfinite_at is not None:
                        break
                if due(cfg.log_every):
                    write_logs()
                if due(cfg.sample_every):
                    write_grid()
                if evaluating and due(cfg.fid_every):
                    evaluate()
                if due(cfg.ckpt_every) or stopping is not None:
                    last_ckpt = save()

            # ---- The end of the run: a last grid, evaluation and checkpoint where they are due.
            if nonfinite_at is None:
                nonfinite_at = _first_nonfinite(window, (G, D), iteration, dist)
            if nonfinite_at is not None:
                stopping = "non-finite"
            finished = stopping is None
            if finished and iteration > start_iteration:
                if cfg.sample_every > 0 and not due(cfg.sample_every):
                    write_grid()
                if evaluating and not due(cfg.fid_every):
                    evaluate()
            if nonfinite_at is None and (last_ckpt is None
                                         or folder.checkpoint_file(iteration) != last_ckpt):
                if iteration > start_iteration or payload is None:
                    last_ckpt = save()
    finally:
        logger.close()
        lock.release()
    if dist.is_main and evaluating:
        directions = getattr(evaluator, "directions", None) or {best_metric: "min"}
        write_hparams(folder, run_hparams(cfg, G),
                      run_outcome(folder.metrics_rows(), directions, iteration))
    if nonfinite_at is not None:
        newest = folder.latest_checkpoint()
        logger.message(f"non-finite losses or D outputs at iteration {nonfinite_at} (noticed at "
                       f"{iteration}): stopped without writing; newest finite checkpoint: {newest}")
    elif stopping is not None:
        logger.message(f"{stopping}: stopped at iteration {iteration}; checkpoint {last_ckpt}; "
                       f"continue with: python train.py --resume {run_dir}")
    return TrainResult(
        run_dir=run_dir, config=cfg, iteration=iteration, images_seen=iteration * cfg.batch_size,
        train_seconds=clock.seconds(), stopped_by=stopping, checkpoint=last_ckpt,
        best_metric=best["metric"], best_value=best["value"], best_iteration=best["iteration"],
        last_log=last_log,
    )
