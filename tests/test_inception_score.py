"""Inception Score: the formula against an independent numpy transcription of the original code,
hand-built logits, the real extractor's logits, and the evaluator computing it in the FID pass."""

import numpy as np
import pytest
import torch

from dcgan_mn import metrics as M
from dcgan_mn.features import InceptionFeatureExtractor
from dcgan_mn.metrics.inception_score import inception_score


def original_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """The original code's computation (Salimans et al.'s inception_score.py), in numpy."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds = e / e.sum(axis=1, keepdims=True)
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits) : ((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize(
    "n, classes, splits, scale",
    [(100, 1008, 10, 3.0), (257, 1008, 10, 8.0), (50, 7, 5, 1.0), (30, 1008, 1, 0.5)],
)
def test_equals_the_original_formula(n, classes, splits, scale):
    logits = np.random.default_rng(n).normal(0, scale, size=(n, classes))
    mean, std = inception_score(torch.from_numpy(logits), splits)
    ref_mean, ref_std = original_inception_score(logits, splits)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8, abs=1e-12)


def test_hand_built_logits():
    # uniform
    assert inception_score(torch.zeros(100, 1008)) == pytest.approx((1.0, 0.0), abs=1e-12)
    # One-hot predictions, every class used equally in every split -> the number of classes.
    labels = torch.arange(1008).repeat(10)  # [10080]: split i holds one of each class
    logits = torch.full((10080, 1008), -100.0)
    logits[torch.arange(10080), labels] = 100.0
    mean, std = inception_score(logits)
    assert mean == pytest.approx(1008.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-6)
    # One class only: nothing is told apart -> 1.
    assert inception_score(logits[labels == 3])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(torch.zeros(9, 1008))


def test_real_extractor_logits_are_the_2015_classifier_without_bias(fid_weights_file):
    extractor = InceptionFeatureExtractor(
        2048, fid_weights_file, device="cpu", batch_size=3, progress=False
    )
    images = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(
        torch.uint8
    )
    feats, logits = extractor.features_and_logits(images)  # [4, 2048], [4, 1008]
    assert extractor.has_logits and logits.shape == (4, 1008)
    torch.testing.assert_close(feats, extractor(images), rtol=0, atol=0)  # the same pass
    fc = torch.load(fid_weights_file, weights_only=True)["fc.weight"]  # [1008, 2048]
    torch.testing.assert_close(logits, feats @ fc.t(), rtol=1e-5, atol=1e-5)
    assert not InceptionFeatureExtractor(
        64, fid_weights_file, device="cpu", progress=False
    ).has_logits


class FeaturesAndLogits:
    """A stand-in extractor with logits: 8-d features and 1008 logits from fixed projections;
    counts its calls."""

    dims = 8
    batch_size = 16
    weights_sha256 = "test"
    has_logits = True

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * 32 * 32, 8, generator=g) / 50
        self.cls = torch.randn(8, 1008, generator=g)
        self.calls = 0

    def features_and_logits(self, images):
        self.calls += 1
        feats = images.float().flatten(1) / 255 @ self.proj  # [B, 8]
        return feats, feats @ self.cls  # [B, 1008]

    def __call__(self, images):
        return self.features_and_logits(images)[0]


def test_evaluator_scores_is_in_the_fid_pass():
    extractor = FeaturesAndLogits()
    rng = np.random.default_rng(0)
    real = rng.standard_normal((40, 8))
    ref = M.ReferenceStats(
        mu=real.mean(0),
        sigma=np.cov(real, rowvar=False),
        key="k",
        features=real.astype(np.float32),
        meta={},
    )
    images = (torch.rand(50, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(
        torch.uint8
    )
    ev = M.Evaluator(extractor, ref, num_samples=50, kid_subsets=2, kid_subset_size=10)
    result = ev.score_images(iter(images.split(20)), total=50)
    assert extractor.calls == 3  # one call per batch of 20: FID, KID, PRDC and IS share it
    expect = inception_score(extractor.features_and_logits(images)[1])
    # float32 batching
    assert (result["inception_score"], result["inception_score_std"]) == pytest.approx(
        expect, rel=1e-6
    )
    assert result["is_splits"] == 10 and M.metric_direction("inception_score") == "max"
    assert "inception_score" in ev.metric_names(result)
