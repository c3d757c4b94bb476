#!/usr/bin/env python
"""What the evaluation extras cost, each against its baseline measured in the same run.

* ``is_overhead``: an Inception evaluation of ``--images`` images with the Inception Score
  (features and the 1008 logits from one pass) over the same evaluation without it (features
  only); FID Inception of the real architecture with random weights (the real ones cannot be
  downloaded here; the cost does not depend on the values). Target < 1.03.
* ``export_speed``: ``evaluate.py samples``'s export (generation + PNG writing, into a fresh
  folder) of ``--export`` images against generation plus ``torchvision.utils.save_image`` per
  image; images per second, ratio >= 0.80 is the target.

Repetitions are interleaved (A, B, A, B, ...) and the median is reported.

    .venv/bin/python bench/bench_eval_extras.py [--images 100 --export 2000 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--export", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from formats import save_random_fid_inception
    from dcgan_mn import metrics as M
    from dcgan_mn.features import InceptionFeatureExtractor
    from dcgan_mn.models import Generator

    tmp = Path(tempfile.mkdtemp(prefix="bench_extras_"))
    out: dict = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }

    # ---- IS: the same evaluation with and without the logits.
    weights = save_random_fid_inception(tmp / "inception.pth")
    extractor = InceptionFeatureExtractor(2048, weights, device="cpu", progress=False)
    images = (
        torch.rand(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    ).to(torch.uint8)
    real = torch.randn(64, 2048, dtype=torch.float64)
    ref = M.ReferenceStats(
        mu=real.mean(0).numpy(),
        sigma=torch.cov(real.T).numpy(),
        key="bench",
        features=real.float().numpy(),
        meta={},
    )

    class FeaturesOnly:  # the same extractor with the Inception Score switched off
        dims, batch_size, weights_sha256, has_logits = 2048, extractor.batch_size, "x", False

        def __call__(self, x):
            return extractor(x)

    def evaluation(ex) -> float:
        ev = M.Evaluator(ex, ref, num_samples=args.images, kid_subsets=2, kid_subset_size=32)
        t0 = time.perf_counter()
        ev.score_images(iter(images.split(50)), total=args.images)
        return time.perf_counter() - t0

    evaluation(extractor)  # warm-up
    with_is, without = [], []
    for _ in range(args.reps):
        without.append(evaluation(FeaturesOnly()))
        with_is.append(evaluation(extractor))
    out["is"] = {
        "images": args.images,
        "with_is_s": statistics.median(with_is),
        "without_is_s": statistics.median(without),
        "is_overhead": statistics.median(with_is) / statistics.median(without),
    }

    # ---- Export: evaluate.py samples' writer vs save_image per image.
    from torchvision.utils import save_image

    torch.manual_seed(0)
    G = Generator()  # the default generator (MN in layers 0,1)
    batch = 64

    def export_ours(folder: Path) -> float:
        t0 = time.perf_counter()
        batches = (
            im
            for _, im in M.generated_images(
                G,
                num_samples=args.export,
                seed=0,
                sample_mode="batch",
                batch_size=batch,
                shard=False,
            )
        )
        M.write_samples(batches, folder, "png", total=args.export)
        return time.perf_counter() - t0

    def export_save_image(folder: Path) -> float:
        folder.mkdir()
        t0 = time.perf_counter()
        z = torch.randn(args.export, G.z_dim, generator=torch.Generator().manual_seed(0))
        n = 0
        for zc in z.split(batch):
            with torch.no_grad():
                fake = G.sample(zc, mode="batch", batch_size=batch)  # [64, 3, 32, 32]
            for img in fake:
                save_image(img, folder / f"{n:06d}.png", normalize=True, value_range=(-1, 1))
                n += 1
        return time.perf_counter() - t0

    ours, theirs = [], []
    for r in range(args.reps):
        theirs.append(export_save_image(tmp / f"save_image_{r}"))
        ours.append(export_ours(tmp / f"ours_{r}"))
    ips_ours, ips_theirs = (
        args.export / statistics.median(ours),
        args.export / statistics.median(theirs),
    )
    out["export"] = {
        "images": args.export,
        "ours_images_per_s": round(ips_ours, 1),
        "save_image_images_per_s": round(ips_theirs, 1),
        "export_speed": ips_ours / ips_theirs,
    }
    assert math.isfinite(out["export"]["export_speed"])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
