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

from . import estimators, factory, functional, matching, mixture, mode, module, readings, reference
from .estimators import *  # noqa: F401,F403  (each module's __all__ is the public surface)
from .factory import *  # noqa: F401,F403
from .functional import *  # noqa: F401,F403
from .functional import _MixtureAffine, _mixture_norm2d_fixed, _PosteriorMoments  # noqa: F401 (tests, sync)
from .matching import *  # noqa: F401,F403
from .mixture import *  # noqa: F401,F403
from .mode import *  # noqa: F401,F403
from .module import *  # noqa: F401,F403
from .readings import *  # noqa: F401,F403
from .reference import *  # noqa: F401,F403

__all__ = [name for part in (mixture, matching, readings, reference, estimators, functional,
                             module, mode, factory) for name in part.__all__]
