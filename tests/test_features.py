"""FID Inception features: weights (flag, env, hub cache, download, hash and offline errors),
PNG-exact quantization, and features equal to pytorch-fid's on the same PNG files.

The real FID weights cannot be downloaded here, so the tests save a randomly initialised network
of the real architecture (torchvision's Inception v3 with 1008 classes and no aux head has
exactly the FID Inception's parameter names and shapes) in torch hub's format.
"""

import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import pytorch_fid.inception as pfi
from dcgan_mn import features as FT


@pytest.fixture(scope="module")
def weights_file(fid_weights_file):
    return fid_weights_file


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- weights -------------------------------------------------------------------------------


def test_default_url_is_pytorch_fids():
    assert FT.FID_WEIGHTS_URL == pfi.FID_WEIGHTS_URL
    assert FT.FEATURE_DIMS == tuple(sorted(pfi.InceptionV3.BLOCK_INDEX_BY_DIM))
    assert FT.url_hash_prefix(FT.FID_WEIGHTS_URL) == "6726825d"
    assert FT.hub_cache_path().name == "pt_inception-2015-12-05-6726825d.pth"


def test_weights_from_flag_and_env(weights_file, monkeypatch):
    monkeypatch.delenv(FT.WEIGHTS_ENV_VAR, raising=False)
    w = FT.resolve_inception_weights(weights_file)
    assert (w.path, w.sha256, w.standard, w.source) == (
        weights_file,
        sha256(weights_file),
        False,
        "flag",
    )
    # Not pytorch-fid's file: said once it has loaded as Inception weights (not before: see below).
    with pytest.warns(UserWarning, match="not pytorch-fid's FID weights"):
        FT.load_fid_inception(w, 64)
    monkeypatch.setenv(FT.WEIGHTS_ENV_VAR, str(weights_file))
    assert FT.resolve_inception_weights().source == "env"
    with pytest.raises(
        FT.InceptionWeightsError, match=r"--inception-weights '/nope.pth': no such file"
    ):
        FT.resolve_inception_weights("/nope.pth")


def hub_url_for(path):
    """A torch-hub-style URL whose file name carries ``path``'s SHA-256 prefix."""
    return f"https://example.invalid/weights/pt_inception-test-{sha256(path)[:8]}.pth"


def test_weights_from_hub_cache(weights_file, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(FT.WEIGHTS_ENV_VAR, raising=False)
    url = hub_url_for(weights_file)
    dst = FT.hub_cache_path(url)
    assert dst == tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    dst.parent.mkdir(parents=True)
    dst.write_bytes(weights_file.read_bytes())
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded")
    )
    w = FT.resolve_inception_weights(url=url)
    assert (w.path, w.sha256, w.source) == (dst, sha256(weights_file), "hub-cache")
    ext = FT.InceptionFeatureExtractor(dims=64, weights=w)
    assert ext.weights_sha256 == sha256(weights_file)


def test_download_checks_hash_prefix_like_torch_hub(weights_file, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(FT.WEIGHTS_ENV_VAR, raising=False)
    url = hub_url_for(weights_file)
    calls = []

    def fake_download(u, dst, hash_prefix=None, progress=True):
        calls.append((u, hash_prefix))
        Path(dst).write_bytes(weights_file.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    w = FT.resolve_inception_weights(url=url, progress=False)
    assert calls == [(url, sha256(weights_file)[:8])]
    assert w.path.is_file() and w.sha256 == sha256(weights_file)
    FT.resolve_inception_weights(url=url)  # cached now: no second download
    assert len(calls) == 1


def test_hash_mismatch_in_hub_cache(weights_file, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(FT.WEIGHTS_ENV_VAR, raising=False)
    dst = FT.hub_cache_path()  # pytorch-fid's own name, but our random bytes
    dst.parent.mkdir(parents=True)
    dst.write_bytes(weights_file.read_bytes())
    with pytest.raises(
        FT.InceptionWeightsError, match=r"does not start with '6726825d'.*--inception-weights"
    ):
        FT.resolve_inception_weights()


def test_offline_error_names_url_cache_path_and_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(FT.WEIGHTS_ENV_VAR, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FT.InceptionWeightsError) as err:
        FT.resolve_inception_weights()
    msg = str(err.value)
    assert FT.FID_WEIGHTS_URL in msg and str(FT.hub_cache_path()) in msg
    assert "--inception-weights" in msg and FT.WEIGHTS_ENV_VAR in msg and "\n" not in msg
    assert not FT.hub_cache_path().exists()


def test_not_inception_weights(tmp_path, monkeypatch):
    """A file that is not FID Inception weights: one line naming how it was given, what is wrong
    and what a valid file is; no warning about it first and none of torch's own paragraphs."""
    import warnings

    monkeypatch.delenv(FT.WEIGHTS_ENV_VAR, raising=False)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    for path, why in [(junk, "torch.load cannot read it as a state dict"), (other, "Missing key")]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w = FT.resolve_inception_weights(path)
            with pytest.raises(FT.InceptionWeightsError) as err:
                FT.load_fid_inception(w, 64)
        assert not [c for c in caught if issubclass(c.category, UserWarning)], [
            str(c.message) for c in caught
        ]
        msg = str(err.value)
        assert "\n" not in msg and len(msg) - len(str(path)) < 400, msg
        assert (
            msg.startswith(f"--inception-weights {str(path)!r}: not FID Inception weights")
            and why in msg
        ), msg
        assert "pt_inception-2015-12-05-6726825d.pth" in msg and "weights_only" not in msg, msg


# --- images --------------------------------------------------------------------------------


def test_quantize_matches_save_image_png(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 2.4 - 1.2  # includes values outside [-1, 1]
    # exact rounding midpoints and the ends
    x[0, 0, 0, :6] = torch.tensor(
        [-1.0, 1.0, 0.0, -1 + 1 / 255, (2 * 127.5 / 255) - 1, 2 * 0.5 / 255 - 1]
    )
    q = FT.quantize_images(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    for i in range(x.shape[0]):
        for kwargs, img in [
            (dict(normalize=True, value_range=(-1, 1)), x[i]),
            ({}, (x[i] + 1) / 2),
        ]:
            f = tmp_path / f"{i}.png"
            torchvision.utils.save_image(img, f, **kwargs)
            saved = torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)
            assert torch.equal(saved, q[i])


# --- features ------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [64, 2048])
def test_features_equal_pytorch_fids_on_png_files(weights_file, tmp_path, monkeypatch, dims):
    from pytorch_fid.fid_score import get_activations

    rng = np.random.default_rng(dims)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    state = torch.load(weights_file, weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    theirs_net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    theirs = get_activations(files, theirs_net, batch_size=3, dims=dims, num_workers=0)
    monkeypatch.undo()

    with pytest.warns(UserWarning):
        ext = FT.InceptionFeatureExtractor(dims=dims, weights=weights_file, batch_size=2)
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files]
    )
    ours = ext(images).double().numpy()
    assert ours.shape == (3, dims)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
    with pytest.raises(ValueError, match="uint8 images"):
        ext(images.float())
