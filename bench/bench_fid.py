"""FID speed against pytorch-fid, measured in one run; prints one JSON object.

Two measurements:

* ``end_to_end``: FID between two folders of 32x32 PNGs, ``python evaluate.py fid A --ref B``
  (our pipeline: decode once, channels-last Inception with BatchNorm folded, large batches,
  inference mode) against ``python -m pytorch_fid A B`` (its defaults: batch 50, a DataLoader
  with per-image transforms). Both are fresh processes with the same random FID-Inception
  weights loaded from one file: ours through ``--inception-weights``, pytorch-fid's through a
  private torch hub cache holding that file under pytorch-fid's name. No statistics cache is
  used (``--no-cache``). Wall time per process, images/s = 2 * N / time, and both FIDs.
* ``frechet_distance`` at 2048-d: ``dcgan_mn.metrics.frechet_distance`` (symmetric
  eigendecompositions) against ``pytorch_fid.fid_score.calculate_frechet_distance``
  (``scipy.linalg.sqrtm``) on the same statistics: "cold" builds the reference square root
  each time, "cached" reuses it (what the periodic evaluator does).

Repetitions are interleaved (ours, theirs, theirs, ours, ...) so background load hits both;
we report medians and minima. Ratios are theirs / ours (> 1: we are faster).

    python bench/bench_fid.py --images 200 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real-format file writers the suite uses

from formats import save_random_fid_inception, write_pngs  # noqa: E402

PYTORCH_FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def end_to_end(images: int, reps: int, dims: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hub = tmp / "torch" / "hub" / "checkpoints"
        hub.mkdir(parents=True)
        weights = hub / PYTORCH_FID_WEIGHTS_NAME
        save_random_fid_inception(weights)
        a, b = tmp / "a", tmp / "b"
        write_pngs(a, images, seed=1, shift=0)
        write_pngs(b, images, seed=2, shift=30)
        env = dict(os.environ, TORCH_HOME=str(tmp / "torch"), PYTHONWARNINGS="ignore")
        py = sys.executable
        ours_cmd = [
            py,
            "evaluate.py",
            "fid",
            str(a),
            "--ref",
            str(b),
            "--dims",
            str(dims),
            "--inception-weights",
            str(weights),
            "--device",
            "cpu",
            "--no-cache",
            "--no-progress",
        ]
        theirs_cmd = [
            py,
            "-m",
            "pytorch_fid",
            str(a),
            str(b),
            "--device",
            "cpu",
            "--dims",
            str(dims),
        ]
        times = {"ours": [], "pytorch_fid": []}
        fids = {}
        for rep in range(reps):
            order = ["ours", "pytorch_fid"] if rep % 2 == 0 else ["pytorch_fid", "ours"]
            for name in order:
                if name == "ours":
                    s, out = timed(ours_cmd, env)
                    fids["ours"] = json.loads(out)["results"][0]["fid"]
                else:
                    s, out = timed(theirs_cmd, env)
                    fids["pytorch_fid"] = float(re.search(r"FID:\s+(\S+)", out).group(1))
                times[name].append(s)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "images_per_folder": images,
        "dims": dims,
        "reps": reps,
        "ours_s": {"median": round(med["ours"], 2), "min": round(min(times["ours"]), 2)},
        "pytorch_fid_s": {
            "median": round(med["pytorch_fid"], 2),
            "min": round(min(times["pytorch_fid"]), 2),
        },
        "ours_images_per_s": round(2 * images / med["ours"], 2),
        "pytorch_fid_images_per_s": round(2 * images / med["pytorch_fid"], 2),
        "speedup": round(med["pytorch_fid"] / med["ours"], 3),
        "fid_ours": fids["ours"],
        "fid_pytorch_fid": fids["pytorch_fid"],
        "fid_rel_diff": abs(fids["ours"] - fids["pytorch_fid"]) / abs(fids["pytorch_fid"]),
        "commands": {"ours": " ".join(ours_cmd[1:]), "pytorch_fid": " ".join(theirs_cmd[1:])},
    }


def frechet(dims: int, reps: int) -> dict:
    from pytorch_fid.fid_score import calculate_frechet_distance

    from dcgan_mn.metrics import FrechetReference, frechet_distance

    rng = np.random.default_rng(0)

    def stats(shift):
        # A covariance like Inception features': low-rank-ish spectrum plus a floor.
        a = rng.standard_normal((dims, dims)) * np.exp(-np.arange(dims) / (dims / 8))
        return rng.standard_normal(dims) + shift, a @ a.T / dims + 1e-3 * np.eye(dims)

    (mu1, s1), (mu2, s2) = stats(0.0), stats(0.5)
    cached_ref = FrechetReference(mu2, s2)
    cached_ref.sqrt  # built once, outside the timing
    fns = {
        "pytorch_fid": lambda: calculate_frechet_distance(mu1, s1, mu2, s2),
        "ours_cold": lambda: FrechetReference(mu2, s2).distance(mu1, s1),
        "ours_cached": lambda: cached_ref.distance(mu1, s1),
    }
    times = {k: [] for k in fns}
    values = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                values[name] = float(fn())
                times[name].append(time.perf_counter() - t0)
    assert frechet_distance(mu1, s1, mu2, s2) == values["ours_cold"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "dims": dims,
        "reps": reps,
        "pytorch_fid_ms": round(1e3 * med["pytorch_fid"], 1),
        "ours_cold_ms": round(1e3 * med["ours_cold"], 1),
        "ours_cached_ms": round(1e3 * med["ours_cached"], 1),
        "speedup_cold": round(med["pytorch_fid"] / med["ours_cold"], 2),
        "speedup_cached": round(med["pytorch_fid"] / med["ours_cached"], 2),
        "value_pytorch_fid": values["pytorch_fid"],
        "value_ours": values["ours_cold"],
        "rel_diff": abs(values["ours_cold"] - values["pytorch_fid"]) / abs(values["pytorch_fid"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="PNGs per folder")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions per tool")
    p.add_argument("--dims", type=int, default=2048)
    p.add_argument("--frechet-reps", type=int, default=3)
    p.add_argument("--skip-end-to-end", action="store_true")
    args = p.parse_args()
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "command": "python bench/bench_fid.py " + " ".join(sys.argv[1:]),
        "frechet_distance": frechet(2048, args.frechet_reps),
    }
    if not args.skip_end_to_end:
        result["end_to_end"] = end_to_end(args.images, args.reps, args.dims)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
