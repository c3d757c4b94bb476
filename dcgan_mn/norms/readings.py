"""What one mixture describes (``point``), as a layout chosen once per layer.

* ``"vector"`` (our reading of the paper): a point is the C-vector at one (n, h, w); one
  mixture over all channels jointly. Mixture weight [K], mean and var [K, C]; posteriors
  tau [N, K, L].
* ``"channel"`` (BatchNorm's per-activation reading, the one third-party reimplementations
  use): an independent 1-D mixture per channel. Weight, mean and var [K, C]; tau [N, C, K, L].

The estimators fit G mixtures of M points in C' dimensions at once ([G, M, C']): the vector
reading is G = 1 group of C-dimensional points, the channel reading G = C groups of 1-D points.
Everything that differs between the readings is a field of ``Reading``, so the rest of the code
has no ``point == ...`` branches.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .matching import match_components, match_components_per_channel
from .mixture import _TINY, Mixture

__all__ = ["POINTS", "READINGS", "Reading"]


class Reading(NamedTuple):
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
    from_groups=lambda mix: Mixture(mix.weight.t(), mix.mean.squeeze(2).t(), mix.var.squeeze(2).t()),
    weight_shape=lambda k, c: (k, c),
    match=_match_channel,
    posterior_dim=2,  # tau [N, C, K, L]
    synchronizable=False,
    summarize=_summarize_channel,
)

READINGS = {r.name: r for r in (VECTOR, CHANNEL)}
POINTS = tuple(READINGS)  # ("vector", "channel")
