"""Evaluation metrics, one module per concern:

* ``frechet``: streaming float64 moments and the Fréchet distance (FID's and cfd's core);
* ``kid_prdc``: KID and precision / recall / density / coverage on feature sets;
* ``images``: image folders read as pytorch-fid reads them;
* ``featurepass``: one feature network's pass over image batches (shared by the two below);
* ``reference``: reference statistics and their on-disk cache;
* ``inception``: the Inception metric family (FID, KID, PRDC);
* ``classifier``: the stacked-digit mode classifier, trained and cached on first use;
* ``modes``: the mode metric family (``modes``, ``kl_modes``, ``cfd``);
* ``specs``: every metric's direction, sample-count column and collapse reading (``METRICS``);
* ``evaluator``: one pass of generated images through a list of metric families.

The names below are the package's public API (``from dcgan_mn.metrics import ...``).
"""

from .errors import MetricsError
from .frechet import FrechetReference, StreamingMoments, frechet_distance
from .kid_prdc import kernel_inception_distance, knn_radii, prdc
from .images import (
    IMAGE_EXTENSIONS,
    SAMPLE_FORMATS,
    image_folder_files,
    iter_image_batches,
    write_samples,
)
from .featurepass import feature_pass
from .reference import (
    BUILTIN_REFS,
    CACHE_ENV_VAR,
    DEFAULT_REAL_FEATURES,
    ReferenceStats,
    default_cache_dir,
    load_reference,
    load_stats_npz,
    reference_identity,
    reference_key,
    save_stats_npz,
)
from .inception import InceptionMetrics
from .specs import METRICS, MetricSpec, metric_spec
from .evaluator import (
    Evaluator,
    build_evaluator,
    generated_images,
    metric_count_key,
    metric_direction,
    sample_count_tag,
)

__all__ = [  # sorted: the package's public names, whichever module defines them
    "build_evaluator",
    "BUILTIN_REFS",
    "CACHE_ENV_VAR",
    "default_cache_dir",
    "DEFAULT_REAL_FEATURES",
    "Evaluator",
    "feature_pass",
    "frechet_distance",
    "FrechetReference",
    "generated_images",
    "IMAGE_EXTENSIONS",
    "image_folder_files",
    "InceptionMetrics",
    "iter_image_batches",
    "kernel_inception_distance",
    "knn_radii",
    "load_reference",
    "load_stats_npz",
    "metric_count_key",
    "metric_direction",
    "metric_spec",
    "METRICS",
    "MetricsError",
    "MetricSpec",
    "prdc",
    "reference_identity",
    "reference_key",
    "ReferenceStats",
    "sample_count_tag",
    "SAMPLE_FORMATS",
    "save_stats_npz",
    "StreamingMoments",
    "write_samples",
]
