#!/usr/bin/env python
"""Training throughput (images/s): our loop vs a loop in the style of pytorch/examples' DCGAN.

Both train the same all-BatchNorm DCGAN (dcgan_mn.models, ngf = ndf = 64) at the same batch
size on the same data: a small CIFAR-10 written in the real python-pickle format into a temporary
folder (5 x --images-per-batch images). In the same process, repetitions interleaved
(A B C D A B C D ...), medians reported:

* ``baseline_workersN``: torchvision's CIFAR10 dataset object over those pickles, a DataLoader
  (shuffle, N worker processes, the example's default is 2) with per-image
  Resize/ToTensor/Normalize, D ending in a sigmoid with BCELoss, three ``.item()`` reads and a
  print per iteration, D and G gradients for every backward pass;
* ``ours_fp32``: ``dcgan_mn.training.train`` with ``--mn-layers none`` (logging every 10
  iterations, TensorBoard, progress bar on; its ``train_seconds``);
* ``ours_bf16_channels_last``: the same with ``--amp bf16 --channels-last``;
* ``ours_mn_default``: our default config (MN in layers 0,1, K = 3), for reference.

Timing of the baseline starts once its first batch is ready (worker start-up excluded); ours
is the loop's own training clock (set-up, final checkpoint excluded). Prints one JSON object.

    .venv/bin/python bench/bench_train.py [--iters 30 --reps 5]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

# the suite's real-format writers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from formats import write_fake_cifar10  # noqa: E402


# ---- the baseline: pytorch/examples/dcgan's loop, on our architecture ----------------------


def baseline_images_per_s(
    data_root: Path, iters: int, batch_size: int, workers: int, seed: int
) -> float:
    import torchvision.datasets as dset
    import torchvision.datasets.cifar
    import torchvision.transforms as transforms

    from dcgan_mn.models import Discriminator, Generator

    # Our files are in the real format but are not the real files: skip torchvision's MD5 check.
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    torch.manual_seed(seed)
    dataset = dset.CIFAR10(
        root=str(data_root),
        train=True,
        download=False,
        transform=transforms.Compose(
            [
                transforms.Resize(32),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        ),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    device = torch.device("cpu")
    netG = Generator(z_dim=100, ngf=64, mn_layers="none").to(device)
    # the example's D ends in a sigmoid
    netD = nn.Sequential(Discriminator(64), nn.Sigmoid()).to(device)
    criterion = nn.BCELoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    sink = io.StringIO()  # the example prints a line per iteration

    batches = iter(loader)
    data = next(batches)  # worker start-up is not timed
    start = time.perf_counter()
    for i in range(iters):
        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        real_cpu = data[0].to(device)
        b_size = real_cpu.size(0)
        label = torch.full((b_size,), 1.0, dtype=real_cpu.dtype, device=device)
        output = netD(real_cpu)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()
        noise = torch.randn(b_size, 100, device=device)
        fake = netG(noise)
        label.fill_(0.0)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        optimizerD.step()
        # (2) Update G: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(1.0)
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        optimizerG.step()
        print(
            f"[{i}/{iters}] Loss_D: {errD.item():.4f} Loss_G: {errG.item():.4f} D(x): {D_x:.4f} "
            f"D(G(z)): {D_G_z1:.4f} / {D_G_z2:.4f}",
            file=sink,
        )
        if i + 1 < iters:
            try:
                data = next(batches)
            except StopIteration:  # a new epoch, as the example's outer loop would start
                batches = iter(loader)
                data = next(batches)
    seconds = time.perf_counter() - start
    return iters * batch_size / seconds


# ---- ours: the real training function ------------------------------------------------------


def ours_images_per_s(
    images: torch.Tensor,
    out: Path,
    iters: int,
    batch_size: int,
    seed: int,
    progress: bool,
    **overrides,
) -> float:
    from dcgan_mn.config import TrainConfig
    from dcgan_mn.training import train

    cfg = TrainConfig(
        iters=iters,
        batch_size=batch_size,
        seed=seed,
        device="cpu",
        out=str(out),
        log_every=10,
        sample_every=0,
        fid_every=0,
        ckpt_every=0,
        **overrides,
    )
    result = train(cfg, images=images, progress=progress)
    return result.images_seen / result.train_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=30, help="iterations per measurement")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--images-per-batch", type=int, default=1000, help="images per fake CIFAR pickle"
    )
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[2, 0],
        help="baseline DataLoader worker counts to measure (pytorch/examples default: 2)",
    )
    ap.add_argument("--progress", action="store_true", help="show our progress bar (stderr)")
    args = ap.parse_args()

    from dcgan_mn.data import load_cifar10
    from dcgan_mn.device import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    skipped = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = write_fake_cifar10(tmp / "data", args.images_per_batch)
        images = load_cifar10(data_root, "train", download=False)  # uint8 [N, 3, 32, 32]
        arms = {
            f"baseline_workers{w}": (
                lambda s, w=w: baseline_images_per_s(data_root, args.iters, args.batch_size, w, s)
            )
            for w in args.workers
        }
        ours = {
            "ours_fp32": dict(mn_layers="none"),
            "ours_bf16_channels_last": dict(mn_layers="none", amp="bf16", channels_last=True),
            "ours_mn_default": dict(),
        }
        if not native_bf16:  # emulated bf16 is ~20x slower: measuring it says nothing about us
            del ours["ours_bf16_channels_last"]
            skipped["ours_bf16_channels_last"] = (
                f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16"
            )
        for name, kw in ours.items():
            arms[name] = lambda s, kw=kw: ours_images_per_s(
                images, tmp / f"runs-{s}", args.iters, args.batch_size, 0, args.progress, **kw
            )
        for name, fn in arms.items():  # warm-up: allocator, oneDNN primitives, worker imports
            fn(-1)
        samples = {name: [] for name in arms}
        for rep in range(args.reps):
            for name, fn in arms.items():
                samples[name].append(fn(rep))
                print(f"rep {rep} {name}: {samples[name][-1]:.1f} images/s", file=sys.stderr)

    med = {name: statistics.median(v) for name, v in samples.items()}
    baselines = {n: v for n, v in med.items() if n.startswith("baseline")}
    best_baseline = max(baselines, key=baselines.get)
    default_baseline = "baseline_workers2" if "baseline_workers2" in baselines else best_baseline

    def ratio(a, b):
        return round(med[a] / med[b], 3) if a in med and b in med else None

    report = {
        "benchmark": "training images/s, all-BN DCGAN ngf=ndf=64, CPU",
        "iters": args.iters,
        "reps": args.reps,
        "batch_size": args.batch_size,
        "dataset_images": 5 * args.images_per_batch,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16,
        "skipped": skipped,
        "images_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "images_per_s_all": {k: [round(x, 1) for x in v] for k, v in samples.items()},
        "baseline": default_baseline,
        "ratio_fp32_vs_baseline": ratio("ours_fp32", default_baseline),
        "ratio_bf16_channels_last_vs_baseline": ratio("ours_bf16_channels_last", default_baseline),
        "best_baseline": best_baseline,
        "ratio_fp32_vs_best_baseline": ratio("ours_fp32", best_baseline),
        "ratio_bf16_channels_last_vs_best_baseline": ratio(
            "ours_bf16_channels_last", best_baseline
        ),
        "ratio_mn_default_vs_ours_fp32": ratio("ours_mn_default", "ours_fp32"),
        "targets": {"fp32_vs_baseline": 1.0, "bf16_channels_last_vs_baseline": 1.4},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
