#!/usr/bin/env python
"""Chaos test of resume: SIGKILL a training run at random moments, resume it, compare.

One small stacked-digits run (MN in layers 0,1; mode metrics every --eval-every iterations;
a checkpoint every --ckpt-every) is started with ``train.py --run-name chaos
--resume-if-exists`` and killed with SIGKILL after a random delay (seeded), --kills times;
each kill can land anywhere: during start-up, an iteration, an evaluation or a checkpoint
write. After the last kill the same command runs to the end. Then:

* the final checkpoint must be bitwise identical to an uninterrupted run's (every tensor of
  G, D, both optimizers, the RNG states, the data order);
* every checkpoint left on disk must load with ``weights_only=True``;
* ``metrics.jsonl`` must hold each evaluated iteration exactly once.

Prints JSON (kills, how many landed after the first checkpoint, tensors compared, tensors
that differ: 0) and exits 1 when a check fails.

    .venv/bin/python bench/chaos_resume.py [--kills 10 --iters 400 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_command(out: Path, name: str, iters: int, eval_every: int, ckpt_every: int) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *"--dataset stacked-digits --stack-size 256 --ngf 8 --ndf 8 --batch-size 16 --mn-fit-points 64 --iters".split(),
        str(iters),
        "--fid-every",
        str(eval_every),
        "--mode-samples",
        "64",
        "--no-inception-metrics",
        "--ckpt-every",
        str(ckpt_every),
        "--sample-every",
        str(eval_every),
        *"--log-every 5 --device cpu --no-progress --out".split(),
        str(out),
        "--run-name",
        name,
        "--resume-if-exists",
    ]


def tensors(obj, prefix=""):
    """(path, tensor) for every tensor in a nested checkpoint dict."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def run_chaos(
    kills: int,
    iters: int,
    seed: int,
    out: Path,
    eval_every: int = 20,
    ckpt_every: int = 15,
    min_delay: float = 2.0,
    max_delay: float = 9.0,
    env=None,
) -> dict:
    import torch

    from dcgan_mn.checkpoint import load_checkpoint
    from dcgan_mn.runfolder import RunFolder

    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    chaos = train_command(out, "chaos", iters, eval_every, ckpt_every)
    after_first_checkpoint = 0
    for _ in range(kills):
        proc = subprocess.Popen(
            chaos, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(min_delay, max_delay))
        if proc.poll() is None:
            had_checkpoint = bool(RunFolder(out / "chaos").checkpoints())
            proc.send_signal(signal.SIGKILL)
            after_first_checkpoint += had_checkpoint
        proc.wait()
    final = subprocess.run(chaos, env=env, capture_output=True, text=True)
    straight = subprocess.run(
        train_command(out, "straight", iters, eval_every, ckpt_every),
        env=env,
        capture_output=True,
        text=True,
    )
    report = {
        "kills": kills,
        "kills_after_first_checkpoint": after_first_checkpoint,
        "iters": iters,
        "final_exit": final.returncode,
        "straight_exit": straight.returncode,
    }
    if final.returncode or straight.returncode:
        report["error"] = (final.stderr or straight.stderr)[-2000:]
        return report
    a = load_checkpoint(RunFolder(out / "chaos").checkpoints()[-1][1])
    b = load_checkpoint(RunFolder(out / "straight").checkpoints()[-1][1])
    ta, tb = (
        dict(
            tensors(
                {k: a[k] for k in ("generator", "discriminator", "opt_g", "opt_d", "rng", "data")}
            )
        ),
        dict(
            tensors(
                {k: b[k] for k in ("generator", "discriminator", "opt_g", "opt_d", "rng", "data")}
            )
        ),
    )
    differ = sorted(
        k
        for k in ta.keys() | tb.keys()
        if k not in ta or k not in tb or not torch.equal(ta[k], tb[k])
    )
    loads = 0
    for _, path in RunFolder(out / "chaos").checkpoints():
        torch.load(path, weights_only=True)
        loads += 1
    rows = [
        json.loads(x)["iteration"]
        for x in RunFolder(out / "chaos").metrics_file.read_text().splitlines()
    ]
    expected = sorted({*range(eval_every, iters + 1, eval_every), iters})
    report.update(
        tensors_compared=len(ta),
        tensors_differing=len(differ),
        differing=differ[:10],
        checkpoints_loaded=loads,
        metrics_rows=len(rows),
        metrics_rows_expected=len(expected),
        metrics_each_iteration_once=rows == expected,
        final_iteration=a["iteration"],
    )
    return report


def passed(report: dict) -> bool:
    return (
        report.get("tensors_differing") == 0
        and report.get("metrics_each_iteration_once") is True
        and report.get("final_iteration") == report["iters"]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos_") as tmp:
        t0 = time.perf_counter()
        report = run_chaos(args.kills, args.iters, args.seed, Path(tmp))
        report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    sys.exit(0 if passed(report) else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
