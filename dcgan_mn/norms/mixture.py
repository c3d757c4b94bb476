"""The two value types every part of Mixture Normalization passes around, and shared constants.

Shape legend of the whole package: N images, C channels, L = H*W positions, P = N*L points,
M fitting points, K components, G groups (independent mixtures fitted side by side: 1 for the
vector reading, C for the per-channel reading).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

__all__ = ["Mixture", "MixtureMoments"]

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
