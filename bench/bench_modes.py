#!/usr/bin/env python
"""What the mode metrics cost: evaluation vs training between two evaluations, and classifier
training time.

Measured in one process on this machine, in this order:

* ``train_iter_s``: one training iteration of the default model (MN in layers 0,1, K = 3,
  batch 64, ngf = ndf = 64) on stacked-digits, the loop's own training clock over ``--iters``
  iterations after a warm-up (``dcgan_mn.training.train``);
* ``mode_eval_s``: one evaluation of the mode metrics on ``--mode-samples`` (default 26,000,
  PacGAN's) generated images: generation at batch 64 in batch mode + the classifier + scoring
  (``Evaluator`` with the ``ModeMetrics`` family alone), median of ``--reps``;
* ``ratio_eval_to_training``: mode_eval_s / (train_iter_s * --fid-every), the share of the
  training time between two default evaluations (2,000 iterations) that evaluation adds;
  target < 0.20;
* ``classifier_train_s``: training the stacked-digits classifier from scratch (target < 60 s);
  ``mnist_classifier_train_s``: the MNIST recipe (3 epochs over 60,000 digits) on random digits
  of MNIST's size (MNIST itself cannot be downloaded here; the time does not depend on the
  pixels), target < 300 s.

    .venv/bin/python bench/bench_modes.py [--iters 30 --reps 3 --skip-mnist]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mode-samples", type=int, default=26_000)
    ap.add_argument("--fid-every", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--skip-mnist", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dcgan_mn.checkpoint import load_generator
    from dcgan_mn.runfolder import RunFolder
    from dcgan_mn.config import TrainConfig
    from dcgan_mn.metrics import Evaluator
    from dcgan_mn.metrics import classifier as CL
    from dcgan_mn.metrics.modes import ModeMetrics
    from dcgan_mn.training import train

    tmp = Path(tempfile.mkdtemp(prefix="bench_modes_"))
    out: dict = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())
        and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }

    # Classifier training from scratch (an empty cache).
    t0 = time.perf_counter()
    clf = CL.load_mode_classifier("stacked-digits", cache_dir=tmp / "cache")
    out["classifier_train_s"] = round(time.perf_counter() - t0, 2)
    out["classifier_accuracy"] = clf.accuracy

    # Training iterations of the default model on stacked-digits.
    def run(name: str, iters: int):
        cfg = TrainConfig(
            dataset="stacked-digits",
            iters=iters,
            fid_every=0,
            sample_every=0,
            ckpt_every=0,
            log_every=10,
            device="cpu",
            out=str(tmp / "runs"),
            run_name=name,
        )
        return train(cfg, progress=False)

    warm = run("warm", 5)
    timed = run("timed", args.iters + 5)
    out["train_iter_s"] = round((timed.train_seconds - warm.train_seconds) / args.iters, 4)

    # Mode evaluation of that generator on --mode-samples samples.
    gen, cfg, _ = load_generator(RunFolder(timed.run_dir).snapshot_file(timed.iteration), "cpu")
    ev = Evaluator(families=[ModeMetrics(clf, num_samples=args.mode_samples)])
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        result = ev(gen, sample_mode="batch", batch_size=64)
        times.append(time.perf_counter() - t0)
    out["mode_samples"] = args.mode_samples
    out["mode_eval_s"] = round(statistics.median(times), 2)
    out["mode_eval_s_all"] = [round(t, 2) for t in times]
    out["modes_of_untrained_generator"] = result["modes"]
    out["fid_every"] = args.fid_every
    out["ratio_eval_to_training"] = round(
        out["mode_eval_s"] / (out["train_iter_s"] * args.fid_every), 4
    )

    if not args.skip_mnist:
        g = torch.Generator().manual_seed(0)
        digits = torch.randint(0, 256, (60_000, 32, 32), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (60_000,), generator=g)
        t0 = time.perf_counter()
        CL.train_digit_net(digits, labels, epochs=CL.DEFAULT_EPOCHS["stacked-mnist"])
        out["mnist_classifier_train_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
