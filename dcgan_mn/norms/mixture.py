"""What a mixture is and what every part of Mixture Normalization computes from one.

* the value types ``Mixture`` and ``MixtureMoments``, and the constants;
* the math the fused path, the estimators and the reference share: the posteriors
  (``mixture_posteriors``, also the EM estimator's E-step), the statistics read off summed
  moments (``moments_to_stats``) and the shift every point is centred by;
* component matching: which batch component is averaged into which running one;
* the readings (``point="vector"`` / ``"channel"``): what one mixture describes, as a layout.

Shape legend of the whole package: N images, C channels, L = H*W positions, P = N*L points,
M fitting points, K components, G groups (independent mixtures fitted side by side: 1 for the
vector reading, C for the per-channel reading).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Mixture",
    "MixtureMoments",
    "mixture_posteriors",
    "moments_to_stats",
    "match_components",
    "match_components_per_channel",
    "Reading",
    "READINGS",
    "POINTS",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Smallest mixture weight / posterior mass we divide by. Keeps empty components finite: their
# posteriors are ~0, so whatever statistics they get are multiplied by ~0 in the output.
_TINY = 1e-12


class Mixture(NamedTuple):
    """A diagonal Gaussian mixture: weight [K] (sums to 1), mean [K, C], var [K, C].

    The per-channel reading stores one 1-D mixture per channel as weight, mean, var [K, C];
    the estimators work on G mixtures at once: weight [G, K], mean and var [G, K, C].
    """

    weight: Tensor
    mean: Tensor
    var: Tensor


class MixtureMoments(NamedTuple):
    """Sufficient statistics of a posterior-weighted batch, all additive over points.

    Kept as sums (not means) so that distributed training can all-reduce them and get the
    statistics of the concatenated batch. ``shift`` [C] is a constant subtracted from every
    point before squaring, so that the one-pass variance does not cancel catastrophically for
    inputs far from zero (1e4 + small noise); it must be identical on every rank.
    """

    count: Tensor  # [] number of points P
    mass: Tensor  # [K]    sum_p tau[p, k]
    sum_sq_tau: Tensor  # [K]    sum_p tau[p, k]^2  (effective sample size)
    sum_x: Tensor  # [K, C] sum_p tau[p, k] (x_p - shift)
    sum_xx: Tensor  # [K, C] sum_p tau[p, k] (x_p - shift)^2
    shift: Tensor  # [C]


# ---- shared math: posteriors and the statistics of summed moments ----------------------------


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


def _mixture_shift(mixture: Mixture) -> Tensor:
    """The mixture's overall mean [C]: the constant every point is centred by."""
    return (mixture.weight.unsqueeze(1) * mixture.mean).sum(0).detach()  # [C]


# ---- component matching ----------------------------------------------------------------------
#
# Mixture components carry no identity across batches (k-means++ seeds are random), so before
# the running statistics absorb a batch's components, the batch components are permuted to the
# running ones they are closest to.

_PERMS: dict[tuple[int, str], Tensor] = {}


def match_components(batch_mean: Tensor, running_mean: Tensor) -> Tensor:
    """The permutation [K] of batch components that best matches the running ones.

    Batch component perm[k] is averaged into running component k, with perm minimising
    sum_k ||batch[perm[k]] - running[k]||^2. Brute force over K! permutations for K <= 6 (all on
    device, no host sync); greedy nearest-pair matching beyond that.
    """
    k = batch_mean.shape[0]
    # Squared distances spelled out: torch.cdist reads a size on the host (a sync on a GPU).
    cost = (running_mean.unsqueeze(1) - batch_mean.unsqueeze(0)).square().sum(2)  # [K_run, K_batch]
    if k <= 6:
        key = (k, str(cost.device))
        perms = _PERMS.get(key)
        if perms is None:
            perms = torch.tensor(list(itertools.permutations(range(k))), device=cost.device)
            _PERMS[key] = perms  # [K!, K]
        total = cost.gather(1, perms.t()).sum(0)  # [K!]
        # index_select with a 1-element index, not perms[argmin]: indexing by a 0-d tensor
        # reads it on the host.
        return perms.index_select(0, total.argmin().view(1)).view(k)  # [K]
    # Greedy beyond K = 6: repeatedly take the closest remaining pair, all on the device.
    perm = torch.zeros(k, dtype=torch.long, device=cost.device)
    cost = cost.clone()
    for _ in range(k):
        flat = cost.view(-1).argmin().view(1)  # [1]
        r, b = flat // k, flat % k  # [1], [1]
        perm.scatter_(0, r, b)
        cost.index_fill_(0, r, float("inf")).index_fill_(1, b, float("inf"))
    return perm


def match_components_per_channel(batch_mean: Tensor, running_mean: Tensor) -> Tensor:
    """perm [K, C]: batch component perm[k, c] is averaged into running component k of channel c.

    For 1-D components the assignment that minimises the summed squared distance between means
    pairs them in sorted order (rearrangement inequality), so no search is needed.
    """
    batch_order = batch_mean.argsort(0)  # [K, C]: the batch component of each rank
    running_rank = running_mean.argsort(0).argsort(0)  # [K, C]: each running component's rank
    return batch_order.gather(0, running_rank)  # [K, C]


# ---- the readings: what one mixture describes, as a layout chosen once per layer -------------
#
# * ``"vector"`` (our reading of the paper): a point is the C-vector at one (n, h, w); one
#   mixture over all channels jointly. Mixture weight [K], mean and var [K, C]; posteriors
#   tau [N, K, L].
# * ``"channel"`` (BatchNorm's per-activation reading, the one third-party reimplementations
#   use): an independent 1-D mixture per channel. Weight, mean and var [K, C]; tau [N, C, K, L].
#
# The estimators fit G mixtures of M points in C' dimensions at once ([G, M, C']): the vector
# reading is G = 1 group of C-dimensional points, the channel reading G = C groups of 1-D points.
# Everything that differs between the readings is a field of ``Reading``, so the rest of the code
# has no ``point == ...`` branches.


class Reading(NamedTuple):
    """Everything that differs between the vector and the per-channel reading."""

    name: str
    # fitting points [M, C] -> the estimators' groups [G, M, C']
    to_groups: Callable[[Tensor], Tensor]
    # the estimators' grouped mixture (weight [G, K], mean/var [G, K, C']) -> this reading's Mixture
    from_groups: Callable[[Mixture], Mixture]
    # shape of running_weight for K components and C channels
    weight_shape: Callable[[int, int], tuple[int, ...]]
    # batch statistics (lambda, E, Var, n_eff) permuted to match the running means
    match: Callable[[tuple[Tensor, ...], Tensor], tuple[Tensor, ...]]
    # the components' dimension of the posteriors tau
    posterior_dim: int
    # may the moments be summed across processes (synchronized MN)?
    synchronizable: bool
    # a batch's mixture weights -> (weights [K] for telemetry, effective number of components [])
    summarize: Callable[[Tensor], tuple[Tensor, Tensor]]


def _match_vector(stats: tuple[Tensor, ...], running_mean: Tensor) -> tuple[Tensor, ...]:
    perm = match_components(stats[1], running_mean)  # [K]
    return tuple(t[perm] for t in stats)


def _effective_components(lam: Tensor, dim: int) -> Tensor:
    """exp(H(lambda)) along ``dim``: K for equal weights, 1 for a single occupied component."""
    lam = lam.clamp_min(_TINY)
    return torch.exp(-(lam * lam.log()).sum(dim))


def _summarize_vector(lam: Tensor) -> tuple[Tensor, Tensor]:
    return lam, _effective_components(lam, 0)  # [K], []


def _summarize_channel(lam: Tensor) -> tuple[Tensor, Tensor]:
    # [K, C]: components carry no identity across channels, so sort them per channel first
    return lam.sort(0, descending=True).values.mean(1), _effective_components(lam, 0).mean()


def _match_channel(stats: tuple[Tensor, ...], running_mean: Tensor) -> tuple[Tensor, ...]:
    perm = match_components_per_channel(stats[1], running_mean)  # [K, C]
    stacked = torch.stack(stats)  # [S, K, C]: one gather for all of them, not one each
    return tuple(stacked.gather(1, perm.expand(len(stats), -1, -1)).unbind(0))  # S x [K, C]


VECTOR = Reading(
    name="vector",
    to_groups=lambda points: points.unsqueeze(0),  # [1, M, C]
    from_groups=lambda mix: Mixture(mix.weight[0], mix.mean[0], mix.var[0]),  # [K], [K, C]
    weight_shape=lambda k, c: (k,),
    match=_match_vector,
    posterior_dim=1,  # tau [N, K, L]
    synchronizable=True,
    summarize=_summarize_vector,
)

CHANNEL = Reading(
    name="channel",
    to_groups=lambda points: points.t().unsqueeze(2),  # [C, M, 1]
    from_groups=lambda mix: Mixture(
        mix.weight.t(), mix.mean.squeeze(2).t(), mix.var.squeeze(2).t()
    ),
    weight_shape=lambda k, c: (k, c),
    match=_match_channel,
    posterior_dim=2,  # tau [N, C, K, L]
    synchronizable=False,
    summarize=_summarize_channel,
)

READINGS = {r.name: r for r in (VECTOR, CHANNEL)}
POINTS = tuple(READINGS)  # ("vector", "channel")
