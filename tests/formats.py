"""Small files in the real on-disk formats our loaders read, for tests and benchmarks.

Nothing here is part of the product: CIFAR-10 and MNIST, the FID Inception weights and image
folders cannot be downloaded on the machines the suite runs on, so the suite (and ``bench/``,
which imports this file by path) builds them in their genuine formats, with random content:

* CIFAR-10's python batches: protocol-2 pickles of a Python 2 dict, as the original tarball
  holds them (``write_cifar10_batch``, ``write_cifar10_meta``, ``write_fake_cifar10``);
* MNIST's raw idx files, as torchvision extracts them (``write_idx``, ``write_mnist_raw``);
* a torch-hub weights file of the FID Inception's real architecture, randomly initialised
  (``save_random_fid_inception``);
* folders of PNG images (``write_pngs``).
"""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, Path]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


# ---- CIFAR-10 -------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (the BINSTRING opcodes), as CIFAR-10's files were
    written: loaded with ``encoding="bytes"`` they are bytes, with ``encoding="latin1"``
    (torchvision) they are str."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = (
            pickle.SHORT_BINSTRING + bytes([n])
            if n < 256
            else pickle.BINSTRING + struct.pack("<i", n)
        )
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def write_cifar10_batch(path: PathLike, images: np.ndarray, labels, name: str = "") -> Path:
    """Write uint8 images [n, 3, 32, 32] as one CIFAR-10 python batch, in the original on-disk
    format (a protocol-2 pickle of a Python 2 dict: data [n, 3072], labels, filenames,
    batch_label)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    n = images.shape[0]
    entry = {
        b"batch_label": (name or Path(path).name).encode(),
        b"labels": [int(x) for x in labels],
        b"data": images.reshape(n, 3072),  # R plane, G plane, B plane per row
        b"filenames": [f"image_{i:05d}.png".encode() for i in range(n)],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(entry)
    return path


def write_cifar10_meta(folder: PathLike, images_per_batch: int = 10000) -> Path:
    """The ``batches.meta`` file of a CIFAR-10 folder (class names), in the original format."""
    path = Path(folder) / "batches.meta"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_cases_per_batch": images_per_batch,
        b"num_vis": 3072,
    }
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(entry)
    return path


def write_fake_cifar10(root: PathLike, images_per_batch: int = 40, seed: int = 0) -> Path:
    """A data root whose ``cifar-10-batches-py`` holds data_batch_1..5, test_batch and
    batches.meta with random images and labels; returns the root."""
    folder = Path(root) / "cifar-10-batches-py"
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (images_per_batch, 3, 32, 32), dtype=np.uint8)
        write_cifar10_batch(folder / name, images, rng.integers(0, 10, images_per_batch), name)
    write_cifar10_meta(folder, images_per_batch)
    return Path(root)


# ---- MNIST ----------------------------------------------------------------------------------


def write_idx(path: PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (MNIST's format: magic 0x0000 08 <ndim>, big-endian
    int32 sizes, then the bytes), readable by torchvision's MNIST reader."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}i", *array.shape))
        f.write(array.tobytes())
    return path


def write_mnist_raw(root: PathLike, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict:
    """MNIST's four raw idx files under ``root/MNIST/raw``, with random digits;
    {"train" | "t10k": (images [n, 28, 28], labels [n])}."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


# ---- the FID Inception's weights ------------------------------------------------------------


def save_random_fid_inception(path: PathLike, seed: int = 0) -> Path:
    """A random state dict with the FID Inception's keys and shapes, as torch hub stores it: the
    real architecture (so also its speed), a variance-preserving init that keeps the deep
    features in a sane range. The global RNG is left as it was."""
    import torch
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torchvision.models.inception_v3(
            num_classes=1008, aux_logits=False, weights=None, init_weights=False
        )
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                torch.nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
    torch.save(net.state_dict(), path)
    return Path(path)


# ---- image folders --------------------------------------------------------------------------


def write_pngs(
    folder: PathLike, n: int, seed: int, shift: float = 0.0, *, smooth: bool = True, size: int = 32
) -> Path:
    """n random RGB PNGs ``000.png``, ``001.png``, ... of ``size`` x ``size`` in ``folder``.

    ``smooth``: low-frequency noise plus a little pixel noise, brightened by ``shift`` (so deep
    features vary sensibly and two folders with different shifts differ); otherwise uniform
    pixel noise."""
    import torch
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if smooth:
        g = torch.Generator().manual_seed(seed)
        small = torch.rand(n, 3, 4, 4, generator=g) * 200 + shift
        images = torch.nn.functional.interpolate(
            small, size=size, mode="bilinear", align_corners=False
        )
        images = (
            (images + torch.rand(n, 3, size, size, generator=g) * 40).clamp(0, 255).to(torch.uint8)
        )
        pixels = images.permute(0, 2, 3, 1).numpy()  # [n, size, size, 3]
    else:
        rng = np.random.default_rng(seed)
        pixels = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder
