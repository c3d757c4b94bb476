"""Synchronized norms on 2 gloo ranks equal single-process norms on the concatenated batch.

One spawn of two CPU processes runs every case (a file:// rendezvous in a fresh temporary
directory, so parallel test runs never share a port); the parent computes the single-process
reference and compares.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dcgan_mn.models import Generator
from dcgan_mn.norms import MixtureNorm2d
from dcgan_mn.sync import (
    PortableSyncBatchNorm,
    SyncMixtureNorm2d,
    convert_sync_norms,
    unsynchronized,
)

WORLD = 2
N_PER_RANK = 4
C, H, W = 5, 4, 4
STEPS = 3
F64 = torch.float64

# name -> (kind, K, fit_points): fit_points >= every point of the global batch makes the fitting
# subset "all points in order", identical for the synchronized and the single-process layer.
CASES = {"mn_k1": ("mn", 1, 4096), "mn_k3": ("mn", 3, 4096), "bn": ("bn", None, None)}


def make_norm(case: str) -> nn.Module:
    kind, k, fit_points = CASES[case]
    if kind == "bn":
        m = nn.BatchNorm2d(C, momentum=0.3)
    else:
        m = MixtureNorm2d(C, num_components=k, momentum=0.3, fit_points=fit_points)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.weight.copy_(torch.rand(C, generator=g) + 0.5)
        m.bias.copy_(torch.randn(C, generator=g))
    return m.double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global input and output-gradient for a step: [WORLD * N_PER_RANK, C, H, W] each."""
    g = torch.Generator().manual_seed(100 + step)
    n = WORLD * N_PER_RANK
    modes = torch.randn(3, C, generator=g, dtype=F64) * 3
    which = torch.randint(0, 3, (n, H, W), generator=g)
    x = torch.randn(n, C, H, W, generator=g, dtype=F64) + modes[which].permute(0, 3, 1, 2)
    return x, torch.randn(n, C, H, W, generator=g, dtype=F64)


def run_norm(module: nn.Module, rank: int | None) -> dict:
    """A few training steps then an eval pass; rank None = the whole batch in one process."""
    out = {"y": [], "x_grad": [], "w_grad": [], "b_grad": [], "buffers": []}
    rows = slice(None) if rank is None else slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    for step in range(STEPS):
        x, g = batch(step)
        x = x[rows].clone().requires_grad_()
        module.zero_grad()
        torch.manual_seed(1000 + step)  # the mixture is fitted with rank 0's (= this) RNG
        y = module(x)
        y.backward(g[rows])
        out["y"].append(y.detach())
        out["x_grad"].append(x.grad)
        out["w_grad"].append(module.weight.grad.clone())
        out["b_grad"].append(module.bias.grad.clone())
        out["buffers"].append({k: v.clone() for k, v in module.state_dict().items()})
    module.eval()
    out["eval"] = module(batch(STEPS)[0][rows])
    return out


def run_generator(rank: int | None) -> dict:
    """Two SGD steps of a tiny generator (MN in layers 0 and 1, BN in layer 2); under DDP when
    rank is not None. DDP averages gradients over ranks, so each rank's loss is scaled by WORLD."""
    torch.manual_seed(0)
    g = Generator(z_dim=8, ngf=2, mn_layers="0,1", num_components=3).double()
    if rank is not None:
        g = nn.parallel.DistributedDataParallel(convert_sync_norms(g))
    opt = torch.optim.SGD(g.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(7)
    n = WORLD * N_PER_RANK
    rows = slice(None) if rank is None else slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    images = []
    for step in range(2):
        z = torch.randn(n, 8, generator=gen, dtype=F64)
        target = torch.randn(n, 3, 32, 32, generator=gen, dtype=F64)
        torch.manual_seed(2000 + step)
        img = g(z[rows])
        scale = 1.0 if rank is None else WORLD
        loss = scale * (img * target[rows]).sum() / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        images.append(img.detach())
    module = g if rank is None else g.module
    params = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"images": images, "params": params}


def run_subsampled(rank: int) -> dict:
    """fit_points smaller than the batch: ranks draw random shares, yet agree on everything."""
    torch.manual_seed(rank)  # different RNG per rank, as in real training
    m = convert_sync_norms(MixtureNorm2d(C, num_components=3, fit_points=16).double())
    x, g = batch(0)
    x = x[rank * N_PER_RANK : (rank + 1) * N_PER_RANK].requires_grad_()
    y = m(x)
    y.backward(g[:N_PER_RANK])
    return {
        "y": y.detach(),
        "buffers": {k: v.clone() for k, v in m.state_dict().items()},
        "finite": bool(torch.isfinite(x.grad).all()),
    }


def run_sampling(rank: int | None) -> torch.Tensor | None:
    """Batch-mode sampling with synchronized norms is local: rank 0 samples, rank 1 does not."""
    torch.manual_seed(0)
    g = Generator(z_dim=8, ngf=2, mn_layers="0", num_components=3).double()
    if rank is not None:
        g = convert_sync_norms(g)
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.manual_seed(5)
    return g.sample(z, "batch", batch_size=4) if rank in (None, 0) else None


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            module = convert_sync_norms(make_norm(case))
            expected = PortableSyncBatchNorm if case == "bn" else SyncMixtureNorm2d
            assert type(module) is expected, type(module)
            results[case] = run_norm(module, rank)
        results["generator"] = run_generator(rank)
        results["subsampled"] = run_subsampled(rank)
        results["sampling"] = run_sampling(rank)
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sync_norm")
    ctx = mp.spawn(_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 180 s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _rows(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * N_PER_RANK : (rank + 1) * N_PER_RANK]


@pytest.mark.parametrize("case", list(CASES))
def test_sync_equals_single_process_on_concatenated_batch(ranks, case):
    single = run_norm(make_norm(case), rank=None)
    tol = {"rtol": 1e-9, "atol": 1e-10}
    for step in range(STEPS):
        for r in range(WORLD):
            got = ranks[r][case]
            torch.testing.assert_close(got["y"][step], _rows(single["y"][step], r), **tol)
            torch.testing.assert_close(got["x_grad"][step], _rows(single["x_grad"][step], r), **tol)
            for k, v in single["buffers"][step].items():  # identical on every rank
                torch.testing.assert_close(got["buffers"][step][k], v, **tol)
        # parameter gradients: each rank holds its share (DDP sums/averages them)
        for key in ("w_grad", "b_grad"):
            total = sum(ranks[r][case][key][step] for r in range(WORLD))
            torch.testing.assert_close(total, single[key][step], **tol)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][case]["eval"], _rows(single["eval"], r), **tol)


def test_ddp_generator_with_sync_norms_equals_single_process(ranks):
    single = run_generator(rank=None)
    for r in range(WORLD):
        got = ranks[r]["generator"]
        for step in range(2):
            torch.testing.assert_close(
                got["images"][step], _rows(single["images"][step], r), rtol=1e-8, atol=1e-9
            )
        for k, v in single["params"].items():
            torch.testing.assert_close(got["params"][k], v, rtol=1e-8, atol=1e-9)


def test_subsampled_fit_is_shared_by_all_ranks(ranks):
    a, b = (ranks[r]["subsampled"] for r in range(WORLD))
    assert a["finite"] and b["finite"]
    for k in a["buffers"]:
        torch.testing.assert_close(a["buffers"][k], b["buffers"][k], rtol=0, atol=0)
    assert int(a["buffers"]["num_batches_tracked"]) == 1


def test_sampling_with_sync_norms_is_local(ranks):
    assert ranks[1]["sampling"] is None
    torch.testing.assert_close(ranks[0]["sampling"], run_sampling(None), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# In-process checks (no process group)
# --------------------------------------------------------------------------------------------


def test_convert_shares_state_and_keeps_keys():
    torch.manual_seed(0)
    g = Generator(z_dim=8, ngf=4, mn_layers="0")
    params = list(g.parameters())
    keys = set(g.state_dict())
    converted = convert_sync_norms(g)
    assert [type(m) for m in converted.norm_layers] == [
        SyncMixtureNorm2d,
        PortableSyncBatchNorm,
        PortableSyncBatchNorm,
    ]
    assert all(a is b for a, b in zip(params, converted.parameters()))
    assert set(converted.state_dict()) == keys
    assert convert_sync_norms(converted) is converted  # idempotent
    assert all(a is b for a, b in zip(params, converted.parameters()))
    bn = nn.BatchNorm2d(3).eval()
    assert type(convert_sync_norms(bn)) is PortableSyncBatchNorm
    assert not convert_sync_norms(bn).training


@pytest.mark.parametrize("spec", ["none", "0,1", "all"])
def test_without_process_group_sync_norms_are_plain_norms(spec):
    torch.manual_seed(0)
    g = Generator(z_dim=8, ngf=4, mn_layers=spec)
    state = {k: v.clone() for k, v in g.state_dict().items()}
    z = torch.randn(4, 8)
    torch.manual_seed(1)
    y0 = g(z)
    after = {k: v.clone() for k, v in g.state_dict().items()}
    g.load_state_dict(state)
    g = convert_sync_norms(g)
    torch.manual_seed(1)
    torch.testing.assert_close(g(z), y0, rtol=0, atol=0)
    for k, v in g.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)


def test_unsynchronized_restores_every_layer():
    model = nn.Sequential(
        convert_sync_norms(MixtureNorm2d(3)),
        convert_sync_norms(nn.BatchNorm2d(3)),
        nn.SyncBatchNorm(3),
    )
    with pytest.raises(RuntimeError, match="boom"):
        with unsynchronized(model):
            assert not model[0].sync_enabled and not model[1].sync_enabled
            assert type(model[2]) is not nn.SyncBatchNorm
            assert isinstance(model[2], nn.SyncBatchNorm)
            y = model(torch.randn(4, 3, 2, 2))  # plain BatchNorm on CPU
            assert y.shape == (4, 3, 2, 2)
            raise RuntimeError("boom")
    assert model[0].sync_enabled and model[1].sync_enabled
    assert type(model[2]) is nn.SyncBatchNorm
