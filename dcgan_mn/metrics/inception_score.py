"""The Inception Score (Salimans et al., 2016), as the original code computes it.

IS = exp(E_x KL(p(y|x) || p(y))), with p(y|x) the softmax of the 2015 Inception graph's 1008
logits and p(y) their mean over the samples, computed on each of ``splits`` contiguous parts of
the samples (part i holds rows [i N / splits, (i + 1) N / splits)); the score is the mean over
parts and its spread their std (numpy's, ddof=0), as the original reports them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["IS_SPLITS", "inception_score"]

IS_SPLITS = 10


def inception_score(logits: Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` parts of ``logits`` [N, C]."""
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(
            f"the Inception Score needs at least {splits} samples for {splits} splits, got {n}"
        )
    log_p = torch.log_softmax(logits.double(), dim=1)  # [N, C], log p(y|x)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]  # [n_i, C]
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # [C], log p(y)
        kl = (part.exp() * (part - log_py)).sum(dim=1)  # [n_i], KL(p(y|x) || p(y))
        scores.append(math.exp(kl.mean().item()))
    mean = sum(scores) / splits
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)
    return mean, std
