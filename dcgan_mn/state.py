"""The training state: everything a full checkpoint holds, in one object.

``TrainingState`` owns the models, their optimizers, the loss scaler, the data order, the
logging window, the grid's fixed noise, the best evaluation so far, the iteration and the
training seconds. ``checkpoint_payload()`` and ``load_payload()`` are the full checkpoint's
schema, in one place:

    {"format": "dcgan_mn", "schema": 1, "kind": "full",
     "config": TrainConfig.to_dict(), "iteration": int, "images_seen": int,
     "generator", "discriminator", "opt_g", "opt_d": state dicts,
     "scaler": GradScaler state dict or None (fp16 only),
     "rng": {"torch", "cuda", "python", "numpy"}, "data": BatchSampler.state_dict(),
     "fixed_noise": [64, z_dim], "best": {"metric", "value", "iteration"},
     "train_seconds": float, "log_window": StepWindow.state_dict(),
     # with --g-ema (in snapshots too): "generator_ema": G_ema's state dict,
     # under torchrun only:
     "world_size": int, "ranks": [{"rng", "log_window", "buffers": {"generator", "discriminator"}}]}

Generator-only snapshots (``checkpoint.generator_payload``) hold the first block only.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import BatchSampler
from .distributed import SINGLE_PROCESS, DistInfo, all_gather_objects, broadcast_
from .ema import EmaSchedule, GeneratorEMA
from .models import Discriminator, Generator
from .step import StepWindow

__all__ = ["GRID_SIZE", "TrainingState", "seed_everything"]

GRID_SIZE = 64  # the fixed-noise sample grid is 8 x 8


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def fixed_noise(cfg: TrainConfig, device: torch.device) -> Tensor:
    """The grid's latents [64, z_dim]: from their own generator, so no other draw moves them."""
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    return torch.randn(GRID_SIZE, cfg.z_dim, generator=gen).to(device)


class TrainingState:
    """What a run is at one iteration; built from its config, then (resuming) from a payload."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        images: Tensor,
        *,
        amp: str,
        dist_info: DistInfo = SINGLE_PROCESS,
        best_metric: str = "fid",
    ) -> None:
        self.cfg, self.device, self.dist_info = cfg, device, dist_info
        # Under DDP every rank takes its slice of the same global batch (--batch-size is global).
        self.sampler = BatchSampler(
            images.to(device),
            cfg.batch_size,
            seed=cfg.seed,
            hflip=cfg.hflip,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )

        # Models, optimizers and the grid's noise, all from cfg.seed.
        seed_everything(cfg.seed)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.G = Generator(**cfg.model_kwargs()).to(device).to(memory_format=memory_format)
        self.D = Discriminator(cfg.ndf).to(device).to(memory_format=memory_format)
        # capturable: Adam's step counter lives on the GPU, as a CUDA graph (--compile) needs.
        capturable = cfg.compile and device.type == "cuda"
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(
            self.G.parameters(), lr=cfg.lr, betas=betas, capturable=capturable
        )
        self.opt_d = torch.optim.Adam(
            self.D.parameters(), lr=cfg.lr, betas=betas, capturable=capturable
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.fixed_noise = fixed_noise(cfg, device)  # [64, z_dim]
        # before DDP wraps them; parameters are shared, so the optimizers stay valid
        if cfg.sync_norm:
            from .sync import convert_sync_norms

            self.G, self.D = convert_sync_norms(self.G), convert_sync_norms(self.D)
        # The averaged generator: a copy of G (no random draw), updated inside the step.
        self.ema: Optional[GeneratorEMA] = None
        if cfg.g_ema > 0:
            self.ema = GeneratorEMA(
                self.G,
                EmaSchedule(cfg.g_ema, cfg.g_ema_rampup, cfg.g_ema_start),
                stats=cfg.g_ema_stats,
                standing_batches=cfg.g_ema_standing_batches,
                batch_size=self.sampler.local_batch,
            )
        # same weights everywhere, but each rank its own noise and k-means draws
        if dist_info.enabled:
            seed_everything(cfg.seed * 1_000_003 + 104_729 + dist_info.rank)

        self.window = StepWindow(device)  # loss_D, loss_G, D(x), D(G(z)) summed over the log window
        self.iteration = 0
        self.train_seconds = 0.0  # training-only seconds before this process started
        # The snapshot kept as best.pt: by --best-metric, else FID, or the mode classifier's cfd
        # when the evaluator has no Inception metrics (a stacked run without Inception weights).
        self.best: dict = {
            "metric": cfg.best_metric or best_metric,
            "value": None,
            "iteration": None,
        }

    @property
    def images_seen(self) -> int:
        return self.iteration * self.cfg.batch_size

    def improves_best(self, value: Optional[float]) -> bool:
        """Is ``value`` of the best metric a new best (in the metric's direction: lower FID and
        cfd, more modes)?"""
        from .metrics.specs import METRICS

        if value is None or not np.isfinite(value):
            return False
        spec = METRICS.get(self.best["metric"])
        if self.best["value"] is None:
            return True
        return (
            value > self.best["value"]
            if spec is not None and spec.higher_is_better
            else value < self.best["value"]
        )

    def generator_payloads(self) -> dict:
        """What every snapshot and checkpoint holds of the generators: G, and G_ema when there is
        one (its normalization state made ready first, so it is what was scored)."""
        if self.ema is None:
            return {}
        self.ema.ready_for_use(rank_buffers_from=broadcast_ if self.dist_info.enabled else None)
        return {"generator_ema": self.ema.state_dict()}

    # ---- the full checkpoint --------------------------------------------------------------------

    def checkpoint_payload(self, train_seconds: float) -> Optional[dict]:
        """The full checkpoint of this state (rank 0; None on the other ranks). Under DDP every
        rank's RNG states, logging window and running statistics are gathered (a collective:
        every rank calls this at the same iteration), so that resume is exact."""
        rng = ckpt.capture_rng_state(self.device)
        log_window = self.window.state_dict()
        generators = self.generator_payloads()  # every rank: copying G's buffers may broadcast
        ranks = None
        # running statistics are each rank's own (buffers are not synchronized)
        if self.dist_info.enabled:
            buffers = {
                "generator": {n: b.cpu() for n, b in self.G.named_buffers()},
                "discriminator": {n: b.cpu() for n, b in self.D.named_buffers()},
            }
            ranks = all_gather_objects({"rng": rng, "log_window": log_window, "buffers": buffers})
            if not self.dist_info.is_main:
                return None
        block = ckpt.generator_payload(
            self.G, self.cfg, self.iteration, self.images_seen, **generators
        )
        return ckpt.full_payload(
            block,
            ranks,
            discriminator=self.D.state_dict(),
            opt_g=self.opt_g.state_dict(),
            opt_d=self.opt_d.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            rng=rng,
            data=self.sampler.state_dict(),
            fixed_noise=self.fixed_noise.cpu(),
            best=dict(self.best),
            train_seconds=train_seconds,
            log_window=log_window,
        )

    def load_payload(self, payload: dict) -> None:
        """Continue from a full checkpoint: weights, optimizers, data order, the logging window,
        the best so far, and last (set-up drew random numbers) every RNG state."""
        saved = ckpt.full_checkpoint(
            payload, self.dist_info.rank if self.dist_info.enabled else None
        )
        self.G.load_state_dict(saved.generator)
        if self.ema is not None:
            self.ema.load_state_dict(saved.generator_ema)
        self.D.load_state_dict(saved.discriminator)
        self.opt_g.load_state_dict(saved.opt_g)
        self.opt_d.load_state_dict(saved.opt_d)
        if saved.scaler is not None:
            self.scaler.load_state_dict(saved.scaler)
        self.sampler.load_state_dict(saved.data)
        self.fixed_noise = saved.fixed_noise.to(self.device)
        if saved.best.get("metric", self.best["metric"]) == self.best["metric"]:
            self.best = {**self.best, **saved.best}
        self.iteration = saved.iteration
        self.train_seconds = saved.train_seconds
        self.window.load_state_dict(saved.log_window)  # this rank's streams
        ckpt.restore_rng_state(saved.rng, self.device)

    def restore_rank_buffers(self, payload: dict) -> None:
        """DDP copied rank 0's buffers when it wrapped the models: put back this rank's own."""
        saved = ckpt.full_checkpoint(payload, self.dist_info.rank).buffers
        with torch.no_grad():
            for model, part in ((self.G, "generator"), (self.D, "discriminator")):
                for name, buf in model.named_buffers():
                    buf.copy_(saved[part][name])
