"""``make_norm2d``: a generator norm layer by name (``NORM_KINDS``)."""

from __future__ import annotations

import math

from torch import nn

from .mode import ModeNorm2d
from .module import MixtureNorm2d

__all__ = ["NORM_KINDS", "group_norm_groups", "make_norm2d"]

NORM_KINDS = ("bn", "mn", "mode", "group", "none")


def group_norm_groups(num_features: int, max_groups: int = 32) -> int:
    """GroupNorm's number of groups for C channels: the largest divisor of C that also divides
    ``max_groups`` (32, Wu & He's default), i.e. 32 for every DCGAN width (64 * 2^i), and fewer
    only for channel counts that 32 groups cannot split evenly (C = 3 -> 1, C = 48 -> 16)."""
    return math.gcd(num_features, max_groups)


def make_norm2d(
    num_features: int,
    kind: str,
    num_components: int = 3,
    **kwargs,
) -> nn.Module:
    """A norm layer over C = ``num_features`` channels by name:

    * ``"bn"``: nn.BatchNorm2d;
    * ``"mn"``: MixtureNorm2d with K = ``num_components`` (``kwargs`` are its other options);
    * ``"mode"``: ModeNorm2d with K = ``num_components`` modes (``kwargs`` are its options);
    * ``"group"``: nn.GroupNorm with ``group_norm_groups(C)`` groups;
    * ``"none"``: nn.Identity.
    """
    if kind == "bn":
        return nn.BatchNorm2d(num_features)
    if kind == "mn":
        return MixtureNorm2d(num_features, num_components=num_components, **kwargs)
    if kind == "mode":
        return ModeNorm2d(num_features, num_modes=num_components, **kwargs)
    if kind == "group":
        return nn.GroupNorm(group_norm_groups(num_features), num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {', '.join(map(repr, NORM_KINDS))}")
