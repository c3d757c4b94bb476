"""--fid-protocol clean: clean-fid's resize (checked against clean-fid's own function), the
features it feeds, and the two protocols kept apart in caches and rows."""

import json

import numpy as np
import pytest
import torch
from cleanfid.resize import make_resizer

from dcgan_mn import metrics as M
from dcgan_mn.config import ConfigError, TrainConfig
from dcgan_mn.features import FID_PROTOCOLS, InceptionFeatureExtractor, clean_resize


@pytest.mark.parametrize("size, seed", [(32, 0), (8, 1), (299, 2)])
def test_clean_resize_equals_clean_fids(size, seed):
    images = (torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255).to(
        torch.uint8
    )
    ours = clean_resize(images)  # [3, 3, 299, 299] float32 in [0, 255]
    resize = make_resizer("PIL", False, "bicubic", (299, 299))  # clean-fid's "clean" mode
    for i in range(3):
        theirs = resize(images[i].permute(1, 2, 0).numpy())  # [299, 299, 3]
        np.testing.assert_array_equal(ours[i].permute(1, 2, 0).numpy(), theirs)


def test_clean_protocol_feeds_the_network_the_resized_images(fid_weights_file):
    images = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(
        torch.uint8
    )
    clean = InceptionFeatureExtractor(
        64, fid_weights_file, device="cpu", progress=False, fid_protocol="clean"
    )
    plain = InceptionFeatureExtractor(64, fid_weights_file, device="cpu", progress=False)
    assert (clean.protocol, plain.protocol) == (
        FID_PROTOCOLS["clean"],
        FID_PROTOCOLS["pytorch-fid"],
    )
    # The clean images at 299 through the pytorch-fid network (its own resize is then the identity).
    with torch.inference_mode():
        # [2, 3, 299, 299]
        x = clean_resize(images).div(255).contiguous(memory_format=torch.channels_last)
        expected = torch.nn.functional.adaptive_avg_pool2d(plain.net(x)[0], 1).flatten(1)  # [2, 64]
    torch.testing.assert_close(clean(images), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clean(images), plain(images), atol=1e-3)  # the resize matters
    with pytest.raises(ValueError, match="--fid-protocol 'tf'"):
        InceptionFeatureExtractor(
            64, fid_weights_file, device="cpu", progress=False, fid_protocol="tf"
        )


class Tiny:
    dims, weights_sha256, batch_size = 4, "cd" * 32, 16

    def __init__(self, protocol):
        self.fid_protocol, self.protocol = protocol, FID_PROTOCOLS[protocol]

    def __call__(self, images):
        return images.float().mean(dim=(2, 3)).repeat(1, 2)[:, :4] / 255  # [N, 4]


def test_protocols_never_share_a_cache_entry_and_rows_record_theirs(tmp_path):
    from PIL import Image

    folder = tmp_path / "ref"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    refs = {
        p: M.load_reference(str(folder), Tiny(p), cache_dir=tmp_path / "cache")
        for p in FID_PROTOCOLS
    }
    assert refs["clean"].key != refs["pytorch-fid"].key
    assert len(list((tmp_path / "cache" / "ref_stats").glob("*.npz"))) == 2
    assert refs["clean"].meta["protocol"] == FID_PROTOCOLS["clean"]
    # A statistics file of one protocol is refused by the other.
    path = M.save_stats_npz(tmp_path / "clean.npz", refs["clean"])
    with pytest.raises(M.MetricsError, match="--fid-protocol"):
        M.load_reference(str(path), Tiny("pytorch-fid"))
    images = torch.from_numpy(rng.integers(0, 255, (12, 3, 32, 32), dtype=np.uint8))
    row = M.Evaluator(
        Tiny("clean"), refs["clean"], num_samples=12, kid_subsets=2, kid_subset_size=6
    ).score_images(iter([images]), total=12)
    assert row["fid_protocol"] == "clean"


def test_config_flag():
    assert TrainConfig().fid_protocol == "pytorch-fid"
    with pytest.raises(ConfigError, match="--fid-protocol 'legacy'"):
        TrainConfig(fid_protocol="legacy")
    from dcgan_mn.config import RESUME_FIXED

    assert "fid_protocol" in RESUME_FIXED
    assert json.loads(TrainConfig(fid_protocol="clean").to_json())["fid_protocol"] == "clean"
