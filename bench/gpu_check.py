#!/usr/bin/env python
"""The first command to run on a GPU: speed, CUDA-graph capture, correctness on the device and
evaluation throughput, in one JSON object (stdout) and a short table (stderr).

    python bench/gpu_check.py                          # on a GPU: about 5-8 minutes
    python bench/gpu_check.py --device cpu --quick     # the same checks, smaller (~1 minute)

Sections of the JSON:

* ``step_time``: one training iteration (``dcgan_mn.step.TrainStep``, the capturable spelling
  training uses) for all-BN (``mn_layers=()``), MN(0,1) and MN(all), at batch 64 and 256, eager,
  ``torch.compile`` default mode and ``reduce-overhead``, fp32 and bf16 autocast. Medians of
  interleaved repetitions after a warm-up (``torch.cuda.synchronize()`` around every timed
  step), ratios to all-BN in the same group, compile time, recompilations and CUDA-graph
  recordings over the steps after warm-up, peak memory. Groups run in priority order
  (b64 fp32 first) and a group that would overrun ``--budget-s`` is skipped with a reason.
  ``mn01+g_ema`` is the MN(0,1) step with the averaged generator's update inside it
  (``--g-ema 7812.5 --g-ema-rampup 0.05``, the G-EMA experiment's; the decay changes every step
  as it ramps up), timed in the first group only, with ``ratio_to_without_g_ema`` to ``mn01``.
* ``capture``: the reduce-overhead step replays as CUDA graphs (no cudagraph skips; one step
  profiled: ``cudaGraphLaunch`` calls and kernels launched outside graphs) with MN in it, and
  is reproducible (same seed -> the same losses over 20 steps; another seed -> other losses,
  so the k-means++ draws are live inside the graph, not frozen at capture).
* ``correctness`` (each line must pass; the exit status is 1 otherwise): MN with K = 1 equals
  ``nn.BatchNorm2d`` on the device; the fused MN path equals the reference on points; 20
  training steps on the device equal 20 on the CPU from one seed; the capturable step equals
  ``backward()`` + ``Adam.step`` on the device; G_ema updated inside the compiled (on a GPU,
  CUDA-graph) step equals its closed form over G's trajectory while its decay ramps up.
* ``evaluation``: generate + Inception features (FID's pass) images/s against pytorch-fid's own
  loop on the same images, and the mode metrics' images/s.
* ``targets``: what good looks like, checked line by line (slow hardware fails a target line,
  not the exit status).

GPU-only values are ``null`` on a CPU, each with a ``<name>_reason`` (or ``reason``) string.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch._dynamo  # here, not in main(): a local import there made `torch` local to all of main

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from anywhere: the worktree's package first
    sys.path.insert(0, str(ROOT))

from dcgan_mn.device import autocast, cpu_capability, resolve_device  # noqa: E402
from dcgan_mn.ema import EmaSchedule, GeneratorEMA  # noqa: E402
from dcgan_mn.models import Discriminator, Generator  # noqa: E402
from dcgan_mn.step import TrainStep  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))  # the real-format file writers the suite uses
from formats import save_random_fid_inception  # noqa: E402

SCHEMA = "gpu_check/1"
CONFIGS = {"bn": (), "mn01": (0, 1), "mn_all": (0, 1, 2), "mn01+g_ema": (0, 1)}
# The configs that add the averaged generator's update, and the config they are timed against.
G_EMA_CONFIGS = {"mn01+g_ema": "mn01"}
G_EMA_HALF_LIFE, G_EMA_RAMPUP = 7812.5, 0.05  # the G-EMA experiment's (StyleGAN2-ADA's CIFAR-10)
MODES = ("eager", "default", "reduce-overhead")
AMPS = {"fp32": "none", "bf16": "bf16"}
PYTORCH_FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"

# Targets (what good looks like). Checked per line in "targets"; only correctness sets the exit.
TARGET_MN01_RATIO = 1.10  # MN(0,1) step / all-BN step, compile reduce-overhead, batch 64, fp32
TARGET_G_EMA_RATIO = (
    1.05  # MN(0,1) step with the G_ema update / without, b64 fp32, the fastest mode
)
TARGET_EVAL_SPEEDUP = 2.0  # our generate + features images/s over pytorch-fid's model loop's

# Correctness tolerances (stated in the JSON next to each result).
TOL_K1 = dict(rtol=1e-5, atol=1e-5)  # MN K=1 vs nn.BatchNorm2d, fp32 on the device
TOL_FUSED = 1e-3  # max |fused - reference| / max |reference|, per tensor, fp32
TOL_DEVICE_VS_CPU = 2e-3  # max |loss_device - loss_cpu| over 20 steps (losses are ~1.4)
TOL_CAPTURABLE = dict(rtol=1e-5, atol=1e-6)  # capturable vs backward() + Adam.step
TOL_G_EMA = dict(rtol=1e-5, atol=1e-6)  # G_ema in the compiled step vs its closed form


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mib(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


class CompileEvents:
    """Counts compilations and CUDA-graph recordings as they start (TorchDynamo's compile
    callbacks: a Dynamo trace, a lazily compiled backward, a cudagraph recording), with the
    ``unique_graphs`` counter as a fallback where the callbacks do not exist."""

    def __init__(self) -> None:
        self.counts = {"compiles": 0, "cudagraph_recordings": 0}
        self.available = False
        try:
            from torch._dynamo.callback import callback_handler

            callback_handler.register_start_callback(self._on_start)
            self.available = True
        except (ImportError, AttributeError):
            pass

    def _on_start(self, *args) -> None:
        trigger = getattr(args[0], "callback_trigger", None) if args else None
        name = getattr(trigger, "name", "DYNAMO")
        if name == "CUDAGRAPH_RECORDING":
            self.counts["cudagraph_recordings"] += 1
        elif name != "TRITON_AUTOTUNING":
            self.counts["compiles"] += 1

    def snapshot(self) -> tuple[int, int]:
        if self.available:
            return self.counts["compiles"], self.counts["cudagraph_recordings"]
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]), 0


def git_commit() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            return {"git_commit": commit, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "git_commit": None,
        "git_commit_reason": "not a git checkout (or git is missing)",
        "git_dirty": None,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, args) -> dict:
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": None,
        "cudnn": None,
        **cpu_capability(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **git_commit(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        reason = "CPU run: no CUDA device"
        env["cuda_reason"] = env["cudnn_reason"] = reason
    return env


def make_step(
    mn_layers,
    device: torch.device,
    *,
    amp: str = "none",
    mode: str = "eager",
    backend: str = "inductor",
    ngf: int = 64,
    ndf: int = 64,
    seed: int = 0,
    capturable: bool = True,
    models: Optional[tuple] = None,
    g_ema: Optional[EmaSchedule] = None,
) -> TrainStep:
    """A training iteration as ``training.train`` builds it (Adam 2e-4, betas (0.5, 0.999), its
    step counter on the GPU when compiled there, ``g_ema``: the averaged generator's update
    after G's), optionally compiled."""
    if models is None:
        torch.manual_seed(seed)
        G = Generator(z_dim=100, ngf=ngf, mn_layers=mn_layers, num_components=3).to(device)
        D = Discriminator(ndf).to(device)
    else:
        G, D = models
    on_gpu_counter = mode != "eager" and device.type == "cuda"
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=on_gpu_counter)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=on_gpu_counter)
    scaler = None if capturable else torch.amp.GradScaler(device.type, enabled=False)
    ema = GeneratorEMA(G, g_ema) if g_ema is not None else None
    step = TrainStep(
        G,
        D,
        opt_g,
        opt_d,
        autocast=lambda: autocast(device, amp),
        scaler=scaler,
        capturable=capturable,
        ema=ema,
    )
    if mode != "eager":
        step.compile(mode, backend=backend)
    return step


def step_batch(
    batch: int, device: torch.device, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(batch, 100, generator=g)
    return real.to(device), z.to(device)


def state_tensors(step: TrainStep) -> list[torch.Tensor]:
    """Every tensor a step reads and writes: weights, buffers, Adam's state (in a fixed order)."""
    out = []
    for model in (step.G, step.D):
        out += list(model.parameters()) + [b for b in model.buffers()]
    for opt in (step.opt_g, step.opt_d):
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


def snapshot(step: TrainStep) -> list[torch.Tensor]:
    return [t.detach().clone() for t in state_tensors(step)]


@torch.no_grad()
def restore(step: TrainStep, saved: list[torch.Tensor]) -> None:
    """Put a snapshot back in place (the same storages: compiled graphs and CUDA graphs keep
    pointing at them)."""
    for t, s in zip(state_tensors(step), saved):
        t.copy_(s)


def run_losses(step: TrainStep, data, seed: int, cudagraph: bool) -> list[tuple[float, float]]:
    """Losses of consecutive steps from ``seed`` (the MN layers' k-means++ draws)."""
    torch.manual_seed(seed)
    out = []
    for real, z in data:
        if cudagraph:
            torch.compiler.cudagraph_mark_step_begin()
        o = step(real, z)
        out.append((o.loss_d.detach().clone(), o.loss_g.detach().clone()))  # before the next replay
    return [(float(a), float(b)) for a, b in out]


# ----------------------------------------------------------------------------------------------
# Step time
# ----------------------------------------------------------------------------------------------


class Arm:
    """One timed variant: (batch, precision, mode, norm config)."""

    def __init__(self, name: str, batch: int, amp: str, mode: str, config: str) -> None:
        self.name, self.batch, self.amp, self.mode, self.config = name, batch, amp, mode, config
        self.step: Optional[TrainStep] = None
        self.data = None
        self.times: list[float] = []
        self.compile_s: Optional[float] = None
        self.warmup_s: Optional[float] = None
        self.steps_after_warmup = 0
        self.recompiles = 0
        self.recordings = 0
        self.persistent_bytes: Optional[int] = None
        self.step_peak_bytes: Optional[int] = None
        self.iteration = 0  # iterations done: the EMA schedule's clock (its decay ramps up)

    def __call__(self) -> None:
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        self.step(*self.data, self.iteration)
        self.iteration += 1


def build_and_warm(arm: Arm, device: torch.device, args, events: CompileEvents) -> None:
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        before = torch.cuda.memory_allocated(device)
    arm.step = make_step(
        CONFIGS[arm.config],
        device,
        amp=AMPS[arm.amp],
        mode=arm.mode,
        backend=args.backend,
        ngf=args.ngf,
        ndf=args.ndf,
        g_ema=EmaSchedule(G_EMA_HALF_LIFE, G_EMA_RAMPUP) if arm.config in G_EMA_CONFIGS else None,
    )
    arm.data = step_batch(arm.batch, device)
    t0 = time.perf_counter()
    arm()
    sync(device)
    arm.compile_s = round(time.perf_counter() - t0, 2) if arm.mode != "eager" else None
    # reduce-overhead: the 1st call compiles and warms up, the 2nd records, the 3rd replays.
    for _ in range(max(args.warmup, 3 if arm.mode == "reduce-overhead" else 1) - 1):
        arm()
    sync(device)
    arm.warmup_s = round(time.perf_counter() - t0, 2)
    if cuda:
        arm.persistent_bytes = torch.cuda.memory_allocated(device) - before
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        arm()
        sync(device)
        arm.step_peak_bytes = torch.cuda.max_memory_allocated(device) - start


def timed_round(arms: list[Arm], device: torch.device, events: CompileEvents, record: bool) -> None:
    for arm in arms:
        c0, r0 = events.snapshot()
        sync(device)
        t0 = time.perf_counter()
        arm()
        sync(device)
        dt = time.perf_counter() - t0
        c1, r1 = events.snapshot()
        arm.recompiles += c1 - c0
        arm.recordings += r1 - r0
        arm.steps_after_warmup += 1
        if record:
            arm.times.append(dt)


def arm_json(
    arm: Arm, base: Optional[Arm], device: torch.device, without_g_ema: Optional[Arm] = None
) -> dict:
    med = statistics.median(arm.times)
    row: dict[str, Any] = {
        "median_ms": round(1e3 * med, 3),
        "min_ms": round(1e3 * min(arm.times), 3),
        "reps": len(arm.times),
        "ratio_to_bn": round(med / statistics.median(base.times), 3)
        if base and base.times
        else None,
        **(
            {"ratio_to_without_g_ema": round(med / statistics.median(without_g_ema.times), 3)}
            if without_g_ema and without_g_ema.times
            else {}
        ),
        "compile_s": arm.compile_s,
        "warmup_s": arm.warmup_s,
        "steps_after_warmup": arm.steps_after_warmup,
        "recompiles_after_warmup": arm.recompiles if arm.mode != "eager" else 0,
        "cudagraph_recordings_after_warmup": arm.recordings
        if arm.mode == "reduce-overhead"
        else None,
    }
    if device.type == "cuda":
        row["peak_memory_mib"] = mib(arm.persistent_bytes + arm.step_peak_bytes)
        row["memory_detail_mib"] = {
            "persistent": mib(arm.persistent_bytes),
            "step_transient": mib(arm.step_peak_bytes),
        }
    else:
        row["peak_memory_mib"] = None
        row["peak_memory_mib_reason"] = "CPU run: torch.cuda.max_memory_allocated is CUDA-only"
    return row


def null_arm(reason: str) -> dict:
    return {
        "median_ms": None,
        "min_ms": None,
        "ratio_to_bn": None,
        "compile_s": None,
        "recompiles_after_warmup": None,
        "peak_memory_mib": None,
        "reason": reason,
    }


def step_time_section(
    device: torch.device, args, events: CompileEvents, t_start: float
) -> tuple[dict, dict]:
    """(the JSON section, the arms kept for the capture check)."""
    out: dict[str, Any] = {
        "what": "one TrainStep iteration (D then G update, Adam), capturable spelling; "
        f"Generator/Discriminator ngf={args.ngf}, ndf={args.ndf}, z_dim 100, K=3",
        "timing": f"median of {args.reps} interleaved repetitions after {args.warmup} warm-up steps; "
        + (
            "torch.cuda.synchronize() before and after each timed step"
            if device.type == "cuda"
            else "wall clock per step"
        ),
        "backend": args.backend,
        "recompiles_counted_over": f"every step after warm-up (at least {args.recompile_steps})",
        "memory": "peak_memory_mib = memory an arm holds after warm-up (models, Adam state, "
        "compiled/CUDA-graph pools) + the transient peak of one step",
    }
    kept: dict[str, Arm] = {}
    groups = [(b, a) for b in args.batch_sizes for a in args.amps]
    group_seconds: list[float] = []
    for gi, (batch, amp) in enumerate(groups):
        key_b = f"b{batch}"
        section = out.setdefault(key_b, {}).setdefault(amp, {})
        reason = None
        if amp == "bf16" and device.type == "cpu" and not cpu_capability()["native_bf16"]:
            reason = (
                f"this CPU ({cpu_capability()['cpu_capability']}) has no native bf16: autocast "
                f"emulates it (~20x slower than fp32); not timed"
            )
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            reason = f"{torch.cuda.get_device_name(device)} does not support bf16"
        elapsed = time.perf_counter() - t_start
        estimate = max(group_seconds) if group_seconds else 0.0
        if reason is None and gi > 0 and elapsed + estimate > args.budget_s:
            reason = (
                f"skipped: --budget-s {args.budget_s:g} s (elapsed {elapsed:.0f} s, a group took "
                f"{estimate:.0f} s); rerun with a larger --budget-s for every group"
            )
        arms: list[Arm] = []
        for mode in args.modes:
            rows = section.setdefault(mode, {})
            mode_reason = reason
            if mode_reason is None and mode == "reduce-overhead" and device.type != "cuda":
                mode_reason = (
                    "CPU run: reduce-overhead replays CUDA graphs, which need a CUDA device"
                )
            for config in CONFIGS:
                if mode_reason is None and config in G_EMA_CONFIGS and gi > 0:
                    rows[config] = null_arm(
                        f"timed in the first group only (b{args.batch_sizes[0]} "
                        f"{args.amps[0]}), to save compile time"
                    )
                elif mode_reason is None and mode != "eager" and config in args.skip_compiled:
                    rows[config] = null_arm(
                        "--quick: not compiled, to save compile time "
                        "(the full run compiles every arm)"
                    )
                elif mode_reason:
                    rows[config] = null_arm(mode_reason)
                else:
                    arms.append(Arm(f"{key_b}/{amp}/{mode}/{config}", batch, amp, mode, config))
        if not arms:
            continue
        g0 = time.perf_counter()
        for arm in arms:
            log(f"  warm-up {arm.name} ...")
            build_and_warm(arm, device, args, events)
        for rep in range(args.reps):
            timed_round(arms, device, events, record=True)
        compiled = [a for a in arms if a.mode != "eager"]
        while compiled and min(a.steps_after_warmup for a in compiled) < args.recompile_steps:
            timed_round(compiled, device, events, record=False)
        for arm in arms:
            base = next(a for a in arms if a.mode == arm.mode and a.config == "bn")
            plain = G_EMA_CONFIGS.get(arm.config)
            without = next((a for a in arms if a.mode == arm.mode and a.config == plain), None)
            section[arm.mode][arm.config] = arm_json(arm, base, device, without)
            if (
                arm.mode in ("reduce-overhead", "default")
                and arm.config == "mn01"
                and batch == args.batch_sizes[0]
                and amp == "fp32"
            ):
                kept[arm.mode] = arm
            else:
                arm.step = None  # free the models (and their graphs' inputs)
        for mode in list(section):  # rows in the order of CONFIGS
            section[mode] = {c: section[mode][c] for c in CONFIGS if c in section[mode]}
        group_seconds.append(time.perf_counter() - g0)
        log_group(key_b, amp, section)
    return out, kept


def log_group(key_b: str, amp: str, section: dict) -> None:
    log(f"step time {key_b} {amp}:   " + "  ".join(f"{c:>14}" for c in CONFIGS))
    for mode, rows in section.items():
        cells = []
        for c in CONFIGS:
            r = rows.get(c, {})
            if r.get("median_ms") is None:
                cells.append(f"{'-':>14}")
            else:
                cells.append(f"{r['median_ms']:8.2f}ms x{r['ratio_to_bn']:.2f}")
        log(f"  {mode:>16}: " + "  ".join(cells))


# ----------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------


def capture_section(device: torch.device, args, kept: dict) -> dict:
    cuda = device.type == "cuda"
    mode = "reduce-overhead" if cuda else "default"
    arm = kept.get(mode)
    out: dict[str, Any] = {"arm": arm.name if arm else None, "backend": args.backend}
    if cuda:
        from torch._dynamo.utils import counters

        skips = int(counters["inductor"]["cudagraph_skips"])
        out["cudagraph_skips"] = skips
        out["cudagraph_skip_reasons"] = cudagraph_skip_reasons()
    else:
        reason = "CPU run: CUDA graphs need a CUDA device"
        for k in (
            "cudagraph_skips",
            "cuda_graph_launches_per_step",
            "kernels_launched_outside_graphs",
            "replays_as_cuda_graph",
        ):
            out[k] = None
            out[f"{k}_reason"] = reason
    if arm is None:
        out["reproducible"] = None
        out["reproducible_reason"] = f"no {mode} MN(0,1) b{args.batch_sizes[0]} fp32 arm was run"
        return out
    step = arm.step
    if cuda:
        prof = profile_one_step(arm, device)
        out.update(prof)
        out["replays_as_cuda_graph"] = bool(
            skips == 0
            and prof["cuda_graph_launches_per_step"] >= 1
            and prof["kernels_launched_outside_graphs"] <= 8
        )
        out["replays_as_cuda_graph_rule"] = (
            "no cudagraph skips, >= 1 cudaGraphLaunch per step, "
            "<= 8 kernels launched outside graphs (input copies)"
        )
    # Reproducibility: the same state and seed -> the same losses; another seed -> other ones.
    saved = snapshot(step)
    data = [step_batch(arm.batch, device, seed=100 + i) for i in range(args.capture_steps)]
    runs = {}
    for name, seed in (("a", 7), ("a_again", 7), ("b", 8)):
        restore(step, saved)
        runs[name] = run_losses(step, data, seed, cudagraph=arm.mode == "reduce-overhead")
    restore(step, saved)
    same = runs["a"] == runs["a_again"]
    live = runs["a"] != runs["b"]
    out.update(
        {
            "steps": args.capture_steps,
            "reproducible": same,
            "rng_live": live,
            "max_abs_diff_same_seed": max(
                abs(x - y) for p, q in zip(runs["a"], runs["a_again"]) for x, y in zip(p, q)
            ),
            "losses_first": runs["a"][0],
            "losses_last": runs["a"][-1],
            "rule": "same seed -> bitwise the same losses over the steps; another seed -> other losses "
            "(the MN k-means++ draws change inside the compiled step)",
        }
    )
    return out


def cudagraph_skip_reasons() -> list[str]:
    try:
        from torch._dynamo.utils import get_compilation_metrics

        return sorted(
            {
                m.cudagraph_skip_reason
                for m in get_compilation_metrics()
                if getattr(m, "cudagraph_skip_reason", None)
            }
        )
    except Exception:  # noqa: BLE001 - internal API; the counter above still says how many
        return []


def profile_one_step(arm: Arm, device: torch.device) -> dict:
    """One replayed step under the profiler: CUDA-graph launches vs kernels launched one by one."""
    from torch.profiler import ProfilerActivity, profile

    arm()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        arm()
        sync(device)
    names = [e.name for e in prof.events()]
    launches = sum(
        1
        for n in names
        if n in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
    )
    graph_launches = sum(1 for n in names if n in ("cudaGraphLaunch", "cuGraphLaunch"))
    gpu_kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {
        "cuda_graph_launches_per_step": graph_launches,
        "kernels_launched_outside_graphs": launches,
        "gpu_kernels_per_step": gpu_kernels,
    }


# ----------------------------------------------------------------------------------------------
# Correctness on the device
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_tf32():
    """Full fp32 convolutions and matmuls on the GPU (cuDNN allows TF32 by default)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def host_drawn_randomness():
    """MN's k-means++ draws (``torch.randperm`` / ``randint`` / ``rand`` on a device, from the
    global RNG) drawn by the CPU RNG and moved to the device, so that a CPU run and a device
    run from one seed fit the same mixtures. Eager code only; undone on exit."""
    names = ("randperm", "randint", "rand")
    originals = {n: getattr(torch, n) for n in names}

    def wrap(fn):
        def drawn_on_host(*args, device=None, generator=None, **kwargs):
            if device is not None and torch.device(device).type != "cpu" and generator is None:
                return fn(*args, **kwargs).to(device)
            return fn(*args, device=device, generator=generator, **kwargs)

        return drawn_on_host

    for n in names:
        setattr(torch, n, wrap(originals[n]))
    try:
        yield
    finally:
        for n in names:
            setattr(torch, n, originals[n])


def line(passed: bool, **details) -> dict:
    return {"passed": bool(passed), **details}


def check_k1_equals_batchnorm(device: torch.device) -> dict:
    """MixtureNorm2d(K=1) vs nn.BatchNorm2d: train outputs and gradients over 3 steps, running
    buffers, eval outputs; and the K=1 mixture path (the fused kernels) against BatchNorm."""
    from torch import nn

    from dcgan_mn.norms import Mixture, MixtureNorm2d, mixture_norm

    torch.manual_seed(0)
    c = 32
    bn = nn.BatchNorm2d(c).to(device)
    mn = MixtureNorm2d(c, num_components=1).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        mn.weight.copy_(bn.weight), mn.bias.copy_(bn.bias)
    worst = {}

    def cmp(name, a, b):
        a, b = a.detach(), b.detach()
        worst[name] = max(worst.get(name, 0.0), float((a - b).abs().max()))
        return torch.allclose(a, b, **TOL_K1)

    ok = True
    for i in range(3):
        x = (torch.randn(16, c, 8, 8, device=device) * (1 + i) + i).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn_like(x)
        y_bn, y_mn = bn(x), mn(x2)
        ok &= cmp("train_output", y_mn, y_bn)
        y_bn.backward(g), y_mn.backward(g)
        ok &= cmp("input_grad", x2.grad, x.grad)
        ok &= cmp("weight_grad", mn.weight.grad, bn.weight.grad)
        ok &= cmp("running_mean", mn.running_mean[0], bn.running_mean)
        ok &= cmp("running_var", mn.running_var[0], bn.running_var)
    bn.eval(), mn.eval()
    x = torch.randn(16, c, 8, 8, device=device) * 2 + 1
    with torch.no_grad():
        ok &= cmp("eval_output", mn(x), bn(x))
    # The mixture path (what K > 1 runs) at K = 1 is BatchNorm too.
    bn.train()
    x = torch.randn(16, c, 8, 8, device=device) * 3 + 2
    points = x.transpose(0, 1).reshape(c, -1).t()  # [P, C]
    mixture = Mixture(
        torch.ones(1, device=device),
        points.mean(0, keepdim=True),
        points.var(0, unbiased=False, keepdim=True),
    )
    y, _, _ = mixture_norm(
        x.flatten(2), mixture, bn.eps, bn.weight.detach(), bn.bias.detach(), batch_stats=True
    )
    with torch.no_grad():
        ok &= cmp("mixture_path_output", y.view_as(x), bn(x))
    return line(
        ok,
        max_abs_diff={k: float(f"{v:.3g}") for k, v in worst.items()},
        tolerance=f"torch.allclose rtol={TOL_K1['rtol']}, atol={TOL_K1['atol']} (fp32)",
    )


def check_fused_equals_reference(device: torch.device) -> dict:
    """The fused path on [N, C, L] (``mixture_norm``, what the module runs) against the
    reference on points [P, C] (``reference.mixture_norm_reference``), K = 3, fp32 on the
    device: outputs, posteriors' statistics, input / gamma / beta gradients."""
    from dcgan_mn.norms import fit_mixture, mixture_norm
    from dcgan_mn.norms.reference import mixture_norm_reference

    g = torch.Generator().manual_seed(0)
    n, c, h, w = 16, 32, 8, 8
    x = torch.randn(n, c, h, w, generator=g)
    modes = torch.randn(3, c, generator=g) * 3
    x = x + modes[torch.randint(0, 3, (n, h, w), generator=g)].permute(0, 3, 1, 2)  # 3 modes
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    gy = torch.randn(n * h * w, c, generator=g)
    x, gamma, beta, gy = (t.to(device) for t in (x, gamma, beta, gy))
    points = x.permute(0, 2, 3, 1).reshape(-1, c)  # [P, C]
    mixture = fit_mixture(points, 3, generator=torch.Generator(device=device).manual_seed(1))
    results = {}
    for name in ("reference", "fused"):
        ga, ba = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        if name == "reference":
            xin = points.clone().requires_grad_()
            x_hat, _, stats = mixture_norm_reference(xin, mixture, 1e-5)
            y = x_hat * ga + ba
            gx_of = lambda t: t  # noqa: E731
        else:
            xin = x.flatten(2).clone().requires_grad_()
            y, _, stats = mixture_norm(xin, mixture, 1e-5, ga, ba, batch_stats=True)
            y = y.transpose(1, 2).reshape(-1, c)
            gx_of = lambda t: t.transpose(1, 2).reshape(-1, c)  # noqa: E731
        gx, gg, gb = torch.autograd.grad(y, [xin, ga, ba], gy)
        results[name] = {
            "output": y,
            "input_grad": gx_of(gx),
            "gamma_grad": gg,
            "beta_grad": gb,
            "lambda": stats[0],
            "mean": stats[1],
            "var": stats[2],
            "n_eff": stats[3],
        }
        results[name] = {k: v.detach() for k, v in results[name].items()}
    errors = {
        k: float((results["fused"][k] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        for k, ref in results["reference"].items()
    }
    ok = all(e <= TOL_FUSED for e in errors.values())
    return line(
        ok,
        relative_error={k: float(f"{v:.3g}") for k, v in errors.items()},
        tolerance=f"max |fused - reference| / max |reference| <= {TOL_FUSED:g} per tensor (fp32)",
    )


def check_device_vs_cpu(device: torch.device, steps: int = 20) -> dict:
    """20 eager fp32 training steps (MN(0,1), ngf=ndf=16, batch 32) on the device and on the
    CPU from the same weights, data and k-means draws (drawn on the host for both)."""
    batch = 32
    torch.manual_seed(0)
    G, D = Generator(z_dim=100, ngf=16, mn_layers=(0, 1)), Discriminator(16)
    data = [step_batch(batch, torch.device("cpu"), seed=200 + i) for i in range(steps)]
    losses = {}
    for where in ("cpu", "device"):
        dev = torch.device("cpu") if where == "cpu" else device
        models = (copy.deepcopy(G).to(dev), copy.deepcopy(D).to(dev))
        step = make_step(None, dev, models=models)
        with host_drawn_randomness(), no_tf32():
            losses[where] = run_losses(
                step, [(r.to(dev), z.to(dev)) for r, z in data], seed=3, cudagraph=False
            )
    diffs = [abs(a - b) for p, q in zip(losses["device"], losses["cpu"]) for a, b in zip(p, q)]
    same_device = device.type == "cpu"
    return line(
        max(diffs) <= TOL_DEVICE_VS_CPU,
        steps=steps,
        max_abs_loss_diff=float(f"{max(diffs):.3g}"),
        losses_device_last=losses["device"][-1],
        losses_cpu_last=losses["cpu"][-1],
        tolerance=f"max |loss_device - loss_cpu| <= {TOL_DEVICE_VS_CPU:g} over {steps} steps "
        "(loss_D, loss_G ~ 0.7-1.4): different kernels (cuDNN vs oneDNN, other "
        "summation orders) with TF32 off; the same k-means draws on both",
        **(
            {"note": "the device is the CPU: both runs are the same computation"}
            if same_device
            else {}
        ),
    )


def check_capturable_equals_backward(device: torch.device, steps: int = 3) -> dict:
    """The capturable spelling (autograd.grad + functional Adam) vs backward() + Adam.step on
    the device, MN(0,1), eager fp32: losses, weights, buffers, Adam state after 3 steps."""
    data = [step_batch(16, device, seed=300 + i) for i in range(steps)]
    steps_ = {}
    for name, capturable in (("capturable", True), ("backward", False)):
        steps_[name] = make_step((0, 1), device, ngf=16, ndf=16, seed=0, capturable=capturable)
    assert steps_["capturable"].capturable and not steps_["backward"].capturable
    losses = {n: run_losses(s, data, seed=5, cudagraph=False) for n, s in steps_.items()}
    worst, ok, bitwise = 0.0, True, True
    pairs = list(
        zip(sum(map(list, losses["capturable"]), []), sum(map(list, losses["backward"]), []))
    )
    for a, b in pairs:
        worst = max(worst, abs(a - b))
        ok &= math.isclose(a, b, rel_tol=TOL_CAPTURABLE["rtol"], abs_tol=TOL_CAPTURABLE["atol"])
        bitwise &= a == b
    for a, b in zip(state_tensors(steps_["capturable"]), state_tensors(steps_["backward"])):
        a, b = a.float(), b.float()
        worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
        ok &= torch.allclose(a, b, **TOL_CAPTURABLE)
        bitwise &= torch.equal(a, b)
    return line(
        ok,
        steps=steps,
        bitwise_equal=bitwise,
        max_abs_diff=float(f"{worst:.3g}"),
        tolerance=f"rtol={TOL_CAPTURABLE['rtol']}, atol={TOL_CAPTURABLE['atol']} on losses, "
        "weights, buffers and Adam state (bitwise on the CPU)",
    )


def check_g_ema_follows_its_schedule(device: torch.device, steps: int = 8) -> dict:
    """G_ema updated inside the compiled step (CUDA graphs on a GPU: reduce-overhead; on a CPU
    the default mode, aot_eager) equals its closed form over G's own trajectory,
    G_ema <- d_t G_ema + (1 - d_t) G_t, with a ramp-up that changes d_t every step: a decay frozen
    into the graph at capture, or a replay reading a stale copy of it, fails this line."""
    cuda = device.type == "cuda"
    mode, backend = ("reduce-overhead", "inductor") if cuda else ("default", "aot_eager")
    schedule = EmaSchedule(3.0, 0.5)  # half-life min(3, t / 2): d_t = 0, 0.25, 0.5, ..., 0.79
    step = make_step(
        (0, 1), device, ngf=16, ndf=16, seed=0, mode=mode, backend=backend, g_ema=schedule
    )
    reference = [p.detach().clone().double() for p in step.ema.G_ema.parameters()]
    torch.manual_seed(7)
    for t in range(steps):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        step(*step_batch(16, device, seed=400 + t), t)
        d = schedule.decay(t)
        for ref, p in zip(reference, step.G.parameters()):
            ref.mul_(d).add_(p.detach().double(), alpha=1.0 - d)
    worst, ok = 0.0, True
    for ref, mine in zip(reference, step.ema.G_ema.parameters()):
        mine = mine.detach().double()
        worst = max(worst, float((mine - ref).abs().max()))
        ok &= torch.allclose(mine, ref, **TOL_G_EMA)
    return line(
        ok,
        mode=mode,
        backend=backend,
        steps=steps,
        decays=[round(schedule.decay(t), 4) for t in range(steps)],
        max_abs_diff=float(f"{worst:.3g}"),
        tolerance=f"rtol={TOL_G_EMA['rtol']}, atol={TOL_G_EMA['atol']} on G_ema's weights",
    )


def check_reproducible(capture: dict) -> dict:
    rep, live = capture.get("reproducible"), capture.get("rng_live")
    if rep is None:
        return line(False, reason=capture.get("reproducible_reason", "not measured"))
    return line(
        bool(rep and live),
        arm=capture.get("arm"),
        reproducible=rep,
        rng_live=live,
        rule=capture.get("rule"),
    )


def correctness_section(device: torch.device) -> dict:
    checks = {
        "k1_equals_batchnorm": check_k1_equals_batchnorm,
        "fused_equals_reference": check_fused_equals_reference,
        "device_vs_cpu_20_steps": check_device_vs_cpu,
        "capturable_equals_backward": check_capturable_equals_backward,
        "g_ema_follows_its_schedule": check_g_ema_follows_its_schedule,
    }
    out = {}
    for name, fn in checks.items():
        try:
            out[name] = fn(device)
        except Exception as e:  # noqa: BLE001 - a crash is a failed line, with its message
            out[name] = line(
                False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=3)
            )
        log(f"correctness {name}: {'pass' if out[name]['passed'] else 'FAIL'}")
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def inception_weights(path: Optional[str], tmp: Path):
    """(InceptionWeights, what they are): pytorch-fid's real file when this machine has it
    (``--inception-weights``, ``$DCGAN_MN_INCEPTION_WEIGHTS`` or the torch hub cache; nothing is
    downloaded), else random weights of the real architecture."""
    from dcgan_mn.features import InceptionWeightsError, resolve_inception_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            w = resolve_inception_weights(path, download=False, progress=False)
            return w, (
                "real: pytorch-fid's FID Inception weights"
                if w.standard
                else f"given file {w.path} (not pytorch-fid's published weights)"
            )
        except InceptionWeightsError as e:
            if path:
                raise
            file = tmp / "random_fid_inception.pth"
            save_random_fid_inception(file)
            w = resolve_inception_weights(file, download=False, progress=False)
            return w, (
                f"random weights of the real FID Inception architecture (the real weights "
                f"are absent: {str(e).split(':')[0]}; put them in the torch hub cache or pass "
                f"--inception-weights for the real ones; speed is the same)"
            )


@contextlib.contextmanager
def hub_dir_with(weights_path: Path, tmp: Path):
    """A private torch hub directory holding ``weights_path`` under pytorch-fid's file name, so
    that pytorch-fid's own ``InceptionV3`` loads those weights without downloading."""
    hub = tmp / "hub"
    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    link = hub / "checkpoints" / PYTORCH_FID_WEIGHTS_NAME
    if not link.exists():
        link.symlink_to(Path(weights_path).resolve())
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        yield
    finally:
        torch.hub.set_dir(old)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def evaluation_section(device: torch.device, args, tmp: Path) -> dict:
    from pytorch_fid.fid_score import calculate_activation_statistics
    from pytorch_fid.inception import InceptionV3

    from dcgan_mn.features import InceptionFeatureExtractor
    from dcgan_mn.metrics import StreamingMoments
    from dcgan_mn.metrics.evaluator import generated_images

    n = args.eval_images
    weights, weights_kind = inception_weights(args.inception_weights, tmp)
    torch.manual_seed(0)
    G = Generator(z_dim=100, ngf=args.ngf, mn_layers=(0, 1)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = InceptionFeatureExtractor(2048, weights, device=device, progress=False)
    gen = dict(
        num_samples=n, seed=0, sample_mode="batch", batch_size=64, chunk_images=ours.batch_size
    )

    def our_pass():  # what an FID evaluation does: generate, quantize, features, moments
        moments = StreamingMoments(2048, device)
        first = None
        for _, images in generated_images(G, **gen):
            feats = ours(images)  # [b, 2048]
            moments.update(feats)
            first = feats if first is None else first
        return moments.numpy(), first

    images = torch.cat([im.cpu() for _, im in generated_images(G, **gen)])  # [n, 3, 32, 32] uint8
    warm = images[: 2 if args.quick else min(n, ours.batch_size)]
    ours(warm)  # warm-up (cuDNN, allocator)
    t_ours, (_, our_feats) = timed(our_pass, device)
    t_ours_features = None if args.quick else timed(lambda: ours(images), device)[0]

    # pytorch-fid: its own network and loop, same weights, same images.
    with hub_dir_with(weights.path, tmp), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    their_batch = 50  # pytorch-fid's default --batch-size

    @torch.no_grad()
    def their_loop():  # fid_score.get_activations's loop body, images already in memory
        acts = []
        for chunk in images.split(their_batch):
            x = chunk.to(device).float().div(255)  # ToTensor
            pred = theirs(x)[0]
            acts.append(pred.squeeze(3).squeeze(2).cpu().numpy())
        acts = np.concatenate(acts)
        return acts, np.mean(acts, axis=0), np.cov(acts, rowvar=False)

    with torch.no_grad():
        theirs(warm.to(device).float().div(255))  # warm-up
    t_theirs, (their_acts, _, _) = timed(their_loop, device)

    folder = tmp / "pngs"
    folder.mkdir(exist_ok=True)
    from PIL import Image

    files = []
    for i, im in enumerate(images):
        f = folder / f"{i:05d}.png"
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(f)
        files.append(str(f))
    try:
        workers = min(len(os.sched_getaffinity(0)), 8)  # pytorch-fid's CLI default
    except AttributeError:
        workers = min(os.cpu_count() or 1, 8)
    if args.quick:
        workers = 0  # no worker processes to start for a few images
    # its progress bar and notes: stdout is the JSON's
    with (
        open(os.devnull, "w") as devnull,
        contextlib.redirect_stderr(devnull),
        contextlib.redirect_stdout(devnull),
    ):
        t_files, _ = timed(
            lambda: calculate_activation_statistics(
                files, theirs, their_batch, 2048, device, workers
            ),
            device,
        )

    k = our_feats.shape[0]  # the first chunk's features, against pytorch-fid's of the same images
    feat_diff = float(np.abs(our_feats.float().cpu().numpy() - their_acts[:k]).max())
    scale = float(np.abs(their_acts).max())
    out = {
        "images": n,
        "inception_weights": weights_kind,
        "inception_weights_sha256": weights.sha256,
        "ours": {
            "what": "generate (MN(0,1) generator, batch 64, batch statistics) + quantize + "
            f"InceptionFeatureExtractor (batch {ours.batch_size}, BN folded, channels-last) "
            "+ streaming moments",
            "images_per_s": round(n / t_ours, 1),
            "features_only_images_per_s": round(n / t_ours_features, 1)
            if t_ours_features
            else None,
            **(
                {"features_only_images_per_s_reason": "--quick: not measured"}
                if not t_ours_features
                else {}
            ),
        },
        "pytorch_fid": {
            "what": f"pytorch-fid's InceptionV3 and get_activations loop (batch {their_batch}) on the "
            "same uint8 images in memory, then mean and covariance",
            "images_per_s": round(n / t_theirs, 1),
            "from_png_files_images_per_s": round(n / t_files, 1),
            "from_png_files_what": f"fid_score.calculate_activation_statistics over PNG files, "
            f"num_workers={workers}",
        },
        "speedup": round(t_theirs / t_ours, 2),
        "speedup_what": "ours (generate + features) images/s over pytorch-fid's in-memory model loop",
        "speedup_vs_png_files": round(t_files / t_ours, 2),
        "features_agree": feat_diff <= 1e-3 * max(scale, 1.0),
        "features_max_abs_diff": float(f"{feat_diff:.3g}"),
        "features_compared": f"the first {k} images' 2048-d features, ours vs pytorch-fid's",
    }
    out["mode_metrics"] = mode_metrics_eval(device, args, G, tmp)
    log(
        f"evaluation: ours {out['ours']['images_per_s']} img/s, pytorch-fid "
        f"{out['pytorch_fid']['images_per_s']} img/s (x{out['speedup']}); mode metrics "
        f"{out['mode_metrics']['images_per_s']} img/s"
    )
    return out


def mode_metrics_eval(device: torch.device, args, G, tmp: Path) -> dict:
    from dcgan_mn.metrics import Evaluator
    from dcgan_mn.metrics.classifier import load_mode_classifier
    from dcgan_mn.metrics.modes import ModeMetrics

    if args.quick:  # speed does not depend on accuracy: a 1-epoch classifier in a private cache
        t0 = time.perf_counter()
        clf = load_mode_classifier(
            "stacked-digits", cache_dir=tmp / "cache", device=device, epochs=1, min_accuracy=0.0
        )
        note = (
            f"--quick: a 1-epoch stacked-digits classifier (trained in {time.perf_counter() - t0:.1f} s, "
            f"accuracy {clf.accuracy:.2f}; the real one: 30 epochs, >= 0.95)"
        )
    else:
        t0 = time.perf_counter()
        clf = load_mode_classifier("stacked-digits", cache_dir=args.cache_dir, device=device)
        note = (
            f"the stacked-digits classifier (held-out accuracy {clf.accuracy:.3f}; loaded or "
            f"trained and cached in {time.perf_counter() - t0:.1f} s)"
        )
    n = args.mode_images
    warm = Evaluator(families=[ModeMetrics(clf, num_samples=min(n, 256))])
    warm(G, sample_mode="batch", batch_size=64)
    ev = Evaluator(families=[ModeMetrics(clf, num_samples=n)])
    seconds, result = timed(lambda: ev(G, sample_mode="batch", batch_size=64), device)
    return {
        "images": n,
        "images_per_s": round(n / seconds, 1),
        "classifier": note,
        "what": "Evaluator with the ModeMetrics family: generate (batch 64) + classifier + "
        "modes, KL and cfd",
        "modes_found": result["modes"],
    }


# ----------------------------------------------------------------------------------------------
# Targets and main
# ----------------------------------------------------------------------------------------------


def target(
    name: str, want: str, value, passed: Optional[bool], reason: Optional[str] = None
) -> dict:
    row = {"name": name, "target": want, "value": value, "passed": passed}
    if passed is None:
        row["reason"] = reason or "not measured"
    return row


def targets(result: dict, device: torch.device, args) -> list[dict]:
    rows = []
    b = f"b{args.batch_sizes[0]}"
    st = result.get("step_time") or {}
    ro = ((st.get(b) or {}).get("fp32") or {}).get("reduce-overhead") or {}
    for name, config, key, limit in (
        ("mn01_step_ratio_reduce_overhead_b64", "mn01", "ratio_to_bn", TARGET_MN01_RATIO),
        (
            "g_ema_step_ratio_reduce_overhead_b64",
            "mn01+g_ema",
            "ratio_to_without_g_ema",
            TARGET_G_EMA_RATIO,
        ),
    ):
        ratio = (ro.get(config) or {}).get(key)
        if ratio is None:
            reason = (ro.get(config) or {}).get("reason") or (
                "CPU run: reduce-overhead needs CUDA" if device.type != "cuda" else "not measured"
            )
            rows.append(target(name, f"<= {limit}", None, None, reason))
        else:
            rows.append(target(name, f"<= {limit}", ratio, ratio <= limit))
    recompiles = [
        arm["recompiles_after_warmup"]
        for per_b in st.values()
        if isinstance(per_b, dict)
        for per_amp in per_b.values()
        if isinstance(per_amp, dict)
        for mode, arms in per_amp.items()
        if mode != "eager" and isinstance(arms, dict)
        for arm in arms.values()
        if isinstance(arm, dict) and arm.get("recompiles_after_warmup") is not None
    ]
    if recompiles:
        rows.append(
            target(
                "recompiles_after_warmup",
                "0 in every compiled arm",
                sum(recompiles),
                sum(recompiles) == 0,
            )
        )
    else:
        rows.append(
            target(
                "recompiles_after_warmup",
                "0 in every compiled arm",
                None,
                None,
                "no compiled arm was run",
            )
        )
    cap = result.get("capture") or {}
    if device.type == "cuda" and cap.get("replays_as_cuda_graph") is not None:
        rows.append(
            target(
                "reduce_overhead_replays_cuda_graph",
                "true",
                cap["replays_as_cuda_graph"],
                cap["replays_as_cuda_graph"],
            )
        )
    else:
        rows.append(
            target(
                "reduce_overhead_replays_cuda_graph",
                "true",
                None,
                None,
                cap.get("replays_as_cuda_graph_reason") or "not measured",
            )
        )
    ev = result.get("evaluation") or {}
    if ev.get("speedup") is not None:
        rows.append(
            target(
                "eval_speedup_vs_pytorch_fid",
                f">= {TARGET_EVAL_SPEEDUP}x",
                ev["speedup"],
                ev["speedup"] >= TARGET_EVAL_SPEEDUP,
            )
        )
    else:
        rows.append(
            target(
                "eval_speedup_vs_pytorch_fid",
                f">= {TARGET_EVAL_SPEEDUP}x",
                None,
                None,
                ev.get("error", "not measured"),
            )
        )
    for name, row in (result.get("correctness") or {}).items():
        rows.append(target(f"correctness/{name}", "passes", row["passed"], row["passed"]))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller and faster: batch 64 only, fewer reps, small models on a CPU, "
        "the aot_eager backend on a CPU",
    )
    p.add_argument("--batch-sizes", default=None, help="default 64,256 (--quick: 64)")
    p.add_argument("--amps", default=None, help="default fp32,bf16 (--quick on a CPU: fp32)")
    p.add_argument("--modes", default=None, help="default eager,default,reduce-overhead")
    p.add_argument(
        "--backend",
        default=None,
        help="torch.compile backend (default inductor; --quick on a CPU: aot_eager)",
    )
    p.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per arm (default 30; --quick 3)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 5; --quick 2)"
    )
    p.add_argument(
        "--recompile-steps",
        type=int,
        default=None,
        help="steps after warm-up over which recompilations are counted (default 50; --quick 5)",
    )
    p.add_argument("--ngf", type=int, default=None, help="default 64 (--quick on a CPU: 16)")
    p.add_argument("--ndf", type=int, default=None, help="default 64 (--quick on a CPU: 16)")
    p.add_argument("--eval-images", type=int, default=None, help="default 5000 (--quick: 8)")
    p.add_argument("--mode-images", type=int, default=None, help="default 26000 (--quick: 256)")
    p.add_argument(
        "--capture-steps",
        type=int,
        default=None,
        help="steps of the reproducibility check (default 20; --quick 8)",
    )
    p.add_argument("--inception-weights", default=None, help="FID Inception weights file")
    p.add_argument(
        "--cache-dir", default=None, help="mode classifier cache (default: the project's)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip step-time groups that would end past this many seconds (default 360; "
        "the first group, b64 fp32, always runs)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (--quick on a CPU: 1)")
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated sections to skip: step_time, capture, correctness, evaluation",
    )
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    return args


def finish_args(args, device: torch.device) -> None:
    cpu_quick = args.quick and device.type == "cpu"
    args.batch_sizes = [
        int(b) for b in (args.batch_sizes or ("64" if args.quick else "64,256")).split(",")
    ]
    args.amps = (args.amps or ("fp32" if cpu_quick else "fp32,bf16")).split(",")
    args.modes = (args.modes or ",".join(MODES)).split(",")  # reduce-overhead: null on a CPU
    for a in args.amps:
        if a not in AMPS:
            raise SystemExit(f"--amps: unknown {a!r} (expected {', '.join(AMPS)})")
    for m in args.modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown {m!r} (expected {', '.join(MODES)})")
    args.backend = args.backend or ("aot_eager" if cpu_quick else "inductor")
    args.reps = args.reps or (3 if args.quick else 30)
    args.warmup = args.warmup or (2 if args.quick else 5)
    args.recompile_steps = args.recompile_steps or (5 if args.quick else 50)
    args.ngf = args.ngf or (16 if cpu_quick else 64)
    args.ndf = args.ndf or (16 if cpu_quick else 64)
    args.eval_images = args.eval_images or (8 if args.quick else 5000)
    args.mode_images = args.mode_images or (256 if args.quick else 26_000)
    args.budget_s = args.budget_s if args.budget_s is not None else (90.0 if args.quick else 360.0)
    args.skip = {s for s in args.skip.split(",") if s}
    args.skip_compiled = {"mn_all"} if cpu_quick else set()
    args.capture_steps = args.capture_steps or (8 if args.quick else 20)
    if args.threads is None and cpu_quick:
        args.threads = 1  # 2 shared cores: one thread is many times faster for these small models
    if args.threads:
        torch.set_num_threads(args.threads)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = resolve_device(args.device)
    finish_args(args, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as training does: fixed shapes
    # Every arm compiles the same code object (TrainStep.capturable_step) for its own models:
    # room for all of them, and static shapes per batch size as training has (one shape).
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.config.automatic_dynamic_shapes = False
    events = CompileEvents()

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "environment": environment(device, args),
        "settings": {
            "batch_sizes": args.batch_sizes,
            "amps": args.amps,
            "modes": args.modes,
            "compile_backend": args.backend,
            "compile_backend_note": (
                "aot_eager on a CPU in --quick: it traces the same single graph "
                "as inductor without building kernels (inductor takes minutes "
                "there)"
            )
            if args.backend == "aot_eager"
            else "inductor, as --compile trains",
            "reps": args.reps,
            "warmup": args.warmup,
            "recompile_steps": args.recompile_steps,
            "ngf": args.ngf,
            "ndf": args.ndf,
            "num_components": 3,
            "budget_s": args.budget_s,
            "dynamo": {"recompile_limit": 256, "automatic_dynamic_shapes": False},
        },
    }
    errors = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        sections = []
        if "correctness" not in args.skip:
            sections.append(("correctness", lambda: correctness_section(device)))
        kept: dict = {}

        def run_step_time():
            section, arms = step_time_section(device, args, events, t_start)
            kept.update(arms)
            return section

        if "step_time" not in args.skip:
            sections.append(("step_time", run_step_time))
        if "capture" not in args.skip:
            sections.append(("capture", lambda: capture_section(device, args, kept)))
        if "evaluation" not in args.skip:
            sections.append(("evaluation", lambda: evaluation_section(device, args, tmp)))
        for name, fn in sections:
            log(f"== {name} ({time.perf_counter() - t_start:.0f} s)")
            try:
                result[name] = fn()
            except Exception as e:  # noqa: BLE001 - recorded, printed, and the exit status says so
                errors[name] = f"{type(e).__name__}: {e}"
                result[name] = {"error": errors[name], "traceback": traceback.format_exc(limit=4)}
                log(traceback.format_exc())
        if "capture" in result and "correctness" in result and "error" not in result["capture"]:
            result["correctness"]["reproducible_same_seed"] = check_reproducible(result["capture"])
    result["targets"] = targets(result, device, args)
    correctness = result.get("correctness") or {}
    failed = [
        k for k, v in correctness.items() if isinstance(v, dict) and not v.get("passed", True)
    ]
    result["correctness_passed"] = not failed and "error" not in correctness
    result["errors"] = errors
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    log("targets:")
    for row in result["targets"]:
        mark = {True: "pass", False: "FAIL", None: "n/a "}[row["passed"]]
        log(
            f"  [{mark}] {row['name']}: {row['value']} (target {row['target']})"
            + (f" - {row['reason']}" if row.get("reason") else "")
        )
    log(f"done in {result['elapsed_s']} s")
    if failed:
        return 1
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
