"""Shared fixtures. Training-side fixtures (tiny datasets in the real on-disk formats) are
prefixed ``train_``; other suites add theirs below with their own prefix."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest


def write_fake_cifar10(root: Path, images_per_batch: int = 40, seed: int = 0) -> Path:
    """CIFAR-10's python pickles (data_batch_1..5, test_batch) with random images, in the real
    format: a dict with b"data" uint8 [n, 3072] (R, G, B planes) and b"labels" [n]."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, images_per_batch).tolist(),
            b"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(images_per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return Path(root)


@pytest.fixture
def train_cifar_root(tmp_path):
    """A data root holding a tiny CIFAR-10 (5 x 40 training images, 40 test images)."""
    return write_fake_cifar10(tmp_path / "data")


@pytest.fixture
def train_single_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spinning on a busy core makes tiny
    models ~50x slower. Restored afterwards so other suites keep their setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_tensorboard(run_dir):
    """(scalars {tag: [(step, value)]}, image tags {tag: [step]}, text tags) from a run folder's
    event files, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    images = {t: [e.step for e in acc.Images(t)] for t in tags["images"]}
    return scalars, images, tags["tensors"]
