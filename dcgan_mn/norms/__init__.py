"""Mixture Normalization (Kalayeh & Shah, TPAMI 2019), Mode Normalization and the norm-layer factory.

Mixture Normalization (MN) replaces BatchNorm's single Gaussian per channel with a K-component
diagonal Gaussian mixture over the *points* of a batch (a point is the C-vector at one
(n, h, w); a batch of [N, C, H, W] has P = N*H*W of them). Each point is normalized by every
component's statistics, weighted by its posterior:

    x_hat_p = sum_k tau[p, k] / sqrt(lambda_k) * (x_p - E_k) / sqrt(Var_k + eps)

With K = 1 every posterior is exactly 1 and the layer is BatchNorm. The package, one module per
concept, in import order (each module imports only those above it):

* ``mixture``     what a mixture is: the value types ``Mixture`` and ``MixtureMoments``, the
  math shared by all below (posteriors, statistics of summed moments), matching batch
  components to running ones, and the readings ``point="vector"`` / ``"channel"`` (``POINTS``);
* ``estimators``  step 1: k-means++ seeding, Lloyd and EM, once, over [G, M, C] (``ESTIMATORS``);
* ``reference``   steps 2-5 on points [P, C] in plain autograd ops, to be read with the paper; a
  leaf that only the tests and benches import;
* ``functional``  steps 2-5 as the module runs them (fused autograd Functions) behind the one
  front door ``mixture_norm``;
* ``module``      the bookkeeping MN and Mode Normalization share, and ``MixtureNorm2d``;
* ``mode``        Mode Normalization (Deecke et al., ICLR 2019): ``mode_norm``, ``ModeNorm2d``.

The factory, ``make_norm2d`` (bn, mn, mode, group or none by name, ``NORM_KINDS``), lives here:
it is the one piece that needs both layers, a dozen lines that pick one by name, and here it
sits above them without a module of its own.

``__all__`` is what a user imports; a module's other names are imported from that module.
Synchronized MN/BN under torch.distributed lives in ``dcgan_mn.sync``, which imports from here
(never the other way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .estimators import ESTIMATORS, fit_mixture
from .functional import mixture_norm
from .mixture import POINTS, Mixture, MixtureMoments
from .mode import ModeNorm2d, mode_norm
from .module import MN_OPTIONS, MixtureNorm2d

__all__ = [
    "Mixture",
    "MixtureMoments",
    "POINTS",
    "ESTIMATORS",
    "fit_mixture",
    "mixture_norm",
    "MixtureNorm2d",
    "MN_OPTIONS",
    "mode_norm",
    "ModeNorm2d",
    "NORM_KINDS",
    "group_norm_groups",
    "make_norm2d",
    "NormSpec",
    "norm_specs",
]

NORM_KINDS = ("bn", "mn", "mode", "group", "none")


def group_norm_groups(num_features: int, max_groups: int = 32) -> int:
    """GroupNorm's number of groups for C channels: the largest divisor of C that also divides
    ``max_groups`` (32, Wu & He's default), i.e. 32 for every DCGAN width (64 * 2^i), and fewer
    only for channel counts that 32 groups cannot split evenly (C = 3 -> 1, C = 48 -> 16)."""
    return math.gcd(num_features, max_groups)


def make_norm2d(num_features: int, kind: str, num_components: int = 3, **kwargs) -> nn.Module:
    """A norm layer over C = ``num_features`` channels by name:

    * ``"bn"``: nn.BatchNorm2d;
    * ``"mn"``: MixtureNorm2d with K = ``num_components`` (``kwargs`` are its other options);
    * ``"mode"``: ModeNorm2d with K = ``num_components`` modes (``kwargs`` are its options);
    * ``"group"``: nn.GroupNorm with ``group_norm_groups(C)`` groups;
    * ``"none"``: nn.Identity.
    """
    _check_norm_kind(kind)
    if kind == "bn":
        return nn.BatchNorm2d(num_features)
    if kind == "mn":
        return MixtureNorm2d(num_features, num_components=num_components, **kwargs)
    if kind == "mode":
        return ModeNorm2d(num_features, num_modes=num_components, **kwargs)
    if kind == "group":
        return nn.GroupNorm(group_norm_groups(num_features), num_features)
    return nn.Identity()  # "none"


def _check_norm_kind(kind: str) -> None:
    """Raise ValueError, naming the kinds there are, unless ``kind`` is one of ``NORM_KINDS``."""
    if kind not in NORM_KINDS:
        raise ValueError(
            f"unknown norm kind {kind!r}; expected one of {', '.join(map(repr, NORM_KINDS))}"
        )


@dataclass(frozen=True)
class NormSpec:
    """One generator layer's norm, decided once at the edge (the config) and built later:
    ``NormSpec("mn", 3, (("point", "vector"),))(C)`` is a fresh layer over C channels, as
    torchvision passes a ``norm_layer`` callable down instead of a name. Frozen and hashable,
    so the model never sees the strings of a command line."""

    kind: str
    num_components: int = 1  # K: MN's components, Mode Normalization's modes; 1 for the others
    options: tuple[tuple[str, Any], ...] = ()  # MixtureNorm2d / ModeNorm2d keyword arguments

    def __post_init__(self) -> None:
        _check_norm_kind(self.kind)

    def __call__(self, num_features: int) -> nn.Module:
        return make_norm2d(num_features, self.kind, self.num_components, **dict(self.options))


def norm_specs(
    kinds: Sequence[str], mn_components: int = 3, mode_components: int = 2, **mn_options
) -> tuple[NormSpec, ...]:
    """Per-layer norm kinds (``--g-norms``, or ``--mn-layers`` spelt out) -> one ``NormSpec`` a
    layer: MN layers get K = ``mn_components`` and ``mn_options``, Mode Normalization layers
    ``mode_components`` modes, the others nothing."""
    options = tuple(sorted(mn_options.items()))
    return tuple(
        NormSpec(kind, mn_components, options)
        if kind == "mn"
        else NormSpec(kind, mode_components if kind == "mode" else 1)
        for kind in kinds
    )
