"""Collective helpers of dcgan_mn.distributed on 2 CPU processes (gloo)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan_mn import distributed


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = distributed.init_distributed(torch.device("cpu"))  # already initialised: only reads env
    rows = torch.arange(3 * (rank + 1), dtype=torch.float32).reshape(rank + 1, 3) + 100 * rank
    gathered = distributed.all_gather_rows(rows)
    total = distributed.all_reduce_sum_(torch.tensor([float(rank + 1)]))
    obj = distributed.broadcast_object({"rank": rank})
    torch.save(
        {
            "info": (info.rank, info.world_size, info.is_main),
            "gathered": gathered,
            "total": total,
            "obj": obj,
        },
        os.path.join(out_dir, f"r{rank}.pt"),
    )
    distributed.shutdown_distributed()


def test_collectives_on_two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(2)]
    expected = [torch.arange(3.0).reshape(1, 3), torch.arange(6.0).reshape(2, 3) + 100]
    for r, res in enumerate(results):
        assert res["info"] == (r, 2, r == 0)
        assert len(res["gathered"]) == 2
        for got, want in zip(res["gathered"], expected):
            torch.testing.assert_close(got, want)  # uneven row counts, rank order kept
        assert res["total"].item() == 3.0
        assert res["obj"] == {"rank": 0}  # rank 0's object everywhere


def test_single_process_is_identity(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_distributed(torch.device("cpu"))
    assert (info.world_size, info.is_main, info.enabled) == (1, True, False)
    t = torch.ones(2, 2)
    assert distributed.all_gather_rows(t)[0] is t
    assert distributed.broadcast_object("x") == "x"
    assert distributed.all_reduce_sum_(t) is t


def _max_and_objects_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # e.g. a stop signal on rank 1 only
    biggest = distributed.all_reduce_max_(torch.tensor([[0, 15][rank]]))
    objects = distributed.all_gather_objects({"rank": rank, "t": torch.full((2,), float(rank))})
    torch.save({"max": biggest, "objects": objects}, os.path.join(out_dir, f"m{rank}.pt"))
    distributed.shutdown_distributed()


def test_all_reduce_max_and_all_gather_objects():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _max_and_objects_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True
        )
        results = [torch.load(os.path.join(tmp, f"m{r}.pt")) for r in range(2)]
    for res in results:
        assert res["max"].item() == 15
        assert [o["rank"] for o in res["objects"]] == [0, 1]
        torch.testing.assert_close(res["objects"][1]["t"], torch.ones(2))
    assert distributed.all_reduce_max_(torch.tensor([3])).item() == 3  # no process group: identity
    assert distributed.all_gather_objects("x") == ["x"]
