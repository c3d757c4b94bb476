"""The chaos test of resume (bench/chaos_resume.py, small): a run SIGKILLed at random moments
and resumed each time ends bitwise identical to an uninterrupted one."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_chaos_resume", ROOT / "bench" / "chaos_resume.py")
chaos = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = chaos
spec.loader.exec_module(chaos)


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tmp_path, modes_cache):
    report = chaos.run_chaos(
        kills=3,
        iters=150,
        seed=1,
        out=tmp_path,
        eval_every=20,
        ckpt_every=15,
        min_delay=4.0,
        max_delay=9.0,
        env={"DCGAN_MN_CACHE_DIR": str(modes_cache)},
    )
    assert report["final_exit"] == 0 and report["straight_exit"] == 0, report.get("error")
    assert report["tensors_compared"] > 50 and report["tensors_differing"] == 0, report["differing"]
    assert report["metrics_each_iteration_once"], report
    assert report["checkpoints_loaded"] >= 1 and chaos.passed(report)
