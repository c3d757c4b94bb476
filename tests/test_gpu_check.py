"""bench/gpu_check.py, the first command a GPU user runs: its CPU quick run gives one JSON object
with every field, GPU-only values null with a reason, every correctness line passed and the
targets reported line by line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORRECTNESS = (
    "k1_equals_batchnorm",
    "fused_equals_reference",
    "device_vs_cpu_20_steps",
    "capturable_equals_backward",
    "g_ema_follows_its_schedule",
    "reproducible_same_seed",
)
TARGETS = (
    "mn01_step_ratio_reduce_overhead_b64",
    "g_ema_step_ratio_reduce_overhead_b64",
    "recompiles_after_warmup",
    "reduce_overhead_replays_cuda_graph",
    "eval_speedup_vs_pytorch_fid",
    *(f"correctness/{name}" for name in CORRECTNESS),
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("gpu_check")
    env = dict(
        os.environ,
        TORCH_HOME=str(home / "torch"),
        DCGAN_MN_CACHE_DIR=str(home / "cache"),
        PYTHONWARNINGS="ignore",
    )
    env.pop("DCGAN_MN_INCEPTION_WEIGHTS", None)
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr  # stdout is the JSON object alone


def null_with_reason(section: dict, key: str) -> None:
    assert section[key] is None, (key, section[key])
    reason = section.get(f"{key}_reason") or section.get("reason")
    assert isinstance(reason, str) and reason, (key, section)


@pytest.mark.slow
def test_quick_cpu_run_reports_every_field(quick_run):
    result, stderr = quick_run
    assert result["schema"] == "gpu_check/1" and result["quick"] is True
    env = result["environment"]
    for key in ("device", "device_name", "torch", "cpu_capability", "native_bf16", "git_commit"):
        assert env[key] is not None, key
    for key in ("cuda", "cudnn"):
        null_with_reason(env, key)
    assert result["settings"]["compile_backend"] == "aot_eager"  # said so, on a CPU

    # Step time: every config, eager and compiled; reduce-overhead null with its reason.
    arms = result["step_time"]["b64"]["fp32"]
    for mode in ("eager", "default"):
        for config in ("bn", "mn01"):
            row = arms[mode][config]
            assert row["median_ms"] > 0 and row["ratio_to_bn"] > 0
            null_with_reason(row, "peak_memory_mib")
        assert arms[mode]["bn"]["ratio_to_bn"] == 1.0
    assert arms["eager"]["mn_all"]["median_ms"] > 0
    assert arms["default"]["mn01"]["compile_s"] > 0
    assert arms["default"]["mn01"]["recompiles_after_warmup"] == 0
    assert arms["default"]["mn01"]["steps_after_warmup"] >= result["settings"]["recompile_steps"]
    for config in ("bn", "mn01", "mn_all", "mn01+g_ema"):
        null_with_reason(arms["reduce-overhead"][config], "median_ms")
    # The averaged generator's update in the step: timed against the same step without it, and
    # compiled once although its decay changes every step (the ramp-up).
    for mode in ("eager", "default"):
        assert arms[mode]["mn01+g_ema"]["ratio_to_without_g_ema"] > 0
    assert arms["default"]["mn01+g_ema"]["recompiles_after_warmup"] == 0

    # Capture: CUDA-graph fields null with a reason; reproducibility measured on the CPU too.
    capture = result["capture"]
    for key in ("cudagraph_skips", "cuda_graph_launches_per_step", "replays_as_cuda_graph"):
        null_with_reason(capture, key)
    assert capture["reproducible"] is True and capture["rng_live"] is True

    # Correctness: every line there and passed.
    for name in CORRECTNESS:
        assert result["correctness"][name]["passed"] is True, result["correctness"][name]
    assert result["correctness_passed"] is True and result["errors"] == {}

    # Evaluation: both throughputs, which weights, and the mode metrics.
    ev = result["evaluation"]
    assert ev["ours"]["images_per_s"] > 0 and ev["pytorch_fid"]["images_per_s"] > 0
    assert ev["speedup"] > 0 and "random" in ev["inception_weights"]
    assert ev["features_agree"] is True
    assert ev["mode_metrics"]["images_per_s"] > 0

    # Targets: one line each, pass / fail, or null with a reason (GPU-only on a CPU).
    rows = {row["name"]: row for row in result["targets"]}
    assert set(TARGETS) <= set(rows)
    for row in rows.values():
        assert row["passed"] in (True, False, None) and row["target"]
        if row["passed"] is None:
            assert row["reason"]
    assert rows["mn01_step_ratio_reduce_overhead_b64"]["passed"] is None
    assert rows["g_ema_step_ratio_reduce_overhead_b64"]["passed"] is None
    assert rows["reduce_overhead_replays_cuda_graph"]["passed"] is None
    assert rows["recompiles_after_warmup"]["passed"] is True
    # slow hardware is no error
    assert rows["eval_speedup_vs_pytorch_fid"]["passed"] in (True, False)
    assert all(rows[f"correctness/{n}"]["passed"] for n in CORRECTNESS)
    assert "targets:" in stderr and "step time b64 fp32" in stderr  # the human table
    assert result["elapsed_s"] < 180  # typically 50-60 s on 2 busy cores; a guard against runaways


def test_correctness_failure_sets_the_exit_status(monkeypatch, capsys):
    """A failed correctness line exits 1 (slow hardware never does): only correctness runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "TOL_FUSED", -1.0)  # nothing can pass
    monkeypatch.setattr(gpu_check, "check_device_vs_cpu", lambda device: gpu_check.line(True))
    monkeypatch.setattr(
        gpu_check, "check_capturable_equals_backward", lambda device: gpu_check.line(True)
    )
    import torch
    import torch._dynamo.config as dynamo_config

    threads = torch.get_num_threads()
    try:
        with dynamo_config.patch(
            recompile_limit=dynamo_config.recompile_limit,
            accumulated_recompile_limit=dynamo_config.accumulated_recompile_limit,
            automatic_dynamic_shapes=dynamo_config.automatic_dynamic_shapes,
        ):
            rc = gpu_check.main(
                ["--device", "cpu", "--quick", "--skip", "step_time,capture,evaluation"]
            )
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert out["correctness"]["fused_equals_reference"]["passed"] is False
    assert out["correctness"]["k1_equals_batchnorm"]["passed"] is True
    assert out["correctness_passed"] is False


def test_g_ema_line_fails_when_the_decay_is_frozen_at_the_first_step(monkeypatch):
    """The G_ema line catches the CUDA-graph failure it exists for: a decay read once (frozen at
    capture) instead of every step. Here the schedule's first weight is kept for every update."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    import torch

    cpu = torch.device("cpu")
    assert gpu_check.check_g_ema_follows_its_schedule(cpu, steps=4)["passed"] is True
    first_only = gpu_check.GeneratorEMA.prepare

    def frozen(self, iteration):
        if iteration == 0:
            first_only(self, iteration)

    monkeypatch.setattr(gpu_check.GeneratorEMA, "prepare", frozen)
    assert gpu_check.check_g_ema_follows_its_schedule(cpu, steps=4)["passed"] is False
