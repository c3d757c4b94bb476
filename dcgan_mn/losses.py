"""The non-saturating GAN loss of DCGAN, on discriminator logits.

D minimises  BCE(D(x), 1) + BCE(D(G(z)), 0)  =  softplus(-D(x)) + softplus(D(G(z)));
G minimises  BCE(D(G(z)), 1)                 =  softplus(-D(G(z)))   (the "non-saturating" form:
strong gradients while D still rejects the fakes, unlike minimising -BCE(D(G(z)), 0)).

Written with softplus, which is what BCE-with-logits computes, without allocating target tensors.
Losses are computed in float32 even when the logits come from a bf16/fp16 autocast region.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["discriminator_loss", "generator_loss"]


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Mean BCE of real logits [N] against 1 plus fake logits [N] against 0 (a scalar)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Mean BCE of the fakes' logits [N] against 1: G wants D to call its images real."""
    return F.softplus(-fake_logits.float()).mean()
