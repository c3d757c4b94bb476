"""``_ComponentNormBase``: the bookkeeping Mixture and Mode Normalization share, as torch's
``_NormBase`` is BatchNorm's.

Both layers keep, per component k of K, a running mean and variance over C channels; both are
BatchNorm at K = 1, and so share BatchNorm's hyper-parameters (eps, momentum, affine,
track_running_stats), its per-channel affine, its ``num_batches_tracked`` and its update rule
(``lerp`` by momentum, ``None`` = cumulative average, the variance unbiased by n / (n - 1) with
the component's effective count). A subclass registers what is its own in ``_register_own``
(MN's running mixture weights, Mode's gating network), before the shared tensors, so that
parameter and buffer order, and so optimizer state and state dicts, read as they always have.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["_ComponentNormBase"]


class _ComponentNormBase(nn.Module):
    """Hyper-parameters, affine, running [K, C] statistics and their update; no forward."""

    _components_arg = "num_components"  # the constructor's name for K, in messages

    def __init__(self, num_features: int, num_components: int, eps: float,
                 momentum: Optional[float], affine: bool, track_running_stats: bool,
                 device=None, dtype=None) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if num_components < 1:
            raise ValueError(f"{self._components_arg} (K) must be >= 1, got {num_components}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats

    def _register_tensors(self, device=None, dtype=None) -> None:
        """Register the subclass's own tensors, then weight / bias [C] (``affine``) and
        running_mean / running_var [K, C] and num_batches_tracked (``track_running_stats``);
        then reset them all. Called at the end of a subclass's ``__init__``."""
        factory = {"device": device, "dtype": dtype}
        self._register_own(factory)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory))
            self.bias = nn.Parameter(torch.empty(self.num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        k, c = self.num_components, self.num_features
        for name in ("running_mean", "running_var"):
            self.register_buffer(name, torch.empty(k, c, **factory) if self.track_running_stats else None)
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device)
                             if self.track_running_stats else None)
        self.reset_parameters()

    def _register_own(self, factory: dict) -> None:
        """The subclass's own parameters and buffers (none here)."""

    # ---- nn.BatchNorm2d-style housekeeping ----------------------------------------------------

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, {self._components_arg}={self.num_components}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name} expects 4-D input [N, C, H, W], got {x.dim()}-D "
                             f"input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}({self.num_features}) got {x.shape[1]} channels "
                             f"(input shape {tuple(x.shape)})")

    # ---- running statistics --------------------------------------------------------------------

    def _momentum_factor(self) -> Union[float, Tensor]:
        """This batch's weight in the running averages: ``momentum``, or 1 / batches seen for
        ``momentum=None`` (a cumulative average, as nn.BatchNorm2d), as a device tensor: no host
        read. Call after ``num_batches_tracked`` counts this batch."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)

    @torch.no_grad()
    def _fold_running(self, mean: Tensor, var: Tensor, n_eff: Tensor,
                      factor: Union[float, Tensor]) -> None:
        """running_mean / running_var [K, C] move towards a batch's mean and biased var [K, C].

        The variance is unbiased as BatchNorm's, n / (n - 1), with the effective number of
        values n_eff behind each component ([K], or [K, C] per channel); a component carrying
        less than two values' worth of mass (n_eff < 2) has no variance estimate worth
        correcting, so its factor is capped at n_eff (<= 2) rather than growing without bound
        as n_eff -> 1."""
        bessel = n_eff / (n_eff - 1.0).clamp_min(1.0)  # [K] or [K, C]
        unbiased = var * bessel.view(self.num_components, -1)  # [K, C]
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
