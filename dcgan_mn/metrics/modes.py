"""Mode metrics on stacked digits: how many of the 1000 digit triples a generator produces.

From one pass of the mode classifier (``classifier.ModeClassifier``) over generated images:

* ``modes``: distinct triples among the samples (of 1000; higher is better). Every channel is
  labelled with the classifier's arg-max, however unsure it is, as PacGAN counts.
* ``kl_modes``: KL(p_gen || uniform over 1000) in nats, with p_gen the empirical distribution of
  the samples' triples: sum_m p_m ln(1000 p_m). 0 for perfectly balanced samples, ln 1000 = 6.91
  for a single triple. Its floor at N samples is sampling noise, about 999 / (2N) (0.019 at
  PacGAN's 26,000).
* ``cfd``: Fréchet distance between the samples' classifier features (3 channels x 128) and the
  real stacked images' Gaussian: an FID-like distance that needs no Inception weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..digits import NUM_MODES, mode_ids
from ..distributed import all_gather_rows
from .classifier import ModeClassifier
from .errors import MetricsError
from .frechet import FrechetReference, StreamingMoments
from .specs import MODE_COUNT_KEY, directions_of

__all__ = [
    "mode_histogram",
    "count_modes",
    "kl_to_uniform",
    "ModeMetrics",
    "DIRECTIONS",
    "DEFAULT_MODE_SAMPLES",
]

DEFAULT_MODE_SAMPLES = 26_000  # PacGAN's sample count for Stacked MNIST
# Which way is better, for compare and for best-so-far tracking (from specs.METRICS).
DIRECTIONS = directions_of(MODE_COUNT_KEY)


def mode_histogram(labels: Tensor) -> Tensor:
    """Digit triples [N, 3] -> counts [1000] of each mode."""
    return torch.bincount(mode_ids(labels.cpu()), minlength=NUM_MODES)


def count_modes(labels: Tensor) -> int:
    """Distinct digit triples among labels [N, 3]."""
    return int((mode_histogram(labels) > 0).sum())


def kl_to_uniform(labels: Tensor) -> float:
    """KL(p || uniform over 1000 modes) in nats of the empirical triple distribution of [N, 3]."""
    counts = mode_histogram(labels).double()  # [1000]
    if counts.sum() == 0:
        raise MetricsError("mode metrics need at least one sample")
    p = counts[counts > 0] / counts.sum()  # [modes seen]
    return float((p * (p * NUM_MODES).log()).sum().clamp(min=0.0))


class ModeMetrics:
    """The mode-metric family: ``modes``, ``kl_modes`` and ``cfd`` of the first ``num_samples``
    images of a pass (a metric family of ``evaluator.Evaluator``)."""

    needs = "digits"  # the evaluator's provider whose outputs this reads: (labels, features)
    directions = DIRECTIONS
    count_key = MODE_COUNT_KEY

    def __init__(
        self, classifier: ModeClassifier, *, num_samples: int = DEFAULT_MODE_SAMPLES
    ) -> None:
        if num_samples < 2:
            raise MetricsError(
                f"--mode-samples {num_samples}: mode metrics need at least 2 samples"
            )
        self.provider = classifier  # images -> (labels, features)
        self.classifier = classifier
        self.num_samples = num_samples
        self.reference = FrechetReference(classifier.ref_mu, classifier.ref_sigma)
        self.reset()

    @property
    def batch_size(self) -> int:
        return getattr(self.classifier, "batch_size", 256)

    @property
    def tags(self) -> dict:
        return {
            "classifier_sha256": self.classifier.sha256,
            "classifier_accuracy": self.classifier.accuracy,
            "mode_source": self.classifier.source,
        }

    def reset(self) -> None:
        self._moments: Optional[StreamingMoments] = None
        self._idx: list[Tensor] = []
        self._labels: list[Tensor] = []

    def update(self, offset: int, outputs: tuple[Tensor, Tensor]) -> None:
        labels, feats = outputs  # [b, 3], [b, 3F]
        if self._moments is None:
            self._moments = StreamingMoments(feats.shape[1], feats.device)
        self._moments.update(feats)
        self._idx.append(torch.arange(offset, offset + labels.shape[0], device=labels.device))
        self._labels.append(labels)

    def gather(self) -> None:
        """Every rank's labels and moments (identity without torchrun)."""
        idx, labels = torch.cat(self._idx), torch.cat(self._labels)
        self._idx = [torch.cat(all_gather_rows(idx))]
        self._labels = [torch.cat(all_gather_rows(labels))]
        self._moments.all_reduce()

    def result(self) -> dict:
        if self._moments is None or self._moments.count < 2:
            raise MetricsError("mode metrics need at least 2 samples")
        labels = torch.cat(self._labels).cpu()  # [N, 3]
        mu, sigma = self._moments.numpy()
        return {
            "modes": count_modes(labels),
            "kl_modes": kl_to_uniform(labels),
            "cfd": self.reference.distance(mu, sigma),
            "mode_samples": int(labels.shape[0]),
            **self.tags,
        }
