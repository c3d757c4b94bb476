"""Image folders as the metrics read them: the same files and decoding as ``python -m pytorch_fid``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .errors import MetricsError

__all__ = ["IMAGE_EXTENSIONS", "image_folder_files", "iter_image_batches"]

# pytorch-fid's image extensions (it globs the folder itself, not its subfolders).
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})


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

