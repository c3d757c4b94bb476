"""evaluate.py end to end: FID of image folders equals pytorch-fid's on the same PNG files (same
random Inception weights loaded from a file for both), stats export, bad-input errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pytorch_fid.inception as pfi
from dcgan_mn.runfolder import RunFolder
from dcgan_mn.features import sha256_file

from conftest import invoker, load_script, write_fake_cifar10, write_run
from formats import write_pngs


cli = load_script("evaluate.py", "cli")


@pytest.fixture(scope="module")
def weights_file(fid_weights_file):
    return fid_weights_file


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imgs")
    return write_pngs(tmp / "a", 70, seed=1), write_pngs(tmp / "b", 70, seed=2, shift=30)


run = invoker(cli)


def pytorch_fid_reference(weights_file, monkeypatch, fn):
    state = torch.load(weights_file, weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    try:
        return fn()
    finally:
        monkeypatch.undo()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_fid_of_two_folders_equals_pytorch_fid(weights_file, folders, tmp_path, monkeypatch):
    from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path

    a, b = folders
    common = [
        *"--dims 64".split(),
        *["--inception-weights", weights_file],
        *"--device cpu --no-progress".split(),
        *["--cache-dir", tmp_path / "cache"],
    ]
    # reference statistics of b: computed, cached, and exported in pytorch-fid's format
    npz = tmp_path / "b.npz"
    res = run("stats", "--ref", b, "--out", npz, *common)
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert Path(info["cache_path"]).is_file() and info["num_images"] == 70
    # FID of a against b (b's statistics now come from the cache)
    out = tmp_path / "fid.json"
    res = run("fid", a, "--ref", b, "--out", out, *common)
    assert res.exit_code == 0, res.output
    ours = json.loads(res.stdout)
    assert json.loads(out.read_text()) == ours
    row = ours["results"][0]
    assert (row["num_samples"], row["dims"], ours["ref_key"]) == (70, 64, info["ref_key"])
    assert ours["weights_sha256"] == sha256_file(weights_file) and ours["weights_standard"] is False

    # pytorch-fid on the same PNG files with the same weights (what calculate_fid_given_paths does)
    def theirs():
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[64]])
        return [compute_statistics_of_path(str(p), net, 50, 64, "cpu", 0) for p in (a, b)]

    (mu_a, sigma_a), (mu_b, sigma_b) = pytorch_fid_reference(weights_file, monkeypatch, theirs)
    their_fid = calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    assert their_fid > 1.0  # the folders differ: a meaningful comparison
    assert row["fid"] == pytest.approx(their_fid, rel=1e-4)
    with np.load(npz) as f:
        np.testing.assert_allclose(f["mu"], mu_b, rtol=1e-5, atol=1e-6 * np.abs(mu_b).max())
        np.testing.assert_allclose(
            f["sigma"], sigma_b, rtol=1e-4, atol=1e-5 * np.abs(sigma_b).max()
        )
    # our FID is pytorch-fid's Frechet distance of our statistics of a against the exported b
    assert row["fid"] == pytest.approx(
        calculate_frechet_distance(mu_a, sigma_a, np.load(npz)["mu"], np.load(npz)["sigma"]),
        rel=1e-4,
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_inputs_one_line_nonzero_nothing_written(weights_file, folders, tmp_path):
    a, b = folders
    out = tmp_path / "keep.json"
    out.write_text("precious")
    (tmp_path / "empty").mkdir()
    one = write_pngs(tmp_path / "one", 1, seed=3)
    broken = write_pngs(tmp_path / "broken", 3, seed=4)
    (broken / "001.png").write_bytes(b"\x89PNG nope")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d2048.npz", mu=rng.standard_normal(2048), sigma=np.eye(2048))
    common = [
        *"--dims 64".split(),
        *["--inception-weights", weights_file],
        *"--device cpu --no-progress".split(),
        *["--out", out, "--cache-dir", tmp_path / "c"],
    ]
    cases = [
        (["fid", a, "--ref", tmp_path / "d2048.npz", *common], "2048-d but the features are 64-d"),
        (["fid", tmp_path / "empty", "--ref", b, *common], "no images in this folder"),
        (["fid", one, "--ref", b, *common], "at least 2 images"),
        (["fid", broken, "--ref", b, *common], "cannot read image"),
        (["fid", a, "--ref", tmp_path / "empty", *common], "no images in this folder"),
        (["fid", tmp_path / "nowhere", "--ref", b, *common], "no such file or folder"),
        (["fid", a, "--ref", b, "--samples", 1, *common], "--samples 1: FID needs at least 2"),
        (["fid", a, "--ref", b, "--sample-modes", "eval", *common], "--sample-modes 'eval'"),
        (["fid", a, "--ref", "cifar10", *common], "expected cifar10-train"),
        (
            [
                *["fid", a, "--ref", b, "--dims", 64],
                *["--inception-weights", tmp_path / "none.pth", "--out", out],
            ],
            "no such file",
        ),
        (
            ["stats", "--ref", b, "--out", out, "--dims", 64, "--inception-weights", weights_file],
            "file exists",
        ),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.exit_code != 0, (args, res.output)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], (args, res.stderr)
        assert out.read_text() == "precious"


def test_compare_cli(tmp_path):
    def make_run(name, fids, seed):
        rows = [
            {
                "iteration": 1000 * (i + 1),
                "fid": f,
                "num_samples": 100,
                "sample_mode": "batch",
                "train_seconds": 5.0 * (i + 1),
            }
            for i, f in enumerate(fids)
        ]
        return write_run(
            tmp_path, name, rows, {"seed": seed, "sample_mode": "batch", "fid_samples": 100}
        )

    bn = make_run("bn", [60, 50, 40, 45], seed=0)
    mn = make_run("mn", [55, 39, 35, 33], seed=0)
    # Three evaluation seeds (the default) need snapshots to score the extra seeds from.
    res = run("compare", mn, "--baseline", bn, "--out", tmp_path / "report")
    assert (
        res.exit_code != 0
        and "no generator snapshot for iteration(s) [1000, 2000, 3000, 4000]" in res.stderr
    )
    assert "--eval-seeds 1" in res.stderr and not (tmp_path / "report").exists()
    res = run(
        *["compare", mn, "--baseline", bn, "--out", tmp_path / "report"],
        *"--label MN --baseline-label BN --eval-seeds 1".split(),
    )
    assert res.exit_code == 0, res.output
    assert "33.3%" in res.stdout  # 1 - 2000 / 3000
    report = json.loads((tmp_path / "report" / "compare.json").read_text())
    assert report["pairs"][0]["acceleration"] == pytest.approx(1 / 3)
    assert report["metric"] == "fid" and "baseline_metric" not in report
    res = run(
        *["compare", mn, "--baseline", tmp_path / "nothing", "--out", tmp_path / "report2"],
        *"--eval-seeds 1".split(),
    )
    assert res.exit_code != 0 and "not a folder" in res.stderr
    assert not (tmp_path / "report2").exists()


def test_compare_g_ema_against_g_of_the_same_runs(tmp_path):
    """--baseline-metric: each run's G_ema (fid_ema) against its own G (fid), paired by seed;
    only a metric and its G_ema twin, each flag named in its error."""
    fids = {0: ([60, 50, 40, 45], [58, 44, 41, 39]), 1: ([70, 52, 47, 46], [66, 50, 43, 44])}
    runs = []
    for seed, (g, g_ema) in fids.items():
        rows = [
            {"iteration": 100 * (i + 1), "fid": a, "fid_ema": b, "num_samples": 100}
            | {"sample_mode": "batch", "train_seconds": 5.0 * (i + 1)}
            for i, (a, b) in enumerate(zip(g, g_ema))
        ]
        runs.append(
            write_run(tmp_path, f"bn-s{seed}", rows, {"seed": seed, "sample_mode": "batch"})
        )
    baselines = [x for r in runs for x in ("--baseline", r)]
    res = run(
        *["compare", *runs, *baselines, "--out", tmp_path / "avg", "--eval-seeds", "1"],
        *"--metric fid_ema --baseline-metric fid --label G_ema --baseline-label G".split(),
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "avg" / "compare.json").read_text())
    assert (report["metric"], report["baseline_metric"]) == ("fid_ema", "fid")
    by_hand = [min(g_ema) - min(g) for g, g_ema in fids.values()]  # [-1, -3]
    assert [p["best_difference"] for p in report["pairs"]] == pytest.approx(by_hand)
    assert [(p["candidate"], p["baseline"]) for p in report["pairs"]] == [
        ("bn-s0", "bn-s0"),
        ("bn-s1", "bn-s1"),
    ]
    # G_ema reaches G's best (40 at 300; 46 at 400) at 400 and 300: 1 - 400/300, 1 - 300/400.
    assert [p["acceleration"] for p in report["pairs"]] == pytest.approx([-1 / 3, 1 / 4])
    assert "## FID_EMA VS FID: G_ema vs G" in res.stdout
    assert "bn-s0 (G_ema)" in res.stdout  # still improving: a shared run name says its arm
    res = run(
        *["compare", *runs, *baselines, "--out", tmp_path / "x", "--eval-seeds", "1"],
        *"--metric fid_ema --baseline-metric fdi".split(),
    )
    assert res.exit_code != 0 and "--baseline-metric 'fdi': unknown metric" in res.stderr
    res = run(
        *["compare", *runs, *baselines, "--out", tmp_path / "x", "--eval-seeds", "1"],
        *"--metric kid_ema --baseline-metric fid".split(),
    )
    assert res.exit_code != 0 and "only a metric and its G_ema twin" in res.stderr
    assert "'fid' or 'fid_ema'" in res.stderr and not (tmp_path / "x").exists()


# --- generators: checkpoint files and run folders (a tiny injected feature extractor) -------


class TinyFeatures:
    """Stands in for Inception (tests/test_features.py covers the real one)."""

    dims, weights_sha256, batch_size = 64, "ab" * 32, 32

    def __init__(self, *args, **kwargs):
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(48, 64, generator=g)

    def __call__(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return torch.tanh(pooled @ self.proj)  # [N, 64]


@pytest.fixture
def tiny_features(monkeypatch):
    import dcgan_mn.features

    monkeypatch.setattr(dcgan_mn.features, "InceptionFeatureExtractor", TinyFeatures)


def make_run_folder(root, iterations, mn_layers="0"):
    from dcgan_mn.checkpoint import generator_payload, save_checkpoint
    from dcgan_mn.config import TrainConfig
    from dcgan_mn.models import Generator

    cfg = TrainConfig(
        z_dim=8,
        ngf=4,
        mn_layers=mn_layers,
        mn_fit_points=64,
        batch_size=8,
        sample_mode="running",
        dims=64,
    )
    root.mkdir(parents=True)
    (root / "config.json").write_text(cfg.to_json())
    gens = {}
    for it in iterations:
        torch.manual_seed(it)
        gens[it] = Generator(**cfg.model_kwargs())
        save_checkpoint(
            RunFolder(root).snapshot_file(it), generator_payload(gens[it], cfg, it, 8 * it)
        )
    return cfg, gens


def test_fid_of_run_folder_and_checkpoint(tiny_features, folders, tmp_path):
    from dcgan_mn.metrics import Evaluator, load_reference

    _, b = folders
    run_dir = tmp_path / "run"
    cfg, gens = make_run_folder(run_dir, [100, 200])
    common = [
        *["--ref", b],
        *"--samples 12 --device cpu --dims 64 --no-progress".split(),
        *["--cache-dir", tmp_path / "c"],
    ]
    res = run("fid", run_dir, "--sample-modes", "batch,running", *common)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [(r["iteration"], r["sample_mode"]) for r in rows] == [
        (100, "batch"),
        (100, "running"),
        (200, "batch"),
        (200, "running"),
    ]
    assert all(
        r["num_samples"] == 12 and r["batch_size"] == 8 and r["tag"] == "fid_12" for r in rows
    )
    assert "fid batch" in res.stderr and "fid running" in res.stderr  # the curve, side by side
    # the same number as the evaluator computes directly
    ev = Evaluator(
        TinyFeatures(),
        load_reference(str(b), TinyFeatures(), cache_dir=tmp_path / "c"),
        num_samples=12,
    )
    assert rows[3]["fid"] == pytest.approx(
        ev(gens[200], sample_mode="running", batch_size=8)["fid"], rel=1e-12
    )
    # one checkpoint file: the run's configured sample mode and batch size
    res = run("fid", run_dir / "snapshots" / "G-00000100.pt", *common)
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["results"]
    assert (row["iteration"], row["sample_mode"], row["fid"]) == (100, "running", rows[1]["fid"])
    # a plain pytorch-fid .npz (mu, sigma) as --ref: the same FID, no KID/PRDC (no real features)
    ref = load_reference(str(b), TinyFeatures(), cache_dir=tmp_path / "c")
    np.savez(tmp_path / "plain.npz", mu=ref.mu, sigma=ref.sigma)
    res = run(
        "fid", run_dir / "snapshots" / "G-00000100.pt", *common[2:], "--ref", tmp_path / "plain.npz"
    )
    assert res.exit_code == 0, res.output
    (plain,) = json.loads(res.stdout)["results"]
    assert plain["fid"] == pytest.approx(row["fid"], rel=1e-12) and plain["kid"] is None


def test_generator_bad_inputs(tiny_features, folders, tmp_path):
    _, b = folders
    out = tmp_path / "keep.json"
    out.write_text("precious")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torch")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.json").write_text("{}")
    common = [
        *["--ref", b],
        *"--samples 4 --device cpu --dims 64 --no-progress".split(),
        *["--out", out, "--cache-dir", tmp_path / "c"],
    ]
    for target, message in [
        (junk, "unreadable"),
        (foreign, "not a dcgan_mn checkpoint"),
        (tmp_path / "empty_run", "no generator snapshots"),
    ]:
        res = run("fid", target, *common)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code != 0 and len(lines) == 1 and message in lines[0], res.stderr
        assert out.read_text() == "precious"


# --- CIFAR-10 references, from the real on-disk format ---------------------------------------


def test_cifar10_reference_offline_and_missing(tiny_features, folders, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu
    import urllib.error

    a, _ = folders
    data = tmp_path / "data"
    write_fake_cifar10(data, images_per_batch=6)
    common = [
        *"--dims 64 --device cpu --no-progress".split(),
        *["--cache-dir", tmp_path / "c", "--data-root", data],
    ]
    res = run("stats", "--ref", "cifar10-train", *common)
    assert res.exit_code == 0, res.output
    train = json.loads(res.stdout)
    assert train["num_images"] == 30 and "cifar10-train-64d-" in train["cache_path"]
    res = run("stats", "--ref", "cifar10-test", *common)
    test = json.loads(res.stdout)
    assert test["num_images"] == 6 and test["ref_key"] != train["ref_key"]
    res = run("fid", a, "--ref", "cifar10-train", *common)
    assert res.exit_code == 0 and json.loads(res.stdout)["ref_key"] == train["ref_key"]

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    # CIFAR-10 is identified by its split alone: cached statistics need no data at all ...
    res = run("stats", "--ref", "cifar10-train", *common[:-1], tmp_path / "nodata")
    assert res.exit_code == 0 and json.loads(res.stdout)["ref_key"] == train["ref_key"]
    # ... and without them, a missing data root and no network is one clear line
    res = run(
        *"stats --ref cifar10-train --dims 64 --device cpu --no-progress".split(),
        *["--cache-dir", tmp_path / "c2", "--data-root", tmp_path / "nodata"],
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "cifar-10-python.tar.gz" in lines[0], (
        res.stderr
    )


# --- samples: export what the evaluator scores ----------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_exported_samples_score_as_the_generator_does(tiny_features, folders, tmp_path, mode):
    _, b = folders
    run_dir = tmp_path / "run"
    make_run_folder(run_dir, [100, 200], mn_layers="0")  # MN: batch mode draws k-means seeds
    common = [
        *["--ref", b],
        *"--device cpu --dims 64 --no-progress".split(),
        *["--cache-dir", tmp_path / "c"],
    ]
    res = run(
        *["samples", run_dir, "--num", 20, "--out", tmp_path / "png"],
        *f"--sample-mode {mode} --seed 3 --no-progress".split(),
    )
    assert res.exit_code == 0, res.output
    assert "G-00000200.pt" in res.stderr  # no best.pt: the newest snapshot
    files = sorted((tmp_path / "png").iterdir())
    assert [f.name for f in files[:2]] == ["000000.png", "000001.png"] and len(files) == 20
    from_pngs = json.loads(run("fid", tmp_path / "png", *common).stdout)["results"][0]
    from_gen = json.loads(
        run(
            *["fid", run_dir / "snapshots" / "G-00000200.pt"],
            *f"--samples 20 --seed 3 --sample-modes {mode}".split(),
            *common,
        ).stdout
    )["results"][0]
    assert from_pngs["fid"] == pytest.approx(from_gen["fid"], rel=1e-6)
    # npz: the same pixels, NHWC.
    res = run(
        *["samples", run_dir, "--num", 20, "--out", tmp_path / "npz"],
        *f"--format npz --sample-mode {mode} --seed 3 --which latest --no-progress".split(),
    )
    assert res.exit_code == 0, res.output
    arr = np.load(tmp_path / "npz" / "samples.npz")["images"]
    assert arr.dtype == np.uint8 and arr.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(arr[7], np.asarray(Image.open(files[7])))


def test_samples_refuses_a_non_empty_folder_and_bad_targets(tmp_path):
    run_dir = tmp_path / "run"
    make_run_folder(run_dir, [100])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    res = run("samples", run_dir, "--num", 4, "--out", tmp_path / "full", "--no-progress")
    assert res.exit_code != 0 and "exists and is not an empty folder" in res.stderr
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    assert "no such file" in run("samples", tmp_path / "nope", "--out", tmp_path / "o").stderr
    assert (
        "'--num': 0 is not in the range x>=1"
        in run("samples", run_dir, "--num", 0, "--out", tmp_path / "o").stderr
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# --- prepare: everything a compute node without internet needs --------------------------------


def test_prepare_offline_names_what_it_could_not_get(tmp_path, monkeypatch):
    import urllib.error

    import dcgan_mn.data

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DCGAN_MN_INCEPTION_WEIGHTS", raising=False)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    res = run(
        *["prepare", "--data-root", tmp_path / "data", "--cache-dir", tmp_path / "cache"],
        "--no-progress",
    )
    assert res.exit_code == 1
    assert (
        "FAILED  dataset cifar10: --data-root" in res.stdout
        and "cifar-10-python.tar.gz" in res.stdout
    )
    assert "FAILED  FID Inception weights" in res.stdout and "pt_inception-2015-12-05" in res.stdout
    assert (
        "could not get: dataset cifar10, FID Inception weights, reference statistics cifar10-train"
        in res.stderr
    )
    assert dcgan_mn.data.CIFAR10_FOLDER not in {p.name for p in (tmp_path / "data").glob("*")}


def test_prepare_fetches_and_caches_then_points_a_node_at_it(
    tiny_features, fid_weights_file, tmp_path, modes_cache
):
    from conftest import write_fake_cifar10

    data = write_fake_cifar10(tmp_path / "data")
    res = run(
        *["prepare", "--data-root", data, "--cache-dir", tmp_path / "cache"],
        *["--inception-weights", fid_weights_file],
        *"--dims 64 --device cpu --no-progress".split(),
    )
    assert res.exit_code == 0, res.output
    assert "ok      dataset cifar10" in res.stdout and "ok      FID Inception weights" in res.stdout
    assert "ok      reference statistics cifar10-train" in res.stdout and "FAILED" not in res.stdout
    assert len(list((tmp_path / "cache" / "ref_stats").glob("*.npz"))) == 1
    assert f"export DCGAN_MN_CACHE_DIR={tmp_path / 'cache'}" in res.stdout
    assert f"export DCGAN_MN_INCEPTION_WEIGHTS={fid_weights_file}" in res.stdout
    # A stacked dataset without Inception: its mode classifier (here: already in the cache).
    res = run(
        *"prepare --dataset stacked-digits --no-inception".split(),
        *["--cache-dir", modes_cache, "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    assert "ok      dataset stacked-digits: scikit-learn's bundled digits" in res.stdout
    assert (
        "ok      mode classifier stacked-digits" in res.stdout and "held-out accuracy" in res.stdout
    )
