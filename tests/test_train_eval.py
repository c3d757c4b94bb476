"""train.py with the periodic FID evaluator wired in: the real FID Inception architecture
(random weights from a file), metrics.jsonl rows, snapshots and best.pt; and the offline error,
which must stop the run before anything is written."""

import hashlib
import json
import math
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TRAIN_TINY, invoker, load_script, read_tensorboard, write_fake_cifar10

pytestmark = pytest.mark.usefixtures("train_single_thread")


cli = load_script("train.py", "main")
TINY = [*TRAIN_TINY, "--sample-every", "0", "--dims", "64"]
run = invoker(cli)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """(data root with a tiny CIFAR-10, a 10-image PNG reference folder, output folder), with an
    empty torch hub cache and the evaluator's statistics cache under tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("DCGAN_MN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DCGAN_MN_INCEPTION_WEIGHTS", raising=False)
    ref = tmp_path / "ref"
    ref.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        img = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).save(ref / f"{i}.png")
    return write_fake_cifar10(tmp_path / "data", images_per_batch=16), ref, tmp_path / "runs"


def test_periodic_fid_rows_snapshots_and_best(env, fid_weights_file):
    data, ref, out = env
    result = run(
        *TINY,
        *["--data-root", data, "--out", out],
        *"--run-name r --iters 4 --fid-every 2 --fid-samples 8".split(),
        *["--ref", ref, "--inception-weights", fid_weights_file],
    )
    assert result.exit_code == 0, result.output
    run_dir = out / "r"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4]
    sha = hashlib.sha256(Path(fid_weights_file).read_bytes()).hexdigest()
    for r in rows:
        assert r["images_seen"] == 8 * r["iteration"]
        assert r["num_samples"] == 8 and r["sample_mode"] == "batch" and r["dims"] == 64
        assert r["weights_sha256"] == sha
        assert math.isfinite(r["fid"]) and r["fid"] > 0
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0
    # The reference key is recorded with the config; every evaluation left a snapshot.
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["extra"]["ref_key"] == rows[0]["ref_key"]
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == [
        "G-00000002.pt",
        "G-00000004.pt",
    ]
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["iteration"] == min(rows, key=lambda r: r["fid"])["iteration"]
    scalars, _, _ = read_tensorboard(run_dir)
    assert [step for step, _ in scalars["metrics/fid_8"]] == [2, 4]


def test_offline_inception_stops_before_writing(env, monkeypatch):
    data, ref, out = env
    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = run(
        *TINY,
        *["--data-root", data, "--out", out],
        *"--run-name r --iters 2 --fid-every 1 --fid-samples 4".split(),
        *["--ref", ref],
    )
    assert result.exit_code != 0
    assert "pt_inception-2015-12-05" in result.output and "--inception-weights" in result.output
    assert not (out / "r").exists()
