"""Steps 2-5 of Mixture Normalization on points [P, C]: the reference, in plain autograd ops.

Written to be read next to the paper (Kalayeh & Shah, TPAMI 2019):

    tau[p, k] = lambda_k N(x_p | E_k, Var_k) / sum_j lambda_j N(x_p | E_j, Var_j)   (posteriors)
    x_hat_p   = sum_k tau[p, k] / sqrt(lambda_k) * (x_p - E_k) / sqrt(Var_k + eps)

The module runs the fused equivalent (``functional.mixture_norm``); the tests and the benches
hold the two together. A leaf: it imports the shared math (posteriors, statistics of summed
moments) from ``mixture.py``, and nothing in the package imports it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .mixture import (
    _TINY,
    Mixture,
    MixtureMoments,
    _centred_stats,
    _mixture_shift,
    mixture_posteriors,
)

__all__ = ["mixture_moments", "normalize_reference", "mixture_norm_reference"]


def mixture_moments(points: Tensor, tau: Tensor, shift: Tensor) -> MixtureMoments:
    """Posterior-weighted sums of the points [P, C] under posteriors tau [P, K]."""
    centred = points - shift  # [P, C]
    return MixtureMoments(
        count=points.new_tensor(float(points.shape[0])),
        mass=tau.sum(0),  # [K]
        sum_sq_tau=tau.pow(2).sum(0),  # [K]
        sum_x=tau.t() @ centred,  # [K, C]
        sum_xx=tau.t() @ centred.pow(2),  # [K, C]
        shift=shift,
    )


def normalize_reference(
    points: Tensor,
    tau: Tensor,
    weight: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    lambda_scale: bool = True,
) -> Tensor:
    """Step 5 alone: x_hat_p = sum_k tau[p,k] / sqrt(weight_k) * (x_p - mean_k) / sqrt(var_k + eps).

    Rewritten as x_p * (A @ R)_p - (A @ (mean * R))_p with A = tau / sqrt(weight) [P, K] and
    R = 1 / sqrt(var + eps) [K, C], so no [P, K, C] tensor is ever formed. ``lambda_scale=False``
    drops the Fisher-vector factor 1 / sqrt(weight_k) (A = tau).
    """
    if weight.shape[0] == 1:
        inv_std = torch.rsqrt(var + eps)  # [1, C]
        return (points - mean) * inv_std  # [P, C]  (BatchNorm; weight is 1)
    a = tau * torch.rsqrt(weight.clamp_min(_TINY)) if lambda_scale else tau  # [P, K]
    r = torch.rsqrt(var + eps)  # [K, C]
    return points * (a @ r) - a @ (mean * r)  # [P, C]


def mixture_norm_reference(
    points: Tensor,
    mixture: Mixture,
    eps: float,
    reduce: Optional[Callable[[MixtureMoments], MixtureMoments]] = None,
    *,
    posterior_grad: bool = True,
    lambda_scale: bool = True,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Training-mode MN of points [P, C] under a fitted mixture (reference implementation).

    ``reduce`` (optional) sums the moments across processes (synchronized MN). Returns the
    normalized points [P, C], the posteriors [P, K] and (lambda, E, Var, n_eff).
    ``posterior_grad=False`` treats the posteriors as constants (no gradient through them, so
    none through lambda either); ``lambda_scale=False`` drops the 1 / sqrt(lambda_k) factor.
    """
    # The shift only improves conditioning; any constant gives the same statistics.
    shift = _mixture_shift(mixture)  # [C]
    centred = points - shift  # [P, C]
    centred_mixture = Mixture(mixture.weight, mixture.mean - shift, mixture.var)
    tau = mixture_posteriors(centred, centred_mixture)  # [P, K]
    if not posterior_grad:
        tau = tau.detach()
    moments = mixture_moments(points, tau, shift)
    if reduce is not None:
        moments = reduce(moments)
    lam, mean_c, var, n_eff = _centred_stats(moments)
    x_hat = normalize_reference(centred, tau, lam, mean_c, var, eps, lambda_scale)  # [P, C]
    return x_hat, tau, (lam, mean_c + shift, var, n_eff)
