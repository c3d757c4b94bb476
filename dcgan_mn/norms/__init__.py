"""Mixture Normalization (Kalayeh & Shah, TPAMI 2019) and the norm-layer factory.

Mixture Normalization (MN) replaces BatchNorm's single Gaussian per channel with a K-component
diagonal Gaussian mixture over the *points* of a batch (a point is the C-vector at one
(n, h, w); a batch of [N, C, H, W] has P = N*H*W of them). Each point is normalized by every
component's statistics, weighted by its posterior:

    x_hat_p = sum_k tau[p, k] / sqrt(lambda_k) * (x_p - E_k) / sqrt(Var_k + eps)

With K = 1 every posterior is exactly 1 and the layer is BatchNorm. The package, in import order
(each module imports only those above it):

* ``mixture``     the value types ``Mixture`` and ``MixtureMoments``;
* ``matching``    matching batch components to running ones;
* ``readings``    ``point="vector"`` / ``"channel"``: what one mixture describes, as a layout;
* ``reference``   steps 2-5 on points [P, C] in plain autograd ops, to be read with the paper;
* ``estimators``  step 1: k-means++ seeding, Lloyd and EM, once, over [G, M, C];
* ``functional``  the fused autograd Functions the module runs and the front door
  ``mixture_normalization``;
* ``module``      ``MixtureNorm2d`` (bookkeeping base + forward);
* ``mode``        Mode Normalization (Deecke et al., ICLR 2019): ``mode_norm``, ``ModeNorm2d``;
* ``factory``     ``make_norm2d``: bn, mn, mode, group or none by name.

Synchronized MN/BN under torch.distributed lives in ``dcgan_mn.sync``, which imports from here
(never the other way).
"""

from .estimators import (
    ESTIMATORS,
    channel_mixtures,
    em_mixture,
    estimate_mixture,
    fit_mixture,
    kmeans_mixture,
    kmeans_pp_seeds,
    sample_fit_points,
)
from .factory import NORM_KINDS, group_norm_groups, make_norm2d
from .functional import (
    _MixtureAffine,
    _mixture_norm2d_fixed,
    _PosteriorMoments,
    channel_mixture_norm,
    mixture_norm2d,
    mixture_normalization,
)
from .matching import match_components, match_components_per_channel
from .mixture import Mixture, MixtureMoments
from .mode import ModeNorm2d, mode_gates, mode_norm
from .module import MixtureNorm2d
from .readings import POINTS
from .reference import (
    mixture_moments,
    mixture_norm,
    mixture_normalize,
    mixture_posteriors,
    moments_to_stats,
)

__all__ = [
    "Mixture",
    "MixtureMoments",
    "sample_fit_points",
    "ESTIMATORS",
    "kmeans_pp_seeds",
    "kmeans_mixture",
    "em_mixture",
    "estimate_mixture",
    "fit_mixture",
    "mixture_posteriors",
    "mixture_moments",
    "moments_to_stats",
    "mixture_normalize",
    "mixture_norm",
    "mixture_norm2d",
    "mixture_normalization",
    "match_components",
    "POINTS",
    "channel_mixtures",
    "channel_mixture_norm",
    "match_components_per_channel",
    "MixtureNorm2d",
    "make_norm2d",
    "NORM_KINDS",
    "group_norm_groups",
    "ModeNorm2d",
    "mode_norm",
    "mode_gates",
]
