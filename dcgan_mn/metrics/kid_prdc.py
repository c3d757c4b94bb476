"""Set metrics on features: KID and precision / recall / density / coverage.

* ``kernel_inception_distance``: unbiased polynomial-kernel MMD^2 over random subsets
  (Binkowski et al. 2018).
* ``prdc``: precision / recall (Kynkaanniemi et al. 2019), density / coverage (Naeem et al.
  2020), with k-NN balls in feature space (strict ``<`` as in Naeem et al.'s code).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .errors import MetricsError

__all__ = ["kernel_inception_distance", "knn_radii", "prdc"]


def _poly_mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 between equal-size x, y [m, d] (float64)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3  # [m, m]
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_xx = k_xx.sum() - k_xx.diagonal().sum()
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    real: Tensor, fake: Tensor, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std over ``num_subsets`` random subsets (without replacement) of
    min(subset_size, len(real), len(fake)) rows of each set; returns (mean, std)."""
    real = real.to(torch.float64)
    fake = fake.to(real.device, torch.float64)
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise MetricsError(
            f"KID needs at least 2 samples per set, got {real.shape[0]} and {fake.shape[0]}"
        )
    if m == real.shape[0] == fake.shape[0]:
        num_subsets = 1  # every subset would be the whole of both sets: the estimate is exact
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        i = torch.from_numpy(rng.choice(fake.shape[0], m, replace=False)).to(fake.device)
        j = torch.from_numpy(rng.choice(real.shape[0], m, replace=False)).to(real.device)
        values.append(_poly_mmd2_unbiased(fake[i], real[j]))
    return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances [Na, Nb] between rows of a [Na, D] and b [Nb, D] (float64)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)  # [Na, Nb]
    return sq.clamp_(min=0).sqrt_()


def knn_radii(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance from each row of x [N, D] to its k-th nearest other row [N] (float64).

    As in Naeem et al.'s code: the (k + 1)-th smallest distance with the row itself included.
    """
    x = x.to(torch.float64)
    if x.shape[0] <= k:
        raise MetricsError(f"k-NN radii with k={k} need more than {k} samples, got {x.shape[0]}")
    out = []
    for rows in x.split(chunk):
        d = _pairwise_distances(rows, x)  # [c, N]
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def prdc(
    real: Tensor,
    fake: Tensor,
    k: int = 5,
    *,
    real_radii: Optional[Tensor] = None,
    chunk: int = 2048,
) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` [M, D] against ``real`` [N, D].

    precision: share of fakes inside some real k-NN ball; recall: share of reals inside some fake
    k-NN ball; density: (1 / kM) * number of (fake, real ball) containments; coverage: share of
    real balls that contain at least one fake.
    """
    real = real.to(torch.float64)
    fake = fake.to(real.device, torch.float64)
    r_real = knn_radii(real, k, chunk) if real_radii is None else real_radii.to(real)
    r_fake = knn_radii(fake, k, chunk)
    inside_some_real = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    real_balls_per_fake = torch.zeros(fake.shape[0], dtype=torch.float64, device=real.device)
    real_in_some_fake, real_covered = [], []
    for start in range(0, real.shape[0], chunk):
        d = _pairwise_distances(real[start : start + chunk], fake)  # [c, M]
        in_real_ball = d < r_real[start : start + chunk, None]  # [c, M]
        inside_some_real |= in_real_ball.any(0)
        real_balls_per_fake += in_real_ball.sum(0)
        real_in_some_fake.append((d < r_fake[None, :]).any(1))
        real_covered.append(d.min(1).values < r_real[start : start + chunk])
    return {
        "precision": inside_some_real.double().mean().item(),
        "recall": torch.cat(real_in_some_fake).double().mean().item(),
        "density": (real_balls_per_fake.mean() / k).item(),
        "coverage": torch.cat(real_covered).double().mean().item(),
    }
