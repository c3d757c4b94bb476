"""``make_norm2d``: a generator norm layer by name."""

from __future__ import annotations

from torch import nn

from .module import MixtureNorm2d

__all__ = ["make_norm2d"]


def make_norm2d(
    num_features: int,
    kind: str,
    num_components: int = 3,
    **mn_kwargs,
) -> nn.Module:
    """Norm factory: ``kind`` is ``"bn"`` (nn.BatchNorm2d) or ``"mn"`` (MixtureNorm2d)."""
    if kind == "bn":
        return nn.BatchNorm2d(num_features)
    if kind == "mn":
        return MixtureNorm2d(num_features, num_components=num_components, **mn_kwargs)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'bn' or 'mn'")
