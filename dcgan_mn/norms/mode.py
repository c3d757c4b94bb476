"""Mode Normalization (Deecke, Murray & Bilen, ICLR 2019) as a generator norm layer.

A gating network soft-assigns each *sample* (not each point, as Mixture Normalization does) to
K modes; each mode normalizes with its own gate-weighted batch statistics:

    g(x_n)  = softmax_k(W phi(x_n) + b)          phi = spatial average pooling, [N, C] -> [N, K]
    w_nk    = g_k(x_n) / sum_m g_k(x_m)          the gates normalised over the batch
    mu_k    = sum_n w_nk mean_hw(x_n)                                   [K, C]
    var_k   = sum_n w_nk mean_hw((x_n - mu_k)^2)                        [K, C] (biased)
    x_hat_n = sum_k g_k(x_n) (x_n - mu_k) / sqrt(var_k + eps)
    y       = gamma * x_hat + beta                one affine per channel

With K = 1 every gate is exactly 1 and this is BatchNorm.

Choices, settled against the authors' code (ldeecke/mn-torch, ``nn/ops.py``; no code copied):

* The gate pools its input by a spatial mean (their ``phi = x.mean(3).mean(2)``) and is an
  ``nn.Linear(C, K)`` *with* a bias; its weight starts at 1/K plus N(0, 0.01^2) noise (near-uniform
  gates, the symmetry broken by the noise), its bias as nn.Linear's default. We follow both.
* Gradients flow through the gates into both the mixing and the statistics (they do not detach
  g in training), so the gate learns from the task loss. We follow.
* eps inside the square root, ``(x - mu) / sqrt(var + eps)``, as they (and BatchNorm) do.
* Running statistics: they keep momentum averages of the gate-weighted E[x] and E[x^2] (zeros
  at start, ``new = m * batch + (1 - m) * old``) and read var = E[x^2] - E[x]^2, biased. We
  deviate: per-mode ``running_mean`` / ``running_var`` [K, C] that start at 0 / 1 and are updated
  exactly as nn.BatchNorm2d updates its own (``lerp`` by ``momentum``, ``None`` = cumulative
  average, the variance unbiased), so that K = 1 is BatchNorm in training *and* eval, buffers
  included, a fresh layer in eval is the identity (theirs divides by sqrt(eps)), and the
  E[x^2] - E[x]^2 cancellation is avoided. The Bessel factor uses the effective number of
  values behind a mode, n_eff = L (sum_n g)^2 / sum_n g^2 (N L for K = 1, as BatchNorm), capped
  like MixtureNorm2d's (n_eff / max(n_eff - 1, 1)).
* The batch variance is computed per sample first (law of total variance: the gate-weighted
  mean of each sample's spatial variance plus the gate-weighted spread of the sample means), so
  no [K, N, C, H, W] tensor is formed and no one-pass cancellation occurs.

Eval with ``track_running_stats``: the gates come from the same gating network, the statistics
from the running buffers, so a sample's output does not depend on the rest of its batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .mixture import _TINY
from .module import _ComponentNormBase

__all__ = ["ModeNorm2d", "mode_norm", "mode_gates"]


def mode_gates(x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor]) -> Tensor:
    """g [N, K] = softmax_k(W mean_hw(x_n) + b) for x [N, C, H, W], W [K, C], b [K] or None."""
    pooled = x.mean((2, 3))  # [N, C]
    return torch.softmax(nn.functional.linear(pooled, gate_weight, gate_bias), dim=1)  # [N, K]


def mode_norm(
    x: Tensor,
    gate_weight: Tensor,
    gate_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    training: bool,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, Tensor, Tensor]]]:
    """Mode Normalization of x [N, C, H, W]: a pure function (buffers are read, never written).

    ``training=True`` (or no running statistics): batch statistics per mode; returns
    (y [N, C, H, W], gates [N, K], (mu [K, C], biased var [K, C], n_eff [K])) so the caller may
    update its running statistics. ``training=False``: the statistics are ``running_mean`` and
    ``running_var`` [K, C]; returns (y, gates, None).
    """
    n, c, h, w = x.shape
    g = mode_gates(x, gate_weight, gate_bias)  # [N, K]
    stats = None
    if training:
        mass = g.sum(0)  # [K]
        wts = g / mass.clamp_min(_TINY)  # [N, K]  gates normalised over the batch
        var_n, mean_n = torch.var_mean(x, dim=(2, 3), correction=0)  # [N, C] each
        mu = wts.t() @ mean_n  # [K, C]
        spread = (mean_n.unsqueeze(0) - mu.unsqueeze(1)).square()  # [K, N, C]
        var = wts.t() @ var_n + (wts.t().unsqueeze(2) * spread).sum(1)  # [K, C]
        n_eff = (h * w) * mass.square() / g.square().sum(0).clamp_min(_TINY)  # [K]
        stats = (mu, var, n_eff)
    else:
        mu, var = running_mean, running_var  # [K, C]
    # x_hat = sum_k g_k (x - mu_k) r_k = x * (g @ r) - g @ (mu r): a per-(n, c) scale and offset
    r = torch.rsqrt(var + eps)  # [K, C]
    scale = g @ r  # [N, C]
    offset = g @ (mu * r)  # [N, C]
    if weight is not None:
        scale = scale * weight  # [N, C]
        offset = offset * weight  # [N, C]
    if bias is not None:
        offset = offset - bias  # [N, C]
    y = x * scale[:, :, None, None] - offset[:, :, None, None]  # [N, C, H, W]
    return y, g, stats


class ModeNorm2d(_ComponentNormBase):
    r"""Mode Normalization over a 4-D input [N, C, H, W] (see the module docstring).

    Args:
        num_features: C, the number of channels.
        num_modes: K, modes (K = 1 is exactly ``nn.BatchNorm2d``).
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``
            (``momentum=None`` is a cumulative moving average).

    Parameters: ``gate_weight`` [K, C], ``gate_bias`` [K] (the gating network), and with
    ``affine`` ``weight`` / ``bias`` [C]. Buffers: ``running_mean`` / ``running_var`` [K, C],
    ``num_batches_tracked``. ``telemetry()`` reports the last training batch's mean gate
    weights [K] and mean gate entropy (nats).
    """

    __constants__ = [
        "num_features",
        "num_modes",
        "eps",
        "momentum",
        "affine",
        "track_running_stats",
    ]
    _components_arg = "num_modes"

    def __init__(
        self,
        num_features: int,
        num_modes: int = 2,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, num_modes, eps, momentum, affine, track_running_stats)
        # Telemetry of the last training batch: detached device tensors, read only on demand.
        self.last_gate_weight: Optional[Tensor] = None  # [K]
        self.last_gate_entropy: Optional[Tensor] = None  # []
        self._register_tensors(device, dtype)

    @property
    def num_modes(self) -> int:
        """K, the number of modes (the base's ``num_components``)."""
        return self.num_components

    def _register_own(self, factory: dict) -> None:
        """The gating network: gate_weight [K, C], gate_bias [K]."""
        self.gate_weight = nn.Parameter(torch.empty(self.num_modes, self.num_features, **factory))
        self.gate_bias = nn.Parameter(torch.empty(self.num_modes, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # The authors' gate initialisation: near-uniform gates, symmetry broken by small noise;
        # the bias as nn.Linear's default.
        with torch.no_grad():
            self.gate_weight.normal_(0.0, 0.01).add_(1.0 / self.num_modes)
            bound = 1.0 / math.sqrt(self.num_features)
            self.gate_bias.uniform_(-bound, bound)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        n, _, h, w = x.shape
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats and n * h * w == 1:  # a shape check: no host sync
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)}"
            )
        y, g, stats = mode_norm(
            x,
            self.gate_weight,
            self.gate_bias,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=use_batch_stats,
            eps=self.eps,
        )
        if self.training:
            self._record_batch(g, stats)
        return y

    @torch.no_grad()
    def _record_batch(self, g: Tensor, stats: tuple[Tensor, Tensor, Tensor]) -> None:
        """Telemetry and running statistics after a training batch (all on the device)."""
        g = g.detach()
        self.last_gate_weight = g.mean(0)  # [K]
        self.last_gate_entropy = -(g * g.clamp_min(_TINY).log()).sum(1).mean()  # []
        if not self.track_running_stats:
            return
        mu, var, n_eff = (s.detach() for s in stats)
        self.num_batches_tracked.add_(1)
        self._fold_running(mu, var, n_eff, self._momentum_factor())

    def telemetry(self) -> dict[str, Tensor]:
        """Last training batch: mean gate weights [K] and mean gate entropy (nats). Device
        tensors; call .item() to log."""
        if self.last_gate_weight is None:
            return {}
        return {"gate_weight": self.last_gate_weight, "gate_entropy": self.last_gate_entropy}
