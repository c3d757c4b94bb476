"""Stacked digits: the mode-collapse datasets (Stacked MNIST and its offline twin).

Every stacked image holds three digits, one per colour channel, drawn independently and
uniformly from a set of single handwritten digits, so the data has 10^3 = 1000 equally likely
modes (the digit triples). Metz et al. (Unrolled GANs), Srivastava et al. (VEEGAN) and Lin et al.
(PacGAN) measure mode collapse with it: a digit classifier labels each channel of each generated
image (``metrics.modes``).

Two sources of single digits, both as uint8 [n, 32, 32] with labels [n]:

* ``stacked-mnist``: MNIST through torchvision's reader and downloader (MD5-checked downloads)
  in ``<data-root>/MNIST/raw``; train = MNIST train (60k), test = MNIST test (10k). The 28x28
  digits are **zero-padded** by 2 pixels to 32x32: every original pixel is kept (no resampling),
  the digit stays centred as MNIST centres it, and the classifier sees exactly MNIST's digits.
* ``stacked-digits``: scikit-learn's bundled 8x8 digits (``load_digits``, 1,797 real
  handwritten digits, no download), split once by a fixed permutation into 1,347 train and 450
  test digits, values 0..16 scaled to 0..255 and **upscaled** bilinearly to 32x32 (an 8x8 image
  has to be resampled to fill a channel; bilinear gives smooth strokes rather than 4x4 blocks).

``load_stacked`` draws the fixed, seeded set of triples (size and seed are config values) and
keeps its labels [N, 3].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError

__all__ = [
    "STACKED_SOURCES",
    "NUM_MODES",
    "MNIST_FILES",
    "StackedDigits",
    "load_digit_split",
    "stack_digits",
    "load_stacked",
    "mode_ids",
    "side_by_side",
    "digits_key",
]

STACKED_SOURCES = ("stacked-mnist", "stacked-digits")
NUM_MODES = 1000  # 10 digits in each of 3 channels
DEFAULT_STACK_SIZE = 128_000  # PacGAN's Stacked MNIST training-set size
# The four files torchvision's MNIST reader wants in <data-root>/MNIST/raw (gz: as downloaded).
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DIGITS_TEST_SIZE = 450  # of sklearn's 1,797 digits (a quarter, as train_test_split's default)
DIGITS_SPLIT_SEED = 0

PathLike = Union[str, Path]


@dataclass
class StackedDigits:
    images: Tensor  # uint8 [N, 3, 32, 32]
    labels: Tensor  # int64 [N, 3]: the digit in each channel
    source: str
    split: str
    seed: int
    num_source_digits: int  # the single digits the triples were drawn from


# --------------------------------------------------------------------------------------------
# Single digits
# --------------------------------------------------------------------------------------------


def _check_source(source: str) -> None:
    if source not in STACKED_SOURCES:
        raise DataError(f"--source {source!r}: expected one of {', '.join(STACKED_SOURCES)}")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"unknown digit split {split!r}; expected 'train' or 'test'")


def _load_mnist(root: PathLike, split: str, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import MNIST

    root = Path(root).expanduser()
    raw = root / "MNIST" / "raw"
    try:
        ds = MNIST(str(root), train=split == "train", download=download)
    except Exception as e:  # torchvision: RuntimeError (not found / all mirrors failed), URLError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"--data-root {str(root)!r}: MNIST is not there and could not be downloaded ({first}). "
            f"Offline, put {', '.join(MNIST_FILES)} (or their .gz downloads) into {raw}/"
        ) from None
    images = ds.data.to(torch.uint8)  # [n, 28, 28]
    labels = ds.targets.to(torch.int64)  # [n]
    if images.dim() != 3 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"--data-root {str(root)!r}: {raw} holds images {tuple(images.shape)} and "
            f"labels {tuple(labels.shape)} that do not match"
        )
    pad = [
        (32 - images.shape[2]) // 2,
        (32 - images.shape[2] + 1) // 2,
        (32 - images.shape[1]) // 2,
        (32 - images.shape[1] + 1) // 2,
    ]
    return F.pad(images, pad), labels  # [n, 32, 32]: zero padding keeps every pixel


def _load_sklearn_digits(split: str) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32))  # [1797, 8, 8] in 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))  # [1797]
    # One fixed split, independent of scikit-learn's own splitting helpers' versions.
    perm = torch.from_numpy(np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels)))
    idx = perm[:DIGITS_TEST_SIZE] if split == "test" else perm[DIGITS_TEST_SIZE:]
    x = images[idx, None] * (255.0 / 16.0)  # [n, 1, 8, 8] in 0..255
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)  # [n, 1, 32, 32]
    return x[:, 0].round().clamp(0, 255).to(torch.uint8), labels[idx]  # [n, 32, 32], [n]


def load_digit_split(
    source: str, split: str, data_root: PathLike = "data", download: bool = True
) -> tuple[Tensor, Tensor]:
    """Single digits of ``source``'s ``split``: uint8 [n, 32, 32] and int64 labels [n] in 0..9."""
    _check_source(source)
    _check_split(split)
    if source == "stacked-mnist":
        return _load_mnist(data_root, split, download)
    return _load_sklearn_digits(split)


def digits_key(images: Tensor, labels: Tensor) -> str:
    """SHA-256 of single digits and their labels (identifies a classifier's training data)."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().astype(np.int64).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Stacking
# --------------------------------------------------------------------------------------------


def stack_digits(images: Tensor, labels: Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``size`` stacked images from single digits [n, 32, 32]: (uint8 [size, 3, 32, 32], labels
    [size, 3]); channel c of image i is digit ``idx[i, c]`` with idx uniform, seeded by ``seed``."""
    if size < 1:
        raise DataError(f"--stack-size {size}: must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, images.shape[0], (size, 3), generator=gen)  # [size, 3]
    return images[idx], labels[idx]  # [size, 3, 32, 32], [size, 3]


def load_stacked(
    source: str,
    split: str = "train",
    data_root: PathLike = "data",
    *,
    size: int = DEFAULT_STACK_SIZE,
    seed: int = 0,
    download: bool = True,
) -> StackedDigits:
    """The stacked set of ``source``'s ``split``: ``size`` images, triples drawn with ``seed``."""
    digits, digit_labels = load_digit_split(source, split, data_root, download)
    images, labels = stack_digits(digits, digit_labels, size, seed)
    return StackedDigits(
        images=images,
        labels=labels,
        source=source,
        split=split,
        seed=seed,
        num_source_digits=int(digits.shape[0]),
    )


def mode_ids(labels: Tensor) -> Tensor:
    """Digit triples [N, 3] -> mode index [N] in 0..999 (100 * red + 10 * green + blue)."""
    labels = labels.to(torch.int64)
    return labels[:, 0] * 100 + labels[:, 1] * 10 + labels[:, 2]


def side_by_side(images: Tensor) -> Tensor:
    """Stacked images [N, 3, H, W] as their three digits in a row, grey [N, 1, H, 3W]: red on the
    left, so a sample reads as its mode number (``mode_ids``). Drawn in colour, three digits on
    top of each other read as a blob."""
    return torch.cat(images.unbind(1), dim=-1).unsqueeze(1)
