"""Kernel launches and host synchronisations of BN and MN, the GPU's cost model, counted on CPU.

On a GPU at batch 64 a DCGAN step is bound by kernel-launch latency, so we count what a GPU
would launch (``dcgan_mn.kernels.count_ops``: the outermost aten ops that do work; views,
metadata and allocations excluded; fused kernels of compiled code counted one each) and every
op that makes the host wait for the device. Three parts, each with ratios to BatchNorm:

* ``layers``: one norm layer, training forward + backward (the fit and the running-statistics
  update included) at the generator's three shapes: nn.BatchNorm2d, MN K=1, MN K=3 (and any
  ``--components``), eager.
* ``step``: a whole training iteration (``dcgan_mn.step.TrainStep``: G and D forward and
  backward, both Adam updates) with MN in no layer, layers 0,1, and all, eager; and its
  forward and backward passes alone (``passes_only``), whose host syncs are ours (the step's
  include Adam reading its CPU-resident step counters, which involves no device).
* ``compiled`` (``--compiled``): the same layers and steps under ``torch.compile(fullgraph=True)``
  with TorchInductor's C++ kernels profiled (``cpp.enable_kernel_profile``); on a GPU the
  Triton kernels of the same graph. Takes a few minutes on 2 CPU cores (compilation).

    python bench/bench_kernels.py --compiled
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform

import torch
from torch import nn

from dcgan_mn.kernels import count_ops
from dcgan_mn.models import Discriminator, Generator
from dcgan_mn.norms import MixtureNorm2d, make_norm2d
from dcgan_mn.step import TrainStep, compile_step_config
from dcgan_mn.device import cpu_has_native_bf16

LAYER_SHAPES = [(64, 512, 4, 4), (64, 256, 8, 8), (64, 128, 16, 16)]
# Generator norms per layer (0 nearest z): BN, MN in 0,1 or all, and MN's relatives in 0,1.
STEP_CONFIGS = {
    "bn": ("bn", "bn", "bn"),
    "mn01": ("mn", "mn", "bn"),
    "mn_all": ("mn", "mn", "mn"),
    "mode01": ("mode", "mode", "bn"),
    "group01": ("group", "group", "bn"),
    "none01": ("none", "none", "bn"),
}
# MN's switches other than the defaults, counted beside them.
VARIANTS = {
    "em": dict(estimator="em"),
    "no_posterior_grad": dict(posterior_grad=False),
    "no_lambda_scale": dict(lambda_scale=False),
    "point_channel": dict(point="channel"),
}
# The budget for one MN layer (training forward + backward), eager.
BUDGET = {"mn_k3": 64, "mn_k1": 16}


def layer_fn(layer: nn.Module, shape, compiled: bool):
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)

    def fwd_bwd(x):
        return torch.autograd.grad(layer(x), [x, *layer.parameters()], grad)

    if not compiled:
        return lambda: fwd_bwd(x)
    torch._dynamo.reset()  # one compiled variant at a time (fullgraph refuses recompile limits)
    fn = torch.compile(fwd_bwd, fullgraph=True)

    def run():
        with compile_step_config():  # tracing torch.autograd.grad
            return fn(x)

    return run


def step_fn(norms, batch_size: int, components: int, compiled: bool):
    torch.manual_seed(0)
    G, D = Generator(norms=norms, num_components=components), Discriminator()
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    step = TrainStep(G, D, opt_g, opt_d, autocast=contextlib.nullcontext)
    if compiled:
        torch._dynamo.reset()
        step.compile("default")
    real = torch.rand(batch_size, 3, 32, 32) * 2 - 1
    z = torch.randn(batch_size, G.z_dim)
    return lambda: step(real, z)


def passes_fn(norms, batch_size: int, components: int):
    """The iteration's forward and backward passes without the Adam updates: on a CPU, Adam's
    step counters are host tensors (read with .item(), no device involved; under --compile on
    a GPU they live on the device), so the step's own host syncs are counted here."""
    from dcgan_mn.losses import discriminator_loss, generator_loss

    torch.manual_seed(0)
    G, D = Generator(norms=norms, num_components=components), Discriminator()
    real = torch.rand(batch_size, 3, 32, 32) * 2 - 1
    z = torch.randn(batch_size, G.z_dim)

    def run():
        fake = G(z)
        loss_d = discriminator_loss(D(real), D(fake.detach()))
        torch.autograd.grad(loss_d, list(D.parameters()))
        torch.autograd.grad(generator_loss(D(fake)), list(G.parameters()))

    return run


def measure(fn, warmup: int = 2) -> dict:
    for _ in range(warmup):  # Adam's state, compilation, the permutation table
        fn()
    return count_ops(fn).to_json(top=8)


def with_ratios(rows: dict, base: str) -> dict:
    b = rows[base]["kernels"]
    for row in rows.values():
        row["ratio_to_bn"] = round(row["kernels"] / b, 2)
    return rows


def count_layers(components: list[int], compiled: bool) -> dict:
    out = {}
    for shape in LAYER_SHAPES:
        c = shape[1]
        layers = {"bn": nn.BatchNorm2d(c)}
        layers.update({f"mn_k{k}": MixtureNorm2d(c, num_components=k) for k in components})
        for name, switches in VARIANTS.items():  # the readings of issue 14, at K = 3
            layers[f"mn_k3_{name}"] = MixtureNorm2d(c, num_components=3, **switches)
        for kind in ("mode", "group", "none"):  # MN's relatives (Mode Normalization at K = 2)
            layers[kind] = make_norm2d(c, kind, 2)
        rows = {name: measure(layer_fn(layer, shape, compiled)) for name, layer in layers.items()}
        out["x".join(map(str, shape))] = with_ratios(rows, "bn")
    return out


def count_steps(batch_size: int, components: int, compiled: bool) -> dict:
    rows = {
        name: measure(step_fn(spec, batch_size, components, compiled))
        for name, spec in STEP_CONFIGS.items()
    }
    if not compiled:
        for name, spec in STEP_CONFIGS.items():
            rows[name]["passes_only"] = measure(passes_fn(spec, batch_size, components), warmup=1)
    return with_ratios(rows, "bn")


def budget_check(layers: dict) -> dict:
    """Worst layer shape against the budget, per MN variant."""
    out = {}
    for name, limit in BUDGET.items():
        counts = [rows[name]["kernels"] for rows in layers.values() if name in rows]
        if counts:
            out[name] = {"worst_kernels": max(counts), "budget": limit, "met": max(counts) <= limit}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--components", default="1,3", help="K values of the MN layers to count")
    p.add_argument("--step-components", type=int, default=3, help="K of the MN layers in the steps")
    p.add_argument(
        "--compiled", action="store_true", help="also count under torch.compile (minutes)"
    )
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    components = [int(k) for k in args.components.split(",")]
    result = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "counting": "outermost aten ops that do work (no views/metadata/allocation), fused "
        "compiled kernels one each; host syncs = item/_local_scalar_dense/nonzero/...",
        "layers": count_layers(components, compiled=False),
        "step": count_steps(args.batch_size, args.step_components, compiled=False),
    }
    result["budget_eager"] = budget_check(result["layers"])
    if args.compiled:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
        result["compiled"] = {
            "layers": count_layers(components, compiled=True),
            "step": count_steps(args.batch_size, args.step_components, compiled=True),
        }
        result["budget_compiled"] = budget_check(result["compiled"]["layers"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
