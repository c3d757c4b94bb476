"""Steps 2-5 of Mixture Normalization on points [P, C]: the reference, in plain autograd ops.

Written to be read next to the paper (Kalayeh & Shah, TPAMI 2019):

    tau[p, k] = lambda_k N(x_p | E_k, Var_k) / sum_j lambda_j N(x_p | E_j, Var_j)   (posteriors)
    x_hat_p   = sum_k tau[p, k] / sqrt(lambda_k) * (x_p - E_k) / sqrt(Var_k + eps)

The module runs the fused equivalent (``functional.py``); the tests hold the two together. The
posteriors are also the E-step of the EM estimator, which calls ``mixture_posteriors`` on G
groups of points at once ([G, M, C] with a mixture of weight [G, K], mean and var [G, K, C]).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .mixture import _LOG_2PI, _TINY, Mixture, MixtureMoments

__all__ = [
    "mixture_posteriors",
    "mixture_moments",
    "moments_to_stats",
    "mixture_normalize",
    "mixture_norm",
]


def mixture_posteriors(points: Tensor, mixture: Mixture) -> Tensor:
    """tau[p, k] = softmax_k(log weight_k + log N(x_p | mean_k, var_k)) for points [P, C].

    The diagonal-Gaussian log-density is expanded so that its point-dependent parts are two
    matrix products; the mixture is treated as constant (no gradient to its parameters). For
    accuracy far from zero, pass points and means centred by a common shift (the densities do
    not change). Leading batch dimensions are allowed: points [G, M, C] with weight [G, K],
    mean and var [G, K, C] give tau [G, M, K] (the estimators' grouped layout).
    """
    weight, mean, var = (t.detach() for t in mixture)
    if weight.shape[-1] == 1:
        # A single component has posterior exactly 1; skip the densities (K = 1 is BatchNorm).
        return points.new_ones(*points.shape[:-1], 1)  # [..., P, 1]
    inv_var = var.reciprocal()  # [..., K, C]
    log_norm = -0.5 * (var.log().sum(-1) + points.shape[-1] * _LOG_2PI)  # [..., K]
    quad = (
        points.pow(2) @ inv_var.transpose(-1, -2)  # [..., P, K]
        - 2.0 * points @ (mean * inv_var).transpose(-1, -2)  # [..., P, K]
        + (mean.pow(2) * inv_var).sum(-1).unsqueeze(-2)  # [..., 1, K]
    )
    logits = (weight.clamp_min(_TINY).log() + log_norm).unsqueeze(-2) - 0.5 * quad  # [..., P, K]
    return torch.softmax(logits, dim=-1)  # [..., P, K]


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


def _centred_stats(moments: MixtureMoments) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lambda [K], E_k - shift [K, C], Var [K, C], n_eff [K]) from summed moments."""
    mass = moments.mass.clamp_min(_TINY)  # [K]
    lam = moments.mass / moments.count  # [K]
    mean_c = moments.sum_x / mass.unsqueeze(1)  # [K, C]
    var = (moments.sum_xx / mass.unsqueeze(1) - mean_c.pow(2)).clamp_min(0.0)  # [K, C]
    n_eff = mass.pow(2) / moments.sum_sq_tau.clamp_min(_TINY)  # [K]
    return lam, mean_c, var, n_eff


def moments_to_stats(moments: MixtureMoments) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-component statistics from summed moments.

    Returns lambda [K] (batch mixture weight = mean posterior), E [K, C], Var [K, C] (biased,
    weighted by the normalized contribution w[p, k] = tau[p, k] / sum_p tau[p, k]) and the
    effective sample size n_eff [K] = 1 / sum_p w[p, k]^2, which is P for K = 1.
    """
    lam, mean_c, var, n_eff = _centred_stats(moments)
    return lam, mean_c + moments.shift, var, n_eff


def mixture_normalize(
    points: Tensor, tau: Tensor, weight: Tensor, mean: Tensor, var: Tensor, eps: float,
    lambda_scale: bool = True,
) -> Tensor:
    """x_hat_p = sum_k tau[p,k] / sqrt(weight_k) * (x_p - mean_k) / sqrt(var_k + eps).

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


def _mixture_shift(mixture: Mixture) -> Tensor:
    """The mixture's overall mean [C]: the constant every point is centred by."""
    return (mixture.weight.unsqueeze(1) * mixture.mean).sum(0).detach()  # [C]


def mixture_norm(
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
    x_hat = mixture_normalize(centred, tau, lam, mean_c, var, eps, lambda_scale)  # [P, C]
    return x_hat, tau, (lam, mean_c + shift, var, n_eff)
