"""One pass of a feature network over uint8 image batches, into streaming moments.

It sits below both of its users, the reference cache and the evaluator.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from ..features import FeatureExtractor
from .errors import MetricsError
from .frechet import StreamingMoments

__all__ = ["feature_pass"]


def feature_pass(
    batches: Iterable[Tensor],
    extractor: FeatureExtractor,
    *,
    keep: Union[int, Tensor] = 0,
    total: Optional[int] = None,
    progress: bool = False,
    desc: str = "features",
    index_offset: int = 0,
    moments: Optional[StreamingMoments] = None,
) -> tuple[StreamingMoments, Tensor, Tensor]:
    """Features of uint8 batches -> (moments, indices [K] and rows [K, D] (CPU float32) kept).

    ``keep``: an int keeps the first that many rows; a tensor of indices keeps those rows.
    """
    from tqdm import tqdm

    keep_mask = None
    if isinstance(keep, Tensor):
        keep_mask = torch.zeros(total or int(keep.max()) + 1, dtype=torch.bool)
        keep_mask[keep] = True
    kept_idx, kept = [], []
    start = index_offset
    bar = tqdm(
        total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False
    )
    with bar:
        for images in batches:
            feats = extractor(images)  # [B, D]
            if moments is None:
                moments = StreamingMoments(feats.shape[1], feats.device)
            moments.update(feats)
            idx = torch.arange(start, start + feats.shape[0])
            sel = keep_mask[idx] if keep_mask is not None else idx < keep
            if sel.any():
                kept_idx.append(idx[sel])
                kept.append(feats[sel.to(feats.device)].float().cpu())
            start += feats.shape[0]
            bar.update(feats.shape[0])
    if moments is None:
        raise MetricsError("no images to compute features of")
    dims = moments.dims
    return (
        moments,
        torch.cat(kept_idx) if kept_idx else torch.empty(0, dtype=torch.long),
        torch.cat(kept) if kept else torch.empty(0, dims),
    )
