"""Shared fixtures. Training-side fixtures (tiny datasets in the real on-disk formats) are
prefixed ``train_``; other suites add theirs below with their own prefix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_fake_cifar10(root: Path, images_per_batch: int = 40, seed: int = 0) -> Path:
    """CIFAR-10's python batches (data_batch_1..5, test_batch) with random images, in the real
    on-disk format (see ``dcgan_mn.data.write_cifar10_batch``)."""
    from dcgan_mn.data import write_cifar10_batch, write_cifar10_meta

    folder = Path(root) / "cifar-10-batches-py"
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (images_per_batch, 3, 32, 32), dtype=np.uint8)
        write_cifar10_batch(folder / name, images, rng.integers(0, 10, images_per_batch), name)
    write_cifar10_meta(folder, images_per_batch)
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


def save_random_fid_inception(path, seed: int = 0):
    """A random state dict with the FID Inception's keys and shapes, as torch hub stores it
    (the real weights cannot be downloaded here; the architecture is the real one)."""
    import math

    import torch
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                          init_weights=False)
    for m in net.modules():  # variance-preserving init keeps the deep features in a sane range
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            torch.nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
    torch.save(net.state_dict(), path)
    return Path(path)


@pytest.fixture(scope="session")
def fid_weights_file(tmp_path_factory):
    """One random FID-Inception weights file shared by every test of the session."""
    return save_random_fid_inception(tmp_path_factory.mktemp("fid_weights") / "random_inception.pth")


def load_script(filename: str, attribute: str):
    """The click command ``attribute`` of a repo-root script (train.py, evaluate.py), loaded by
    file path: the scripts are not part of the installed package."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / filename
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attribute)


@pytest.fixture(scope="session")
def modes_cache(tmp_path_factory):
    """A cache dir holding the stacked-digits mode classifier, trained once per session (~10 s)."""
    from dcgan_mn.metrics.classifier import load_mode_classifier

    cache = tmp_path_factory.mktemp("modes_cache")
    load_mode_classifier("stacked-digits", cache_dir=cache)
    return cache


@pytest.fixture(scope="session")
def modes_classifier(modes_cache):
    """The cached stacked-digits mode classifier (CPU)."""
    from dcgan_mn.metrics.classifier import load_mode_classifier

    return load_mode_classifier("stacked-digits", cache_dir=modes_cache)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, modes_cache):
    """No Inception weights anywhere and no network; the session's mode classifier cache."""
    import urllib.error

    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DCGAN_MN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("DCGAN_MN_CACHE_DIR", str(modes_cache))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path
