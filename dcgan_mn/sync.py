"""Synchronized normalization for distributed (DDP) training: ``convert_sync_norms``.

With ``--sync-norm`` every norm layer computes its batch statistics over the global batch (all
ranks together) instead of each rank's share, so that training on R ranks normalizes exactly as
one process would on the concatenated batch:

* ``nn.BatchNorm*`` -> torch's ``nn.SyncBatchNorm`` for layers on GPUs; on other devices
  (CPU with gloo), where torch's version refuses to run and DDP refuses it, ->
  ``PortableSyncBatchNorm``, the same statistics from two autograd-aware all-reduces.
* ``MixtureNorm2d`` -> ``SyncMixtureNorm2d``. The mixture: every rank draws its share
  (``ceil(fit_points / R)``) of the fitting subset, rank 0 gathers the shares, fits the mixture
  and broadcasts it, so every rank uses the same mixture. The statistics: the posterior-weighted
  sums (``MixtureMoments``) are all-reduced with an autograd-aware all-reduce, so outputs,
  input gradients and running statistics equal single-process MN on the concatenated batch.

Synchronization happens in training mode only (as in torch's SyncBatchNorm). Inside
``unsynchronized(model)`` the layers normalize with their own process's batch, as plain layers
do; ``Generator.sample`` uses it, so sampling is never a collective operation and ranks may
sample different amounts. Parameters and buffers are shared with the converted modules and
state_dict keys do not change, so checkpoints move freely between synchronized and plain models.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import initialized
from .norms import Mixture, MixtureMoments, MixtureNorm2d
from .norms.estimators import sample_fit_points

__all__ = [
    "convert_sync_norms",
    "unsynchronized",
    "PortableSyncBatchNorm",
    "SyncMixtureNorm2d",
    "differentiable_all_reduce_sum",
]

# Device types torch's nn.SyncBatchNorm runs on; elsewhere we use PortableSyncBatchNorm.
_TORCH_SYNC_BN_DEVICES = ("cuda", "hpu", "xpu")


def _world_size(group) -> int:
    if not initialized():
        return 1
    return dist.get_world_size(group)


def _group_src(group) -> int:
    """Global rank of the group's first member (collectives name ranks globally)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum over ranks of gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def differentiable_all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Autograd-aware all-reduce (sum). Same contract as the deprecated
    ``torch.distributed.nn.functional.all_reduce``; written out so that it works unchanged on
    every torch version we support."""
    return _AllReduceSum.apply(tensor, group)


# --------------------------------------------------------------------------------------------
# Mixture Normalization
# --------------------------------------------------------------------------------------------


class SyncMixtureNorm2d(MixtureNorm2d):
    """``MixtureNorm2d`` whose batch statistics span every rank of ``process_group``.

    Identical to ``MixtureNorm2d`` outside training, without an initialised process group, or
    in a group of one.
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self._reading.synchronizable:
            raise ValueError(
                "synchronized MN supports point='vector' only (--sync-norm with --mn-point "
                f"{self.point!r})"
            )
        self.process_group = process_group
        self.sync_enabled = True  # False inside unsynchronized()

    def _sync_now(self) -> bool:
        return self.sync_enabled and self.training and _world_size(self.process_group) > 1

    def _fit_batch_mixture(self, x: Tensor, dtype: torch.dtype) -> Mixture:
        if not self._sync_now():
            return super()._fit_batch_mixture(x, dtype)
        group = self.process_group
        world, rank, src = dist.get_world_size(group), dist.get_rank(group), _group_src(group)
        k, c = self.num_components, self.num_features
        share = -(-self.fit_points // world)  # ceil: this rank's part of the fitting subset
        sub = sample_fit_points(x, share).to(dtype)  # [m_r, C]
        # Ranks may hold different numbers of points: pad to `share` rows and flag real ones.
        packed = sub.new_zeros(share, c + 1)  # [share, C + 1]
        packed[: sub.shape[0], :c] = sub
        packed[: sub.shape[0], c] = 1.0
        flat = sub.new_empty(k + 2 * k * c)  # the mixture, packed for one broadcast
        if rank == 0:
            parts = [torch.empty_like(packed) for _ in range(world)]
            dist.gather(packed, parts, dst=src, group=group)
            rows = torch.cat(parts)  # [R * share, C + 1] in rank order
            points = rows[rows[:, c] > 0, :c]  # [M, C]
            mixture = self._estimate(points)
            flat = torch.cat([mixture.weight, mixture.mean.reshape(-1), mixture.var.reshape(-1)])
        else:
            dist.gather(packed, None, dst=src, group=group)
        dist.broadcast(flat, src=src, group=group)
        weight, mean, var = torch.split(flat, [k, k * c, k * c])
        return Mixture(weight, mean.view(k, c), var.view(k, c))

    def _reduce_moments(self, moments: MixtureMoments) -> MixtureMoments:
        if not self._sync_now():
            return super()._reduce_moments(moments)
        k, c = moments.sum_x.shape
        # [1 + 2K + 2KC]
        flat = torch.cat(
            [
                moments.count.reshape(1),
                moments.mass,
                moments.sum_sq_tau,
                moments.sum_x.reshape(-1),
                moments.sum_xx.reshape(-1),
            ]
        )
        flat = differentiable_all_reduce_sum(flat, self.process_group)
        count, mass, sum_sq_tau, sum_x, sum_xx = torch.split(flat, [1, k, k, k * c, k * c])
        return MixtureMoments(
            count[0], mass, sum_sq_tau, sum_x.view(k, c), sum_xx.view(k, c), moments.shift
        )

    @classmethod
    def from_mixture_norm(cls, module: MixtureNorm2d, process_group=None) -> "SyncMixtureNorm2d":
        """A synchronized copy sharing ``module``'s parameters, buffers and settings."""
        new = cls(
            module.num_features,
            module.num_components,
            process_group=process_group,
            **module.options(),
        )
        _share_state(module, new)
        new.reduce_moments = module.reduce_moments
        new.last_batch_weight = module.last_batch_weight
        new.last_posterior_entropy = module.last_posterior_entropy
        return new


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------


class PortableSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronized BatchNorm for any device, built from two autograd-aware all-reduces.

    torch's ``nn.SyncBatchNorm`` runs on GPUs only (and DDP refuses it in a CPU model), so
    ``convert_sync_norms`` uses this class for layers that live elsewhere, e.g. CPU training with
    gloo. In training mode on more than one rank, the global mean and biased variance come from
    an all-reduce of the sums and then one of the centred squares (two passes: no cancellation);
    the running statistics are updated as torch does (unbiased variance over the global count).
    Otherwise it is exactly ``nn.BatchNorm``. Same parameters, buffers and state_dict keys.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum=0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.sync_enabled = True  # False inside unsynchronized()

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.sync_enabled and self.training and _world_size(self.process_group) > 1):
            return super().forward(input)  # plain BatchNorm
        self._check_input_dim(input)
        group = self.process_group
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local_count = x.new_tensor([x.numel() / x.shape[1]])  # values per channel on this rank
        # [C + 1]
        sums = differentiable_all_reduce_sum(torch.cat([x.sum(dims), local_count]), group)
        count = sums[-1].detach()
        if float(count) <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(input.size())} on every rank together"
            )
        mean = sums[:-1] / count  # [C]
        centred = x - mean.view(shape)
        var = differentiable_all_reduce_sum(centred.square().sum(dims), group) / count  # [C] biased
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                unbiased = var * (count / (count - 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(input.dtype)

    @classmethod
    def from_batch_norm(
        cls, module: nn.modules.batchnorm._BatchNorm, process_group=None
    ) -> "PortableSyncBatchNorm":
        new = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        _share_state(module, new)
        return new


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _share_state(old: nn.Module, new: nn.Module) -> None:
    """Make ``new`` use ``old``'s parameters and buffers (the same tensors) and training mode."""
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in old.named_buffers(recurse=False):
        setattr(new, name, buf)
    new.train(old.training)


class _LocalSyncBatchNorm(nn.SyncBatchNorm):
    """What a torch ``nn.SyncBatchNorm`` is while ``unsynchronized``: a plain BatchNorm."""

    def forward(self, input: Tensor) -> Tensor:
        return nn.modules.batchnorm._BatchNorm.forward(self, input)


@contextlib.contextmanager
def unsynchronized(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every synchronized norm layer of ``module`` uses only this process's
    batch (no collectives), e.g. to sample images on some ranks and not others."""
    ours, torchs = [], []
    for m in module.modules():
        if isinstance(m, (SyncMixtureNorm2d, PortableSyncBatchNorm)):
            ours.append((m, m.sync_enabled))
            m.sync_enabled = False
        elif type(m) is nn.SyncBatchNorm:
            torchs.append(m)
            m.__class__ = _LocalSyncBatchNorm  # same state, forward of a plain BatchNorm
    try:
        yield module
    finally:
        for m, enabled in ours:
            m.sync_enabled = enabled
        for m in torchs:
            m.__class__ = nn.SyncBatchNorm


def _device_type(module: nn.Module) -> str:
    tensors = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
    first = next(tensors, None)
    return "cpu" if first is None else first.device.type


def convert_sync_norms(module: nn.Module, process_group=None) -> nn.Module:
    """Return ``module`` with every BatchNorm and MixtureNorm2d synchronized across ranks.

    BatchNorm layers on CUDA/HPU/XPU become torch's ``nn.SyncBatchNorm``; elsewhere (CPU) they
    become ``PortableSyncBatchNorm``, so move the model to its device first, and convert before
    wrapping it in DDP. Parameters are shared, not copied, so an optimizer built earlier stays
    valid. ``process_group`` limits the synchronization to a group (default: the whole world).
    Layers that are already synchronized are left alone.
    """
    if isinstance(module, MixtureNorm2d) and not isinstance(module, SyncMixtureNorm2d):
        return SyncMixtureNorm2d.from_mixture_norm(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (nn.SyncBatchNorm, PortableSyncBatchNorm)
    ):
        if _device_type(module) in _TORCH_SYNC_BN_DEVICES:
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        return PortableSyncBatchNorm.from_batch_norm(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_norms(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module
