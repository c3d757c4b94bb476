"""Component matching: which batch component is averaged into which running component.

Mixture components carry no identity across batches (k-means++ seeds are random), so before
the running statistics absorb a batch's components, the batch components are permuted to the
running ones they are closest to.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = ["match_components", "match_components_per_channel"]

_PERMS: dict[tuple[int, str], Tensor] = {}


def match_components(batch_mean: Tensor, running_mean: Tensor) -> Tensor:
    """The permutation [K] of batch components that best matches the running ones.

    Batch component perm[k] is averaged into running component k, with perm minimising
    sum_k ||batch[perm[k]] - running[k]||^2. Brute force over K! permutations for K <= 6 (all on
    device, no host sync); greedy nearest-pair matching beyond that.
    """
    k = batch_mean.shape[0]
    # Squared distances spelled out: torch.cdist reads a size on the host (a sync on a GPU).
    cost = (running_mean.unsqueeze(1) - batch_mean.unsqueeze(0)).square().sum(2)  # [K_run, K_batch]
    if k <= 6:
        key = (k, str(cost.device))
        perms = _PERMS.get(key)
        if perms is None:
            perms = torch.tensor(list(itertools.permutations(range(k))), device=cost.device)
            _PERMS[key] = perms  # [K!, K]
        total = cost.gather(1, perms.t()).sum(0)  # [K!]
        # index_select with a 1-element index, not perms[argmin]: indexing by a 0-d tensor
        # reads it on the host.
        return perms.index_select(0, total.argmin().view(1)).view(k)  # [K]
    # Greedy beyond K = 6: repeatedly take the closest remaining pair, all on the device.
    perm = torch.zeros(k, dtype=torch.long, device=cost.device)
    cost = cost.clone()
    for _ in range(k):
        flat = cost.view(-1).argmin().view(1)  # [1]
        r, b = flat // k, flat % k  # [1], [1]
        perm.scatter_(0, r, b)
        cost.index_fill_(0, r, float("inf")).index_fill_(1, b, float("inf"))
    return perm


def match_components_per_channel(batch_mean: Tensor, running_mean: Tensor) -> Tensor:
    """perm [K, C]: batch component perm[k, c] is averaged into running component k of channel c.

    For 1-D components the assignment that minimises the summed squared distance between means
    pairs them in sorted order (rearrangement inequality), so no search is needed.
    """
    batch_order = batch_mean.argsort(0)  # [K, C]: the batch component of each rank
    running_rank = running_mean.argsort(0).argsort(0)  # [K, C]: each running component's rank
    return batch_order.gather(0, running_rank)  # [K, C]
