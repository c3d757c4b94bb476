"""The Inception metric family: FID, KID and precision / recall / density / coverage.

All from one pass of pytorch-fid's FID Inception over the generated images: FID from the
streaming moments of every sample, KID and PRDC from the first ``metric_samples`` feature rows
against the reference's cached real rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import distributed as D
from ..features import FeatureExtractor
from .errors import MetricsError
from .frechet import StreamingMoments
from .kid_prdc import kernel_inception_distance, prdc
from .reference import DEFAULT_REAL_FEATURES, ReferenceStats

__all__ = ["InceptionMetrics", "DIRECTIONS"]

DIRECTIONS = {"fid": "min", "kid": "min", "precision": "max", "recall": "max", "density": "max",
              "coverage": "max"}


class InceptionMetrics:
    """A metric family of ``evaluator.Evaluator`` reading Inception features [b, dims]."""

    needs = "inception"
    directions = DIRECTIONS
    count_key = "num_samples"

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference: ReferenceStats,
        *,
        num_samples: int = 10_000,
        seed: int = 0,
        prdc_k: int = 5,
        max_metric_samples: int = DEFAULT_REAL_FEATURES,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ) -> None:
        if num_samples < 2:
            raise MetricsError(f"--fid-samples {num_samples}: FID needs at least 2 samples")
        if reference.dims != extractor.dims:
            raise MetricsError(
                f"--ref {reference.meta.get('ref', reference.key)!r}: statistics are "
                f"{reference.dims}-d but the features are {extractor.dims}-d (--dims)"
            )
        self.extractor = extractor
        self.reference = reference
        self.num_samples = num_samples
        self.seed = seed
        self.prdc_k = prdc_k
        self.max_metric_samples = max_metric_samples
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.reset()

    @property
    def dims(self) -> int:
        return self.extractor.dims

    @property
    def keep_rows(self) -> int:
        """Feature rows (the first of the pass) kept for KID and PRDC."""
        n_real = 0 if self.reference.features is None else self.reference.features.shape[0]
        return min(n_real, self.max_metric_samples)

    # --- one pass ---

    def reset(self) -> None:
        self._moments = StreamingMoments(self.dims, getattr(self.extractor, "device", "cpu"))
        self._idx: list[Tensor] = []
        self._rows: list[Tensor] = []

    def update(self, offset: int, feats: Tensor) -> None:
        self._moments.update(feats)  # [b, D]
        keep = min(feats.shape[0], max(0, self.keep_rows - offset))
        if keep:
            self._idx.append(torch.arange(offset, offset + keep))
            self._rows.append(feats[:keep].float().cpu())

    def gather(self) -> None:
        """Every rank ends up with all ranks' moments and kept rows."""
        device = self._moments.mean.device
        idx = torch.cat(self._idx) if self._idx else torch.empty(0, dtype=torch.long)
        rows = torch.cat(self._rows) if self._rows else torch.empty(0, self.dims)
        self._moments.all_reduce()
        self._idx = [torch.cat(D.all_gather_rows(idx.to(device))).cpu()]
        self._rows = [torch.cat(D.all_gather_rows(rows.to(device))).cpu()]

    def result(self) -> dict:
        idx = torch.cat(self._idx) if self._idx else torch.empty(0, dtype=torch.long)
        rows = torch.cat(self._rows) if self._rows else torch.empty(0, self.dims)
        return self.score(self._moments, rows[idx.argsort()])  # generation order, any rank count

    # --- scoring ---

    def score(self, moments: StreamingMoments, fake_rows: Tensor) -> dict:
        """FID from the moments; KID and PRDC from the first feature rows (CPU or device)."""
        if moments.count < 2:
            raise MetricsError(f"FID needs at least 2 samples, got {moments.count}")
        mu, sigma = moments.numpy()
        result: dict[str, Any] = {
            "fid": self.reference.frechet.distance(mu, sigma),
            "kid": None, "kid_std": None,
            "precision": None, "recall": None, "density": None, "coverage": None,
            "num_samples": moments.count,
            "metric_samples": 0,
            "prdc_k": self.prdc_k,
            "weights_sha256": self.extractor.weights_sha256,
            "ref_key": self.reference.key,
            "dims": self.dims,
        }
        n = min(fake_rows.shape[0], self.keep_rows)
        if n >= 2:
            device = moments.mean.device
            real = self.reference.real_features(n, device)
            fake = fake_rows[:n].to(device, torch.float64)
            result["kid"], result["kid_std"] = kernel_inception_distance(
                real, fake, num_subsets=self.kid_subsets, subset_size=self.kid_subset_size,
                seed=self.seed,
            )
            result["metric_samples"] = n
            if n > self.prdc_k:
                result.update(prdc(real, fake, self.prdc_k,
                                   real_radii=self.reference.real_radii(n, self.prdc_k, device)))
        return result
