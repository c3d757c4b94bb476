"""The Inception metric family: FID, KID, precision / recall / density / coverage and IS.

All from one pass of pytorch-fid's FID Inception over the generated images: FID from the
streaming moments of every sample, KID and PRDC from the first ``metric_samples`` feature rows
against the reference's cached real rows, the Inception Score from the same pass's 1008-way
logits of every sample (when the extractor has them: ``--dims 2048``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import all_gather_rows
from ..features import FeatureExtractor
from .errors import MetricsError
from .frechet import StreamingMoments
from .inception_score import IS_SPLITS, inception_score
from .kid_prdc import kernel_inception_distance, prdc
from .reference import DEFAULT_REAL_FEATURES, ReferenceStats
from .specs import INCEPTION_COUNT_KEY, directions_of

__all__ = ["InceptionMetrics", "DIRECTIONS"]

DIRECTIONS = directions_of(INCEPTION_COUNT_KEY)  # {metric: "min"/"max"}, from specs.METRICS


class InceptionMetrics:
    """A metric family of ``evaluator.Evaluator`` reading Inception features [b, dims]."""

    needs = "inception"
    directions = DIRECTIONS
    count_key = INCEPTION_COUNT_KEY

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
        self.extractor, self.reference = extractor, reference
        self.num_samples, self.seed = num_samples, seed
        self.max_metric_samples = max_metric_samples  # KID and PRDC read at most this many rows
        self.kid_subsets, self.kid_subset_size, self.prdc_k = kid_subsets, kid_subset_size, prdc_k
        self.reset()

    @property
    def dims(self) -> int:
        return self.extractor.dims

    @property
    def scores_is(self) -> bool:
        """Whether this pass also gives the Inception Score (the extractor has the logits)."""
        return bool(getattr(self.extractor, "has_logits", False))

    def provider(self, images: Tensor):
        """What the evaluator calls once per chunk: features [b, dims], with the logits
        [b, 1008] from the same forward pass when the Inception Score is on."""
        if self.scores_is:
            return self.extractor.features_and_logits(images)
        return self.extractor(images)

    @property
    def batch_size(self) -> int:
        return getattr(self.extractor, "batch_size", 256)

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
        self._logits: list[Tensor] = []  # every sample's logits (the score needs all of them)
        self._logits_idx: list[Tensor] = []

    def update(self, offset: int, outputs) -> None:
        feats, logits = outputs if isinstance(outputs, tuple) else (outputs, None)
        if logits is not None:
            self._logits_idx.append(torch.arange(offset, offset + logits.shape[0]))
            self._logits.append(logits.float().cpu())  # [b, 1008]
        self._moments.update(feats)  # [b, D]
        keep = min(feats.shape[0], max(0, self.keep_rows - offset))
        if keep:
            self._idx.append(torch.arange(offset, offset + keep))
            self._rows.append(feats[:keep].float().cpu())

    def gather(self) -> None:
        """Every rank ends up with all ranks' moments and kept rows."""
        device = self._moments.mean.device
        self._moments.all_reduce()
        self._idx = [_all_rows(_joined(self._idx, torch.empty(0, dtype=torch.long)), device)]
        self._rows = [_all_rows(_joined(self._rows, torch.empty(0, self.dims)), device)]
        if self.scores_is:
            self._logits_idx = [
                _all_rows(_joined(self._logits_idx, torch.empty(0, dtype=torch.long)), device)
            ]
            self._logits = [_all_rows(_joined(self._logits, torch.empty(0, 1008)), device)]

    def result(self) -> dict:
        idx = _joined(self._idx, torch.empty(0, dtype=torch.long))
        rows = _joined(self._rows, torch.empty(0, self.dims))
        result = self.score(self._moments, rows[idx.argsort()])  # generation order, any rank count
        result.update(inception_score=None, inception_score_std=None)
        if self._logits:
            order = torch.cat(self._logits_idx).argsort()
            logits = torch.cat(self._logits)[order]  # [N, 1008], generation order
            if logits.shape[0] >= IS_SPLITS:
                result["inception_score"], result["inception_score_std"] = inception_score(
                    logits, IS_SPLITS
                )
                result["is_splits"] = IS_SPLITS
        return result

    # --- scoring ---

    def score(self, moments: StreamingMoments, fake_rows: Tensor) -> dict:
        """FID from the moments; KID and PRDC from the first feature rows (CPU or device)."""
        if moments.count < 2:
            raise MetricsError(f"FID needs at least 2 samples, got {moments.count}")
        mu, sigma = moments.numpy()
        result: dict[str, Any] = {
            "fid": self.reference.frechet.distance(mu, sigma),
            "kid": None,
            "kid_std": None,
            "precision": None,
            "recall": None,
            "density": None,
            "coverage": None,
            "num_samples": moments.count,
            "metric_samples": 0,
            "prdc_k": self.prdc_k,
            "weights_sha256": self.extractor.weights_sha256,
            "fid_protocol": getattr(self.extractor, "fid_protocol", "pytorch-fid"),
            "ref_key": self.reference.key,
            "dims": self.dims,
        }
        n = min(fake_rows.shape[0], self.keep_rows)
        if n >= 2:
            device = moments.mean.device
            real = self.reference.real_features(n, device)
            fake = fake_rows[:n].to(device, torch.float64)
            result["kid"], result["kid_std"] = kernel_inception_distance(
                real,
                fake,
                num_subsets=self.kid_subsets,
                subset_size=self.kid_subset_size,
                seed=self.seed,
            )
            result["metric_samples"] = n
            if n > self.prdc_k:
                result.update(
                    prdc(
                        real,
                        fake,
                        self.prdc_k,
                        real_radii=self.reference.real_radii(n, self.prdc_k, device),
                    )
                )
        return result


def _joined(parts: list[Tensor], empty: Tensor) -> Tensor:
    """The parts one after another (dim 0); ``empty`` when there are none."""
    return torch.cat(parts) if parts else empty


def _all_rows(t: Tensor, device) -> Tensor:
    """Every rank's rows of ``t`` (gathered on ``device``), in rank order, on the CPU."""
    return torch.cat(all_gather_rows(t.to(device))).cpu()
