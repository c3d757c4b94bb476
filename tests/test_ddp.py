"""train.py under torchrun: DDP on 2 CPU processes (gloo), real `torch.distributed.run` launches.

Tiny settings (ngf/ndf 8, global batch 8, a few iterations, one intra-op thread) keep each launch
at a few seconds; one module-scoped run to iteration 4 serves several tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_fake_cifar10

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
WORKER = str(REPO / "tests" / "ddp_worker.py")  # train.py with the test seams (dump, fault)
TINY = "--ngf 8 --ndf 8 --batch-size 8 --fid-every 0 --device cpu --no-progress --log-every 1 --sample-every 0".split()


def _env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def torchrun(
    *args: str, nproc: int = 2, timeout: float = 120, dump=None, fault=None
) -> subprocess.CompletedProcess:
    seams = [
        *(["--test-dump", str(dump)] if dump else []),
        *(["--test-fault", fault] if fault else []),
    ]
    cmd = [
        sys.executable,
        *f"-m torch.distributed.run --standalone --nproc_per_node {nproc}".split(),
        WORKER,
        *seams,
        *args,
    ]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TRAIN, *args], env=_env(), capture_output=True, text=True, timeout=120
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _params_equal(a: dict, b: dict, model) -> None:
    names = {n for n, _ in model.named_parameters()}
    assert names, "no parameters?"
    for n in names:
        assert torch.equal(a[n], b[n]), n


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("ddp_data"), images_per_batch=16)


@pytest.fixture(scope="module")
def run4(tmp_path_factory, data_root):
    """A 2-rank DDP run to iteration 4 (checkpoints at 2 and 4), each rank's final state dumped."""
    tmp = tmp_path_factory.mktemp("ddp_run4")
    proc = torchrun(
        *TINY,
        *["--data-root", str(data_root), "--out", str(tmp / "out")],
        *"--run-name r --iters 4 --ckpt-every 2 --keep-last 5".split(),
        dump=tmp / "dump",
    )
    _ok(proc)
    return tmp


def test_ranks_hold_identical_parameters(run4):
    from dcgan_mn.models import Discriminator, Generator

    r0, r1 = (torch.load(run4 / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["iteration"] == r1["iteration"] == 4
    _params_equal(r0["generator"], r1["generator"], Generator(ngf=8))
    _params_equal(r0["discriminator"], r1["discriminator"], Discriminator(8))
    # Rank 0's checkpoint is what rank 0 holds.
    ckpt = torch.load(run4 / "out" / "r" / "ckpt-00000004.pt", weights_only=True)
    for k, v in r0["generator"].items():
        assert torch.equal(ckpt["generator"][k], v), k


@pytest.mark.parametrize("stats", ["copy", "standing"])
def test_ranks_hold_the_same_averaged_generator(tmp_path, data_root, stats):
    """--g-ema under DDP: every rank's G_ema is the same, weights and norm statistics (copied
    from rank 0's G, or the same standing pass on every rank)."""
    proc = torchrun(
        *TINY,
        *["--data-root", str(data_root), "--out", str(tmp_path / "out")],
        *"--run-name r --iters 3 --mn-layers 0,1 --g-ema 2".split(),
        *f"--g-ema-stats {stats} --g-ema-standing-batches 2".split(),
        dump=tmp_path / "dump",
    )
    _ok(proc)
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["generator_ema"].keys() == r1["generator_ema"].keys()
    for name, value in r0["generator_ema"].items():
        assert torch.equal(value, r1["generator_ema"][name]), name
    # each rank's own G keeps the statistics of its own batches: the copy above was not trivial
    assert any(
        not torch.equal(r0["generator"][n], r1["generator"][n])
        for n in r0["generator"]
        if "running_mean" in n
    )


def test_only_rank0_writes(run4):
    assert [p.name for p in (run4 / "out").iterdir()] == ["r"]  # one run folder, one name
    run = run4 / "out" / "r"
    names = sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out"))
    assert names == [
        "ckpt-00000002.pt",
        "ckpt-00000004.pt",
        "config.json",
        "provenance.jsonl",
        "run.lock",
        "snapshots",
    ]
    events = [p for p in run.iterdir() if p.name.startswith("events.out")]
    assert len(events) == 1  # one TensorBoard writer: rank 0's
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "G-00000002.pt",
        "G-00000004.pt",
    ]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["extra"]["world_size"] == 2 and cfg["batch_size"] == 8
    ckpt = torch.load(run / "ckpt-00000004.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    # Each rank draws its own noise: their RNG states differ.
    assert not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])


def test_resume_under_ddp_is_exact(run4, tmp_path, data_root):
    straight = torchrun(
        *TINY,
        *["--data-root", str(data_root), "--out", str(tmp_path / "a")],
        *"--run-name r --iters 6 --ckpt-every 2".split(),
        dump=tmp_path / "dump_a",
    )
    _ok(straight)
    resumed_dir = tmp_path / "b" / "r"
    shutil.copytree(run4 / "out" / "r", resumed_dir)
    resumed = torchrun(
        "--resume", str(resumed_dir), "--iters", "6", "--no-progress", dump=tmp_path / "dump_b"
    )
    _ok(resumed)
    a = torch.load(tmp_path / "a" / "r" / "ckpt-00000006.pt", weights_only=True)
    b = torch.load(resumed_dir / "ckpt-00000006.pt", weights_only=True)
    for part in ("generator", "discriminator"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    torch.testing.assert_close(a["opt_g"]["state"], b["opt_g"]["state"], rtol=0, atol=0)
    for r in range(2):  # rank 1's state too (its running statistics are its own)
        da = torch.load(tmp_path / "dump_a" / f"rank{r}.pt", weights_only=True)
        db = torch.load(tmp_path / "dump_b" / f"rank{r}.pt", weights_only=True)
        for part in ("generator", "discriminator"):
            for k in da[part]:
                assert torch.equal(da[part][k], db[part][k]), (r, part, k)


def test_sync_norm_under_ddp(tmp_path, data_root):
    proc = torchrun(
        *TINY,
        *["--data-root", str(data_root), "--out", str(tmp_path / "out")],
        *"--run-name s --iters 2 --sync-norm --mn-layers 0 --mn-components 2".split(),
        dump=tmp_path / "dump",
    )
    _ok(proc)
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Synchronized norms: the statistics are the global batch's, so buffers agree too.
    for part in ("generator", "discriminator"):
        for k in r0[part]:
            torch.testing.assert_close(r0[part][k], r1[part][k], msg=f"{part} {k}")
    ckpt = torch.load(tmp_path / "out" / "s" / "ckpt-00000002.pt", weights_only=True)
    assert set(ckpt["generator"]) == set(r0["generator"])  # plain state-dict keys


@pytest.mark.parametrize("batch", [9, 3])
def test_batch_not_divisible_is_refused(tmp_path, data_root, batch):
    out = tmp_path / "out"
    proc = torchrun(
        *f"--ngf 8 --ndf 8 --batch-size {batch} --fid-every 0 --device cpu".split(),
        *["--data-root", str(data_root), "--out", str(out)],
    )
    assert proc.returncode != 0
    assert f"--batch-size {batch}: not divisible by the world size 2" in proc.stderr
    assert not out.exists()


def test_resume_with_another_world_size_is_refused(run4, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(run4 / "out" / "r", run)
    before = sorted(p.name for p in run.iterdir())
    proc = single("--resume", str(run), "--iters", "6", "--no-progress")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "world size" in ln]
    assert len(lines) == 1 and "world size 2" in lines[0] and "--nproc_per_node 2" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == before


def test_dead_rank_fails_clearly_and_keeps_the_checkpoint(tmp_path, data_root):
    out = tmp_path / "out"
    proc = torchrun(
        *TINY,
        *["--data-root", str(data_root), "--out", str(out)],
        *"--run-name d --iters 8 --ckpt-every 2".split(),
        fault="1:3",
        timeout=90,
    )
    assert proc.returncode != 0
    assert "exitcode" in proc.stderr and "3" in proc.stderr  # torchrun's failure report
    ckpts = sorted((out / "d").glob("ckpt-*.pt"))
    assert ckpts and ckpts[-1].name == "ckpt-00000002.pt"
    payload = torch.load(ckpts[-1], weights_only=True)
    assert payload["iteration"] == 2 and payload["world_size"] == 2
    assert not list((out / "d").glob(".*.tmp"))  # no half-written file left behind


@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_signal_to_torchrun_stops_all_ranks_at_one_iteration(tmp_path, data_root, sig):
    import signal
    import time

    run = tmp_path / "out" / "s"
    cmd = [
        sys.executable,
        *"-m torch.distributed.run --standalone --nproc_per_node 2".split(),
        WORKER,
        *["--test-dump", str(tmp_path / "dump")],
        *TINY,
        *["--data-root", str(data_root), "--out", str(tmp_path / "out")],
        *"--run-name s --iters 1000000 --ckpt-every 0".split(),
    ]
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (run.is_dir() and any(run.glob("events.out*"))):
        time.sleep(0.2)
    time.sleep(1.0)  # some iterations in
    proc.send_signal(getattr(signal, sig))  # torchrun forwards it to both workers
    _, err = proc.communicate(timeout=60)
    ckpts = sorted(run.glob("ckpt-*.pt"))
    assert len(ckpts) == 1, err[-3000:]
    payload = torch.load(ckpts[0], weights_only=True)
    dumps = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert payload["iteration"] > 0
    assert [d["iteration"] for d in dumps] == [payload["iteration"]] * 2  # the same iteration
    assert f"{sig}: stopped at iteration {payload['iteration']}" in err


# ---- train() itself on 2 spawned ranks, with an evaluator that needs every rank ----


class _CollectiveEvaluator:
    """Stands in for metrics.Evaluator: a collective (like its feature gather) plus a G sample,
    so a rank that skipped a call, or called it at another iteration, would hang or differ."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, generator, *, sample_mode, batch_size):
        import torch.distributed as dist

        assert not isinstance(generator, torch.nn.parallel.DistributedDataParallel)
        z = torch.randn(batch_size, generator.z_dim)  # uneven use of G across ranks is fine
        generator.sample(
            z[: batch_size // (dist.get_rank() + 1)], mode=sample_mode, batch_size=batch_size
        )
        total = torch.tensor([float(len(self.calls) + 1)])
        dist.all_reduce(total)
        self.calls.append(total.item())
        return {"fid": 10.0 - len(self.calls), "num_samples": 100}


def _train_worker(rank: int, init_file: str, out: str, result_dir: str) -> None:
    import torch.distributed as dist

    from dcgan_mn.config import TrainConfig
    from dcgan_mn.training import train

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = TrainConfig(
        ngf=8,
        ndf=8,
        batch_size=8,
        iters=4,
        log_every=2,
        sample_every=2,
        ckpt_every=0,
        fid_every=2,
        device="cpu",
        out=out,
        run_name="e",
        mn_layers=(0,),
        mn_components=2,
        mn_fit_points=32,
        sync_norm=True,
    )
    images = torch.randint(
        0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    evaluator = _CollectiveEvaluator()
    result = train(cfg, evaluator=evaluator, images=images, progress=False)
    torch.save(
        {"calls": evaluator.calls, "iteration": result.iteration, "best": result.best_fid},
        os.path.join(result_dir, f"r{rank}.pt"),
    )
    dist.destroy_process_group()


def test_train_evaluates_on_every_rank_and_rank0_writes(tmp_path):
    import torch.multiprocessing as mp

    from conftest import read_tensorboard

    mp.spawn(
        _train_worker,
        args=(str(tmp_path / "init"), str(tmp_path / "out"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    assert r0["calls"] == r1["calls"] == [2.0, 4.0]  # both ranks, at iterations 2 and 4
    assert r0["best"] == r1["best"] == 8.0
    run = tmp_path / "out" / "e"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [2, 4]
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "G-00000002.pt",
        "G-00000004.pt",
    ]
    assert (run / "best.pt").exists()
    _, images, _ = read_tensorboard(run)
    assert images["samples/batch"] == [2, 4]  # rank 0's grids, G sampled without collectives
