"""Training images as one uint8 tensor in memory, and a sampler that draws batches by index.

Loading (once, at start-up):

* ``load_cifar10(root, split)``: CIFAR-10 from its python pickles in
  ``root/cifar-10-batches-py``; downloaded first (torchvision's helper, MD5-checked) when missing.
  An extracted folder, or the ``.tar.gz`` placed in ``root``, works offline.
* ``load_image_folder(root, size)``: any tree of images, center-cropped to a square and resized.
* ``stacked-mnist`` / ``stacked-digits``: three digits per image, one per channel
  (``dcgan_mn.digits``).

Both return uint8 [N, 3, H, W]. Training keeps that tensor on its device (CIFAR-10 is 150 MB) and
``BatchSampler`` gathers a batch with one ``index_select``, flips and scales it to [-1, 1] on the
device: no per-image Python, no worker processes, no host-to-device copy per batch.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DataError",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_FOLDER",
    "IMAGE_EXTENSIONS",
    "load_cifar10",
    "find_images",
    "load_image_folder",
    "load_dataset",
    "BatchSampler",
]

# CIFAR-10's location and archive checksum, as torchvision knows them.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

PathLike = Union[str, Path]


def prepare_hint() -> str:
    """What the offline messages point at: it fetches, checks and lists everything a run needs."""
    from .commands import script_command

    return f"{script_command('evaluate.py', 'prepare')}, run where there is internet, fetches and lists all a run needs"


from .digits import STACKED_SOURCES, load_stacked  # noqa: E402
from .errors import DataError  # noqa: E402

# Every --dataset, here and nowhere else: config, the CLIs and their help texts read this tuple.
DATASETS = ("cifar10", "folder", *STACKED_SOURCES)


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


def _download_cifar10(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        # Skips the download when root/cifar-10-python.tar.gz is already there with the right MD5.
        download_and_extract_archive(
            CIFAR10_URL, str(root), filename=CIFAR10_ARCHIVE, md5=CIFAR10_MD5
        )
    except Exception as e:  # URLError, HTTPError, timeouts, MD5 mismatch, tar errors, ...
        raise DataError(
            f"--data-root {str(root)!r}: CIFAR-10 is not there and downloading {CIFAR10_URL} "
            f"failed ({type(e).__name__}: {e}). Offline, put {CIFAR10_ARCHIVE} into {root}/ or "
            f"extract it so that {root / CIFAR10_FOLDER}/data_batch_1 exists ({prepare_hint()})."
        ) from None


def _read_cifar_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 python pickle -> uint8 [n, 3, 32, 32]."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        entry = {k.encode("latin1") if isinstance(k, str) else k: v for k, v in entry.items()}
        data = np.asarray(entry[b"data"], dtype=np.uint8)  # [n, 3072], rows are R, G, B planes
        n = len(entry[b"labels"])
        return data.reshape(n, 3, 32, 32)
    except Exception as e:
        raise DataError(
            f"--data-root: {path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
            f"delete the folder {path.parent} to download it again"
        ) from None


def load_cifar10(root: PathLike, split: str = "train", download: bool = True) -> Tensor:
    """CIFAR-10 ``split`` ('train': 50k, 'test': 10k) as uint8 [N, 3, 32, 32] on the CPU."""
    if split not in CIFAR10_FILES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; expected 'train' or 'test'")
    root = Path(root).expanduser()
    _not_a_file(root)
    folder = root / CIFAR10_FOLDER
    files = [folder / name for name in CIFAR10_FILES[split]]
    if not all(f.is_file() for f in files):
        if not download:
            raise DataError(
                f"--data-root {str(root)!r}: CIFAR-10 not found (expected {files[0]}); download "
                f"{CIFAR10_URL} and extract it there"
            )
        _download_cifar10(root)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"--data-root {str(root)!r}: the CIFAR-10 archive lacks {missing}")
    return torch.from_numpy(np.concatenate([_read_cifar_batch(f) for f in files]))


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def find_images(root: PathLike) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted; png/jpg/jpeg/bmp/webp, any case)."""
    root = Path(root).expanduser()
    _not_a_file(root)
    if not root.is_dir():
        raise DataError(f"--data-root {str(root)!r}: no such folder")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DataError(
            f"--data-root {str(root)!r}: no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) "
            f"in this folder or below"
        )
    return files


def _load_square(path: Path, size: int) -> np.ndarray:
    """One image -> uint8 [size, size, 3]: RGB, center-cropped to a square, resized (bicubic)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side))
            if side != size:
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for unreadable files
        raise DataError(
            f"--data-root: cannot read image {path} ({type(e).__name__}: {e})"
        ) from None


def load_image_folder(root: PathLike, size: int = 32) -> Tensor:
    """All images under ``root`` as uint8 [N, 3, size, size] (center crop, then resize)."""
    files = find_images(root)
    images = np.stack([_load_square(p, size) for p in files])  # [N, size, size, 3]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, size, size]


def _not_a_file(root: Path) -> None:
    """--data-root is a folder (or a path for one): a file there is said to be one, not reported
    as a failed download."""
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == root else f"lies under {p}, which is a file"
                raise DataError(
                    f"--data-root {str(root)!r}: {where}, not a folder; give the folder that "
                    f"holds (or will hold) the dataset"
                )
            return


def missing_data(cfg) -> Optional[str]:
    """What of ``cfg``'s training data is not on this machine (cheap: nothing is read or
    downloaded), as words for an error message; None when it is all there (or cannot be missing)."""
    root = Path(cfg.data_root).expanduser()
    if cfg.dataset == "cifar10":
        folder = root / CIFAR10_FOLDER
        have = (
            all((folder / n).is_file() for n in CIFAR10_FILES["train"])
            or (root / CIFAR10_ARCHIVE).is_file()
        )
        return (
            None
            if have
            else f"CIFAR-10 (not in --data-root {str(root)!r}; {CIFAR10_URL} on first use)"
        )
    if cfg.dataset == "stacked-mnist":
        from .digits import MNIST_FILES

        raw = root / "MNIST" / "raw"
        have = all((raw / n).is_file() or (raw / f"{n}.gz").is_file() for n in MNIST_FILES)
        return None if have else f"MNIST (not in {raw}; downloaded on first use)"
    if cfg.dataset == "folder" and not root.is_dir():
        return f"the image folder --data-root {str(root)!r}"
    return None


def load_dataset(cfg) -> Tensor:
    """The training images a ``TrainConfig`` names, uint8 [N, 3, 32, 32] on the CPU."""
    if cfg.dataset == "cifar10":
        return load_cifar10(cfg.data_root, "train", download=True)
    if cfg.dataset == "folder":
        return load_image_folder(cfg.data_root, 32)
    if cfg.dataset in STACKED_SOURCES:
        return load_stacked(
            cfg.dataset, "train", cfg.data_root, size=cfg.stack_size, seed=cfg.stack_seed
        ).images
    raise DataError(f"--dataset {cfg.dataset!r}: expected one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


class BatchSampler:
    """Random batches of the in-memory images, as float [B, 3, H, W] in [-1, 1] on their device.

    Each epoch is a permutation drawn from a CPU generator seeded with (seed, epoch), so the
    whole data order is a function of (seed, epoch, position): ``state_dict`` is two integers
    and a resumed run sees exactly the batches an uninterrupted one would. An epoch's leftover
    that would not fill a batch is skipped (BatchNorm and MN want full batches). Horizontal
    flips are drawn per image with the permutation.

    Under data parallelism every rank holds the same permutation and takes its own slice
    ``[rank * B/world, (rank+1) * B/world)`` of each global batch.
    """

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        hflip: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if batch_size % world_size:
            raise ValueError(
                f"--batch-size {batch_size}: not divisible by the world size {world_size}"
            )
        if images.shape[0] < batch_size:
            raise DataError(
                f"--batch-size {batch_size}: the dataset has only {images.shape[0]} images"
            )
        self.images = images  # uint8 [N, C, H, W], on the training device
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.seed = seed
        self.hflip = hflip
        self.rank = rank
        self.epoch = 0
        self.pos = 0  # index of the next global batch's first image in this epoch's permutation
        self._load_epoch()

    @property
    def batches_per_epoch(self) -> int:
        return self.images.shape[0] // self.batch_size

    def _load_epoch(self) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = self.images.shape[0]
        device = self.images.device
        self._perm = torch.randperm(n, generator=gen).to(device)  # [N]
        self._flip = (torch.rand(n, generator=gen) < 0.5).to(device) if self.hflip else None  # [N]

    def next(self) -> Tensor:
        """The next batch: this rank's share, float32 [B/world, C, H, W] in [-1, 1]."""
        if self.pos + self.batch_size > self.images.shape[0]:
            self.epoch += 1
            self.pos = 0
            self._load_epoch()
        start = self.pos + self.rank * self.local_batch
        idx = self._perm[start : start + self.local_batch]  # [B]
        self.pos += self.batch_size
        x = self.images.index_select(0, idx)  # uint8 [B, C, H, W]
        if self._flip is not None:
            flip = self._flip[start : start + self.local_batch].view(-1, 1, 1, 1)  # [B, 1, 1, 1]
            x = torch.where(flip, x.flip(3), x)
        return x.float().div_(127.5).sub_(1.0)  # [B, C, H, W] in [-1, 1]

    @property
    def epoch_progress(self) -> float:
        """Epochs done, fractional: ``epoch`` plus the share of this epoch's batches drawn (an
        epoch is ``batches_per_epoch`` whole batches; the remainder of N is skipped)."""
        return self.epoch + self.pos / (self.batches_per_epoch * self.batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data order state is for seed {state['seed']}, not {self.seed}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._load_epoch()
