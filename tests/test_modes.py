"""Stacked digits and mode metrics: datasets in their real formats, the mode classifier's cache
and accuracy gate, modes / kl_modes / cfd against hand-built and independent references, and
the evaluator running Inception and mode families in one pass."""

import math
import urllib.error

import numpy as np
import pytest
import torch

from dcgan_mn import digits as DG
from formats import write_mnist_raw
from dcgan_mn import metrics as M
from dcgan_mn.data import DataError
from dcgan_mn.features import sha256_file
from dcgan_mn.metrics import classifier as CL
from dcgan_mn.metrics.modes import ModeMetrics, count_modes, kl_to_uniform, mode_histogram
from dcgan_mn.models import Generator


def all_triples(repeat=1):
    t = torch.tensor([[a, b, c] for a in range(10) for b in range(10) for c in range(10)])
    return t.repeat(repeat, 1)  # [1000 * repeat, 3]


# --- datasets --------------------------------------------------------------------------------


def test_mnist_from_raw_idx_files_is_padded_not_resampled(tmp_path):
    written = write_mnist_raw(tmp_path)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = DG.load_digit_split("stacked-mnist", split, tmp_path, download=False)
        images, labels = written[prefix]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (len(labels), 32, 32)
        assert torch.equal(x[:, 2:30, 2:30], torch.from_numpy(images))  # every pixel kept
        assert int(x[:, :2].sum() + x[:, 30:].sum() + x[:, :, :2].sum() + x[:, :, 30:].sum()) == 0
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    stacked = DG.load_stacked("stacked-mnist", "train", tmp_path, size=50, seed=3, download=False)
    assert stacked.num_source_digits == 30 and tuple(stacked.images.shape) == (50, 3, 32, 32)


def test_mnist_offline_names_what_to_put_where(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        DG.load_digit_split("stacked-mnist", "train", tmp_path / "data")
    msg = str(err.value)
    assert "\n" not in msg and "--data-root" in msg
    assert str(tmp_path / "data" / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg


def test_sklearn_digits_split_and_upscale():
    from sklearn.datasets import load_digits

    train_x, train_y = DG.load_digit_split("stacked-digits", "train")
    test_x, test_y = DG.load_digit_split("stacked-digits", "test")
    assert (len(train_y), len(test_y)) == (1347, 450)
    assert train_x.dtype == torch.uint8 and tuple(train_x.shape[1:]) == (32, 32)
    # Together the two splits hold each of the 1,797 digits once: compare the 4x4-block means of
    # the upscaled images with the originals, as multisets of (label, image) rows.
    bunch = load_digits()
    pooled = torch.cat([train_x, test_x]).float().view(-1, 8, 4, 8, 4).mean((2, 4)) * 16 / 255
    assert torch.allclose(
        pooled.sum(), torch.tensor(bunch.images.sum(), dtype=torch.float32), rtol=2e-3
    )
    assert sorted(torch.cat([train_y, test_y]).tolist()) == sorted(bunch.target.tolist())
    again, _ = DG.load_digit_split("stacked-digits", "test")
    assert torch.equal(again, test_x)  # fixed split


def test_stacking_round_trips_digits_and_labels():
    x, y = DG.load_digit_split("stacked-digits", "train")
    images, labels = DG.stack_digits(x, y, 500, seed=7)
    assert images.shape == (500, 3, 32, 32) and labels.shape == (500, 3)
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, x.shape[0], (500, 3), generator=gen)  # the documented draw
    for c in range(3):
        assert torch.equal(images[:, c], x[idx[:, c]]) and torch.equal(labels[:, c], y[idx[:, c]])
    same, _ = DG.stack_digits(x, y, 500, seed=7)
    other, _ = DG.stack_digits(x, y, 500, seed=8)
    assert torch.equal(same, images) and not torch.equal(other, images)
    assert DG.mode_ids(torch.tensor([[1, 2, 3], [9, 0, 0]])).tolist() == [123, 900]
    with pytest.raises(DataError, match="--stack-size 0"):
        DG.stack_digits(x, y, 0, seed=0)


# --- modes and kl_modes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels,modes,kl",
    [
        (all_triples(), 1000, 0.0),
        (all_triples(26), 1000, 0.0),
        (torch.tensor([[4, 2, 7]]).repeat(300, 1), 1, math.log(1000)),
        (all_triples()[:500], 500, math.log(2)),
    ],
)
def test_modes_and_kl_on_hand_built_labels(labels, modes, kl):
    assert count_modes(labels) == modes
    assert kl_to_uniform(labels) == pytest.approx(kl, abs=1e-12)


def test_kl_matches_scipy_entropy():
    from scipy.stats import entropy

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (5000, 3), generator=g) * torch.tensor([1, 1, 0])  # 100 modes
    p = mode_histogram(labels).double().numpy()
    assert count_modes(labels) == 100
    assert kl_to_uniform(labels) == pytest.approx(
        entropy(p / p.sum(), np.full(1000, 1e-3)), rel=1e-12
    )


# --- the classifier ----------------------------------------------------------------------------


def test_classifier_tables_cover_exactly_the_stacked_sources():
    assert set(CL.MIN_ACCURACY) == set(DG.STACKED_SOURCES) == set(CL.DEFAULT_EPOCHS)


def test_classifier_cache_hash_and_reuse(modes_cache, modes_classifier, monkeypatch):
    assert modes_classifier.accuracy >= CL.MIN_ACCURACY["stacked-digits"]
    assert modes_classifier.path.parent == modes_cache / "mode_classifier"
    monkeypatch.setattr(CL, "train_digit_net", lambda *a, **k: pytest.fail("retrained"))
    again = CL.load_mode_classifier("stacked-digits", cache_dir=modes_cache)
    assert again.sha256 == modes_classifier.sha256 and again.accuracy == modes_classifier.accuracy
    assert again.dims == 3 * CL.FEATURE_DIM


def test_classifier_corrupt_cache_is_retrained(modes_classifier, tmp_path):
    cache = tmp_path / "cache"
    path = cache / "mode_classifier" / modes_classifier.path.name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    clf = CL.load_mode_classifier(
        "stacked-digits", cache_dir=cache, epochs=CL.DEFAULT_EPOCHS["stacked-digits"]
    )
    # a new file
    assert clf.path == path and sha256_file(path) != sha256_file(modes_classifier.path)
    for k, v in modes_classifier.net.state_dict().items():  # deterministic training
        assert torch.equal(clf.net.state_dict()[k], v), k
    # The same network, so the same identity: the file differs (it stores its training time).
    assert clf.sha256 == modes_classifier.sha256


@pytest.mark.parametrize(
    "change, same", [("train_seconds", True), ("weight", False), ("ref_sigma", False)]
)
def test_classifier_identity_is_the_network_not_the_file(modes_classifier, tmp_path, change, same):
    payload = torch.load(modes_classifier.path, map_location="cpu", weights_only=True)
    if change == "train_seconds":
        payload["train_seconds"] += 1.0
    elif change == "weight":  # one float32 step in one weight: labels unchanged, network changed
        w = next(v for k, v in payload["state_dict"].items() if k.endswith("weight"))
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    else:
        payload["ref_sigma"][0, 0] += 1e-9
    path = tmp_path / "mode_classifier" / modes_classifier.path.name
    path.parent.mkdir()
    torch.save(payload, path)
    clf = CL.load_mode_classifier("stacked-digits", cache_dir=tmp_path)
    assert clf.path == path and sha256_file(path) != sha256_file(modes_classifier.path)
    assert (clf.sha256 == modes_classifier.sha256) is same


def test_classifier_below_accuracy_is_refused_and_not_cached(tmp_path):
    with pytest.raises(M.MetricsError, match=r"held-out accuracy is .* below the 95.0% needed"):
        CL.load_mode_classifier("stacked-digits", cache_dir=tmp_path, epochs=0)
    assert not list(tmp_path.rglob("*.pt"))
    with pytest.raises(M.MetricsError, match="--source 'cifar10'"):
        CL.load_mode_classifier("cifar10", cache_dir=tmp_path)


def test_classifier_labels_each_channel(modes_classifier):
    x, y = DG.load_digit_split("stacked-digits", "test")
    images, labels = DG.stack_digits(x, y, 64, seed=1)
    pred, feats = modes_classifier(images)
    assert pred.shape == (64, 3) and feats.shape == (64, 3 * CL.FEATURE_DIM)
    single = CL.DigitNet.features(modes_classifier.net, images[:, 1])  # channel 1 on its own
    assert torch.allclose(feats[:, CL.FEATURE_DIM : 2 * CL.FEATURE_DIM], single, atol=1e-5)
    assert (pred == labels).double().mean() > 0.9
    with pytest.raises(M.MetricsError, match="32x32"):
        modes_classifier(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


# --- the metrics on real images -----------------------------------------------------------------


def test_real_held_out_stacked_digits_cover_all_modes(modes_classifier):
    """PacGAN's protocol on real images: 26k held-out stacked digits find (nearly) every mode."""
    held_out = DG.load_stacked("stacked-digits", "test", size=26_000, seed=1)
    ev = M.Evaluator(families=[ModeMetrics(modes_classifier, num_samples=26_000)])
    result = ev.score_images(held_out.images.split(2048))
    assert result["mode_samples"] == 26_000
    assert result["modes"] >= 990 and result["kl_modes"] < 0.1
    # A collapsed set: one image repeated finds one mode and is far from the data in cfd.
    collapsed = held_out.images[:1].repeat(2000, 1, 1, 1)
    col = ev.score_images(collapsed.split(500))
    assert col["modes"] == 1 and col["kl_modes"] == pytest.approx(math.log(1000))
    train = DG.load_stacked("stacked-digits", "train", size=5000, seed=5)
    real = ev.score_images(train.images.split(1000))
    assert real["cfd"] < 0.1 * col["cfd"]


def test_cfd_reference_is_the_stacked_gaussian(modes_classifier):
    """The cached reference equals the moments of a large real stacked draw (up to sampling)."""
    train = DG.load_stacked("stacked-digits", "train", size=6000, seed=9)
    _, feats = modes_classifier(train.images)
    mu = feats.double().mean(0).numpy()
    assert np.abs(mu - modes_classifier.ref_mu).max() < 0.05 * np.abs(modes_classifier.ref_mu).max()
    d = CL.FEATURE_DIM
    cross = np.cov(feats.double().numpy(), rowvar=False)[:d, d : 2 * d]  # channels independent
    assert np.abs(cross).max() < 0.1 * np.abs(modes_classifier.ref_sigma[:d, :d]).max()


# --- the evaluator: two families, one pass --------------------------------------------------


class TinyFeatures:
    """uint8 [N, 3, H, W] -> [N, 16] (a stand-in for Inception)."""

    dims, weights_sha256, batch_size = 16, "cd" * 32, 64

    def __init__(self):
        self.proj = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += images.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return torch.tanh(pooled @ self.proj)


def test_one_pass_feeds_each_family_its_share(modes_classifier, tmp_path, monkeypatch):
    extractor = TinyFeatures()
    ref = M.load_reference("stacked-digits", extractor, cache_dir=tmp_path, num_real_features=100)
    assert ref.meta["num_images"] == 50_000 and ref.meta["source"]["kind"] == "stacked"
    calls = []
    real_call = type(modes_classifier).__call__
    monkeypatch.setattr(
        type(modes_classifier),
        "__call__",
        lambda self, x: calls.append(x.shape[0]) or real_call(self, x),
    )
    fam = ModeMetrics(modes_classifier, num_samples=150)
    ev = M.Evaluator(
        extractor, ref, num_samples=40, families=[fam], kid_subsets=2, kid_subset_size=20
    )
    torch.manual_seed(0)
    gen = Generator(z_dim=8, ngf=4, mn_layers=(0,), fit_points=64)
    extractor.images_seen = 0
    row = ev(gen, sample_mode="batch", batch_size=16)
    assert row["num_samples"] == 40 and row["mode_samples"] == 150
    assert extractor.images_seen == 40 and sum(calls) == 150  # each provider once per image
    assert {"fid", "kid", "modes", "kl_modes", "cfd", "classifier_sha256"} <= set(row)
    names = ev.metric_names(row)
    assert names["fid"] == "fid_40" and names["modes"] == "modes_150" and names["cfd"] == "cfd_150"
    assert ev.primary_metric == "fid" and ev.directions["modes"] == "max"
    # Mode metrics alone give the same numbers from the same latents.
    alone = M.Evaluator(families=[ModeMetrics(modes_classifier, num_samples=150)])
    torch.manual_seed(0)
    gen2 = Generator(z_dim=8, ngf=4, mn_layers=(0,), fit_points=64)
    r2 = alone(gen2, sample_mode="batch", batch_size=16)
    assert (r2["modes"], r2["kl_modes"], r2["cfd"]) == (row["modes"], row["kl_modes"], row["cfd"])
    assert alone.primary_metric == "cfd" and alone.ref_key is None
