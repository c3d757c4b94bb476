"""Metrics: streaming moments, Fréchet distance vs pytorch-fid, KID, PRDC, reference cache, evaluator.

A tiny injected feature extractor (a fixed random projection of pooled pixels) stands in for
Inception here; tests/test_features.py covers the real network.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import formats
from dcgan_mn import metrics as M
from dcgan_mn.config import TrainConfig
from dcgan_mn.features import quantize_images
from dcgan_mn.models import Generator


class TinyFeatures:
    """uint8 [N, 3, H, W] -> [N, dims]: tanh of a fixed projection of 4x4-pooled pixels."""

    def __init__(self, dims=64, sha="ab" * 32, batch_size=32):
        self.dims, self.weights_sha256, self.batch_size = dims, sha, batch_size
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(48, dims, generator=g)
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += images.shape[0]
        pooled = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)  # [N, 48]
        return torch.tanh(pooled @ self.proj)  # [N, dims]


def random_spd(d, rng, scale=1.0):
    a = rng.standard_normal((d, 2 * d))
    return scale * (a @ a.T) / (2 * d) + 0.1 * np.eye(d)


def write_pngs(folder, n, seed, size=32):
    return formats.write_pngs(folder, n, seed, smooth=False, size=size)  # uniform pixel noise


# --- streaming moments ---------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 1e4])
@pytest.mark.parametrize("batches", [[7], [3, 1, 5, 11], [1, 1, 1, 1, 2]])
def test_streaming_moments_equal_numpy(shift, batches):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((sum(batches), 6)) * [1, 2, 3, 4, 5, 6] + shift
    mom = M.StreamingMoments(6)
    start = 0
    for b in batches:
        mom.update(torch.from_numpy(x[start : start + b]))
        start += b
    mu, sigma = mom.numpy()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    assert mom.count == x.shape[0]


def test_streaming_moments_merge_and_errors():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((20, 3)))
    a, b, whole = M.StreamingMoments(3), M.StreamingMoments(3), M.StreamingMoments(3)
    a.update(x[:8]), b.update(x[8:]), whole.update(x)
    a.merge(b)
    torch.testing.assert_close(a.mean, whole.mean)
    torch.testing.assert_close(a.cov, whole.cov)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        a.update(torch.zeros(2, 4))
    one = M.StreamingMoments(3).update(x[:1])
    with pytest.raises(M.MetricsError, match="at least 2 samples"):
        one.cov


# --- Frechet distance ----------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 16, 64, 256])  # (scipy's sqrtm breaks pytorch-fid at d=1)
@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_frechet_distance_equals_pytorch_fid(d):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng, scale=2.0)
    want = calculate_frechet_distance(mu1, s1, mu2, s2)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-6)
    # the reference side's square root is reused: a second call gives the same value
    assert M.frechet_distance(mu1, s1, mu2, s2) == got


@pytest.mark.parametrize("d", [3, 64])
def test_frechet_distance_zero_for_identical(d):
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(d), random_spd(d, rng)
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9 * np.trace(s))
    assert M.frechet_distance(mu, s, mu, s) >= 0.0


def test_frechet_reference_caches_sqrt_and_checks_dims(monkeypatch):
    calls = []
    from dcgan_mn.metrics import frechet

    real_sqrt = frechet._psd_sqrt
    monkeypatch.setattr(frechet, "_psd_sqrt", lambda s: calls.append(1) or real_sqrt(s))
    rng = np.random.default_rng(3)
    ref = M.FrechetReference(rng.standard_normal(5), random_spd(5, rng))
    for _ in range(3):
        ref.distance(rng.standard_normal(5), random_spd(5, rng))
    assert len(calls) == 1
    with pytest.raises(M.MetricsError, match="dimension 4 .* 5-d reference"):
        ref.distance(np.zeros(4), np.eye(4))


# --- KID -----------------------------------------------------------------------------------


def kid_numpy(x, y):
    """Unbiased polynomial-kernel MMD^2, written out with loops over pairs (O(n^2))."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_whole_sets_equals_direct_formula():
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3
    kid, std = M.kernel_inception_distance(torch.from_numpy(real), torch.from_numpy(fake))
    assert kid == pytest.approx(kid_numpy(fake, real), rel=1e-10)
    assert std == 0.0


def test_kid_subsets_equal_direct_formula_on_the_same_draws():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((15, 4)), rng.standard_normal((11, 4))
    got, got_std = M.kernel_inception_distance(
        torch.from_numpy(real), torch.from_numpy(fake), num_subsets=4, subset_size=6, seed=7
    )
    draws = np.random.RandomState(7)
    vals = []
    for _ in range(4):
        i = draws.choice(11, 6, replace=False)
        j = draws.choice(15, 6, replace=False)
        vals.append(kid_numpy(fake[i], real[j]))
    assert got == pytest.approx(np.mean(vals), rel=1e-10)
    assert got_std == pytest.approx(np.std(vals), rel=1e-8)


def test_kid_is_near_zero_for_one_distribution_and_needs_two_samples():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    far = b + 3.0
    same, _ = M.kernel_inception_distance(
        torch.from_numpy(a), torch.from_numpy(b), subset_size=200, num_subsets=5
    )
    diff, _ = M.kernel_inception_distance(
        torch.from_numpy(a), torch.from_numpy(far), subset_size=200, num_subsets=5
    )
    assert abs(same) < 0.05 < diff
    with pytest.raises(M.MetricsError, match="at least 2"):
        M.kernel_inception_distance(torch.zeros(1, 3), torch.zeros(5, 3))


# --- precision / recall / density / coverage ------------------------------------------------


def prdc_numpy(real, fake, k):
    """Naeem et al.'s definitions with full distance matrices."""
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    return {
        "precision": (d_rf < r_real[:, None]).any(0).mean(),
        "recall": (d_rf < r_fake[None, :]).any(1).mean(),
        "density": (d_rf < r_real[:, None]).sum(0).mean() / k,
        "coverage": (d_rf.min(1) < r_real).mean(),
    }


def test_prdc_hand_computed_1d():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = torch.tensor([[0.5], [20.0]])
    # k=1 radii: real 1,1,1,1,7; fake 19.5,19.5. 0.5 is in the balls of 0 and 1; 20 in none.
    got = M.prdc(real, fake, k=1)
    assert got == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.4})


def test_prdc_identical_and_disjoint_sets():
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((40, 3)))
    same = M.prdc(x, x.clone(), k=5)
    assert same == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})
    far = M.prdc(x, x + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("chunk", [3, 64])
def test_prdc_equals_full_matrix_definition(chunk):
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((37, 4)), rng.standard_normal((29, 4)) * 1.3 + 0.2
    got = M.prdc(torch.from_numpy(real), torch.from_numpy(fake), k=3, chunk=chunk)
    assert got == pytest.approx(prdc_numpy(real, fake, 3), rel=1e-12)
    radii = M.knn_radii(torch.from_numpy(real), 3, chunk=chunk)
    assert M.prdc(torch.from_numpy(real), torch.from_numpy(fake), k=3, real_radii=radii) == got
    with pytest.raises(M.MetricsError, match="more than 5 samples"):
        M.knn_radii(torch.zeros(5, 2), 5)


# --- reference statistics ------------------------------------------------------------------


def test_npz_round_trip_is_pytorch_fid_format(tmp_path):
    from pytorch_fid.fid_score import compute_statistics_of_path

    rng = np.random.default_rng(9)
    stats = M.ReferenceStats(
        mu=rng.standard_normal(4),
        sigma=random_spd(4, rng),
        key="k1",
        features=rng.standard_normal((6, 4)).astype(np.float32),
        meta={"key": "k1"},
    )
    path = M.save_stats_npz(tmp_path / "s.npz", stats)
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # no temporary file left behind
    mu, sigma = compute_statistics_of_path(str(path), None, 50, 4, "cpu")
    np.testing.assert_array_equal(mu, stats.mu)
    np.testing.assert_array_equal(sigma, stats.sigma)
    back = M.load_stats_npz(path)
    assert back.key == "k1" and back.dims == 4
    np.testing.assert_array_equal(back.features, stats.features)


def test_pytorch_fid_npz_reference_and_dims_mismatch(tmp_path):
    rng = np.random.default_rng(10)
    np.savez_compressed(
        tmp_path / "ttur.npz", mu=rng.standard_normal(64), sigma=random_spd(64, rng)
    )
    ext = TinyFeatures(dims=64)
    ref = M.load_reference(str(tmp_path / "ttur.npz"), ext)
    assert ref.dims == 64 and ref.features is None and ref.key.startswith("npz-")
    with pytest.raises(M.MetricsError, match=r"64-d but the features are 192-d"):
        M.load_reference(str(tmp_path / "ttur.npz"), TinyFeatures(dims=192))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(M.MetricsError, match="cannot read statistics"):
        M.load_reference(str(tmp_path / "bad.npz"), ext)
    with pytest.raises(M.MetricsError, match="expected cifar10-train"):
        M.load_reference(str(tmp_path / "nope"), ext)


def test_reference_from_folder_is_cached_and_matches_direct_stats(tmp_path):
    folder = write_pngs(tmp_path / "real", 30, seed=0)
    ext = TinyFeatures()
    cache = tmp_path / "cache"
    ref = M.load_reference(str(folder), ext, cache_dir=cache, num_real_features=12)
    assert ext.images_seen == 30
    # the statistics are those of all images; the kept features a 12-image subset of them
    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
            for p in sorted(folder.iterdir())
        ]
    )
    feats = ext(images).double().numpy()
    np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-12)
    assert ref.features.shape == (12, 64)
    rows = {tuple(np.round(r, 5)) for r in feats.astype(np.float32)}
    assert all(tuple(np.round(r, 5)) in rows for r in ref.features)
    files = list((cache / "ref_stats").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz" and ref.key[:16] in files[0].name
    # second load: from the cache, no feature pass
    again = M.load_reference(str(folder), ext, cache_dir=cache, num_real_features=12)
    assert ext.images_seen == 30 + 30  # (30 above for the direct check)
    assert again.key == ref.key
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    # a corrupt cache entry is recomputed and replaced
    files[0].write_bytes(b"garbage")
    M.load_reference(str(folder), ext, cache_dir=cache, num_real_features=12)
    assert ext.images_seen == 90
    assert M.load_stats_npz(files[0]).key == ref.key


def test_reference_key_changes_with_every_input(tmp_path, monkeypatch):
    folder = write_pngs(tmp_path / "real", 3, seed=1)
    ident = M.reference_identity(str(folder))
    base = M.reference_key(ident, "a" * 64, 2048)
    keys = {
        "base": base,
        "weights": M.reference_key(ident, "b" * 64, 2048),
        "dims": M.reference_key(ident, "a" * 64, 64),
        "subset": M.reference_key(ident, "a" * 64, 2048, num_real_features=5),
        "train": M.reference_key(M.reference_identity("cifar10-train"), "a" * 64, 2048),
        "test": M.reference_key(M.reference_identity("cifar10-test"), "a" * 64, 2048),
    }
    from dcgan_mn.metrics import reference

    monkeypatch.setattr(reference, "PROTOCOL_VERSION", "v-next")
    keys["protocol"] = M.reference_key(ident, "a" * 64, 2048)
    monkeypatch.undo()
    assert M.reference_key(ident, "a" * 64, 2048) == base  # deterministic
    # the folder's contents: a changed file (size / mtime) or an added file
    write_pngs(tmp_path / "real", 3, seed=2)  # same names, new bytes
    os.utime(folder / "000.png", ns=(1, 1))
    keys["changed"] = M.reference_key(M.reference_identity(str(folder)), "a" * 64, 2048)
    write_pngs(tmp_path / "other", 1, seed=3)
    (tmp_path / "other" / "000.png").rename(folder / "999.png")
    keys["added"] = M.reference_key(M.reference_identity(str(folder)), "a" * 64, 2048)
    assert len(set(keys.values())) == len(keys), keys


def test_reference_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.MetricsError, match="no images in this folder"):
        M.load_reference(str(tmp_path / "empty"), TinyFeatures())
    write_pngs(tmp_path / "one", 1, seed=0)
    with pytest.raises(M.MetricsError, match="at least 2 images"):
        M.load_reference(str(tmp_path / "one"), TinyFeatures(), cache_dir=tmp_path / "c")
    bad = write_pngs(tmp_path / "bad", 2, seed=0)
    (bad / "001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(M.MetricsError, match="cannot read image .*001.png"):
        M.load_reference(str(bad), TinyFeatures(), cache_dir=tmp_path / "c")
    # statistics made with other weights are refused
    ref = M.load_reference(
        str(write_pngs(tmp_path / "ok", 8, seed=0)), TinyFeatures(), cache_dir=tmp_path / "c"
    )
    M.save_stats_npz(tmp_path / "ours.npz", ref)
    with pytest.raises(M.MetricsError, match="Inception weights sha256"):
        M.load_reference(str(tmp_path / "ours.npz"), TinyFeatures(sha="cd" * 32))


# --- evaluator -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    folder = write_pngs(tmp / "real", 40, seed=11)
    return M.load_reference(
        str(folder), TinyFeatures(), cache_dir=tmp / "cache", num_real_features=40
    )


@pytest.mark.parametrize("mn_layers", [(), (0, 1)])
def test_evaluator_is_deterministic_and_read_only(tiny_reference, mn_layers):
    torch.manual_seed(0)
    gen = Generator(z_dim=8, ngf=4, mn_layers=mn_layers, fit_points=64)
    ev = M.Evaluator(
        TinyFeatures(), tiny_reference, num_samples=27, kid_subsets=3, kid_subset_size=10
    )
    buffers = {k: v.clone() for k, v in gen.state_dict().items()}
    rng = torch.get_rng_state()
    first = ev(gen, sample_mode="batch", batch_size=8)
    second = ev(gen, sample_mode="batch", batch_size=8)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    for k, v in gen.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    drop = lambda r: {k: v for k, v in r.items() if k != "eval_seconds"}  # noqa: E731
    assert drop(first) == drop(second)
    assert first["num_samples"] == 27 and first["metric_samples"] == 27
    assert first["ref_key"] == tiny_reference.key == ev.ref_key
    assert first["dims"] == 64 and first["weights_sha256"] == "ab" * 32
    for name in ("fid", "kid", "precision", "recall", "density", "coverage"):
        assert isinstance(first[name], float), name
    running = ev(gen, sample_mode="running", batch_size=8)
    assert running["sample_mode"] == "running" and running["fid"] != first["fid"]


def test_evaluator_scores_exactly_the_quantized_samples(tiny_reference):
    torch.manual_seed(1)
    gen = Generator(z_dim=8, ngf=4, mn_layers=())
    ext = TinyFeatures()
    ev = M.Evaluator(ext, tiny_reference, num_samples=20, kid_subsets=2, kid_subset_size=10)
    got = ev(gen, sample_mode="running", batch_size=6)
    z = ev.latents(8)
    feats = ext(quantize_images(gen.sample(z, mode="running"))).double().numpy()
    want = M.frechet_distance(
        feats.mean(0), np.cov(feats, rowvar=False), tiny_reference.mu, tiny_reference.sigma
    )
    assert got["fid"] == pytest.approx(want, rel=1e-9)
    real = torch.from_numpy(tiny_reference.features[:20]).double()
    assert got["precision"] == M.prdc(real, torch.from_numpy(feats), 5)["precision"]


def test_evaluator_errors(tiny_reference):
    with pytest.raises(M.MetricsError, match="at least 2 samples"):
        M.Evaluator(TinyFeatures(), tiny_reference, num_samples=1)
    with pytest.raises(M.MetricsError, match="64-d but the features are 192-d"):
        M.Evaluator(TinyFeatures(dims=192), tiny_reference, num_samples=10)
    few = M.Evaluator(TinyFeatures(), tiny_reference, num_samples=4)
    r = few(Generator(z_dim=8, ngf=4, mn_layers=()), sample_mode="running", batch_size=4)
    assert r["kid"] is not None and r["precision"] is None  # PRDC needs more than k samples


def test_build_evaluator_from_train_config(tmp_path):
    folder = write_pngs(tmp_path / "real", 16, seed=12)
    cfg = TrainConfig(ref=str(folder), fid_samples=10, dims=64, z_dim=8, ngf=4, mn_layers="none")
    ev = M.build_evaluator(cfg, "cpu", feature_extractor=TinyFeatures(), cache_dir=tmp_path / "c")
    assert ev.num_samples == 10 and ev.dims == 64 and len(ev.ref_key) == 64
    out = ev(
        Generator(**cfg.model_kwargs()), sample_mode=cfg.sample_mode, batch_size=cfg.batch_size
    )
    assert out["num_samples"] == 10 and out["fid"] >= 0
    json.dumps(out)  # every value is JSON-serialisable (metrics.jsonl)


@pytest.mark.parametrize(
    "n,tag", [(10_000, "10k"), (50_000, "50k"), (2500, "2.5k"), (500, "500"), (1234, "1234")]
)
def test_sample_count_tag(n, tag):
    assert M.sample_count_tag(n) == tag


def _sharded_eval_worker(rank, world, init_file, ref_path, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    gen = Generator(z_dim=8, ngf=4, mn_layers=(0,), fit_points=64)
    ev = M.Evaluator(
        TinyFeatures(batch_size=16),
        M.load_stats_npz(ref_path),
        num_samples=50,
        kid_subsets=3,
        kid_subset_size=10,
    )
    torch.save(ev(gen, sample_mode="batch", batch_size=8), os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_evaluator_sharded_over_two_ranks_equals_one_process(tiny_reference, tmp_path):
    """Under torchrun the chunks are split across ranks and gathered: the same numbers."""
    import torch.multiprocessing as mp

    ref_path = M.save_stats_npz(tmp_path / "ref.npz", tiny_reference)
    mp.spawn(
        _sharded_eval_worker,
        args=(2, str(tmp_path / "init"), str(ref_path), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    torch.manual_seed(0)
    gen = Generator(z_dim=8, ngf=4, mn_layers=(0,), fit_points=64)
    ev = M.Evaluator(
        TinyFeatures(batch_size=16),
        M.load_stats_npz(ref_path),
        num_samples=50,
        kid_subsets=3,
        kid_subset_size=10,
    )
    single = ev(gen, sample_mode="batch", batch_size=8)
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt")
        assert got["fid"] == pytest.approx(single["fid"], rel=1e-9)
        for name in ("kid", "precision", "recall", "density", "coverage", "num_samples"):
            assert got[name] == pytest.approx(single[name], rel=1e-9), name


def test_generated_images_do_not_depend_on_chunking():
    """MN in batch mode draws k-means seeds: seeded per generator batch, the evaluation images
    are the same whatever the chunk size (a device's feature batch size)."""
    from dcgan_mn.models import Generator

    torch.manual_seed(0)
    G = Generator(z_dim=8, ngf=4, mn_layers=(0, 1), fit_points=32)

    def images(chunk):
        return torch.cat(
            [
                im
                for _, im in M.generated_images(
                    G, num_samples=37, seed=5, sample_mode="batch", batch_size=8, chunk_images=chunk
                )
            ]
        )

    a, b = images(8), images(64)
    assert a.shape == (37, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    other = torch.cat(
        [
            im
            for _, im in M.generated_images(
                G, num_samples=37, seed=6, sample_mode="batch", batch_size=8
            )
        ]
    )
    assert not torch.equal(a, other)
