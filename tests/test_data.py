"""Data loading from the real on-disk formats (CIFAR-10 pickles, image folders), the offline
error, and the in-memory batch sampler."""

import pickle
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_fake_cifar10
from dcgan_mn import data as D


def test_cifar10_reads_pickles_in_order(train_cifar_root):
    train = D.load_cifar10(train_cifar_root, "train", download=False)
    test = D.load_cifar10(train_cifar_root, "test", download=False)
    assert train.shape == (200, 3, 32, 32) and train.dtype == torch.uint8
    assert test.shape == (40, 3, 32, 32)
    with open(train_cifar_root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]  # [40, 3072]: R plane, G plane, B plane
    img = train[40 + 3]  # 4th image of the 2nd batch
    assert torch.equal(img[0].flatten(), torch.from_numpy(raw[3, :1024]))
    assert torch.equal(img[2].flatten(), torch.from_numpy(raw[3, 2048:]))


def test_cifar10_offline_download_names_url_and_folder(tmp_path, monkeypatch):
    import torchvision.datasets.utils as U

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(U, "download_and_extract_archive", offline)
    root = tmp_path / "nowhere"
    with pytest.raises(D.DataError) as e:
        D.load_cifar10(root)
    msg = str(e.value)
    assert "\n" not in msg
    assert D.CIFAR10_URL in msg and "--data-root" in msg
    assert str(root / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg


def test_cifar10_download_goes_through_torchvision_with_md5(tmp_path, monkeypatch):
    import torchvision.datasets.utils as U

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        write_fake_cifar10(download_root, images_per_batch=4)

    monkeypatch.setattr(U, "download_and_extract_archive", fake_download)
    images = D.load_cifar10(tmp_path)
    assert images.shape == (20, 3, 32, 32)
    assert calls == [(D.CIFAR10_URL, "cifar-10-python.tar.gz", D.CIFAR10_MD5)]
    D.load_cifar10(tmp_path)  # now present: no second download
    assert len(calls) == 1


def test_cifar10_corrupt_batch(train_cifar_root):
    (train_cifar_root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="data_batch_3 is not a CIFAR-10 python batch"):
        D.load_cifar10(train_cifar_root, download=False)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_recursive_case_insensitive_crop_resize(tmp_path):
    rng = np.random.default_rng(0)
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, 32:96] = 200  # the centre square is uniform 200, the sides black
    _save(tmp_path / "b" / "wide.PNG", wide)
    _save(tmp_path / "a.jpg", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    _save(tmp_path / "c" / "d" / "small.bmp", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    files = D.find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "a.jpg",
        "b/wide.PNG",
        "c/d/small.bmp",
    ]
    images = D.load_image_folder(tmp_path, size=32)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert (images[1] == 200).all()  # the black sides were cropped away
    small = np.array(Image.open(tmp_path / "c" / "d" / "small.bmp"))
    assert torch.equal(images[2], torch.from_numpy(small).permute(2, 0, 1))  # 32x32: untouched


@pytest.mark.parametrize("make", ["empty", "only_text", "missing"])
def test_image_folder_without_images(tmp_path, make):
    root = tmp_path / "imgs"
    if make != "missing":
        root.mkdir()
    if make == "only_text":
        (root / "x.txt").write_text("hi")
    with pytest.raises(D.DataError, match=r"--data-root '.*imgs': no"):
        D.find_images(root)


def test_image_folder_unreadable_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(D.DataError, match="cannot read image .*bad.png"):
        D.load_image_folder(tmp_path)


def test_sampler_epochs_cover_data_and_state_round_trip():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    sampler = D.BatchSampler(images, 6, seed=3)
    values = lambda x: ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
    first_epoch = sum((values(sampler.next()) for _ in range(3)), [])
    assert len(set(first_epoch)) == 18  # 3 full batches, no repeats; leftover 2 skipped
    state = sampler.state_dict()
    later = [values(sampler.next()) for _ in range(5)]
    other = D.BatchSampler(images, 6, seed=3)
    other.load_state_dict(state)
    assert [values(other.next()) for _ in range(5)] == later


def test_sampler_range_flip_and_rank_slices():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 4, 4), generator=g, dtype=torch.uint8)
    images[0] = 0
    images[1] = 255
    x = D.BatchSampler(images, 32, seed=0).next()
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    flipped = D.BatchSampler(images, 32, seed=0, hflip=True).next()
    same = [(flipped[i] == x[i]).all().item() for i in range(32)]
    mirrored = [(flipped[i] == x[i].flip(2)).all().item() for i in range(32)]
    assert all(s or m for s, m in zip(same, mirrored)) and 4 < sum(mirrored) < 28
    full = D.BatchSampler(images, 8, seed=5).next()
    parts = [D.BatchSampler(images, 8, seed=5, rank=r, world_size=2).next() for r in range(2)]
    assert torch.equal(torch.cat(parts), full)


def test_sampler_batch_larger_than_dataset():
    with pytest.raises(D.DataError, match="--batch-size 64: the dataset has only 10 images"):
        D.BatchSampler(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), 64)


def test_fake_batches_read_like_the_real_ones_by_torchvision(train_cifar_root, monkeypatch):
    """Our writer produces Python 2 style pickles: torchvision's own CIFAR10 (latin1) reads them
    and sees the same pixels as our loader (bytes)."""
    import torchvision
    import torchvision.datasets.cifar

    # not the real MD5s
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)
    tv = torchvision.datasets.CIFAR10(str(train_cifar_root), train=True, download=False)
    ours = D.load_cifar10(train_cifar_root, "train", download=False)
    assert torch.equal(torch.from_numpy(tv.data).permute(0, 3, 1, 2), ours)
    assert len(tv.targets) == 200
