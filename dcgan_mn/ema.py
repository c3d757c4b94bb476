"""The averaged generator (``--g-ema``): an exponential moving average of G's weights, and what
its normalization layers normalize with.

**Weights.** After every generator update, G_ema <- decay * G_ema + (1 - decay) * G, the update
of ``torch.optim.swa_utils.AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(decay))`` (one
``_foreach_lerp_``; tested equal to it, bitwise). The decay comes from a half-life in iterations,
as StyleGAN2-ADA's ``ema_kimg`` (in images) with its ramp-up and StudioGAN's start iteration
(``EmaSchedule``). The update runs on the device: the lerp weight lives in a device tensor that
is filled before each step (an asynchronous fill, no host read), so the update can sit inside
the compiled, CUDA-graph-captured training step without a recompilation per step.

**Normalization state.** Averaging weights does not average BatchNorm's running statistics, and
the statistics G collected describe G's activations, not G_ema's. Two answers, ``--g-ema-stats``:

* ``copy`` (StyleGAN): G_ema's buffers are G's (running means and variances, MN's running
  mixture, Mode Normalization's per-mode statistics). Copied whenever G_ema is used (grids,
  evaluation, checkpoints) rather than every step: the same buffers at every use, no per-step cost.
* ``standing`` (BigGAN's "standing statistics"): before each use, every norm layer's running
  statistics are reset and recomputed as a cumulative average (``momentum=None``) over
  ``--g-ema-standing-batches`` batches of G_ema's own activations in training mode, from fixed
  latents. For BatchNorm this is ``torch.optim.swa_utils.update_bn`` (tested equal); MN folds each
  batch's matched mixture into its running mixture exactly as training does, and Mode
  Normalization its per-mode statistics.

In ``--sample-mode batch`` (the default) G_ema normalizes with its own batch statistics and neither
choice changes a number; they differ in ``running`` mode. ``copy`` is the default: measured on
stacked digits (``bench/bench_ema_stats.py``), it scored far better for MN(0,1) in running mode and
standing statistics only slightly better for BatchNorm (docs/training.md). Nothing here draws from the training RNG:
the standing pass forks it and seeds its own streams, so a run with ``--g-ema`` trains bitwise as
the same run without it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "EMA_STATS",
    "EmaSchedule",
    "GeneratorEMA",
    "norm_layers_with_stats",
    "standing_statistics",
]

# how G_ema's norm layers get their running statistics (default first)
EMA_STATS = ("copy", "standing")
STANDING_SEED = 6_700_417  # latents and k-means draws of the standing-statistics pass


@dataclass(frozen=True)
class EmaSchedule:
    """The EMA decay at each iteration.

    ``half_life``: iterations after which a weight's share of the average has halved;
    ``rampup``: when > 0, the half-life at iteration t is at most ``rampup * (t - start)``
    (StyleGAN2-ADA's ``ema_rampup``: early on, the average forgets fast); ``start``: before this
    iteration G_ema simply copies G (StudioGAN's ``g_ema_start``)."""

    half_life: float
    rampup: float = 0.0
    start: int = 0

    def decay(self, iteration: int) -> float:
        """The decay of the update that follows generator update number ``iteration + 1`` (``iteration``
        updates done before it, as StyleGAN counts ``cur_nimg`` before the step)."""
        if iteration < self.start:
            return 0.0
        half_life = self.half_life
        if self.rampup > 0:
            half_life = min(half_life, self.rampup * (iteration - self.start))
        return 0.5 ** (1.0 / half_life) if half_life > 0 else 0.0


def norm_layers_with_stats(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that keep running statistics: BatchNorm, MN, Mode Normalization."""
    from .norms.module import _ComponentNormBase

    return [
        m
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, _ComponentNormBase))
        and m.track_running_stats
    ]


@torch.no_grad()
def standing_statistics(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Recompute every norm layer's running statistics as the cumulative average over ``batches``
    of inputs in training mode: ``torch.optim.swa_utils.update_bn`` for BatchNorm, and the same
    recipe for MN and Mode Normalization (reset, ``momentum=None``, forward, momentum back)."""
    layers = norm_layers_with_stats(model)
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)


class GeneratorEMA:
    """G_ema, a frozen copy of G that follows G's weights through ``EmaSchedule``.

    ``prepare(iteration)`` (host side, before a step) fills the device lerp weight for the
    update that follows; ``update()`` (inside the step, after G's optimizer) moves G_ema towards
    G; ``ready_for_use()`` gives G_ema its normalization state (``stats``) before it is sampled or
    saved. ``state_dict`` / ``load_state_dict`` are G_ema's module state (what a checkpoint holds)."""

    def __init__(
        self,
        G: nn.Module,
        schedule: EmaSchedule,
        *,
        stats: str = "copy",
        standing_batches: int = 16,
        batch_size: int = 64,
    ) -> None:
        if stats not in EMA_STATS:
            raise ValueError(f"stats must be one of {EMA_STATS}, got {stats!r}")
        self.G = G
        self.G_ema = copy.deepcopy(G).requires_grad_(False)  # [same architecture, own storage]
        self.schedule = schedule
        self.stats = stats
        self.standing_batches = standing_batches
        self.batch_size = batch_size
        device = next(G.parameters()).device
        self.weight = torch.ones((), device=device)  # 1 - decay of the next update (1: copy G)
        self._ema_params = [p for p in self.G_ema.parameters()]
        self._params = [p for p in G.parameters()]

    def prepare(self, iteration: int) -> None:
        """Set the next update's weight from the schedule (a device fill: no host read)."""
        self.weight.fill_(1.0 - self.schedule.decay(iteration))

    @torch.no_grad()
    def update(self) -> None:
        """G_ema <- lerp(G_ema, G, 1 - decay): AveragedModel's EMA update, with a device weight."""
        torch._foreach_lerp_(
            self._ema_params, [p.detach() for p in self._params], [self.weight] * len(self._params)
        )

    # ---- normalization state ---------------------------------------------------------------------

    def ready_for_use(self, *, rank_buffers_from: Optional[callable] = None) -> None:
        """Give G_ema's norm layers their running statistics (``stats``): G's, or standing ones.

        ``rank_buffers_from``: under torchrun, a function that broadcasts a tensor from rank 0, so
        that every rank holds rank 0's buffers (each rank's G keeps the statistics of its own
        batches; the standing pass needs none: it is the same computation on every rank)."""
        if self.stats == "copy":
            with torch.no_grad():
                for mine, theirs in zip(self.G_ema.buffers(), self.G.buffers()):
                    mine.copy_(theirs)
            if rank_buffers_from is not None:
                for b in self.G_ema.buffers():
                    rank_buffers_from(b)
            return
        devices = [self.weight.device] if self.weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _unsynchronized(self.G_ema):
            torch.manual_seed(STANDING_SEED)  # MN's k-means++ draws: the same every time
            standing_statistics(self.G_ema, self.standing_latents())

    def standing_latents(self) -> Iterator[Tensor]:
        """The standing pass's latents: ``standing_batches`` batches [batch_size, z_dim] from their own stream."""
        gen = torch.Generator().manual_seed(STANDING_SEED)
        for _ in range(self.standing_batches):
            yield torch.randn(self.batch_size, self.G_ema.z_dim, generator=gen).to(
                self.weight.device
            )

    # ---- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.G_ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.G_ema.load_state_dict(state)


def _unsynchronized(model: nn.Module):
    from .sync import unsynchronized

    return unsynchronized(model)
