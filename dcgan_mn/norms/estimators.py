"""Step 1 of Mixture Normalization: fit a mixture to (a subset of) the batch's points, without
gradient.

One implementation of each estimator, over G independent groups of M points in C dimensions
([G, M, C]): the vector reading fits G = 1 group of C-vectors, the per-channel reading G = C
groups of scalars (``mixture.READINGS`` makes the layout). Both estimators start from k-means++
seeds and run with no host synchronisation and no Python loop over points, components or
groups:

* ``kmeans`` (hard clusters, our reading of the paper): ``kmeans_iters`` Lloyd iterations, then
  weights, means and variances of the final clusters;
* ``em``: ``em_iters`` EM iterations of a diagonal Gaussian mixture.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .mixture import _TINY, READINGS, Mixture, mixture_posteriors

__all__ = ["ESTIMATORS", "sample_fit_points", "kmeans_pp_seeds", "estimate_mixture", "fit_mixture"]

ESTIMATORS = ("kmeans", "em")


def _random_point_indices(
    num_points: int, fit_points: int, device, generator: Optional[torch.Generator]
) -> Optional[Tensor]:
    """Indices [M] of a uniform random subset of at most ``fit_points`` points, or None (all)."""
    if num_points <= fit_points:
        return None
    return torch.randperm(num_points, device=device, generator=generator)[:fit_points]


@torch.no_grad()
def sample_fit_points(
    x: Tensor, fit_points: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """The points the mixture is fitted on: at most ``fit_points`` random points of ``x``.

    ``x`` is points [P, C] or a batch [N, C, L]; point p of a batch is (n, l) = divmod(p, L), so
    both spellings of the same batch draw the same subset from the same RNG state. Returns
    [M, C], detached.
    """
    if x.dim() == 2:
        idx = _random_point_indices(x.shape[0], fit_points, x.device, generator)
        return x.detach() if idx is None else x.detach().index_select(0, idx)  # [M, C]
    n, c, length = x.shape
    idx = _random_point_indices(n * length, fit_points, x.device, generator)
    if idx is None:
        return x.detach().transpose(1, 2).reshape(n * length, c)  # [P, C]
    return x.detach()[idx // length, :, idx % length]  # [M, C]


def kmeans_pp_seeds(
    sub: Tensor, sub_sq: Tensor, num_components: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """k-means++ seeds [G, K, C] among each group's points ``sub`` [G, M, C] (``sub_sq`` = sub^2).

    Each new centre is drawn with probability proportional to the squared distance to the
    nearest centre chosen so far (inverse-CDF draw; cheaper than multinomial). The small floor
    keeps the draw defined when every distance is zero (constant input). No host sync.
    """
    g, m, c = sub.shape
    k = num_components
    picks = [torch.randint(m, (g, 1), device=sub.device, generator=generator)]  # K x [G, 1]
    # Every uniform draw at once, after the first picks (one RNG call, not K - 1).
    # [G, K-1]
    uniform = torch.rand(g, k - 1, device=sub.device, dtype=sub.dtype, generator=generator)
    nearest = None
    for j in range(k - 1):
        last = picks[-1]  # [G, 1]
        last_point = sub.gather(1, last.unsqueeze(2).expand(g, 1, c))  # [G, 1, C]
        dist = (sub - last_point).square().sum(2)  # [G, M]
        nearest = dist if nearest is None else torch.minimum(nearest, dist)  # [G, M]
        floor = 1e-12 * (1.0 + nearest.amax(1, keepdim=True))  # [G, 1]
        cdf = (nearest + floor).cumsum(1)  # [G, M]
        u = uniform[:, j : j + 1] * cdf[:, -1:]  # [G, 1]
        picks.append(torch.searchsorted(cdf, u, right=True).clamp_max_(m - 1))  # [G, 1]
    idx = torch.cat(picks, 1)  # [G, K]
    return sub.gather(1, idx.unsqueeze(2).expand(g, k, c))  # [G, K, C]


def _lloyd(
    sub: Tensor, sub_sq: Tensor, subset_var: Tensor, mean: Tensor, iters: int, eps: float
) -> Mixture:
    """``iters`` Lloyd iterations from centres ``mean`` [G, K, C] on centred points sub [G, M, C];
    the mixture of the final hard clusters: weight [G, K], mean and var [G, K, C].

    An empty cluster keeps its previous centre, a tiny weight and the subset's variance, so
    every later step stays finite on degenerate input (constant points, fewer distinct points
    than K). The last pass only assigns (against the final centres) and reads the clusters off.
    (A one-hot matrix product rather than index_add_: deterministic and free of host
    synchronisation on every device.)
    """
    g, m, _ = sub.shape
    k = mean.shape[1]
    for _ in range(iters + 1):
        # argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k); ||x||^2 does not matter.
        # [G, M, K]
        score = torch.baddbmm(
            (mean * mean).sum(2).unsqueeze(1), sub, mean.transpose(1, 2), alpha=-2.0
        )
        onehot = sub.new_zeros(g, m, k).scatter_(2, score.argmin(2, keepdim=True), 1.0)  # [G, M, K]
        onehot_t = onehot.transpose(1, 2)  # [G, K, M]
        counts = onehot.sum(1)  # [G, K]
        inv_counts = counts.clamp_min(1.0).reciprocal().unsqueeze(2)  # [G, K, 1]
        # [G, K, C]
        mean = torch.where(counts.unsqueeze(2) > 0, (onehot_t @ sub) * inv_counts, mean)

    var = (onehot_t @ sub_sq) * inv_counts - mean * mean  # [G, K, C]
    var = torch.where(counts.unsqueeze(2) < 2, subset_var.unsqueeze(1), var).clamp_min(eps)
    weight = (counts / m).clamp_min(_TINY)  # [G, K]
    return Mixture(weight / weight.sum(1, keepdim=True), mean, var)


def _em(
    sub: Tensor, sub_sq: Tensor, subset_var: Tensor, mean: Tensor, iters: int, eps: float
) -> Mixture:
    """``iters`` EM iterations of a diagonal Gaussian mixture from means ``mean`` [G, K, C], equal
    weights and the subset's variance in every component, on centred points sub [G, M, C].

    Each iteration is an E-step (posteriors, ``mixture_posteriors``) and an M-step
    (posterior-weighted weights, means and variances, floored by ``eps``), all K at once. A
    component that loses all its mass keeps its previous mean and variance with a tiny weight,
    as an empty k-means cluster does.
    """
    g, m, c = sub.shape
    k = mean.shape[1]
    var = subset_var.unsqueeze(1).expand(g, k, c)  # [G, K, C]
    weight = sub.new_full((g, k), 1.0 / k)  # [G, K]
    for _ in range(iters):
        tau = mixture_posteriors(sub, Mixture(weight, mean, var))  # [G, M, K]  E-step
        tau_t = tau.transpose(1, 2)  # [G, K, M]                               M-step
        mass = tau.sum(1)  # [G, K]
        inv_mass = mass.clamp_min(_TINY).reciprocal().unsqueeze(2)  # [G, K, 1]
        new_mean = (tau_t @ sub) * inv_mass  # [G, K, C]
        new_var = ((tau_t @ sub_sq) * inv_mass - new_mean * new_mean).clamp_min(eps)  # [G, K, C]
        alive = (mass > _TINY).unsqueeze(2)  # [G, K, 1]
        mean = torch.where(alive, new_mean, mean)
        var = torch.where(alive, new_var, var)
        weight = (mass / m).clamp_min(_TINY)
        weight = weight / weight.sum(1, keepdim=True)  # [G, K]
    return Mixture(weight, mean, var)


_ITERATE = {"kmeans": _lloyd, "em": _em}


@torch.no_grad()
def estimate_mixture(
    points: Tensor,
    num_components: int,
    *,
    estimator: str = "kmeans",
    kmeans_iters: int = 2,
    em_iters: int = 3,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    init_mean: Optional[Tensor] = None,
    point: str = "vector",
) -> Mixture:
    """The mixture of fitting points [M, C] by ``estimator``: ``kmeans`` (k-means++ seeding,
    ``kmeans_iters`` Lloyd iterations, hard clusters; our reading of the paper) or ``em``
    (k-means++ seeding, ``em_iters`` EM iterations).

    ``point="vector"``: one mixture of the C-vectors (weight [K], mean and var [K, C]);
    ``point="channel"``: one 1-D mixture per channel (weight, mean and var [K, C]).
    ``init_mean`` [K, C] replaces the k-means++ seeds (tests compare estimators from one start).
    """
    if estimator not in _ITERATE:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    reading = READINGS[point]
    groups = reading.to_groups(points.detach())  # [G, M, C']
    # Work on centred points: one-pass variances then do not cancel for inputs far from zero
    # (1e4 + small noise). The centre is added back to the means at the end.
    centre = groups.mean(1, keepdim=True)  # [G, 1, C']
    sub = groups - centre  # [G, M, C']
    sub_sq = sub * sub  # [G, M, C']
    subset_var = sub_sq.mean(1).clamp_min(eps)  # [G, C']
    k = num_components
    if k == 1:  # one component: the subset's mean and variance (BatchNorm), for either estimator
        return reading.from_groups(
            Mixture(sub.new_ones(sub.shape[0], 1), centre, subset_var.unsqueeze(1))
        )
    if init_mean is None:
        start = kmeans_pp_seeds(sub, sub_sq, k, generator)  # [G, K, C']
    else:
        start = reading.to_groups(init_mean.detach().to(sub.dtype)) - centre  # [G, K, C']
    iters = kmeans_iters if estimator == "kmeans" else em_iters
    weight, mean, var = _ITERATE[estimator](sub, sub_sq, subset_var, start, iters, eps)
    return reading.from_groups(Mixture(weight, mean + centre, var))


@torch.no_grad()
def fit_mixture(
    points: Tensor,
    num_components: int,
    *,
    fit_points: int = 1024,
    generator: Optional[torch.Generator] = None,
    **options,
) -> Mixture:
    """Fit a K-component diagonal Gaussian mixture to ``points`` [P, C] (or a batch [N, C, L]).

    A random subset of at most ``fit_points`` points is fitted by ``estimate_mixture``, with
    its ``options`` (``estimator``, ``kmeans_iters``, ``em_iters``, ``eps``, ``point``).
    """
    sub = sample_fit_points(points, fit_points, generator)  # [M, C]
    return estimate_mixture(sub, num_components, generator=generator, **options)
