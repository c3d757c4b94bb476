"""Streaming feature statistics and the Fréchet distance between two Gaussians.

* ``StreamingMoments``: float64 mean / covariance over feature batches (Chan et al.'s pairwise
  merge: every batch is centred on its own mean before it is added, so nothing cancels).
* ``frechet_distance``: FID between two Gaussians through symmetric eigendecompositions:
  with A = S2^(1/2), tr sqrt(S1 S2) = tr sqrt(A S1 A) = sum sqrt(eig(A S1 A)). The reference
  side's A is computed once (``FrechetReference``; ``frechet_distance`` keeps a small cache).

Feature-space agnostic: FID uses it on Inception features, ``cfd`` on the mode classifier's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..distributed import all_gather_rows
from .errors import MetricsError

__all__ = ["StreamingMoments", "FrechetReference", "frechet_distance"]


class StreamingMoments:
    """Running count, mean [D] and centred sum of squares [D, D] in float64."""

    def __init__(self, dims: int, device: Union[str, torch.device] = "cpu") -> None:
        self.dims = dims
        self.count = 0
        self.mean = torch.zeros(dims, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dims, dims, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> "StreamingMoments":
        """Add a batch of feature rows x [B, D]."""
        if x.dim() != 2 or x.shape[1] != self.dims:
            raise ValueError(f"expected features [B, {self.dims}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.to(device=self.mean.device, dtype=torch.float64)
        batch_mean = x.mean(0)  # [D]
        xc = x - batch_mean  # [B, D]
        self._merge(x.shape[0], batch_mean, xc.T @ xc)
        return self

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":
        if other.dims != self.dims:
            raise ValueError(f"cannot merge {other.dims}-d moments into {self.dims}-d ones")
        if other.count:
            self._merge(other.count, other.mean.to(self.mean.device), other.m2.to(self.m2.device))
        return self

    def _merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean  # [D]
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    @property
    def cov(self) -> Tensor:
        """Unbiased covariance [D, D] (``np.cov``'s default, as pytorch-fid uses)."""
        if self.count < 2:
            raise MetricsError(f"a covariance needs at least 2 samples, got {self.count}")
        return self.m2 / (self.count - 1)

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) as float64 numpy arrays."""
        return self.mean.cpu().numpy(), self.cov.cpu().numpy()

    def all_reduce(self) -> "StreamingMoments":
        """Merge every rank's moments (in rank order) into this one; identity without torchrun."""
        packed = torch.cat(
            [
                torch.tensor([float(self.count)], dtype=torch.float64, device=self.mean.device),
                self.mean,
                self.m2.flatten(),
            ]
        )[None]  # [1, 1 + D + D*D]
        rows = all_gather_rows(packed)
        if len(rows) == 1:
            return self
        merged = StreamingMoments(self.dims, self.mean.device)
        for row in rows:
            row = row[0]
            n = int(row[0].item())
            if n:
                merged._merge(
                    n, row[1 : 1 + self.dims], row[1 + self.dims :].view(self.dims, self.dims)
                )
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self


# --------------------------------------------------------------------------------------------
# Frechet distance.
# --------------------------------------------------------------------------------------------


def _psd_sqrt(sigma: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative rounding noise clipped)."""
    eigval, eigvec = torch.linalg.eigh((sigma + sigma.T) / 2)  # sym = V diag(w) V^T
    return (eigvec * eigval.clamp(min=0).sqrt()) @ eigvec.T


class FrechetReference:
    """One side of the Fréchet distance (the reference), with its square root computed once.

    The linear algebra runs in float64 through torch on the CPU (its LAPACK is faster than
    numpy's here); inputs and outputs are numpy / Python floats.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        if sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} do not match")
        self.mu, self.sigma = mu, sigma
        self.trace = float(np.trace(sigma))
        self._sqrt: Optional[Tensor] = None

    @property
    def dims(self) -> int:
        return self.mu.shape[0]

    @property
    def sqrt(self) -> Tensor:
        if self._sqrt is None:
            self._sqrt = _psd_sqrt(torch.from_numpy(self.sigma))
        return self._sqrt

    def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """||mu - mu_ref||^2 + tr(S + S_ref) - 2 tr sqrt(S S_ref), clipped at 0."""
        mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        if mu.shape != self.mu.shape or sigma.shape != self.sigma.shape:
            raise MetricsError(
                f"statistics of dimension {mu.shape[0]} cannot be compared with a "
                f"{self.dims}-d reference (check --dims and --ref)"
            )
        a = self.sqrt
        inner = a @ torch.from_numpy(sigma) @ a  # [D, D] symmetric PSD, eigenvalues of S @ S_ref
        eig = torch.linalg.eigvalsh((inner + inner.T) / 2)
        tr_sqrt = float(eig.clamp(min=0).sqrt().sum())
        diff = mu - self.mu
        value = float(diff @ diff) + float(np.trace(sigma)) + self.trace - 2.0 * tr_sqrt
        return max(value, 0.0)


_FRECHET_CACHE: "OrderedDict[bytes, FrechetReference]" = OrderedDict()
_FRECHET_CACHE_SIZE = 4


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (sigma2: the reference side).

    Same value as ``pytorch_fid.fid_score.calculate_frechet_distance`` without ``sqrtm``;
    sigma2's square root is cached by content, so scoring many models against one reference
    pays for it once.
    """
    mu2 = np.ascontiguousarray(np.atleast_1d(mu2), dtype=np.float64)
    sigma2 = np.ascontiguousarray(np.atleast_2d(sigma2), dtype=np.float64)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(sigma2.shape).encode())
    h.update(mu2.tobytes())
    h.update(sigma2.tobytes())
    key = h.digest()
    ref = _FRECHET_CACHE.get(key)
    if ref is None:
        ref = FrechetReference(mu2, sigma2)
        _FRECHET_CACHE[key] = ref
        while len(_FRECHET_CACHE) > _FRECHET_CACHE_SIZE:
            _FRECHET_CACHE.popitem(last=False)
    else:
        _FRECHET_CACHE.move_to_end(key)
    return ref.distance(mu1, sigma1)
