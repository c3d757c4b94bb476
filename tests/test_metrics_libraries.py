"""Our hand-written KID and PRDC against the libraries that define them, on the same features
with the same subset settings: torch-fidelity's KID and the prdc package (Naeem et al.'s code)."""

import numpy as np
import prdc as prdc_package  # the test extra installs both
import pytest
import torch
import torch_fidelity.metric_kid as torch_fidelity_kid

from dcgan_mn.metrics import kernel_inception_distance, prdc


def features(n_real, n_fake, d, shift, seed):
    rng = np.random.default_rng(seed)
    real = rng.standard_normal((n_real, d))
    fake = rng.standard_normal((n_fake, d)) * 1.1 + shift
    return torch.from_numpy(real), torch.from_numpy(fake)


@pytest.mark.parametrize(
    "n_real, n_fake, d, subsets, size, seed",
    [(300, 250, 32, 20, 100, 7), (120, 120, 8, 5, 120, 0), (200, 90, 64, 50, 50, 3)],
)
def test_kid_equals_torch_fidelity(n_real, n_fake, d, subsets, size, seed):
    real, fake = features(n_real, n_fake, d, 0.3, seed)
    ours = kernel_inception_distance(real, fake, num_subsets=subsets, subset_size=size, seed=seed)
    # The same RandomState draws in the same order (the generated set first, then the real one).
    theirs = torch_fidelity_kid.kid_features_to_metric(
        fake, real, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False
    )
    assert ours[0] == pytest.approx(theirs[torch_fidelity_kid.KEY_METRIC_KID_MEAN], rel=1e-10)
    assert ours[1] == pytest.approx(theirs[torch_fidelity_kid.KEY_METRIC_KID_STD], rel=1e-8)


@pytest.mark.parametrize(
    "n_real, n_fake, d, k, shift",
    [(200, 150, 16, 5, 0.5), (80, 120, 4, 3, 0.0), (150, 150, 32, 10, 2.0)],
)
def test_prdc_equals_the_prdc_package(n_real, n_fake, d, k, shift):
    real, fake = features(n_real, n_fake, d, shift, seed=k)
    ours = prdc(real, fake, k)
    theirs = prdc_package.compute_prdc(
        real_features=real.numpy(), fake_features=fake.numpy(), nearest_k=k
    )
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-12), key
