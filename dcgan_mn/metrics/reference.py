"""Reference statistics: what generated images are compared with, and their on-disk cache.

``load_reference(spec, extractor)`` gives the reference Gaussian (and a seeded subset of real
feature rows for KID / PRDC) of CIFAR-10 train / test, a stacked-digit training set, an image
folder, or a pytorch-fid / TTUR ``.npz``. Computed statistics are cached under a key of
everything that changes them, in pytorch-fid's ``.npz`` format (``mu``, ``sigma``) plus
``features`` and ``meta``, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..features import PROTOCOL_VERSION, FeatureExtractor
from ..fileio import atomic_write
from .errors import MetricsError
from .featurepass import feature_pass
from .frechet import FrechetReference
from .images import image_folder_files, iter_image_batches
from .kid_prdc import knn_radii

__all__ = [
    "ReferenceStats",
    "BUILTIN_REFS",
    "DEFAULT_REAL_FEATURES",
    "CACHE_ENV_VAR",
    "default_cache_dir",
    "reference_identity",
    "reference_key",
    "load_reference",
    "load_stats_npz",
    "save_stats_npz",
]

BUILTIN_REFS = {"cifar10-train": "train", "cifar10-test": "test"}
DEFAULT_REAL_FEATURES = 10_000  # real features kept for KID / PRDC (Naeem et al. use 10k)
REAL_SUBSET_SEED = 0
CACHE_ENV_VAR = "DCGAN_MN_CACHE_DIR"
# ``--ref stacked-mnist`` / ``stacked-digits``: 50k stacked images of the train digits, drawn
# with this seed (the same distribution as any run's training set, independent of its draw).
STACKED_REF_SIZE = 50_000
STACKED_REF_SEED = 0


@dataclass
class ReferenceStats:
    """Reference Gaussian (mu [D], sigma [D, D]) and optionally real features [n, D] for KID/PRDC."""

    mu: np.ndarray
    sigma: np.ndarray
    key: str
    features: Optional[np.ndarray] = (
        None  # float32, rows in random order (any prefix is a random subset)
    )
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None
    _frechet: Optional[FrechetReference] = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def dims(self) -> int:
        return int(self.mu.shape[0])

    @property
    def frechet(self) -> FrechetReference:
        if self._frechet is None:
            self._frechet = FrechetReference(self.mu, self.sigma)
        return self._frechet

    def real_features(self, n: int, device) -> Tensor:
        """The first n real feature rows on ``device`` in float64 (memoised)."""
        key = ("features", n, str(device))
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self.features[:n]).to(device, torch.float64)
        return self._cache[key]

    def real_radii(self, n: int, k: int, device) -> Tensor:
        key = ("radii", n, k, str(device))
        if key not in self._cache:
            self._cache[key] = knn_radii(self.real_features(n, device), k)
        return self._cache[key]


def default_cache_dir() -> Path:
    """``$DCGAN_MN_CACHE_DIR``, else ``$XDG_CACHE_HOME/dcgan_mn``, else ``~/.cache/dcgan_mn``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dcgan_mn"


def reference_identity(spec: str, data_root: Union[str, Path] = "data") -> dict:
    """What identifies the images behind ``--ref spec`` (cheap: no decoding).

    CIFAR-10 is a fixed, hash-checked dataset: its split identifies it. A folder is identified
    by every image's relative path, size and modification time. An ``.npz`` by its SHA-256.
    """
    from ..digits import MNIST_FILES, STACKED_SOURCES

    if spec in BUILTIN_REFS:
        return {"kind": "cifar10", "split": BUILTIN_REFS[spec]}
    if spec in STACKED_SOURCES:
        identity = {
            "kind": "stacked",
            "source": spec,
            "split": "train",
            "size": STACKED_REF_SIZE,
            "seed": STACKED_REF_SEED,
        }
        if spec == "stacked-mnist":  # a subset or re-export of MNIST changes the statistics
            raw = Path(data_root).expanduser() / "MNIST" / "raw"
            identity["files"] = [
                [n, (raw / n).stat().st_size if (raw / n).is_file() else None] for n in MNIST_FILES
            ]
        return identity
    p = Path(spec).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise MetricsError(f"--ref {spec!r}: no such statistics file")
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        return {"kind": "npz", "path": str(p.resolve()), "sha256": h}
    if p.is_dir():
        files = image_folder_files(p)
        if not files:
            raise MetricsError(f"--ref {spec!r}: no images in this folder")
        listing = []
        for f in files:
            st = f.stat()
            listing.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return {
            "kind": "folder",
            "path": str(p.resolve()),
            "num_files": len(files),
            "files_sha256": digest,
        }
    raise MetricsError(
        f"--ref {spec!r}: expected {', '.join([*BUILTIN_REFS, *STACKED_SOURCES])}, an "
        f"image folder or a .npz statistics file"
    )


def reference_key(
    identity: dict,
    weights_sha256: str,
    dims: int,
    num_real_features: int = DEFAULT_REAL_FEATURES,
    protocol: Optional[str] = None,
) -> str:
    """Hex key of everything that changes a reference's statistics (``protocol``: the
    extractor's image protocol, ``FID_PROTOCOLS``)."""
    payload = {
        "source": identity,
        "weights_sha256": weights_sha256,
        "dims": dims,
        "protocol": protocol or PROTOCOL_VERSION,
        "num_real_features": num_real_features,
        "real_subset_seed": REAL_SUBSET_SEED,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_stats_npz(
    path: Union[str, Path], stats: ReferenceStats, *, with_features: bool = True
) -> Path:
    """Write pytorch-fid's ``.npz`` (``mu``, ``sigma``) plus ``meta`` (and ``features``),
    atomically (``fileio.atomic_write``)."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "meta": np.array(json.dumps(stats.meta))}
    if with_features and stats.features is not None:
        arrays["features"] = stats.features
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def load_stats_npz(path: Union[str, Path], flag: str = "--ref") -> ReferenceStats:
    """Read a pytorch-fid / TTUR ``.npz`` (keys ``mu``, ``sigma``), or one of ours."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise MetricsError(
                    f"{flag} {str(path)!r}: not FID statistics (no 'mu' and 'sigma' arrays)"
                )
            mu = np.asarray(f["mu"], dtype=np.float64)
            sigma = np.asarray(f["sigma"], dtype=np.float64)
            meta = json.loads(str(f["meta"])) if "meta" in f else {}
            features = np.asarray(f["features"], dtype=np.float32) if "features" in f else None
    except MetricsError:
        raise
    except Exception as e:
        raise MetricsError(
            f"{flag} {str(path)!r}: cannot read statistics ({type(e).__name__}: {e})"
        ) from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricsError(
            f"{flag} {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do not match"
        )
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        features = None
    key = meta.get("key") or "npz-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return ReferenceStats(mu=mu, sigma=sigma, key=key, features=features, meta=meta, path=path)


def _load_real_images(identity: dict, spec: str, data_root) -> tuple[int, Any]:
    """(number of images, batch_size -> iterator of uint8 batches) for a built-in / folder ref."""
    if identity["kind"] == "stacked":
        from ..digits import load_stacked

        # uint8 [N, 3, 32, 32]
        images = load_stacked(
            identity["source"], "train", data_root, size=identity["size"], seed=identity["seed"]
        ).images
        return images.shape[0], lambda bs: iter(images.split(bs))
    if identity["kind"] == "cifar10":
        from ..data import load_cifar10

        # uint8 [N, 3, 32, 32]
        images = load_cifar10(data_root, split=identity["split"], download=True)
        return images.shape[0], lambda bs: iter(images.split(bs))
    files = image_folder_files(spec)
    return len(files), lambda bs: iter_image_batches(files, bs)


def _cache_file(cache_dir: Path, spec: str, identity: dict, dims: int, key: str) -> Path:
    if identity["kind"] in ("cifar10", "stacked"):
        slug = spec
    else:
        slug = "folder-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(identity["path"]).name)[:40]
    return cache_dir / "ref_stats" / f"{slug}-{dims}d-{key[:16]}.npz"


def load_reference(
    spec: str,
    extractor: FeatureExtractor,
    *,
    data_root: Union[str, Path] = "data",
    cache_dir: Union[str, Path, None] = None,
    num_real_features: int = DEFAULT_REAL_FEATURES,
    progress: bool = False,
    use_cache: bool = True,
) -> ReferenceStats:
    """Reference statistics for ``--ref spec`` as seen by ``extractor``: from the cache when
    present, else computed (one feature pass) and cached. ``.npz`` files are read as they are."""
    identity = reference_identity(spec, data_root)
    dims = extractor.dims
    if identity["kind"] == "npz":
        stats = load_stats_npz(spec)
        if stats.dims != dims:
            raise MetricsError(
                f"--ref {spec!r}: statistics are {stats.dims}-d but the features are {dims}-d "
                f"(--dims {dims})"
            )
        ref_sha = stats.meta.get("weights_sha256")
        if ref_sha and ref_sha != extractor.weights_sha256:
            raise MetricsError(
                f"--ref {spec!r}: computed with Inception weights sha256 {ref_sha[:12]}..., but "
                f"these features use {extractor.weights_sha256[:12]}... (--inception-weights)"
            )
        ref_protocol = stats.meta.get("protocol")
        protocol = getattr(extractor, "protocol", None) or PROTOCOL_VERSION
        if ref_protocol and ref_protocol != protocol:
            raise MetricsError(
                f"--ref {spec!r}: computed with image protocol {ref_protocol!r}, but "
                f"these features use {protocol!r} (--fid-protocol)"
            )
        return stats

    protocol = getattr(extractor, "protocol", None) or PROTOCOL_VERSION
    key = reference_key(identity, extractor.weights_sha256, dims, num_real_features, protocol)
    cache_path = _cache_file(
        Path(cache_dir) if cache_dir else default_cache_dir(), spec, identity, dims, key
    )
    if use_cache and cache_path.is_file():
        try:
            stats = load_stats_npz(cache_path)
            if stats.meta.get("key") == key:
                return stats
        except MetricsError:
            pass  # unreadable cache entry: recompute and replace it
    num_images, batches = _load_real_images(identity, spec, data_root)
    if num_images < 2:
        raise MetricsError(f"--ref {spec!r}: FID needs at least 2 images, found {num_images}")
    # A seeded random subset of the real images keeps its features for KID / PRDC, stored in
    # random order so that any prefix is itself a random subset.
    gen = torch.Generator().manual_seed(REAL_SUBSET_SEED)
    keep_order = torch.randperm(num_images, generator=gen)[:num_real_features]  # [n]
    t0 = time.perf_counter()
    moments, kept_idx, kept = feature_pass(
        batches(getattr(extractor, "batch_size", 256)),
        extractor,
        keep=keep_order,
        total=num_images,
        progress=progress,
        desc=f"reference {spec}",
    )
    # kept rows are in image order; put them in keep_order's order.
    pos = {int(i): r for r, i in enumerate(kept_idx.tolist())}
    features = kept[[pos[int(i)] for i in keep_order.tolist()]].numpy().astype(np.float32)
    mu, sigma = moments.numpy()
    meta = {
        "key": key,
        "ref": spec,
        "source": identity,
        "num_images": num_images,
        "dims": dims,
        "weights_sha256": extractor.weights_sha256,
        "protocol": protocol,
        "num_real_features": int(features.shape[0]),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    stats = ReferenceStats(
        mu=mu, sigma=sigma, key=key, features=features, meta=meta, path=cache_path
    )
    if use_cache:
        save_stats_npz(cache_path, stats)
    return stats
