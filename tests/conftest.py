"""Shared fixtures and helpers. Training-side fixtures (tiny datasets in the real on-disk formats)
are prefixed ``train_``; other suites add theirs below with their own prefix. The training
suites' tiny runs (``tiny_cfg``, ``tiny_images``, ``FakeEvaluator``, ``state_of``,
``assert_same_tensors``) are at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dcgan_mn import checkpoint as C
from dcgan_mn.config import TrainConfig
from dcgan_mn.runfolder import RunFolder
from formats import save_random_fid_inception, write_fake_cifar10  # noqa: F401 (suites import them here)

# Flags of a tiny train.py run (8-wide networks, 8-image batches, no grids, no bars) that the
# CLI suites share; each adds what it varies (evaluation cadence, --dims, logging).
TRAIN_TINY = tuple(
    "--ngf 8 --ndf 8 --batch-size 8 --mn-fit-points 64 --device cpu --no-progress".split()
)


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


@pytest.fixture(scope="session")
def fid_weights_file(tmp_path_factory):
    """One random FID-Inception weights file shared by every test of the session."""
    return save_random_fid_inception(
        tmp_path_factory.mktemp("fid_weights") / "random_inception.pth"
    )


def assert_eval_is_per_sample(norm, x, **tol) -> None:
    """A norm layer in eval with running statistics: each sample's output is the same alone, in
    ``x`` and among other (wild) samples, and no buffer changes. ``tol``: assert_close's."""
    import torch

    norm.eval()
    buffers = {k: v.clone() for k, v in norm.state_dict().items()}
    full = norm(x)  # [N, C, H, W]
    for i in range(x.shape[0]):
        torch.testing.assert_close(norm(x[i : i + 1]), full[i : i + 1], **tol)
        other = torch.cat([x[i : i + 1], torch.randn(3, *x.shape[1:]) * 10])
        torch.testing.assert_close(norm(other)[:1], full[i : i + 1], **tol)
    for k, v in norm.state_dict().items():  # eval never touches buffers
        assert torch.equal(v, buffers[k]), k


def load_script(filename: str, attribute: str):
    """The click command ``attribute`` of a repo-root script (train.py, evaluate.py), loaded by
    file path: the scripts are not part of the installed package."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / filename
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attribute)


def invoker(command):
    """``run(*args)`` for a click command: its CliRunner result, every argument made a string."""
    from click.testing import CliRunner

    def run(*args):
        return CliRunner().invoke(command, [str(a) for a in args])

    return run


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


# ---- Slurm (the one-node cluster of .ci/slurm-up) ---------------------------------------------

SLURM_NOT_UP = "Slurm is not up: run `bash .ci/slurm-up` (as root) to bring up the one-node cluster"


def slurm_answers() -> bool:
    import shutil
    import subprocess

    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        r = subprocess.run(
            ["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=15
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real one-node Slurm: skipped with one line where it is not up, but a failure under CI
    (CI=true), where .ci/run brings it up before the tests."""
    import os

    if not slurm_answers():
        if os.environ.get("CI") == "true":
            pytest.fail(SLURM_NOT_UP, pytrace=False)
        pytest.skip(SLURM_NOT_UP)


# ---- the training suites' tiny runs -----------------------------------------------------------


def tiny_images(n=64, seed=0):
    """``n`` random uint8 CIFAR-shaped images, [n, 3, 32, 32], the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def tiny_cfg(tmp_path, **kw):
    """The TrainConfig of a tiny CPU run under ``tmp_path``/runs (TRAIN_TINY's networks and
    batches; no evaluation, grids or checkpoints unless ``kw`` asks): each test adds what it varies."""
    base = dict(
        ngf=8,
        ndf=8,
        batch_size=8,
        iters=6,
        log_every=2,
        sample_every=0,
        ckpt_every=0,
        fid_every=0,
        device="cpu",
        out=str(tmp_path / "runs"),
        run_name="run",
        mn_fit_points=64,
    )
    base.update(kw)
    return TrainConfig(**base)


def state_of(run_dir):
    """Everything a run's newest checkpoint holds that must match bitwise."""
    p = C.load_checkpoint(RunFolder(run_dir).latest_checkpoint())
    return p


def assert_same_tensors(a, b, path="state"):
    """``a`` and ``b`` (nested dicts, lists, tensors, plain values) are equal, tensors bitwise;
    a failure names the path of the first difference."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


class FakeEvaluator:
    """Deterministic stand-in for the FID evaluator: FID from a fixed table, plus a value that
    depends on G's weights so a resumed run is checked too; draws random numbers on purpose
    (training must shield its RNG from the evaluator)."""

    def __init__(self, fids, sleep_s=0.0):
        self.fids = list(fids)
        self.calls = []
        self.sleep_s = sleep_s

    def __call__(self, generator, *, sample_mode, batch_size):
        torch.randn(100)  # must not change training's random stream
        time.sleep(self.sleep_s)
        checksum = float(sum(p.detach().double().sum() for p in generator.parameters()))
        self.calls.append((sample_mode, batch_size))
        return {
            "fid": self.fids[len(self.calls) - 1],
            "kid": 0.5,
            "num_samples": 10_000,
            "sample_mode": sample_mode,
            "weights_checksum": checksum,
        }


# ---- hand-built run folders (compare, re-scoring, sweep reports) ------------------------------


def write_run(root, name, rows, config=None, seed_rows=()) -> Path:
    """A run folder ``root/name`` as training leaves it, from given numbers: ``config.json``
    (``config``, default seed 0 in batch mode), ``metrics.jsonl`` (``rows``) and, when given,
    ``eval_seeds.jsonl`` (``seed_rows``); returns its path."""
    run = Path(root) / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config or {"seed": 0, "sample_mode": "batch"}))
    for file, lines in (("metrics.jsonl", rows), (RunFolder.EVAL_SEEDS, seed_rows)):
        if lines:
            (run / file).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run
