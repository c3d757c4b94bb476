"""The mode classifier: a small CNN that labels each channel of a stacked-digit image.

Trained by the tool on first use on the single training digits of the source (MNIST train, or
the train split of scikit-learn's digits), checked on the held-out split (MNIST test, the
digits' test split), and cached under ``<cache dir>/mode_classifier/`` with its held-out
accuracy. Its identity (``sha256``, the rows' ``classifier_sha256``) is the SHA-256 of what the
metrics read from it, its weights and the real-feature Gaussian below, not of the cache file,
which also stores the training time: two trainings that give the same network (training is
deterministic on one machine) share it, and two machines whose kernels round differently, which
train different networks, do not. Counting modes with a weak classifier would count its
mistakes, so a classifier below ``MIN_ACCURACY`` is refused. The accuracy is measured again on
every load (a few seconds), so a damaged cache entry cannot pass for a good one.

The cache file also holds the Gaussian of the real stacked images in the classifier's feature
space, for ``cfd``: the three channels of a real stacked image are independent uniform draws
from the training digits, so its features [f(a), f(b), f(c)] have mean [m, m, m] and covariance
blockdiag(S, S, S), with m, S the mean and covariance of f over the training digits. That is
the exact statistic of the stacking distribution, not an estimate from one finite draw.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..digits import STACKED_SOURCES, digits_key, load_digit_split
from ..fileio import atomic_write
from .errors import MetricsError
from .frechet import StreamingMoments

__all__ = [
    "MIN_ACCURACY",
    "DigitNet",
    "ModeClassifier",
    "train_digit_net",
    "digit_accuracy",
    "network_sha256",
    "load_mode_classifier",
]

MIN_ACCURACY = {"stacked-mnist": 0.985, "stacked-digits": 0.95}  # one per digits.STACKED_SOURCES
# Bump when the architecture or the training recipe changes: cached classifiers are retrained.
RECIPE = "digitnet-v2/adam1e-3/bs128"
DEFAULT_EPOCHS = {"stacked-mnist": 3, "stacked-digits": 30}  # one per digits.STACKED_SOURCES
FEATURE_DIM = 128  # per channel; a stacked image's classifier features are 3 x 128


class DigitNet(nn.Module):
    """uint8 digits [N, 32, 32] -> logits [N, 10]; ``features`` gives the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 16, 16, 16]
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 32, 8, 8]
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 64, 4, 4]
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM),
            nn.ReLU(),  # [N, 128]
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def prepare(digits: Tensor) -> Tensor:
        """uint8 [N, 32, 32] -> float [N, 1, 32, 32] in [0, 1]."""
        return digits.float().div(255.0)[:, None]

    def features(self, digits: Tensor) -> Tensor:
        return self.body(self.prepare(digits))  # [N, 128]

    def forward(self, digits: Tensor) -> Tensor:
        return self.head(self.features(digits))  # [N, 10]


def train_digit_net(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    progress: bool = False,
) -> DigitNet:
    """Train a DigitNet on uint8 digits [n, 32, 32] with labels [n] (CPU, deterministic)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * max(1, images.shape[0] // batch_size)
    bar = tqdm(
        total=steps,
        desc="mode classifier (first use)",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    net.train()
    with bar:
        for _ in range(epochs):
            perm = torch.randperm(images.shape[0], generator=gen)  # [n]
            for start in range(0, images.shape[0] - batch_size + 1, batch_size):
                idx = perm[start : start + batch_size]  # [b]
                loss = F.cross_entropy(net(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
    return net.eval()


@torch.inference_mode()
def _digit_outputs(net: DigitNet, digits: Tensor, batch_size: int = 2048) -> tuple[Tensor, Tensor]:
    """(features [n, 128], predicted labels [n]) of uint8 digits [n, 32, 32]."""
    feats, preds = [], []
    for chunk in digits.split(batch_size):
        f = net.features(chunk)  # [b, 128]
        feats.append(f)
        preds.append(net.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def digit_accuracy(net: DigitNet, images: Tensor, labels: Tensor) -> float:
    """Share of digits [n, 32, 32] whose arg-max label is right."""
    _, pred = _digit_outputs(net, images)
    return float((pred == labels).double().mean())


@dataclass
class ModeClassifier:
    """What the mode metrics need: labels and features of every channel of stacked images."""

    net: DigitNet
    source: str
    accuracy: float  # held-out, measured on load
    sha256: str  # of the weights and ref_mu / ref_sigma (network_sha256), not of the file
    path: Optional[Path]
    ref_mu: np.ndarray  # [3 * 128] real stacked images' feature mean
    ref_sigma: np.ndarray  # [3 * 128, 3 * 128] and covariance (see module docstring)
    batch_size: int = 512  # stacked images per call from the evaluator

    @property
    def dims(self) -> int:
        return int(self.ref_mu.shape[0])

    def to(self, device) -> "ModeClassifier":
        self.net.to(device)
        return self

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 [B, 3, 32, 32] -> (labels [B, 3]: arg-max digit per channel, as PacGAN counts,
        features [B, 3 * 128]: the channels' penultimate features side by side)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise MetricsError(
                f"mode metrics need RGB images [B, 3, H, W], got {tuple(images.shape)}"
            )
        if tuple(images.shape[2:]) != (32, 32):
            raise MetricsError(f"mode metrics need 32x32 images, got {tuple(images.shape[2:])}")
        device = next(self.net.parameters()).device
        b = images.shape[0]
        digits = images.to(device).reshape(b * 3, 32, 32)  # [3B, 32, 32], channel-major per image
        feats = self.net.features(digits)  # [3B, 128]
        labels = self.net.head(feats).argmax(1)  # [3B]
        return labels.view(b, 3), feats.view(b, 3 * FEATURE_DIM)


def _real_gaussian(net: DigitNet, digits: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [3F] and covariance [3F, 3F] of stacked images of independent uniform digit triples."""
    feats, _ = _digit_outputs(net, digits)  # [n, F]
    m = StreamingMoments(feats.shape[1]).update(feats)
    mu, sigma = m.numpy()  # [F], [F, F]
    return np.tile(mu, 3), np.kron(np.eye(3), sigma)  # [3F], blockdiag(S, S, S)


def network_sha256(payload: dict) -> str:
    """SHA-256 of a cached classifier's network: every state_dict tensor (name, dtype, shape,
    bytes, in name order), then ``ref_mu`` and ``ref_sigma``. Everything else in the file (the
    training time, the recipe's bookkeeping) is left out, so the same network has one hash."""
    h = hashlib.sha256()
    tensors = sorted(payload["state_dict"].items()) + [
        ("ref_mu", payload["ref_mu"]),
        ("ref_sigma", payload["ref_sigma"]),
    ]
    for name, tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _cache_path(cache_dir: Path, source: str, key: str) -> Path:
    return cache_dir / "mode_classifier" / f"{source}-{key[:16]}.pt"


def load_mode_classifier(
    source: str,
    *,
    data_root: Union[str, Path] = "data",
    cache_dir: Union[str, Path, None] = None,
    device: Union[str, torch.device] = "cpu",
    epochs: Optional[int] = None,
    min_accuracy: Optional[float] = None,
    progress: bool = False,
) -> ModeClassifier:
    """The mode classifier of ``source`` (``stacked-mnist`` / ``stacked-digits``): from the cache
    when a matching one is there, else trained (and cached when it passes the accuracy gate)."""
    from .reference import default_cache_dir

    if source not in STACKED_SOURCES:
        raise MetricsError(f"--source {source!r}: expected one of {', '.join(STACKED_SOURCES)}")
    need = MIN_ACCURACY[source] if min_accuracy is None else min_accuracy
    epochs = DEFAULT_EPOCHS[source] if epochs is None else epochs
    train_x, train_y = load_digit_split(source, "train", data_root)  # [n, 32, 32], [n]
    test_x, test_y = load_digit_split(source, "test", data_root)
    key = digits_key(train_x, train_y) + digits_key(test_x, test_y) + RECIPE + f"/e{epochs}"
    key = hashlib.sha256(key.encode()).hexdigest()  # the training data, recipe and epochs
    path = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), source, key)

    net, payload = None, None
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") == key:
                net = DigitNet()
                net.load_state_dict(payload["state_dict"])
                net.eval()
        except Exception:  # unreadable or foreign cache entry: train again and replace it
            net, payload = None, None
    trained = net is None
    if trained:
        t0 = time.perf_counter()
        net = train_digit_net(train_x, train_y, epochs=epochs, progress=progress)
        mu, sigma = _real_gaussian(net, train_x)
        payload = {
            "key": key,
            "source": source,
            "recipe": RECIPE,
            "epochs": epochs,
            "state_dict": net.state_dict(),
            "ref_mu": torch.from_numpy(mu),
            "ref_sigma": torch.from_numpy(sigma),
            "num_train": int(train_x.shape[0]),
            "num_test": int(test_x.shape[0]),
            "train_seconds": time.perf_counter() - t0,
        }
    accuracy = digit_accuracy(net, test_x, test_y)
    if accuracy < need:
        where = f" (cached at {path}; delete it to retrain)" if not trained else ""
        raise MetricsError(
            f"--source {source}: the mode classifier's held-out accuracy is {accuracy:.2%}, below "
            f"the {need:.1%} needed to count modes{where}"
        )
    if trained:
        payload["accuracy"] = accuracy
        with atomic_write(path, "wb") as f:
            torch.save(payload, f)
        if progress:
            print(
                f"mode classifier for {source}: held-out accuracy {accuracy:.2%}, trained in "
                f"{payload['train_seconds']:.1f} s, cached at {path}",
                file=sys.stderr,
            )
    return ModeClassifier(
        net=net,
        source=source,
        accuracy=accuracy,
        sha256=network_sha256(payload),
        path=path,
        ref_mu=payload["ref_mu"].numpy().astype(np.float64),
        ref_sigma=payload["ref_sigma"].numpy().astype(np.float64),
    ).to(device)
