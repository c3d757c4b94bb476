"""Image folders as the metrics read them: the same files and decoding as ``python -m pytorch_fid``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .errors import MetricsError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_FORMATS",
    "image_folder_files",
    "iter_image_batches",
    "write_samples",
]

SAMPLE_FORMATS = ("png", "npz")

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


def write_samples(
    batches,
    out: Union[str, Path],
    fmt: str = "png",
    total: int | None = None,
    progress: bool = False,
) -> Path:
    """Write uint8 batches [B, 3, H, W] to the folder ``out``: ``000000.png``, ... (lossless, the
    bytes our evaluator scores), or one ``samples.npz`` holding ``images``, uint8 [N, H, W, 3]
    (the layout TensorFlow code and clean-fid read). Written into ``<out>.partial`` and renamed
    when complete, so a cut export never looks finished; refuses an existing non-empty ``out``."""
    import os
    import shutil
    import sys

    from PIL import Image
    from tqdm import tqdm

    if fmt not in SAMPLE_FORMATS:
        raise MetricsError(f"--format {fmt!r}: expected one of {SAMPLE_FORMATS}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MetricsError(
            f"--out {str(out)!r}: exists and is not an empty folder; choose a new one"
        )
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # an earlier export that was cut
    partial.mkdir(parents=True)
    arrays, count = [], 0
    with tqdm(
        total=total,
        desc=f"write {fmt}",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    ) as bar:
        for images in batches:
            hwc = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [B, H, W, 3] uint8
            if fmt == "png":
                for i, img in enumerate(hwc):
                    Image.fromarray(img).save(partial / f"{count + i:06d}.png")
            else:
                arrays.append(hwc)
            count += hwc.shape[0]
            bar.update(hwc.shape[0])
    if fmt == "npz":
        np.savez(partial / "samples.npz", images=np.concatenate(arrays))
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(partial, out)
    return out
