"""Cost of Mixture Normalization against BatchNorm, measured in one run.

Two measurements, both forward + backward, on the CPU (or --device):

* ``layers``: one norm layer alone at the three generator shapes (batch 64, ngf 64):
  [64, 512, 4, 4], [64, 256, 8, 8], [64, 128, 16, 16]; MN (K = 3, default fitting knobs),
  Mode Normalization (K = 2) and GroupNorm against nn.BatchNorm2d.
* ``step``: one full DCGAN training iteration (D step on real + detached fake, then G step;
  non-saturating BCE on logits; Adam 2e-4, betas (0.5, 0.999)) with the generator's MN layers
  set to none, (0,), (0, 1) and all, and Mode Normalization, GroupNorm or no norm in layers
  0, 1; ratios are to the all-BN step (``none``). ``none+g_ema`` and ``0,1+g_ema`` are the same
  steps with the averaged generator's update after G's (``--g-ema``; ``dcgan_mn.ema``), with a
  second ratio, ``ratio_to_without_g_ema``, to the same step without it.

Repetitions are interleaved (A B C D A B C D ...) so that load from other processes hits every
variant alike; we report medians and minima, and ratios of both. Prints one JSON object.

    python bench/bench_norm.py --reps 30 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dcgan_mn.ema import EmaSchedule, GeneratorEMA
from dcgan_mn.models import Discriminator, Generator
from dcgan_mn.norms import MixtureNorm2d, make_norm2d
from dcgan_mn.device import cpu_has_native_bf16

LAYER_SHAPES = [(64, 512, 4, 4), (64, 256, 8, 8), (64, 128, 16, 16)]
# Generator norms per layer (0 nearest z); ratios are to the all-BN step ("none": no MN layer).
STEP_CONFIGS = {
    "none": ("bn", "bn", "bn"),
    "0": ("mn", "bn", "bn"),
    "0,1": ("mn", "mn", "bn"),
    "all": ("mn", "mn", "mn"),
    "mode:0,1": ("mode", "mode", "bn"),
    "group:0,1": ("group", "group", "bn"),
    "identity:0,1": ("none", "none", "bn"),
}
G_EMA_CONFIGS = ("none", "0,1")  # also timed with the G_ema update (--g-ema)


def _summary(times_s: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(1e3 * statistics.median(times_s), 3),
        "min_ms": round(1e3 * min(times_s), 3),
    }


def _interleaved(fns: dict, reps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Time every fn ``reps`` times, round-robin, after ``warmup`` untimed rounds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - t0
            if rep >= warmup:
                times[name].append(elapsed)
    return times


def bench_layers(
    reps: int, warmup: int, device: torch.device, batch_size: int, num_components: int
) -> dict:
    out = {}
    for _, c, h, w in LAYER_SHAPES:
        shape = (batch_size, c, h, w)
        x = torch.randn(shape, device=device, requires_grad=True)
        grad = torch.randn(shape, device=device)
        layers = {
            "bn": nn.BatchNorm2d(c).to(device),
            "mn": MixtureNorm2d(c, num_components=num_components).to(device),
            "mode": make_norm2d(c, "mode", 2).to(device),  # Mode Normalization, K = 2
            "group": make_norm2d(c, "group").to(device),
        }

        def step(layer: nn.Module):
            def run():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(grad)

            return run

        times = _interleaved({k: step(m) for k, m in layers.items()}, reps, warmup, device)
        bn = _summary(times["bn"])
        row = {"bn": bn}
        for name in layers:
            if name != "bn":
                s = _summary(times[name])
                row[name] = {
                    **s,
                    "ratio_median": round(s["median_ms"] / bn["median_ms"], 3),
                    "ratio_min": round(s["min_ms"] / bn["min_ms"], 3),
                }
        out["x".join(map(str, shape))] = row
    return out


class GanStep:
    """One DCGAN iteration: D on real and detached fake, then G through the same fake."""

    def __init__(
        self,
        norms,
        batch_size: int,
        device: torch.device,
        num_components: int,
        seed: int = 0,
        g_ema: bool = False,
    ) -> None:
        torch.manual_seed(seed)
        self.g = Generator(norms=norms, num_components=num_components).to(device)
        self.d = Discriminator().to(device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.real = torch.rand(batch_size, 3, 32, 32, device=device) * 2 - 1
        self.z = torch.randn(batch_size, self.g.z_dim, device=device)
        self.ones = torch.ones(batch_size, device=device)
        self.zeros = torch.zeros(batch_size, device=device)
        # StyleGAN2-ADA's CIFAR-10 EMA (500 kimg at batch 64, ramp-up 0.05), as the experiment uses it
        self.ema = GeneratorEMA(self.g, EmaSchedule(7812.5, 0.05)) if g_ema else None
        self.iteration = 0

    def __call__(self) -> None:
        fake = self.g(self.z)
        # D step: real -> 1, fake -> 0.
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = F.binary_cross_entropy_with_logits(
            self.d(self.real), self.ones
        ) + F.binary_cross_entropy_with_logits(self.d(fake.detach()), self.zeros)
        loss_d.backward()
        self.opt_d.step()
        # G step, non-saturating: fake -> 1.
        self.opt_g.zero_grad(set_to_none=True)
        loss_g = F.binary_cross_entropy_with_logits(self.d(fake), self.ones)
        loss_g.backward()
        self.opt_g.step()
        if self.ema is not None:
            self.ema.prepare(self.iteration)
            self.ema.update()
        self.iteration += 1


def bench_step(
    reps: int, warmup: int, device: torch.device, batch_size: int, num_components: int
) -> dict:
    steps = {
        name: GanStep(norms, batch_size, device, num_components)
        for name, norms in STEP_CONFIGS.items()
    }
    steps.update(
        {
            f"{name}+g_ema": GanStep(
                STEP_CONFIGS[name], batch_size, device, num_components, g_ema=True
            )
            for name in G_EMA_CONFIGS
        }
    )
    times = _interleaved(steps, reps, warmup, device)
    base_median, base_min = statistics.median(times["none"]), min(times["none"])
    out = {
        name: {
            **_summary(t),
            "ratio_median": round(statistics.median(t) / base_median, 3),
            "ratio_min": round(min(t) / base_min, 3),
        }
        for name, t in times.items()
    }
    for name in G_EMA_CONFIGS:
        with_ema, without = times[f"{name}+g_ema"], times[name]
        out[f"{name}+g_ema"]["ratio_to_without_g_ema"] = {
            "median": round(statistics.median(with_ema) / statistics.median(without), 3),
            "min": round(min(with_ema) / min(without), 3),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-components", type=int, default=3, help="K for the MN layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=["layers", "step"], default=None, help="run one part")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "torch": torch.__version__,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "batch_size": args.batch_size,
        "num_components": args.num_components,
    }
    if args.only in (None, "layers"):
        result["layers"] = bench_layers(
            args.reps, args.warmup, device, args.batch_size, args.num_components
        )
    if args.only in (None, "step"):
        result["step"] = bench_step(
            args.reps, args.warmup, device, args.batch_size, args.num_components
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
