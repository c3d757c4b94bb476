"""Mixture Normalization (Kalayeh & Shah, TPAMI 2019) and the norm-layer factory.

Mixture Normalization (MN) replaces BatchNorm's single Gaussian per channel with a K-component
diagonal Gaussian mixture over the *points* of a batch (a point is the C-vector at one
(n, h, w); a batch of [N, C, H, W] has P = N*H*W of them). Each point is normalized by every
component's statistics, weighted by its posterior:

    x_hat_p = sum_k tau[p, k] / sqrt(lambda_k) * (x_p - E_k) / sqrt(Var_k + eps)

The math lives in pure functions (``fit_mixture``, ``mixture_posteriors``,
``mixture_moments``, ``mixture_normalize``); ``MixtureNorm2d`` only decides between batch and
running statistics and updates its buffers, as ``nn.BatchNorm2d`` does. With K = 1 every
posterior is exactly 1 and the layer is BatchNorm.

Shape legend used in the comments: P points, M fitting points, K components, C channels.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Mixture",
    "MixtureMoments",
    "fit_mixture",
    "mixture_posteriors",
    "mixture_moments",
    "mixture_normalize",
    "mixture_norm",
    "match_components",
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


def _sq_dists(points: Tensor, centres: Tensor) -> Tensor:
    """Squared Euclidean distances via one matrix product: [M, C] x [K, C] -> [M, K]."""
    d = (
        points.pow(2).sum(1, keepdim=True)  # [M, 1]
        - 2.0 * points @ centres.t()  # [M, K]
        + centres.pow(2).sum(1)  # [K]
    )
    return d.clamp_min_(0.0)  # [M, K]


@torch.no_grad()
def fit_mixture(
    points: Tensor,
    num_components: int,
    *,
    fit_points: int = 1024,
    kmeans_iters: int = 2,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
) -> Mixture:
    """Fit a K-component diagonal Gaussian mixture to ``points`` [P, C] with k-means++.

    A random subset of at most ``fit_points`` points is clustered: k-means++ seeding, then
    ``kmeans_iters`` Lloyd iterations; weights, means and variances are read off the hard
    clusters (variances floored by ``eps``). Everything stays on the points' device; there is no
    host synchronisation. Degenerate inputs (constant points, fewer distinct points than K)
    give empty clusters, which keep a centre, a tiny weight and the subset's variance, so every
    later step stays finite.
    """
    points = points.detach()
    num_points, num_channels = points.shape
    k = num_components
    if num_points > fit_points:
        idx = torch.randperm(num_points, device=points.device, generator=generator)[:fit_points]
        sub = points.index_select(0, idx)  # [M, C]
    else:
        sub = points  # [M, C]
    m = sub.shape[0]
    # Cluster centred points: the one-pass variances below then do not cancel for inputs far
    # from zero (1e4 + small noise). The centre is added back to the means at the end.
    centre = sub.mean(0)  # [C]
    sub = sub - centre  # [M, C]
    subset_var = sub.pow(2).mean(0).clamp_min(eps)  # [C]
    if k == 1:
        return Mixture(sub.new_ones(1), centre.unsqueeze(0), subset_var.unsqueeze(0))

    # k-means++ seeding: each new centre is drawn with probability proportional to the squared
    # distance to the nearest centre chosen so far. The small constant keeps the draw defined
    # when every remaining distance is zero (constant input).
    first = torch.randint(m, (1,), device=sub.device, generator=generator)  # [1]
    centres = [sub.index_select(0, first)]  # K x [1, C]
    nearest = _sq_dists(sub, centres[0]).squeeze(1)  # [M]
    for _ in range(1, k):
        probs = nearest + 1e-12 * (1.0 + nearest.max())  # [M]
        pick = torch.multinomial(probs, 1, generator=generator)  # [1]
        centres.append(sub.index_select(0, pick))
        nearest = torch.minimum(nearest, _sq_dists(sub, centres[-1]).squeeze(1))  # [M]
    mean = torch.cat(centres, 0)  # [K, C]

    # Lloyd iterations. An empty cluster keeps its previous centre.
    for it in range(kmeans_iters + 1):
        assign = _sq_dists(sub, mean).argmin(1)  # [M]
        onehot = torch.nn.functional.one_hot(assign, k).to(sub.dtype)  # [M, K]
        counts = onehot.sum(0)  # [K]
        sums = onehot.t() @ sub  # [K, C]
        new_mean = sums / counts.clamp_min(1.0).unsqueeze(1)  # [K, C]
        empty = (counts == 0).unsqueeze(1)  # [K, 1]
        if it < kmeans_iters:
            mean = torch.where(empty, mean, new_mean)  # [K, C]

    # Read the mixture off the final assignment (computed against the final centres).
    sq = onehot.t() @ sub.pow(2)  # [K, C]
    cluster_mean = torch.where(empty, mean, new_mean)  # [K, C]
    var = sq / counts.clamp_min(1.0).unsqueeze(1) - cluster_mean.pow(2)  # [K, C]
    var = torch.where(empty | (counts.unsqueeze(1) < 2), subset_var, var).clamp_min(eps)  # [K, C]
    weight = (counts / m).clamp_min(_TINY)  # [K]
    weight = weight / weight.sum()  # [K]
    return Mixture(weight, cluster_mean + centre, var)


# --------------------------------------------------------------------------------------------
# Steps 2-4: posteriors, weighted statistics, normalization. Differentiable in x.
# --------------------------------------------------------------------------------------------


def mixture_posteriors(points: Tensor, mixture: Mixture) -> Tensor:
    """tau[p, k] = softmax_k(log weight_k + log N(x_p | mean_k, var_k)) for points [P, C].

    The diagonal-Gaussian log-density is expanded so that its point-dependent parts are two
    matrix products; the mixture is treated as constant (no gradient to its parameters).
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


def moments_to_stats(moments: MixtureMoments) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-component statistics from summed moments.

    Returns lambda [K] (batch mixture weight = mean posterior), E [K, C], Var [K, C] (biased,
    weighted by the normalized contribution w[p, k] = tau[p, k] / sum_p tau[p, k]) and the
    effective sample size n_eff [K] = 1 / sum_p w[p, k]^2, which is P for K = 1.
    """
    mass = moments.mass.clamp_min(_TINY)  # [K]
    lam = moments.mass / moments.count  # [K]
    mean_c = moments.sum_x / mass.unsqueeze(1)  # [K, C]  E_k - shift
    var = (moments.sum_xx / mass.unsqueeze(1) - mean_c.pow(2)).clamp_min(0.0)  # [K, C]
    n_eff = mass.pow(2) / moments.sum_sq_tau.clamp_min(_TINY)  # [K]
    return lam, mean_c + moments.shift, var, n_eff


def mixture_normalize(
    points: Tensor, tau: Tensor, weight: Tensor, mean: Tensor, var: Tensor, eps: float
) -> Tensor:
    """x_hat_p = sum_k tau[p,k] / sqrt(weight_k) * (x_p - mean_k) / sqrt(var_k + eps).

    Rewritten as x_p * (A @ R)_p - (A @ (mean * R))_p with A = tau / sqrt(weight) [P, K] and
    R = 1 / sqrt(var + eps) [K, C], so no [P, K, C] tensor is ever formed.
    """
    if weight.shape[0] == 1:
        inv_std = torch.rsqrt(var + eps)  # [1, C]
        return (points - mean) * inv_std  # [P, C]  (BatchNorm; weight is 1)
    a = tau * torch.rsqrt(weight.clamp_min(_TINY))  # [P, K]
    r = torch.rsqrt(var + eps)  # [K, C]
    return points * (a @ r) - a @ (mean * r)  # [P, C]


def mixture_norm(
    points: Tensor,
    mixture: Mixture,
    eps: float,
    reduce: Optional[Callable[[MixtureMoments], MixtureMoments]] = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Training-mode MN of points [P, C] under a fitted mixture (the batch-statistics path).

    ``reduce`` (optional) sums the moments across processes (synchronized MN). Returns the
    normalized points [P, C], the posteriors [P, K] and (lambda, E, Var, n_eff).
    """
    tau = mixture_posteriors(points, mixture)  # [P, K]
    # The shift only improves conditioning; any constant gives the same statistics.
    shift = (mixture.weight.unsqueeze(1) * mixture.mean).sum(0).detach()  # [C]
    moments = mixture_moments(points, tau, shift)
    if reduce is not None:
        moments = reduce(moments)
    stats = moments_to_stats(moments)
    lam, mean, var, _ = stats
    return mixture_normalize(points, tau, lam, mean, var, eps), tau, stats


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
    cost = _sq_dists(running_mean, batch_mean)  # [K_run, K_batch]
    if k <= 6:
        key = (k, str(cost.device))
        perms = _PERMS.get(key)
        if perms is None:
            perms = torch.tensor(list(itertools.permutations(range(k))), device=cost.device)
            _PERMS[key] = perms  # [K!, K]
        total = cost.gather(1, perms.t()).sum(0)  # [K!]
        return perms[total.argmin()]  # [K]
    perm = torch.empty(k, dtype=torch.long, device=cost.device)
    cost = cost.clone()
    for _ in range(k):  # greedy: repeatedly take the closest remaining pair
        flat = int(cost.argmin())
        r, b = divmod(flat, k)
        perm[r] = b
        cost[r, :] = float("inf")
        cost[:, b] = float("inf")
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

    Args:
        num_features: C, the number of channels.
        num_components: K, mixture components (K = 1 is exactly ``nn.BatchNorm2d``).
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``
            (``momentum=None`` is a cumulative moving average).
        fit_points: at most this many random points are clustered per batch.
        kmeans_iters: Lloyd iterations after k-means++ seeding.
        reduce_moments: optional callable summing ``MixtureMoments`` across processes
            (synchronized MN); ``None`` for single-process training.
    """

    _version = 1
    __constants__ = ["num_features", "num_components", "eps", "momentum", "affine",
                     "track_running_stats", "fit_points", "kmeans_iters"]

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
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.fit_points = fit_points
        self.kmeans_iters = kmeans_iters
        self.reduce_moments: Optional[Callable[[MixtureMoments], MixtureMoments]] = None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            k, c = num_components, num_features
            self.register_buffer("running_weight", torch.empty(k, **factory))
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
            "fit_points={fit_points}, kmeans_iters={kmeans_iters}".format(**self.__dict__)
        )

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"MixtureNorm2d expects 4-D input [N, C, H, W], got {x.dim()}-D "
                             f"input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"MixtureNorm2d({self.num_features}) got {x.shape[1]} channels "
                             f"(input shape {tuple(x.shape)})")

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        n, c, h, w = x.shape
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats and n * h * w == 1 and self.training:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)}"
            )
        in_dtype = x.dtype
        # MN's statistics are always computed in fp32 (or fp64): bf16 posteriors and variances
        # lose too much precision, exactly as BatchNorm keeps fp32 statistics under autocast.
        compute_dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            points = x.permute(0, 2, 3, 1).reshape(-1, c).to(compute_dtype)  # [P, C]
            if use_batch_stats:
                x_hat = self._normalize_batch(points)  # [P, C]
            else:
                x_hat = self._normalize_running(points)  # [P, C]
            if self.affine:
                x_hat = x_hat * self.weight.to(compute_dtype) + self.bias.to(compute_dtype)
            out = x_hat.to(in_dtype).reshape(n, h, w, c).permute(0, 3, 1, 2)  # [N, C, H, W]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return out  # already channels_last strided
        return out.contiguous()

    def _normalize_batch(self, points: Tensor) -> Tensor:
        mixture = fit_mixture(
            points, self.num_components, fit_points=self.fit_points,
            kmeans_iters=self.kmeans_iters, eps=self.eps,
        )
        x_hat, tau, (lam, mean, var, n_eff) = mixture_norm(
            points, mixture, self.eps, reduce=self.reduce_moments
        )
        if self.training:
            with torch.no_grad():
                self.last_batch_weight = lam.detach()
                ent = -(tau * tau.clamp_min(_TINY).log()).sum(1).mean()  # []
                self.last_posterior_entropy = ent.detach()
                if self.track_running_stats:
                    self._update_running(lam, mean, var, n_eff)
        return x_hat

    @torch.no_grad()
    def _update_running(self, lam: Tensor, mean: Tensor, var: Tensor, n_eff: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        if self.num_components > 1:
            perm = match_components(mean.detach(), self.running_mean.to(mean.dtype))  # [K]
            lam, mean, var, n_eff = lam[perm], mean[perm], var[perm], n_eff[perm]
        # Unbiased variance with the effective sample size (BN's P / (P - 1) for K = 1).
        unbiased = var * (n_eff / (n_eff - 1.0).clamp_min(_TINY)).unsqueeze(1)  # [K, C]
        dt = self.running_mean.dtype
        self.running_weight.lerp_(lam.to(dt), factor)
        self.running_mean.lerp_(mean.to(dt), factor)
        self.running_var.lerp_(unbiased.to(dt), factor)

    def _normalize_running(self, points: Tensor) -> Tensor:
        dt = points.dtype
        weight = self.running_weight.to(dt)
        mean = self.running_mean.to(dt)
        var = self.running_var.to(dt)
        # Posteriors from the running mixture; the running variance is floored like the fit's.
        tau = mixture_posteriors(points, Mixture(weight, mean, var.clamp_min(self.eps)))
        return mixture_normalize(points, tau, weight, mean, var, self.eps)

    # ---- telemetry -----------------------------------------------------------------------------

    def telemetry(self) -> dict[str, Tensor]:
        """Last training batch: mixture weights [K], mean posterior entropy (nats) and the
        effective number of components exp(H(lambda)). Device tensors; call .item() to log."""
        if self.last_batch_weight is None:
            return {}
        lam = self.last_batch_weight.clamp_min(_TINY)
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
