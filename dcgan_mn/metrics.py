"""FID and mode-collapse metrics, reference statistics, and the evaluator.

* ``StreamingMoments``: float64 mean / covariance over feature batches (Chan et al.'s pairwise
  merge: every batch is centred on its own mean before it is added, so nothing cancels).
* ``frechet_distance``: FID between two Gaussians through symmetric eigendecompositions:
  with A = S2^(1/2), tr sqrt(S1 S2) = tr sqrt(A S1 A) = sum sqrt(eig(A S1 A)). The reference
  side's A is computed once (``FrechetReference``; ``frechet_distance`` keeps a small cache).
* ``kernel_inception_distance`` (unbiased polynomial-kernel MMD^2 over random subsets,
  Binkowski et al. 2018) and ``prdc`` (precision / recall, Kynkaanniemi et al. 2019; density /
  coverage, Naeem et al. 2020; k-NN balls in feature space, strict ``<`` as in Naeem et al.'s
  code), both from the features of the same pass against a cached subset of real features.
* Reference statistics (``load_reference``): CIFAR-10 train / test, an image folder, or a
  pytorch-fid / TTUR ``.npz``; cached on disk under a key of everything that changes them, in
  pytorch-fid's ``.npz`` format (``mu``, ``sigma``) plus ``features`` and ``meta``.
* ``Evaluator`` / ``build_evaluator``: what training calls every ``--fid-every`` iterations and
  what ``evaluate.py`` uses: generate (seeded, chunked), quantize, featurize, score.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import distributed as D
from .features import PROTOCOL_VERSION, FeatureExtractor, quantize_images
from .fileio import atomic_write

__all__ = [
    "MetricsError",
    "StreamingMoments",
    "FrechetReference",
    "frechet_distance",
    "kernel_inception_distance",
    "knn_radii",
    "prdc",
    "ReferenceStats",
    "BUILTIN_REFS",
    "default_cache_dir",
    "reference_identity",
    "reference_key",
    "load_reference",
    "load_stats_npz",
    "save_stats_npz",
    "image_folder_files",
    "iter_image_batches",
    "Evaluator",
    "build_evaluator",
    "sample_count_tag",
]

BUILTIN_REFS = {"cifar10-train": "train", "cifar10-test": "test"}
DEFAULT_REAL_FEATURES = 10_000  # real features kept for KID / PRDC (Naeem et al. use 10k)
REAL_SUBSET_SEED = 0
CACHE_ENV_VAR = "DCGAN_MN_CACHE_DIR"
# pytorch-fid's image extensions (it globs the folder itself, not its subfolders).
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})


class MetricsError(ValueError):
    """A bad evaluation input; the message is one line naming the flag or path and the value."""


# --------------------------------------------------------------------------------------------
# Streaming statistics.
# --------------------------------------------------------------------------------------------


class StreamingMoments:
    """Running count, mean [D] and centred sum of squares [D, D] in float64."""

    def __init__(self, dims: int, device: Union[str, torch.device] = "cpu") -> None:
        self.dims = dims
        self.count = 0
        self.mean = torch.zeros(dims, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dims, dims, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> "StreamingMoments":
        """Add a batch of feature rows x [B, D]."""
        if x.dim() != 2 or x.shape[1] != self.dims:
            raise ValueError(f"expected features [B, {self.dims}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.to(device=self.mean.device, dtype=torch.float64)
        batch_mean = x.mean(0)  # [D]
        xc = x - batch_mean  # [B, D]
        self._merge(x.shape[0], batch_mean, xc.T @ xc)
        return self

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":
        if other.dims != self.dims:
            raise ValueError(f"cannot merge {other.dims}-d moments into {self.dims}-d ones")
        if other.count:
            self._merge(other.count, other.mean.to(self.mean.device), other.m2.to(self.m2.device))
        return self

    def _merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean  # [D]
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    @property
    def cov(self) -> Tensor:
        """Unbiased covariance [D, D] (``np.cov``'s default, as pytorch-fid uses)."""
        if self.count < 2:
            raise MetricsError(f"a covariance needs at least 2 samples, got {self.count}")
        return self.m2 / (self.count - 1)

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) as float64 numpy arrays."""
        return self.mean.cpu().numpy(), self.cov.cpu().numpy()

    def all_reduce(self) -> "StreamingMoments":
        """Merge every rank's moments (in rank order) into this one; identity without torchrun."""
        packed = torch.cat([
            torch.tensor([float(self.count)], dtype=torch.float64, device=self.mean.device),
            self.mean, self.m2.flatten(),
        ])[None]  # [1, 1 + D + D*D]
        rows = D.all_gather_rows(packed)
        if len(rows) == 1:
            return self
        merged = StreamingMoments(self.dims, self.mean.device)
        for row in rows:
            row = row[0]
            n = int(row[0].item())
            if n:
                merged._merge(n, row[1:1 + self.dims], row[1 + self.dims:].view(self.dims, self.dims))
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self


# --------------------------------------------------------------------------------------------
# Frechet distance.
# --------------------------------------------------------------------------------------------


def _psd_sqrt(sigma: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative rounding noise clipped)."""
    eigval, eigvec = torch.linalg.eigh((sigma + sigma.T) / 2)  # sym = V diag(w) V^T
    return (eigvec * eigval.clamp(min=0).sqrt()) @ eigvec.T


class FrechetReference:
    """One side of the Fréchet distance (the reference), with its square root computed once.

    The linear algebra runs in float64 through torch on the CPU (its LAPACK is faster than
    numpy's here); inputs and outputs are numpy / Python floats.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        if sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} do not match")
        self.mu, self.sigma = mu, sigma
        self.trace = float(np.trace(sigma))
        self._sqrt: Optional[Tensor] = None

    @property
    def dims(self) -> int:
        return self.mu.shape[0]

    @property
    def sqrt(self) -> Tensor:
        if self._sqrt is None:
            self._sqrt = _psd_sqrt(torch.from_numpy(self.sigma))
        return self._sqrt

    def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """||mu - mu_ref||^2 + tr(S + S_ref) - 2 tr sqrt(S S_ref), clipped at 0."""
        mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        if mu.shape != self.mu.shape or sigma.shape != self.sigma.shape:
            raise MetricsError(
                f"statistics of dimension {mu.shape[0]} cannot be compared with a "
                f"{self.dims}-d reference (check --dims and --ref)"
            )
        a = self.sqrt
        inner = a @ torch.from_numpy(sigma) @ a  # [D, D] symmetric PSD, eigenvalues of S @ S_ref
        eig = torch.linalg.eigvalsh((inner + inner.T) / 2)
        tr_sqrt = float(eig.clamp(min=0).sqrt().sum())
        diff = mu - self.mu
        value = float(diff @ diff) + float(np.trace(sigma)) + self.trace - 2.0 * tr_sqrt
        return max(value, 0.0)


_FRECHET_CACHE: "OrderedDict[bytes, FrechetReference]" = OrderedDict()
_FRECHET_CACHE_SIZE = 4


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (sigma2: the reference side).

    Same value as ``pytorch_fid.fid_score.calculate_frechet_distance`` without ``sqrtm``;
    sigma2's square root is cached by content, so scoring many models against one reference
    pays for it once.
    """
    mu2 = np.ascontiguousarray(np.atleast_1d(mu2), dtype=np.float64)
    sigma2 = np.ascontiguousarray(np.atleast_2d(sigma2), dtype=np.float64)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(sigma2.shape).encode())
    h.update(mu2.tobytes())
    h.update(sigma2.tobytes())
    key = h.digest()
    ref = _FRECHET_CACHE.get(key)
    if ref is None:
        ref = FrechetReference(mu2, sigma2)
        _FRECHET_CACHE[key] = ref
        while len(_FRECHET_CACHE) > _FRECHET_CACHE_SIZE:
            _FRECHET_CACHE.popitem(last=False)
    else:
        _FRECHET_CACHE.move_to_end(key)
    return ref.distance(mu1, sigma1)


# --------------------------------------------------------------------------------------------
# KID and precision / recall / density / coverage.
# --------------------------------------------------------------------------------------------


def _poly_mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 between equal-size x, y [m, d] (float64)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3  # [m, m]
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_xx = k_xx.sum() - k_xx.diagonal().sum()
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    real: Tensor, fake: Tensor, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std over ``num_subsets`` random subsets (without replacement) of
    min(subset_size, len(real), len(fake)) rows of each set; returns (mean, std)."""
    real = real.to(torch.float64)
    fake = fake.to(real.device, torch.float64)
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise MetricsError(f"KID needs at least 2 samples per set, got {real.shape[0]} and {fake.shape[0]}")
    if m == real.shape[0] == fake.shape[0]:
        num_subsets = 1  # every subset would be the whole of both sets: the estimate is exact
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        i = torch.from_numpy(rng.choice(fake.shape[0], m, replace=False)).to(fake.device)
        j = torch.from_numpy(rng.choice(real.shape[0], m, replace=False)).to(real.device)
        values.append(_poly_mmd2_unbiased(fake[i], real[j]))
    return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances [Na, Nb] between rows of a [Na, D] and b [Nb, D] (float64)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)  # [Na, Nb]
    return sq.clamp_(min=0).sqrt_()


def knn_radii(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance from each row of x [N, D] to its k-th nearest other row [N] (float64).

    As in Naeem et al.'s code: the (k + 1)-th smallest distance with the row itself included.
    """
    x = x.to(torch.float64)
    if x.shape[0] <= k:
        raise MetricsError(f"k-NN radii with k={k} need more than {k} samples, got {x.shape[0]}")
    out = []
    for rows in x.split(chunk):
        d = _pairwise_distances(rows, x)  # [c, N]
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def prdc(
    real: Tensor, fake: Tensor, k: int = 5, *, real_radii: Optional[Tensor] = None, chunk: int = 2048
) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` [M, D] against ``real`` [N, D].

    precision: share of fakes inside some real k-NN ball; recall: share of reals inside some fake
    k-NN ball; density: (1 / kM) * number of (fake, real ball) containments; coverage: share of
    real balls that contain at least one fake.
    """
    real = real.to(torch.float64)
    fake = fake.to(real.device, torch.float64)
    r_real = knn_radii(real, k, chunk) if real_radii is None else real_radii.to(real)
    r_fake = knn_radii(fake, k, chunk)
    inside_some_real = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    real_balls_per_fake = torch.zeros(fake.shape[0], dtype=torch.float64, device=real.device)
    real_in_some_fake, real_covered = [], []
    for start in range(0, real.shape[0], chunk):
        d = _pairwise_distances(real[start:start + chunk], fake)  # [c, M]
        in_real_ball = d < r_real[start:start + chunk, None]  # [c, M]
        inside_some_real |= in_real_ball.any(0)
        real_balls_per_fake += in_real_ball.sum(0)
        real_in_some_fake.append((d < r_fake[None, :]).any(1))
        real_covered.append(d.min(1).values < r_real[start:start + chunk])
    return {
        "precision": inside_some_real.double().mean().item(),
        "recall": torch.cat(real_in_some_fake).double().mean().item(),
        "density": (real_balls_per_fake.mean() / k).item(),
        "coverage": torch.cat(real_covered).double().mean().item(),
    }


# --------------------------------------------------------------------------------------------
# Reference statistics and their cache.
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Reference Gaussian (mu [D], sigma [D, D]) and optionally real features [n, D] for KID/PRDC."""

    mu: np.ndarray
    sigma: np.ndarray
    key: str
    features: Optional[np.ndarray] = None  # float32, rows in random order (any prefix is a random subset)
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


def image_folder_files(root: Union[str, Path]) -> list[Path]:
    """Image files of a folder, sorted: its own files with pytorch-fid's extensions if it has
    any (what ``python -m pytorch_fid`` reads), else every image in its subfolders."""
    root = Path(root)
    own = sorted(p for p in root.iterdir() if p.is_file() and p.suffix[1:] in IMAGE_EXTENSIONS)
    if own:
        return own
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS
    )


def _decode_rgb(path: Path) -> Tensor:
    """One image file -> uint8 [3, H, W], decoded as pytorch-fid does (PIL, convert('RGB'))."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))  # [H, W, 3]
    except Exception as e:  # PIL raises many types for unreadable files
        raise MetricsError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, H, W]


def iter_image_batches(files: Sequence[Path], batch_size: int) -> Iterator[Tensor]:
    """uint8 batches [B, 3, H, W] of decoded files, in order; a new batch starts at a size change."""
    batch: list[Tensor] = []
    for path in files:
        img = _decode_rgb(path)
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


def reference_identity(spec: str, data_root: Union[str, Path] = "data") -> dict:
    """What identifies the images behind ``--ref spec`` (cheap: no decoding).

    CIFAR-10 is a fixed, hash-checked dataset: its split identifies it. A folder is identified
    by every image's relative path, size and modification time. An ``.npz`` by its SHA-256.
    """
    if spec in BUILTIN_REFS:
        return {"kind": "cifar10", "split": BUILTIN_REFS[spec]}
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
        return {"kind": "folder", "path": str(p.resolve()), "num_files": len(files), "files_sha256": digest}
    raise MetricsError(
        f"--ref {spec!r}: expected cifar10-train, cifar10-test, an image folder or a .npz "
        f"statistics file"
    )


def reference_key(identity: dict, weights_sha256: str, dims: int,
                  num_real_features: int = DEFAULT_REAL_FEATURES) -> str:
    """Hex key of everything that changes a reference's statistics."""
    payload = {
        "source": identity, "weights_sha256": weights_sha256, "dims": dims,
        "protocol": PROTOCOL_VERSION, "num_real_features": num_real_features,
        "real_subset_seed": REAL_SUBSET_SEED,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_stats_npz(path: Union[str, Path], stats: ReferenceStats, *, with_features: bool = True) -> Path:
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
                raise MetricsError(f"{flag} {str(path)!r}: not FID statistics (no 'mu' and 'sigma' arrays)")
            mu = np.asarray(f["mu"], dtype=np.float64)
            sigma = np.asarray(f["sigma"], dtype=np.float64)
            meta = json.loads(str(f["meta"])) if "meta" in f else {}
            features = np.asarray(f["features"], dtype=np.float32) if "features" in f else None
    except MetricsError:
        raise
    except Exception as e:
        raise MetricsError(f"{flag} {str(path)!r}: cannot read statistics ({type(e).__name__}: {e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricsError(f"{flag} {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do not match")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        features = None
    key = meta.get("key") or "npz-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return ReferenceStats(mu=mu, sigma=sigma, key=key, features=features, meta=meta, path=path)


def _load_real_images(identity: dict, spec: str, data_root) -> tuple[int, Any]:
    """(number of images, batch_size -> iterator of uint8 batches) for a cifar10 / folder ref."""
    if identity["kind"] == "cifar10":
        from .data import load_cifar10

        images = load_cifar10(data_root, split=identity["split"], download=True)  # uint8 [N, 3, 32, 32]
        return images.shape[0], lambda bs: iter(images.split(bs))
    files = image_folder_files(spec)
    return len(files), lambda bs: iter_image_batches(files, bs)


def _cache_file(cache_dir: Path, spec: str, identity: dict, dims: int, key: str) -> Path:
    if identity["kind"] == "cifar10":
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
        return stats

    key = reference_key(identity, extractor.weights_sha256, dims, num_real_features)
    cache_path = _cache_file(Path(cache_dir) if cache_dir else default_cache_dir(), spec, identity, dims, key)
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
    moments, kept_idx, kept = _feature_pass(
        batches(getattr(extractor, "batch_size", 256)), extractor, keep=keep_order,
        total=num_images, progress=progress, desc=f"reference {spec}",
    )
    # kept rows are in image order; put them in keep_order's order.
    pos = {int(i): r for r, i in enumerate(kept_idx.tolist())}
    features = kept[[pos[int(i)] for i in keep_order.tolist()]].numpy().astype(np.float32)
    mu, sigma = moments.numpy()
    meta = {
        "key": key, "ref": spec, "source": identity, "num_images": num_images, "dims": dims,
        "weights_sha256": extractor.weights_sha256, "protocol": PROTOCOL_VERSION,
        "num_real_features": int(features.shape[0]), "seconds": round(time.perf_counter() - t0, 3),
    }
    stats = ReferenceStats(mu=mu, sigma=sigma, key=key, features=features, meta=meta, path=cache_path)
    if use_cache:
        save_stats_npz(cache_path, stats)
    return stats


def _feature_pass(
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
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False)
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


# --------------------------------------------------------------------------------------------
# The evaluator.
# --------------------------------------------------------------------------------------------


def sample_count_tag(num_samples: int) -> str:
    """10000 -> '10k', 50000 -> '50k', 2500 -> '2.5k', 500 -> '500' (metric names carry it)."""
    if num_samples >= 1000 and num_samples % 100 == 0:
        return f"{num_samples / 1000:g}k"
    return str(num_samples)


class Evaluator:
    """Scores generators (or images) against one reference with one feature extractor.

    ``evaluator(generator, sample_mode="batch", batch_size=64)`` draws ``num_samples`` latents
    from its own seeded ``torch.Generator`` (the same z for every call, every run and every rank
    count), generates in chunks of whole ``batch_size`` batches with the global RNG forked and
    seeded per chunk (MN's k-means++ draws), quantizes to uint8 as a PNG would, featurizes, and
    returns FID, KID and PRDC from the same pass. Under torchrun the chunks are split across
    ranks and the features gathered: call it on every rank (with the unwrapped generator, not
    the DDP wrapper); every rank gets the same result.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference: ReferenceStats,
        *,
        num_samples: int = 10_000,
        seed: int = 0,
        prdc_k: int = 5,
        max_metric_samples: int = DEFAULT_REAL_FEATURES,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        progress: bool = False,
    ) -> None:
        if num_samples < 2:
            raise MetricsError(f"--fid-samples {num_samples}: FID needs at least 2 samples")
        if reference.dims != extractor.dims:
            raise MetricsError(
                f"--ref {reference.meta.get('ref', reference.key)!r}: statistics are "
                f"{reference.dims}-d but the features are {extractor.dims}-d (--dims)"
            )
        self.extractor = extractor
        self.reference = reference
        self.num_samples = num_samples
        self.seed = seed
        self.prdc_k = prdc_k
        self.max_metric_samples = max_metric_samples
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.progress = progress

    @property
    def ref_key(self) -> str:
        return self.reference.key

    @property
    def dims(self) -> int:
        return self.extractor.dims

    @property
    def weights_sha256(self) -> str:
        return self.extractor.weights_sha256

    @property
    def metric_samples(self) -> int:
        """How many generated (and real) feature rows KID and PRDC use."""
        n_real = 0 if self.reference.features is None else self.reference.features.shape[0]
        return min(self.num_samples, n_real, self.max_metric_samples)

    # --- generators ---

    def latents(self, z_dim: int) -> Tensor:
        """The fixed evaluation latents [num_samples, z_dim] (CPU; the same for every call)."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.num_samples, z_dim, generator=gen)

    def _generated_batches(self, generator, sample_mode: str, batch_size: int) -> Iterator[Tensor]:
        device = next(generator.parameters()).device
        z_all = self.latents(generator.z_dim)  # [num_samples, z_dim]
        # Every image comes from a full batch of batch_size (batch statistics as in training):
        # the last batch is topped up with extra latents from a second stream and cut off.
        num_batches = math.ceil(self.num_samples / batch_size)
        extra = num_batches * batch_size - self.num_samples
        if extra:
            gen = torch.Generator().manual_seed(self.seed + 1)
            z_all = torch.cat([z_all, torch.randn(extra, generator.z_dim, generator=gen)])
        feature_batch = getattr(self.extractor, "batch_size", 256)
        batches_per_chunk = max(1, feature_batch // batch_size)
        chunk_size = batches_per_chunk * batch_size
        num_chunks = math.ceil(z_all.shape[0] / chunk_size)
        rank, world = _rank_world()
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for c in range(rank, num_chunks, world):
                torch.manual_seed(self.seed * 1_000_003 + c)
                z = z_all[c * chunk_size:(c + 1) * chunk_size].to(device)
                images = generator.sample(z, mode=sample_mode, batch_size=batch_size)  # [B, 3, 32, 32]
                keep = min(images.shape[0], self.num_samples - c * chunk_size)
                yield c * chunk_size, quantize_images(images[:keep])

    def __call__(self, generator, *, sample_mode: str, batch_size: int) -> dict:
        from tqdm import tqdm

        if batch_size < 1:
            raise MetricsError(f"--batch-size {batch_size}: must be >= 1")
        t0 = time.perf_counter()
        rank, world = _rank_world()
        moments = StreamingMoments(self.dims, getattr(self.extractor, "device", "cpu"))
        kept_idx, kept = [], []
        bar = tqdm(total=self.num_samples, desc=f"generate+features ({sample_mode})", unit="img",
                   disable=not self.progress or rank != 0, file=sys.stderr, leave=False)
        with bar:
            for offset, images in self._generated_batches(generator, sample_mode, batch_size):
                moments, idx, rows = _feature_pass(
                    [images], self.extractor, keep=self.metric_samples, index_offset=offset,
                    moments=moments,
                )
                kept_idx.append(idx)
                kept.append(rows)
                bar.update(images.shape[0] * world)
        idx = torch.cat(kept_idx) if kept_idx else torch.empty(0, dtype=torch.long)
        rows = torch.cat(kept) if kept else torch.empty(0, self.dims)
        if world > 1:  # every rank ends up with all ranks' moments and kept rows
            device = moments.mean.device
            moments.all_reduce()
            idx = torch.cat(D.all_gather_rows(idx.to(device))).cpu()
            rows = torch.cat(D.all_gather_rows(rows.to(device))).cpu()
        rows = rows[idx.argsort()]  # generation order, whatever the rank count
        result = self.score(moments, rows)
        result.update(sample_mode=sample_mode, batch_size=batch_size, seed=self.seed,
                      eval_seconds=round(time.perf_counter() - t0, 3))
        return result

    # --- images ---

    def score_images(self, batches: Iterable[Tensor], total: Optional[int] = None) -> dict:
        """Score uint8 image batches [B, 3, H, W] (e.g. an image folder) against the reference."""
        t0 = time.perf_counter()
        moments, _, rows = _feature_pass(
            batches, self.extractor, keep=self.max_metric_samples, total=total,
            progress=self.progress, desc="images",
        )
        result = self.score(moments, rows)
        result["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return result

    def score(self, moments: StreamingMoments, fake_rows: Tensor) -> dict:
        """FID from the moments; KID and PRDC from the first feature rows (CPU or device)."""
        if moments.count < 2:
            raise MetricsError(f"FID needs at least 2 samples, got {moments.count}")
        mu, sigma = moments.numpy()
        result: dict[str, Any] = {
            "fid": self.reference.frechet.distance(mu, sigma),
            "kid": None, "kid_std": None,
            "precision": None, "recall": None, "density": None, "coverage": None,
            "num_samples": moments.count,
            "metric_samples": 0,
            "prdc_k": self.prdc_k,
            "weights_sha256": self.weights_sha256,
            "ref_key": self.ref_key,
            "dims": self.dims,
        }
        n_real = 0 if self.reference.features is None else self.reference.features.shape[0]
        n = min(fake_rows.shape[0], n_real, self.max_metric_samples)
        if n >= 2:
            device = moments.mean.device
            real = self.reference.real_features(n, device)
            fake = fake_rows[:n].to(device, torch.float64)
            result["kid"], result["kid_std"] = kernel_inception_distance(
                real, fake, num_subsets=self.kid_subsets, subset_size=self.kid_subset_size,
                seed=self.seed,
            )
            result["metric_samples"] = n
            if n > self.prdc_k:
                result.update(prdc(real, fake, self.prdc_k,
                                   real_radii=self.reference.real_radii(n, self.prdc_k, device)))
        return result


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_evaluator(
    cfg,
    device: Union[str, torch.device],
    *,
    feature_extractor: Optional[FeatureExtractor] = None,
    cache_dir: Union[str, Path, None] = None,
    seed: int = 0,
    progress: bool = False,
) -> Evaluator:
    """The periodic evaluator for a ``TrainConfig``: ``cfg.fid_samples`` samples against
    ``cfg.ref`` (statistics cached under ``cache_dir``, default ``default_cache_dir()``) with
    pytorch-fid's Inception at ``cfg.dims`` (``cfg.inception_weights`` or the hub cache).

    Under torchrun rank 0 computes (or loads) the reference statistics first; the other ranks
    then read them from the cache.
    """
    if feature_extractor is None:
        from .features import InceptionFeatureExtractor

        feature_extractor = InceptionFeatureExtractor(
            cfg.dims, cfg.inception_weights, device=device, progress=progress
        )
    rank, world = _rank_world()
    reference = None
    if rank == 0:
        reference = load_reference(cfg.ref, feature_extractor, data_root=cfg.data_root,
                                   cache_dir=cache_dir, progress=progress)
    if world > 1:
        D.barrier()
        if rank != 0:
            reference = load_reference(cfg.ref, feature_extractor, data_root=cfg.data_root,
                                       cache_dir=cache_dir)
    return Evaluator(feature_extractor, reference, num_samples=cfg.fid_samples, seed=seed,
                     progress=progress)
