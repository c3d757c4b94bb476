"""Mixture Normalization (Kalayeh & Shah, TPAMI 2019) and the norm-layer factory.

Mixture Normalization (MN) replaces BatchNorm's single Gaussian per channel with a K-component
diagonal Gaussian mixture over the *points* of a batch (a point is the C-vector at one
(n, h, w); a batch of [N, C, H, W] has P = N*H*W of them). Each point is normalized by every
component's statistics, weighted by its posterior:

    x_hat_p = sum_k tau[p, k] / sqrt(lambda_k) * (x_p - E_k) / sqrt(Var_k + eps)

The math lives in pure functions; ``MixtureNorm2d`` only decides between batch and running
statistics and updates its buffers, as ``nn.BatchNorm2d`` does. With K = 1 every posterior is
exactly 1 and the layer is BatchNorm.

The file has two implementations of steps 2-5 (posteriors, statistics, normalization, affine):

* the *reference* on points [P, C] (``mixture_posteriors``, ``mixture_moments``,
  ``moments_to_stats``, ``mixture_normalize``, ``mixture_norm``): plain autograd ops, written to
  be read next to the paper;
* the *fused* path on [N, C, H*W] (``mixture_norm2d``) that the module runs: the same math in
  two autograd Functions with hand-written backward passes that read and write the
  activations far fewer times than autograd would (MN is memory-bound: this made a training
  step of the layer about 3x faster on CPU). The tests check it against the reference, against
  an explicit per-component loop, and with ``gradcheck``.

Shape legend used in the comments: N images, C channels, L = H*W positions, P = N*L points,
M fitting points, K components.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "Mixture",
    "MixtureMoments",
    "sample_fit_points",
    "ESTIMATORS",
    "kmeans_pp_seeds",
    "kmeans_mixture",
    "em_mixture",
    "estimate_mixture",
    "fit_mixture",
    "mixture_posteriors",
    "mixture_moments",
    "moments_to_stats",
    "mixture_normalize",
    "mixture_norm",
    "mixture_norm2d",
    "match_components",
    "POINTS",
    "channel_mixtures",
    "channel_mixture_norm",
    "match_components_per_channel",
    "MixtureNorm2d",
    "make_norm2d",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Smallest mixture weight / posterior mass we divide by. Keeps empty components finite: their
# posteriors are ~0, so whatever statistics they get are multiplied by ~0 in the output.
_TINY = 1e-12


class Mixture(NamedTuple):
    """A diagonal Gaussian mixture: weight [K] (sums to 1), mean [K, C], var [K, C]."""

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


# --------------------------------------------------------------------------------------------
# Step 1: fit a mixture to (a subset of) the points, without gradient.
# --------------------------------------------------------------------------------------------


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


def _centred_subset(points: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(centre [C], centred points [M, C], their squares [M, C], subset variance [C]).

    Both estimators work on centred points: one-pass variances then do not cancel for inputs
    far from zero (1e4 + small noise). The centre is added back to the means at the end.
    """
    points = points.detach()
    centre = points.mean(0)  # [C]
    sub = points - centre  # [M, C]
    sub_sq = sub * sub  # [M, C]
    return centre, sub, sub_sq, sub_sq.mean(0).clamp_min(eps)


def kmeans_pp_seeds(
    sub: Tensor, sub_sq: Tensor, num_components: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """k-means++ seeds [K, C] among the points ``sub`` [M, C] (``sub_sq`` = sub * sub).

    Each new centre is drawn with probability proportional to the squared distance to the
    nearest centre chosen so far (inverse-CDF draw; cheaper than multinomial). The small floor
    keeps the draw defined when every distance is zero (constant input). No host sync.
    """
    m, k = sub.shape[0], num_components
    sq_norm = sub_sq.sum(1)  # [M]
    picks = [torch.randint(m, (1,), device=sub.device, generator=generator)]  # K x [1]
    nearest = None
    for _ in range(1, k):
        last = picks[-1]
        dist = torch.addmv(sq_norm + sq_norm[last], sub, sub[last].squeeze(0), alpha=-2.0)  # [M]
        nearest = dist if nearest is None else torch.minimum(nearest, dist)  # [M]
        cdf = (nearest.clamp_min(0.0) + 1e-12 * (1.0 + nearest.max())).cumsum(0)  # [M]
        u = torch.rand(1, device=sub.device, dtype=sub.dtype, generator=generator) * cdf[-1]
        picks.append(torch.searchsorted(cdf, u, right=True).clamp_max_(m - 1))
    return sub[torch.cat(picks)]  # [K, C]


def _initial_centres(sub: Tensor, sub_sq: Tensor, centre: Tensor, k: int,
                     generator: Optional[torch.Generator], init_mean: Optional[Tensor]) -> Tensor:
    """Centred starting centres [K, C]: k-means++ seeds, or the given ``init_mean`` [K, C]
    (tests compare the estimators from the same start)."""
    if init_mean is None:
        return kmeans_pp_seeds(sub, sub_sq, k, generator)  # [K, C]
    return init_mean.detach().to(sub.dtype) - centre  # [K, C]


@torch.no_grad()
def kmeans_mixture(
    points: Tensor,
    num_components: int,
    *,
    kmeans_iters: int = 2,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    init_mean: Optional[Tensor] = None,
) -> Mixture:
    """A K-component diagonal mixture read off a k-means++ clustering of ``points`` [M, C].

    k-means++ seeding, then ``kmeans_iters`` Lloyd iterations; weights, means and variances come
    from the hard clusters of the final assignment (variances floored by ``eps``). There is no
    host synchronisation. Degenerate inputs (constant points, fewer distinct points than K) give
    empty clusters, which keep their centre, a tiny weight and the subset's variance, so every
    later step stays finite.
    """
    centre, sub, sub_sq, subset_var = _centred_subset(points, eps)
    m, k = sub.shape[0], num_components
    if k == 1:  # one component: the subset's mean and variance (BatchNorm), for either estimator
        return Mixture(sub.new_ones(1), centre.unsqueeze(0), subset_var.unsqueeze(0))
    mean = _initial_centres(sub, sub_sq, centre, k, generator, init_mean)  # [K, C]

    # Lloyd iterations; an empty cluster keeps its previous centre. The last pass only assigns
    # (against the final centres) and reads the clusters off. (A one-hot matrix product rather
    # than index_add_: deterministic and free of host synchronisation on every device.)
    for _ in range(kmeans_iters + 1):
        # argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k); ||x||^2 does not matter.
        score = torch.addmm((mean * mean).sum(1), sub, mean.t(), alpha=-2.0)  # [M, K]
        onehot = sub.new_zeros(m, k).scatter_(1, score.argmin(1, keepdim=True), 1.0)  # [M, K]
        counts = onehot.sum(0)  # [K]
        inv_counts = counts.clamp_min(1.0).reciprocal().unsqueeze(1)  # [K, 1]
        mean = torch.where(counts.unsqueeze(1) > 0, (onehot.t() @ sub) * inv_counts, mean)

    var = (onehot.t() @ sub_sq) * inv_counts - mean * mean  # [K, C]
    var = torch.where(counts.unsqueeze(1) < 2, subset_var, var).clamp_min(eps)  # [K, C]
    weight = (counts / m).clamp_min(_TINY)  # [K]
    return Mixture(weight / weight.sum(), mean + centre, var)


@torch.no_grad()
def em_mixture(
    points: Tensor,
    num_components: int,
    *,
    em_iters: int = 3,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    init_mean: Optional[Tensor] = None,
) -> Mixture:
    """A K-component diagonal Gaussian mixture fitted to ``points`` [M, C] by EM.

    Starts from k-means++ seeds (or ``init_mean`` [K, C]) with equal weights and the subset's
    variance in every component, then ``em_iters`` EM iterations, each an E-step (posteriors
    from two matrix products, as ``mixture_posteriors``) and an M-step (posterior-weighted
    weights, means and variances, floored by ``eps``), all K at once: no Python loop over
    points or components, no host sync. A component that loses all its mass keeps its previous
    mean and variance with a tiny weight, as an empty k-means cluster does.
    """
    centre, sub, sub_sq, subset_var = _centred_subset(points, eps)
    m, k = sub.shape[0], num_components
    if k == 1:  # one component: the subset's mean and variance (BatchNorm), for either estimator
        return Mixture(sub.new_ones(1), centre.unsqueeze(0), subset_var.unsqueeze(0))
    mean = _initial_centres(sub, sub_sq, centre, k, generator, init_mean)  # [K, C]
    var = subset_var.expand(k, -1)  # [K, C]
    weight = sub.new_full((k,), 1.0 / k)  # [K]
    for _ in range(em_iters):
        tau = mixture_posteriors(sub, Mixture(weight, mean, var))  # [M, K]  E-step
        mass = tau.sum(0)  # [K]                                            M-step
        inv_mass = mass.clamp_min(_TINY).reciprocal().unsqueeze(1)  # [K, 1]
        new_mean = (tau.t() @ sub) * inv_mass  # [K, C]
        new_var = ((tau.t() @ sub_sq) * inv_mass - new_mean * new_mean).clamp_min(eps)  # [K, C]
        alive = (mass > _TINY).unsqueeze(1)  # [K, 1]
        mean = torch.where(alive, new_mean, mean)
        var = torch.where(alive, new_var, var)
        weight = (mass / m).clamp_min(_TINY)
        weight = weight / weight.sum()  # [K]
    return Mixture(weight, mean + centre, var)


ESTIMATORS = ("kmeans", "em")


def estimate_mixture(
    points: Tensor,
    num_components: int,
    *,
    estimator: str = "kmeans",
    kmeans_iters: int = 2,
    em_iters: int = 3,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
) -> Mixture:
    """The mixture of fitting points [M, C] by ``estimator``: ``kmeans`` (k-means++ seeding,
    ``kmeans_iters`` Lloyd iterations, hard clusters; our reading of the paper) or ``em``
    (k-means++ seeding, ``em_iters`` EM iterations)."""
    if estimator == "kmeans":
        return kmeans_mixture(points, num_components, kmeans_iters=kmeans_iters, eps=eps,
                              generator=generator)
    if estimator == "em":
        return em_mixture(points, num_components, em_iters=em_iters, eps=eps, generator=generator)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


@torch.no_grad()
def fit_mixture(
    points: Tensor,
    num_components: int,
    *,
    fit_points: int = 1024,
    kmeans_iters: int = 2,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    estimator: str = "kmeans",
    em_iters: int = 3,
) -> Mixture:
    """Fit a K-component diagonal Gaussian mixture to ``points`` [P, C] (or a batch [N, C, L]).

    A random subset of at most ``fit_points`` points is fitted by ``estimate_mixture``.
    """
    sub = sample_fit_points(points, fit_points, generator)  # [M, C]
    return estimate_mixture(sub, num_components, estimator=estimator, kmeans_iters=kmeans_iters,
                            em_iters=em_iters, eps=eps, generator=generator)


# --------------------------------------------------------------------------------------------
# Steps 2-5, reference implementation on points [P, C]. Differentiable in x.
# --------------------------------------------------------------------------------------------


def mixture_posteriors(points: Tensor, mixture: Mixture) -> Tensor:
    """tau[p, k] = softmax_k(log weight_k + log N(x_p | mean_k, var_k)) for points [P, C].

    The diagonal-Gaussian log-density is expanded so that its point-dependent parts are two
    matrix products; the mixture is treated as constant (no gradient to its parameters). For
    accuracy far from zero, pass points and means centred by a common shift (the densities do
    not change).
    """
    weight, mean, var = (t.detach() for t in mixture)
    if weight.shape[0] == 1:
        # A single component has posterior exactly 1; skip the densities (K = 1 is BatchNorm).
        return points.new_ones(points.shape[0], 1)  # [P, 1]
    inv_var = var.reciprocal()  # [K, C]
    log_norm = -0.5 * (var.log().sum(1) + points.shape[1] * _LOG_2PI)  # [K]
    quad = (
        points.pow(2) @ inv_var.t()  # [P, K]
        - 2.0 * points @ (mean * inv_var).t()  # [P, K]
        + (mean.pow(2) * inv_var).sum(1)  # [K]
    )
    logits = weight.clamp_min(_TINY).log() + log_norm - 0.5 * quad  # [P, K]
    return torch.softmax(logits, dim=1)  # [P, K]


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


# --------------------------------------------------------------------------------------------
# Steps 2-5, fused implementation on [N, C, L] (what the module runs).
#
# Two autograd Functions, split where the moments are (so that synchronized MN can all-reduce
# them with ordinary autograd-aware collectives in between):
#   _PosteriorMoments: x -> xc = x - shift, tau [N, K, L], S1 = sum tau xc, S2 = sum tau xc^2
#   _MixtureAffine:    (xc, tau, lambda, E, Var, gamma, beta) -> y
# Every contraction is a batched matmul with K (or 2K) on the small side; posteriors live in
# [N, K, L] so that the products over C read the activations in their natural layout.
# --------------------------------------------------------------------------------------------


def _logit_params(mixture: Mixture) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients of the log joint density, linear in x and x^2: for a point x,

        log weight_k + log N(x | mean_k, var_k) = bias_k + x . lin[:, k] + x^2 . quad[:, k]

    with lin [C, K], quad [C, K], bias [K].
    """
    weight, mean, var = (t.detach() for t in mixture)
    inv_var = var.reciprocal()  # [K, C]
    lin = (mean * inv_var).t()  # [C, K]
    quad = (-0.5 * inv_var).t()  # [C, K]
    bias = (
        weight.clamp_min(_TINY).log()
        - 0.5 * (var.log().sum(1) + var.shape[1] * _LOG_2PI)
        - 0.5 * (mean * mean * inv_var).sum(1)
    )  # [K]
    return lin, quad, bias


def _flush_subnormals_(t: Tensor) -> Tensor:
    """Set entries smaller in magnitude than the dtype's smallest normal number to zero.

    Posteriors of well-separated components underflow into the subnormal range (logit gaps of
    about 90 in float32), and a matrix product with subnormal operands runs many times slower
    on x86 CPUs. Flushing them is what a GPU (or an FTZ CPU mode) does anyway and changes
    results by less than 1e-38 relative to the posteriors, which sum to 1.
    """
    return t.masked_fill_(t.abs() < torch.finfo(t.dtype).tiny, 0.0)


def _bmm_left(w: Tensor, u: Tensor) -> Tensor:
    """w [A, B] applied to every u[n] [B, L]: [N, A, L]."""
    return torch.bmm(w.expand(u.shape[0], *w.shape), u)


class _PosteriorMoments(torch.autograd.Function):
    """xc = x - shift; tau = softmax_k(bias + lin^T xc + quad^T xc^2); S1, S2 = tau-weighted sums.

    Inputs: x [N, C, L] (any float dtype), shift [C], lin [C, K], quad [C, K], bias [K]
    (constants: no gradient), need_moments. Outputs: xc [N, C, L], tau [N, K, L] and, if
    need_moments, S1 [K, C] = sum_{n,l} tau xc and S2 [K, C] = sum_{n,l} tau xc^2.

    On a CPU, allocating a fresh activation-sized tensor costs about as much as a pass over it
    (page faults), so the backward pass writes into buffers it already has: the incoming
    gradient of xc (only ever produced by _MixtureAffine.backward, for this Function alone) and
    the saved xc^2 once it has been read (recomputed if backward runs again, retain_graph).
    """

    @staticmethod
    def forward(ctx, x, shift, lin, quad, bias, need_moments, posterior_grad=True):
        k = bias.shape[0]
        xc = torch.empty(x.shape, dtype=shift.dtype, device=x.device)  # [N, C, L] contiguous
        torch.sub(x, shift.unsqueeze(1), out=xc)  # (also turns channels_last into [N, C, L])
        xsq = xc * xc  # [N, C, L]
        if k == 1:
            tau = xc.new_ones(xc.shape[0], 1, xc.shape[2])  # [N, 1, L]
        else:
            logits = torch.baddbmm(bias.unsqueeze(1), lin.t().expand(xc.shape[0], -1, -1), xc)
            logits.baddbmm_(quad.t().expand(xc.shape[0], -1, -1), xsq)  # [N, K, L]
            tau = _flush_subnormals_(torch.softmax(logits, dim=1))  # [N, K, L]
        ctx.save_for_backward(xc, tau, lin, quad)
        ctx.xsq = xsq  # an intermediate: kept on ctx so that backward may reuse its memory
        ctx.xsq_clobbered = False
        ctx.need_moments = need_moments
        ctx.posterior_grad = posterior_grad
        if not need_moments:
            return xc, tau
        s1 = torch.bmm(tau, xc.transpose(1, 2)).sum(0)  # [K, C]
        s2 = torch.bmm(tau, xsq.transpose(1, 2)).sum(0)  # [K, C]
        return xc, tau, s1, s2

    @staticmethod
    @once_differentiable
    def backward(ctx, g_xc, g_tau, g_s1=None, g_s2=None):
        xc, tau, lin, quad = ctx.saved_tensors
        xsq = xc * xc if ctx.xsq_clobbered else ctx.xsq
        n, k = tau.shape[0], tau.shape[1]
        with torch.autocast(device_type=xc.device.type, enabled=False):
            g_s1 = torch.zeros_like(lin.t()) if g_s1 is None else g_s1  # [K, C]
            g_s2 = torch.zeros_like(lin.t()) if g_s2 is None else g_s2  # [K, C]
            # S1 = sum tau xc and S2 = sum tau xc^2 reach x directly and through tau.
            if k == 1 or not ctx.posterior_grad:
                u = tau  # [N, K, L]  (tau is constant: no posterior term)
                b_lin, b_quad = g_s1.t(), 2.0 * g_s2.t()  # [C, K]
            else:
                g = torch.zeros_like(tau) if g_tau is None else g_tau.clone()  # [N, K, L]
                if ctx.need_moments:  # total dL/dtau
                    g.baddbmm_(g_s1.expand(n, -1, -1), xc).baddbmm_(g_s2.expand(n, -1, -1), xsq)
                # softmax backward: dL/dlogits = tau * (g - sum_k tau g)
                g_logits = tau * (g - (tau * g).sum(1, keepdim=True))  # [N, K, L]
                _flush_subnormals_(g_logits)
                # logits = bias + lin^T xc + quad^T xc^2: stack [logits | moments] terms
                u = torch.cat([g_logits, tau], 1)  # [N, 2K, L]
                b_lin = torch.cat([lin, g_s1.t()], 1)  # [C, 2K]
                b_quad = 2.0 * torch.cat([quad, g_s2.t()], 1)  # [C, 2K]
            # dL/dx = g_xc + b_lin u + xc * (b_quad u), accumulated in g_xc's memory
            g_x = _bmm_left(b_lin, u) if g_xc is None else g_xc.baddbmm_(b_lin.expand(n, -1, -1), u)
            scratch = torch.bmm(b_quad.expand(n, -1, -1), u, out=xsq)  # xsq is no longer needed
            ctx.xsq_clobbered = True
            g_x.addcmul_(xc, scratch)
        return g_x, None, None, None, None, None, None


class _MixtureAffine(torch.autograd.Function):
    """y = gamma * sum_k a[k] * (xc - E_k) * R_k + beta, with a = tau / sqrt(lambda) and
    R = 1 / sqrt(Var + eps); computed as y = xc * M1 + M2 where M1 = (R gamma)^T a and
    M2 = beta - (E R gamma)^T a are [N, C, L] batched products with K on the inside.

    Inputs: xc [N, C, L], tau [N, K, L], lam [K], mean [K, C] (centred like xc), var [K, C],
    gamma [C] or None, beta [C] or None, eps. Output y [N, C, L]. One activation-sized tensor is
    allocated forward (y) and one backward (M1, then dL/dxc in the same memory).
    """

    @staticmethod
    def forward(ctx, xc, tau, lam, mean, var, gamma, beta, eps, lambda_scale=True):
        n, k = tau.shape[0], tau.shape[1]
        if lambda_scale:
            inv_sqrt_lam = lam.clamp_min(_TINY).rsqrt()  # [K]
            a = tau * inv_sqrt_lam.unsqueeze(1)  # [N, K, L]
        else:  # a grad-free alias of tau (no copy; ctx may hold it without a reference cycle)
            a = tau.detach()  # [N, K, L]
        ctx.lambda_scale = lambda_scale
        r = (var + eps).rsqrt()  # [K, C]
        scale = r if gamma is None else r * gamma  # [K, C]
        offset = -mean * scale  # [K, C]
        if beta is not None:  # beta rides along as a (K+1)-th component with a = 1
            a = torch.cat([a, a.new_ones(n, 1, a.shape[2])], 1)  # [N, K+1, L]
            offset = torch.cat([offset, beta.unsqueeze(0)])  # [K+1, C]
        y = _bmm_left(scale.t(), a[:, :k]).mul_(xc)  # [N, C, L]  xc * M1
        y.baddbmm_(offset.t().expand(n, -1, -1), a)  # + M2
        ctx.save_for_backward(xc, tau, lam, mean, r, scale, offset[:k], gamma)
        ctx.a = a  # an intermediate, [N, K(+1), L]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y):
        xc, tau, lam, mean, r, scale, offset, gamma = ctx.saved_tensors
        n, k = tau.shape[0], tau.shape[1]
        a_beta = ctx.a  # [N, K+1, L] with a row of ones for beta, or [N, K, L]
        a = a_beta[:, :k]  # [N, K, L]
        need = ctx.needs_input_grad
        g_xc = g_tau = g_lam = g_mean = g_var = g_gamma = g_beta = None
        with torch.autocast(device_type=xc.device.type, enabled=False):
            g_y = g_y.contiguous()  # [N, C, L]
            buf = None
            if any(need[1:6]):
                buf = g_y * xc  # [N, C, L]  dL/dy * xc
            if need[1] or (need[2] and ctx.lambda_scale):
                # dL/da[n, k, l] = sum_c g_y (scale_k xc + offset_k)
                g_a = _bmm_left(scale, buf).baddbmm_(offset.expand(n, -1, -1), g_y)  # [N, K, L]
                inv_sqrt_lam = lam.clamp_min(_TINY).rsqrt()  # [K]
                if need[1]:
                    g_tau = g_a * inv_sqrt_lam.unsqueeze(1) if ctx.lambda_scale else g_a  # [N, K, L]
                if need[2] and ctx.lambda_scale:
                    g_lam = -0.5 * inv_sqrt_lam.pow(3) * (g_a * tau).sum((0, 2))  # [K]
                    g_lam = torch.where(lam > _TINY, g_lam, torch.zeros_like(g_lam))
            if any(need[3:7]):
                # Sums over points of a_k * g_y (and of g_y: dL/dbeta from the row of ones).
                ag = torch.bmm(a_beta, g_y.transpose(1, 2)).sum(0)  # [K(+1), C]
                if need[6]:
                    g_beta = ag[k]  # [C]
                ag = ag[:k]  # [K, C]
            if need[3] or need[4] or need[5]:
                agx = torch.bmm(a, buf.transpose(1, 2)).sum(0)  # [K, C]  sum of a_k g_y xc
                g_scaled = agx - mean * ag  # [K, C]  dL/d(R gamma)
                if need[3]:
                    g_mean = -scale * ag
                if need[4]:
                    g_var = -0.5 * r.pow(3) * (g_scaled if gamma is None else g_scaled * gamma)
                if need[5]:
                    g_gamma = (r * g_scaled).sum(0)  # [C]
            if need[0]:  # dL/dxc = g_y * M1, written over dL/dy * xc (no longer needed)
                m1 = torch.bmm(scale.t().expand(n, -1, -1), a, out=buf)  # [N, C, L]
                g_xc = m1.mul_(g_y)
        return g_xc, g_tau, g_lam, g_mean, g_var, g_gamma, g_beta, None, None


def mixture_norm2d(
    x: Tensor,
    mixture: Mixture,
    eps: float,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    reduce: Optional[Callable[[MixtureMoments], MixtureMoments]] = None,
    *,
    posterior_grad: bool = True,
    lambda_scale: bool = True,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Training-mode MN of a batch x [N, C, L] under a fitted mixture, then the affine.

    The fused equivalent of ``mixture_norm`` followed by ``y = weight * x_hat + bias``
    (with the same switches); computes in the dtype of the mixture. Returns y [N, C, L]
    (contiguous), the posteriors tau [N, K, L] and (lambda [K], E [K, C], Var [K, C], n_eff [K]).
    """
    shift = _mixture_shift(mixture)  # [C]
    lin, quad, logit_bias = _logit_params(
        Mixture(mixture.weight, mixture.mean - shift, mixture.var)
    )
    xc, tau, s1, s2 = _PosteriorMoments.apply(x, shift, lin, quad, logit_bias, True, posterior_grad)
    if not posterior_grad:
        tau = tau.detach()  # constants: lambda and the affine's posteriors carry no gradient
    moments = MixtureMoments(
        count=xc.new_full((), float(x.shape[0] * x.shape[2])),  # (a fill, not a host copy)
        mass=tau.sum((0, 2)),  # [K]
        sum_sq_tau=tau.square().sum((0, 2)),  # [K]
        sum_x=s1,
        sum_xx=s2,
        shift=shift,
    )
    if reduce is not None:
        moments = reduce(moments)
    lam, mean_c, var, n_eff = _centred_stats(moments)
    y = _MixtureAffine.apply(xc, tau, lam, mean_c, var, weight, bias, eps, lambda_scale)  # [N, C, L]
    return y, tau, (lam, mean_c + shift, var, n_eff)


def _mixture_norm2d_fixed(
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gamma: Optional[Tensor],
    beta: Optional[Tensor],
    *,
    posterior_grad: bool = True,
    lambda_scale: bool = True,
) -> Tensor:
    """MN of x [N, C, L] with given statistics (eval with running statistics): posteriors from
    the mixture (weight, mean, var floored by eps), normalization by the same statistics."""
    mixture = Mixture(weight, mean, var)
    shift = _mixture_shift(mixture)  # [C]
    lin, quad, logit_bias = _logit_params(
        Mixture(weight, mean - shift, var.clamp_min(eps))
    )
    xc, tau = _PosteriorMoments.apply(x, shift, lin, quad, logit_bias, False, posterior_grad)
    if not posterior_grad:
        tau = tau.detach()
    return _MixtureAffine.apply(xc, tau, weight, mean - shift, var, gamma, beta, eps, lambda_scale)


# --------------------------------------------------------------------------------------------
# point = "channel": an independent 1-D mixture per channel (BatchNorm's per-activation reading,
# the one third-party reimplementations use). Plain autograd ops on [N, C, K, L]; the tests check
# it against the vector reading run on each channel alone (C = 1), which is what it must equal.
# --------------------------------------------------------------------------------------------

POINTS = ("vector", "channel")


def _channel_seeds(sub: Tensor, k: int, generator: Optional[torch.Generator]) -> Tensor:
    """k-means++ seeds [C, K] of every channel's centred scalars sub [C, M], all channels at once."""
    c, m = sub.shape
    picks = [torch.randint(m, (c, 1), device=sub.device, generator=generator)]  # K x [C, 1]
    u = torch.rand(c, k - 1, device=sub.device, dtype=sub.dtype, generator=generator)  # [C, K-1]
    nearest = None
    for j in range(1, k):
        dist = (sub - sub.gather(1, picks[-1])).square()  # [C, M]
        nearest = dist if nearest is None else torch.minimum(nearest, dist)  # [C, M]
        cdf = (nearest + 1e-12 * (1.0 + nearest.amax(1, keepdim=True))).cumsum(1)  # [C, M]
        target = u[:, j - 1 : j] * cdf[:, -1:]  # [C, 1]
        picks.append(torch.searchsorted(cdf, target, right=True).clamp_max_(m - 1))
    return sub.gather(1, torch.cat(picks, 1))  # [C, K]


@torch.no_grad()
def channel_mixtures(
    points: Tensor,
    num_components: int,
    *,
    estimator: str = "kmeans",
    kmeans_iters: int = 2,
    em_iters: int = 3,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    init_mean: Optional[Tensor] = None,
) -> Mixture:
    """One K-component 1-D mixture per channel of fitting points [M, C], fitted as
    ``estimate_mixture`` fits the vector reading (k-means++ seeds or ``init_mean`` [K, C], then
    Lloyd or EM iterations), batched over channels. Returns weight, mean, var, each [K, C]."""
    x = points.detach().t()  # [C, M]
    c, m = x.shape
    k = num_components
    centre = x.mean(1, keepdim=True)  # [C, 1]
    sub = x - centre  # [C, M]
    sq = sub * sub  # [C, M]
    subset_var = sq.mean(1).clamp_min(eps)  # [C]
    if k == 1:
        return Mixture(sub.new_ones(1, c), centre.t(), subset_var.unsqueeze(0))
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if init_mean is None:
        mean = _channel_seeds(sub, k, generator)  # [C, K]
    else:
        mean = init_mean.detach().to(sub.dtype).t() - centre  # [C, K]
    x3, sq3 = sub.unsqueeze(2), sq.unsqueeze(2)  # [C, M, 1]
    if estimator == "kmeans":
        for _ in range(kmeans_iters + 1):
            dist = (x3 - mean.unsqueeze(1)).square()  # [C, M, K]
            onehot = torch.zeros_like(dist).scatter_(2, dist.argmin(2, keepdim=True), 1.0)  # [C, M, K]
            counts = onehot.sum(1)  # [C, K]
            inv = counts.clamp_min(1.0).reciprocal()  # [C, K]
            mean = torch.where(counts > 0, (onehot * x3).sum(1) * inv, mean)  # [C, K]
        var = (onehot * sq3).sum(1) * inv - mean * mean  # [C, K]
        var = torch.where(counts < 2, subset_var.unsqueeze(1), var).clamp_min(eps)
        weight = (counts / m).clamp_min(_TINY)  # [C, K]
    else:  # EM on the scalars, every channel at once
        var = subset_var.unsqueeze(1).expand(c, k)  # [C, K]
        weight = sub.new_full((c, k), 1.0 / k)  # [C, K]
        for _ in range(em_iters):
            logits = (weight.clamp_min(_TINY).log() - 0.5 * var.log()).unsqueeze(1) \
                - 0.5 * (x3 - mean.unsqueeze(1)).square() / var.unsqueeze(1)  # [C, M, K]
            tau = torch.softmax(logits, 2)  # [C, M, K]
            mass = tau.sum(1)  # [C, K]
            inv = mass.clamp_min(_TINY).reciprocal()
            new_mean = (tau * x3).sum(1) * inv  # [C, K]
            new_var = ((tau * sq3).sum(1) * inv - new_mean * new_mean).clamp_min(eps)
            alive = mass > _TINY
            mean, var = torch.where(alive, new_mean, mean), torch.where(alive, new_var, var)
            weight = (mass / m).clamp_min(_TINY)
            weight = weight / weight.sum(1, keepdim=True)
    weight = weight / weight.sum(1, keepdim=True)
    return Mixture(weight.t(), (mean + centre).t(), var.t())  # [K, C] each


def channel_mixture_norm(
    x: Tensor,
    mixture: Mixture,
    eps: float,
    gamma: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    *,
    fixed_stats: bool = False,
    posterior_grad: bool = True,
    lambda_scale: bool = True,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """MN of x [N, C, L] with one 1-D mixture per channel (weight, mean, var [K, C]), then the
    affine. Training: posterior-weighted batch statistics per (component, channel); with
    ``fixed_stats`` (eval with running statistics) the mixture's own. Returns y [N, C, L], the
    posteriors tau [N, C, K, L] and (lambda, E, Var, n_eff), each [K, C]."""
    weight, mean, var = (t.detach() for t in mixture)
    n, c, length = x.shape
    shift = (weight * mean).sum(0)  # [C]  (conditioning only, as in the vector reading)
    xc = (x - shift.unsqueeze(1)).unsqueeze(2)  # [N, C, 1, L]
    mc, vc = (mean - shift).t(), var.clamp_min(eps).t()  # [C, K]
    logits = (weight.t().clamp_min(_TINY).log() - 0.5 * vc.log())[..., None] \
        - 0.5 * (xc - mc[..., None]).square() / vc[..., None]  # [N, C, K, L]
    tau = torch.softmax(logits, 2)  # [N, C, K, L]
    if not posterior_grad:
        tau = tau.detach()
    if fixed_stats:
        lam, e, v, n_eff = weight.t(), mc, var.t(), torch.full_like(mc, float(n * length))  # [C, K]
    else:
        mass = tau.sum((0, 3))  # [C, K]
        inv_mass = mass.clamp_min(_TINY).reciprocal()
        lam = mass / (n * length)  # [C, K]
        e = (tau * xc).sum((0, 3)) * inv_mass  # [C, K]
        v = ((tau * xc.square()).sum((0, 3)) * inv_mass - e.square()).clamp_min(0.0)  # [C, K]
        n_eff = mass.square() / tau.square().sum((0, 3)).clamp_min(_TINY)  # [C, K]
    a = tau * lam.clamp_min(_TINY).rsqrt()[..., None] if lambda_scale else tau  # [N, C, K, L]
    x_hat = (a * (xc - e[..., None]) * (v + eps).rsqrt()[..., None]).sum(2)  # [N, C, L]
    y = x_hat if gamma is None else x_hat * gamma.unsqueeze(1)
    if beta is not None:
        y = y + beta.unsqueeze(1)
    stats = (lam.t(), (e + shift.unsqueeze(1)).t(), v.t(), n_eff.t())  # [K, C] each
    return y.contiguous(), tau, stats


def match_components_per_channel(batch_mean: Tensor, running_mean: Tensor) -> Tensor:
    """perm [K, C]: batch component perm[k, c] is averaged into running component k of channel c.
    For 1-D components the assignment that minimises the summed squared distance between means
    pairs them in sorted order (rearrangement inequality), so no search is needed."""
    batch_order = batch_mean.argsort(0)  # [K, C]: the batch component of each rank
    running_rank = running_mean.argsort(0).argsort(0)  # [K, C]: each running component's rank
    return batch_order.gather(0, running_rank)  # [K, C]


# --------------------------------------------------------------------------------------------
# Component matching for running statistics.
# --------------------------------------------------------------------------------------------

_PERMS: dict[tuple[int, str], Tensor] = {}


def match_components(batch_mean: Tensor, running_mean: Tensor) -> Tensor:
    """The permutation [K] of batch components that best matches the running ones.

    Mixture components carry no identity across batches, so batch component perm[k] is
    averaged into running component k, with perm minimising sum_k ||batch[perm[k]] -
    running[k]||^2. Brute force over K! permutations for K <= 6 (all on device, no host sync);
    greedy nearest-pair matching beyond that.
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


# --------------------------------------------------------------------------------------------
# The module.
# --------------------------------------------------------------------------------------------


class MixtureNorm2d(nn.Module):
    r"""Mixture Normalization over a 4-D input [N, C, H, W]; a drop-in for ``nn.BatchNorm2d``.

    Training: a ``num_components``-component diagonal Gaussian mixture is fitted to the batch's
    points with k-means++ (on at most ``fit_points`` random points, ``kmeans_iters`` Lloyd
    iterations, no gradient); each point is normalized by every component's posterior-weighted
    statistics, weighted by ``tau / sqrt(lambda)``; then one per-channel affine. Gradients flow
    through the posteriors and statistics, not through the clustering.

    Eval with ``track_running_stats``: posteriors and normalization both come from the running
    mixture (``running_weight``, ``running_mean``, ``running_var``), so a sample's output does
    not depend on the rest of its batch. Without running statistics, eval uses the batch, as BN.

    Statistics are computed in float32 (float64 for float64 input) whatever the input dtype, as
    BatchNorm does under autocast; the output has the input's dtype and memory format.

    Args:
        num_features: C, the number of channels.
        num_components: K, mixture components (K = 1 is exactly ``nn.BatchNorm2d``).
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``
            (``momentum=None`` is a cumulative moving average).
        fit_points: at most this many random points are clustered per batch.
        kmeans_iters: Lloyd iterations after k-means++ seeding (``estimator="kmeans"``).
        point: what one mixture describes: ``"vector"`` (a point is the C-vector at one position;
            one mixture over all channels jointly, our reading) or ``"channel"`` (an independent
            1-D mixture per channel; ``running_weight`` is then [K, C]).
        posterior_grad: gradients flow through the posteriors (and so through lambda), or the
            posteriors are treated as constants.
        lambda_scale: keep the Fisher-vector factor 1 / sqrt(lambda_k), or drop it. With it,
            well-separated components give an output second moment of about K, not 1.
        estimator: how the batch mixture is fitted: ``"kmeans"`` (hard k-means++ clusters, our
            assumption) or ``"em"`` (``em_iters`` EM iterations after k-means++ seeding).
        em_iters: EM iterations (``estimator="em"``).

    Synchronized MN (``dcgan_mn.sync``) overrides ``_fit_batch_mixture`` and
    ``_reduce_moments``; ``reduce_moments`` is a lower-level hook (a callable summing
    ``MixtureMoments`` across processes) honoured by the default ``_reduce_moments``.
    """

    _version = 1
    __constants__ = ["num_features", "num_components", "eps", "momentum", "affine",
                     "track_running_stats", "fit_points", "kmeans_iters", "estimator", "em_iters",
                     "point", "posterior_grad", "lambda_scale"]

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        fit_points: int = 1024,
        kmeans_iters: int = 2,
        estimator: str = "kmeans",
        em_iters: int = 3,
        point: str = "vector",
        posterior_grad: bool = True,
        lambda_scale: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if num_components < 1:
            raise ValueError(f"num_components (K) must be >= 1, got {num_components}")
        if fit_points < num_components:
            raise ValueError(
                f"fit_points must be >= num_components ({num_components}), got {fit_points}"
            )
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if em_iters < 0:
            raise ValueError(f"em_iters must be >= 0, got {em_iters}")
        if point not in POINTS:
            raise ValueError(f"point must be one of {POINTS}, got {point!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.fit_points = fit_points
        self.kmeans_iters = kmeans_iters
        self.estimator = estimator
        self.em_iters = em_iters
        self.point = point
        self.posterior_grad = bool(posterior_grad)
        self.lambda_scale = bool(lambda_scale)
        self.reduce_moments: Optional[Callable[[MixtureMoments], MixtureMoments]] = None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            k, c = num_components, num_features
            weight_shape = (k,) if point == "vector" else (k, c)
            self.register_buffer("running_weight", torch.empty(weight_shape, **factory))
            self.register_buffer("running_mean", torch.empty(k, c, **factory))
            self.register_buffer("running_var", torch.empty(k, c, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_weight", None)
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        # Telemetry of the last training batch: detached device tensors, read only on demand.
        self.last_batch_weight: Optional[Tensor] = None  # [K]
        self.last_posterior_entropy: Optional[Tensor] = None  # []
        self.reset_parameters()

    # ---- nn.BatchNorm2d-style housekeeping ----------------------------------------------------

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_weight.fill_(1.0 / self.num_components)
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            "{num_features}, num_components={num_components}, eps={eps}, momentum={momentum}, "
            "affine={affine}, track_running_stats={track_running_stats}, "
            "fit_points={fit_points}, kmeans_iters={kmeans_iters}, estimator={estimator}, "
            "em_iters={em_iters}, point={point}, posterior_grad={posterior_grad}, "
            "lambda_scale={lambda_scale}"
            .format(**self.__dict__)
        )

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"MixtureNorm2d expects 4-D input [N, C, H, W], got {x.dim()}-D "
                             f"input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"MixtureNorm2d({self.num_features}) got {x.shape[1]} channels "
                             f"(input shape {tuple(x.shape)})")

    # ---- overridable steps (synchronized MN replaces these) ----------------------------------

    def _fit_batch_mixture(self, x: Tensor, dtype: torch.dtype) -> Mixture:
        """The mixture (in ``dtype``) for this batch x [N, C, L], without gradient."""
        return self._estimate(sample_fit_points(x, self.fit_points).to(dtype))  # [M, C] points

    def _estimate(self, points: Tensor) -> Mixture:
        """The mixture of fitting points [M, C] by this layer's estimator (per channel for
        ``point="channel"``: weight, mean and var [K, C])."""
        if self.point == "channel":
            return channel_mixtures(points, self.num_components, estimator=self.estimator,
                                    kmeans_iters=self.kmeans_iters, em_iters=self.em_iters, eps=self.eps)
        return estimate_mixture(points, self.num_components, estimator=self.estimator,
                                kmeans_iters=self.kmeans_iters, em_iters=self.em_iters, eps=self.eps)

    def _reduce_moments(self, moments: MixtureMoments) -> MixtureMoments:
        """Sum the moments over the processes that share this batch (identity by default)."""
        return moments if self.reduce_moments is None else self.reduce_moments(moments)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        n, c, h, w = x.shape
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats and n * h * w == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)}"
            )
        if self.num_components == 1 and self._moments_stay_local():
            return self._batch_norm(x, use_batch_stats)
        # MN's statistics are always computed in fp32 (or fp64): bf16 posteriors and variances
        # lose too much precision, exactly as BatchNorm keeps fp32 statistics under autocast.
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        gamma = self.weight.to(compute_dtype) if self.affine else None
        beta = self.bias.to(compute_dtype) if self.affine else None
        x_ncl = x.flatten(2)  # [N, C, L]  (a view, also for channels_last)
        with torch.autocast(device_type=x.device.type, enabled=False):
            switches = dict(posterior_grad=self.posterior_grad, lambda_scale=self.lambda_scale)
            if self.point == "channel":
                if not self._moments_stay_local():
                    raise ValueError("MixtureNorm2d(point='channel') is not synchronized across processes")
                if use_batch_stats:
                    mixture = self._fit_batch_mixture(x_ncl, compute_dtype)
                else:
                    mixture = Mixture(self.running_weight.to(compute_dtype),
                                      self.running_mean.to(compute_dtype), self.running_var.to(compute_dtype))
                y, tau, stats = channel_mixture_norm(x_ncl.to(compute_dtype), mixture, self.eps, gamma, beta,
                                                     fixed_stats=not use_batch_stats, **switches)
                if self.training:
                    self._record_batch(tau, stats)
            elif use_batch_stats:
                mixture = self._fit_batch_mixture(x_ncl, compute_dtype)
                y, tau, stats = mixture_norm2d(
                    x_ncl, mixture, self.eps, gamma, beta, reduce=self._reduce_moments, **switches
                )
                if self.training:
                    self._record_batch(tau, stats)
            else:
                y = _mixture_norm2d_fixed(
                    x_ncl, self.running_weight.to(compute_dtype),
                    self.running_mean.to(compute_dtype), self.running_var.to(compute_dtype),
                    self.eps, gamma, beta,
                    posterior_grad=self.posterior_grad, lambda_scale=self.lambda_scale,
                )
        y = y.to(x.dtype).view(n, c, h, w)  # [N, C, H, W]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def _moments_stay_local(self) -> bool:
        """True when no subclass or hook sums the moments across processes."""
        return (self.reduce_moments is None
                and type(self)._reduce_moments is MixtureNorm2d._reduce_moments)

    def _batch_norm(self, x: Tensor, use_batch_stats: bool) -> Tensor:
        """K = 1 is BatchNorm, so it runs BatchNorm's own kernel: one posterior equal to 1, one
        component with the batch mean and biased variance, running variance unbiased by
        P / (P - 1) = n_eff / (n_eff - 1), the weight staying 1. Two kernels forward instead of
        the mixture path's dozens (``test_k1_mixture_path_equals_batchnorm`` keeps the mixture
        path itself equal to BatchNorm at K = 1). Dtypes as nn.BatchNorm2d: a bf16 input under
        autocast is normalized with float32 statistics by the kernel itself."""
        factor = 0.0
        running_mean = running_var = None
        if self.track_running_stats:
            running_mean, running_var = self.running_mean.view(-1), self.running_var.view(-1)  # [C]
            if self.training:
                self.num_batches_tracked.add_(1)
                # As nn.BatchNorm2d: momentum=None is a cumulative average (one host read).
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
        if self.training:
            self.last_batch_weight = self._unit_weight(x.device)
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps,
        )  # [N, C, H, W], memory format kept

    def _unit_weight(self, device) -> Tensor:
        """The constant [1] mixture weight of K = 1 (made once, not every step)."""
        one = getattr(self, "_one", None)
        if one is None or one.device != device:
            one = self._one = torch.ones(1, device=device)
        return one

    @torch.no_grad()
    def _record_batch(self, tau: Tensor, stats: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
        """Telemetry and running statistics after a training batch."""
        lam, mean, var, n_eff = (s.detach() for s in stats)
        self.last_batch_weight = lam
        k_dim = 2 if self.point == "channel" else 1  # tau [N, C, K, L] or [N, K, L]
        ent = -(tau * tau.clamp_min(_TINY).log()).sum(k_dim).mean()  # []
        self.last_posterior_entropy = ent.detach()
        if self.track_running_stats:
            self._update_running(lam, mean, var, n_eff)

    @torch.no_grad()
    def _update_running(self, lam: Tensor, mean: Tensor, var: Tensor, n_eff: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        if self.num_components > 1 and self.point == "channel":  # stats [K, C]
            perm = match_components_per_channel(mean, self.running_mean.to(mean.dtype))  # [K, C]
            lam, mean, var, n_eff = (t.gather(0, perm) for t in (lam, mean, var, n_eff))
        elif self.num_components > 1:
            perm = match_components(mean, self.running_mean.to(mean.dtype))  # [K]
            lam, mean, var, n_eff = lam[perm], mean[perm], var[perm], n_eff[perm]
        # Unbiased variance with the effective sample size: n_eff / (n_eff - 1), BN's
        # P / (P - 1) for K = 1. A component carrying less than two points' worth of posterior
        # mass (n_eff < 2) has no variance estimate worth correcting; its factor is capped at
        # n_eff (<= 2) instead of growing without bound as n_eff -> 1.
        bessel = n_eff / (n_eff - 1.0).clamp_min(1.0)  # [K] (or [K, C] per channel)
        unbiased = var * (bessel if bessel.dim() == 2 else bessel.unsqueeze(1))  # [K, C]
        dt = self.running_mean.dtype
        self.running_weight.lerp_(lam.to(dt), factor)
        self.running_mean.lerp_(mean.to(dt), factor)
        self.running_var.lerp_(unbiased.to(dt), factor)

    # ---- telemetry -----------------------------------------------------------------------------

    def telemetry(self) -> dict[str, Tensor]:
        """Last training batch: mixture weights [K] (per channel, sorted, averaged over channels for
        ``point="channel"``), mean posterior entropy (nats) and the effective number of components
        exp(H(lambda)). Device tensors; call .item() to log."""
        if self.last_batch_weight is None:
            return {}
        lam = self.last_batch_weight.clamp_min(_TINY)
        if self.num_components == 1:  # one posterior equal to 1: zero entropy
            return {"mixture_weight": self.last_batch_weight,
                    "posterior_entropy": torch.zeros_like(lam[0]),
                    "effective_components": torch.ones_like(lam[0])}
        if lam.dim() == 2:  # point="channel", [K, C]: components sorted per channel, then averaged
            return {
                "mixture_weight": self.last_batch_weight.sort(0, descending=True).values.mean(1),
                "posterior_entropy": self.last_posterior_entropy,
                "effective_components": torch.exp(-(lam * lam.log()).sum(0)).mean(),
            }
        return {
            "mixture_weight": self.last_batch_weight,
            "posterior_entropy": self.last_posterior_entropy,
            "effective_components": torch.exp(-(lam * lam.log()).sum()),
        }


def make_norm2d(
    num_features: int,
    kind: str,
    num_components: int = 3,
    **mn_kwargs,
) -> nn.Module:
    """Norm factory: ``kind`` is ``"bn"`` (nn.BatchNorm2d) or ``"mn"`` (MixtureNorm2d)."""
    if kind == "bn":
        return nn.BatchNorm2d(num_features)
    if kind == "mn":
        return MixtureNorm2d(num_features, num_components=num_components, **mn_kwargs)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'bn' or 'mn'")
