"""The norm layers' shared bookkeeping and ``MixtureNorm2d``, split as torch splits ``_NormBase`` /
``_BatchNorm``.

``_ComponentNormBase`` is the bookkeeping Mixture and Mode Normalization share, as torch's
``_NormBase`` is BatchNorm's. Both layers keep, per component k of K, a running mean and
variance over C channels; both are BatchNorm at K = 1, and so share BatchNorm's hyper-parameters
(eps, momentum, affine, track_running_stats), its per-channel affine, its ``num_batches_tracked``
and its update rule (``lerp`` by momentum, ``None`` = cumulative average, the variance unbiased
by n / (n - 1) with the component's effective count). A subclass registers what is its own in
``_register_own`` (MN's running mixture weights, Mode's gating network), before the shared
tensors, so that parameter and buffer order, and so optimizer state and state dicts, read as
they always have.

``_MixtureNormBase`` keeps MN's own books on it (its hyper-parameters and their checks, the
running mixture weights, the running-statistics update and telemetry); ``MixtureNorm2d`` adds
the forward: fit the batch mixture (or take the running one), call the one functional front
door ``functional.mixture_norm``, record the batch. What differs between the vector and the
per-channel reading is chosen once, in ``__init__`` (``mixture.READINGS``).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .estimators import ESTIMATORS, estimate_mixture, sample_fit_points
from .functional import mixture_norm
from .mixture import _TINY, POINTS, READINGS, Mixture, MixtureMoments

__all__ = ["BATCHNORM_OPTIONS", "MN_OPTIONS", "MixtureNorm2d"]


class _ComponentNormBase(nn.Module):
    """Hyper-parameters, affine, running [K, C] statistics and their update; no forward."""

    _components_arg = "num_components"  # the constructor's name for K, in messages

    def __init__(
        self,
        num_features: int,
        num_components: int,
        eps: float,
        momentum: Optional[float],
        affine: bool,
        track_running_stats: bool,
        device=None,
        dtype=None,
    ) -> None:
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
            self.register_buffer(
                name, torch.empty(k, c, **factory) if self.track_running_stats else None
            )
        self.register_buffer(
            "num_batches_tracked",
            torch.tensor(0, dtype=torch.long, device=device) if self.track_running_stats else None,
        )
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
        return (
            f"{self.num_features}, {self._components_arg}={self.num_components}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(
                f"{name} expects 4-D input [N, C, H, W], got {x.dim()}-D "
                f"input of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{name}({self.num_features}) got {x.shape[1]} channels "
                f"(input shape {tuple(x.shape)})"
            )

    # ---- running statistics --------------------------------------------------------------------

    def _momentum_factor(self) -> Union[float, Tensor]:
        """This batch's weight in the running averages: ``momentum``, or 1 / batches seen for
        ``momentum=None`` (a cumulative average, as nn.BatchNorm2d), as a device tensor: no host
        read. Call after ``num_batches_tracked`` counts this batch."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)

    @torch.no_grad()
    def _fold_running(
        self, mean: Tensor, var: Tensor, n_eff: Tensor, factor: Union[float, Tensor]
    ) -> None:
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


# BatchNorm's hyper-parameters, which MN shares, and MixtureNorm2d's own: one list each for
# __constants__, extra_repr and the layer's callers (the config's NormSpecs, synchronized copies).
BATCHNORM_OPTIONS = ("eps", "momentum", "affine", "track_running_stats")
MN_OPTIONS = (
    "fit_points",
    "kmeans_iters",
    "estimator",
    "em_iters",
    "point",
    "posterior_grad",
    "lambda_scale",
)


class _MixtureNormBase(_ComponentNormBase):
    """Hyper-parameters, parameters and running buffers of Mixture Normalization; no forward."""

    _version = 1
    __constants__ = ["num_features", "num_components", *BATCHNORM_OPTIONS, *MN_OPTIONS]

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
        super().__init__(num_features, num_components, eps, momentum, affine, track_running_stats)
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
        self.fit_points, self.kmeans_iters, self.estimator = fit_points, kmeans_iters, estimator
        self.em_iters, self.point = em_iters, point
        self._reading = READINGS[point]  # the layout of everything that differs between readings
        self.posterior_grad = bool(posterior_grad)
        self.lambda_scale = bool(lambda_scale)
        self.reduce_moments: Optional[Callable[[MixtureMoments], MixtureMoments]] = None
        # Telemetry of the last training batch: detached device tensors, read only on demand.
        self.last_batch_weight: Optional[Tensor] = None  # [K]
        self.last_posterior_entropy: Optional[Tensor] = None  # []
        self._register_tensors(device, dtype)

    def _register_own(self, factory: dict) -> None:
        """running_weight: the running mixture weights, [K] (or [K, C] per channel)."""
        shape = self._reading.weight_shape(self.num_components, self.num_features)
        self.register_buffer(
            "running_weight", torch.empty(shape, **factory) if self.track_running_stats else None
        )

    # ---- nn.BatchNorm2d-style housekeeping ----------------------------------------------------

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.track_running_stats:
            self.running_weight.fill_(1.0 / self.num_components)

    def options(self) -> dict:
        """The keyword arguments this layer was built with (BatchNorm's and MN's own)."""
        return {name: getattr(self, name) for name in (*BATCHNORM_OPTIONS, *MN_OPTIONS)}

    def extra_repr(self) -> str:
        return super().extra_repr() + "".join(f", {n}={getattr(self, n)}" for n in MN_OPTIONS)

    # ---- running statistics and telemetry -----------------------------------------------------

    def _momentum_factor(self) -> float:
        """As the base's, but a Python float: the K = 1 path hands it to BatchNorm's kernel,
        which takes no tensor (one host read, only for ``momentum=None``)."""
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)

    @torch.no_grad()
    def _update_running(self, lam: Tensor, mean: Tensor, var: Tensor, n_eff: Tensor) -> None:
        """Fold a training batch's statistics (lambda, E, Var, n_eff) into the running ones."""
        self.num_batches_tracked.add_(1)
        factor = self._momentum_factor()
        if self.num_components > 1:  # components have no identity across batches: match them
            lam, mean, var, n_eff = self._reading.match(
                (lam, mean, var, n_eff), self.running_mean.to(mean.dtype)
            )
        self.running_weight.lerp_(lam.to(self.running_weight.dtype), factor)
        self._fold_running(mean, var, n_eff, factor)

    def telemetry(self) -> dict[str, Tensor]:
        """Last training batch: mixture weights [K] (per channel, sorted, averaged over channels for
        ``point="channel"``), mean posterior entropy (nats) and the effective number of components
        exp(H(lambda)). Device tensors; call .item() to log."""
        if self.last_batch_weight is None:
            return {}
        if self.num_components == 1:  # one posterior equal to 1: zero entropy
            one = self.last_batch_weight[0]
            return {
                "mixture_weight": self.last_batch_weight,
                "posterior_entropy": torch.zeros_like(one),
                "effective_components": torch.ones_like(one),
            }
        weight, effective = self._reading.summarize(self.last_batch_weight)
        return {
            "mixture_weight": weight,
            "posterior_entropy": self.last_posterior_entropy,
            "effective_components": effective,
        }


class MixtureNorm2d(_MixtureNormBase):
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

    # ---- overridable steps (synchronized MN replaces these) ----------------------------------

    def _fit_batch_mixture(self, x: Tensor, dtype: torch.dtype) -> Mixture:
        """The mixture (in ``dtype``) for this batch x [N, C, L], without gradient."""
        return self._estimate(sample_fit_points(x, self.fit_points).to(dtype))  # [M, C] points

    def _estimate(self, points: Tensor) -> Mixture:
        """The mixture of fitting points [M, C] by this layer's estimator and reading (per channel
        for ``point="channel"``: weight, mean and var [K, C])."""
        return estimate_mixture(
            points,
            self.num_components,
            estimator=self.estimator,
            kmeans_iters=self.kmeans_iters,
            em_iters=self.em_iters,
            eps=self.eps,
            point=self.point,
        )

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
        local = self._moments_stay_local()
        if self.num_components == 1 and local:
            return self._batch_norm(x, use_batch_stats)
        # MN's statistics are always computed in fp32 (or fp64): bf16 posteriors and variances
        # lose too much precision, exactly as BatchNorm keeps fp32 statistics under autocast.
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        gamma = self.weight.to(compute_dtype) if self.affine else None
        beta = self.bias.to(compute_dtype) if self.affine else None
        x_ncl = x.flatten(2)  # [N, C, L]  (a view, also for channels_last)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if use_batch_stats:
                mixture = self._fit_batch_mixture(x_ncl, compute_dtype)
            else:
                mixture = Mixture(
                    self.running_weight.to(compute_dtype),
                    self.running_mean.to(compute_dtype),
                    self.running_var.to(compute_dtype),
                )
            # y [N, C, L]
            y, tau, stats = mixture_norm(
                x_ncl,
                mixture,
                self.eps,
                gamma,
                beta,
                batch_stats=use_batch_stats,
                point=self.point,
                reduce=None if local else self._reduce_moments,
                posterior_grad=self.posterior_grad,
                lambda_scale=self.lambda_scale,
            )
            if self.training:
                self._record_batch(tau, stats)
        y = y.to(x.dtype).view(n, c, h, w)  # [N, C, H, W]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def _moments_stay_local(self) -> bool:
        """True when no subclass or hook sums the moments across processes."""
        return (
            self.reduce_moments is None
            and type(self)._reduce_moments is MixtureNorm2d._reduce_moments
        )

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
                factor = self._momentum_factor()
        if self.training:
            self.last_batch_weight = self._unit_weight(x.device)
        # [N, C, H, W], memory format kept
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps
        )

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
        ent = -(tau * tau.clamp_min(_TINY).log()).sum(self._reading.posterior_dim).mean()  # []
        self.last_posterior_entropy = ent.detach()
        if self.track_running_stats:
            self._update_running(lam, mean, var, n_eff)
