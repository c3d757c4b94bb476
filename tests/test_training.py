"""The training loop on CPU with tiny models: exact resume, the evaluator hook, TensorBoard,
checkpoint layout, and the speed switches (bf16 autocast, channels_last, torch.compile)."""

import json
import os
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    FakeEvaluator,
    assert_same_tensors,
    read_tensorboard,
    state_of,
    tiny_cfg,
    tiny_images,
)
from dcgan_mn.runfolder import RunFolder
from dcgan_mn import checkpoint as C
from dcgan_mn import device as device_helpers
from dcgan_mn.config import ConfigError
from dcgan_mn.training import train

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("train_single_thread")


@pytest.mark.parametrize(
    "mn_layers,hflip,stop_at,log_every",
    [
        ("0,1", True, 3, 2),  # stop in the middle of a logging window
        ("none", False, 4, 2),
        ("all", False, 2, 1),
    ],
)
def test_resume_is_bitwise_identical(tmp_path, mn_layers, hflip, stop_at, log_every):
    images = tiny_images()
    kw = dict(mn_layers=mn_layers, hflip=hflip, log_every=log_every, fid_every=3, iters=6)
    full = train(
        tiny_cfg(tmp_path, run_name="full", **kw),
        images=images,
        progress=False,
        evaluator=FakeEvaluator([9, 8]),
    )
    part = train(
        tiny_cfg(tmp_path, run_name="part", **{**kw, "iters": stop_at}),
        images=images,
        progress=False,
        evaluator=FakeEvaluator([9, 8, 7]),
    )
    assert part.iteration == stop_at
    resumed = train(
        tiny_cfg(tmp_path, run_name="part", **kw),
        images=images,
        progress=False,
        resume=part.run_dir,
        evaluator=FakeEvaluator([9, 8, 7]),
    )
    assert resumed.iteration == 6 and resumed.run_dir == part.run_dir

    a, b = state_of(full.run_dir), state_of(resumed.run_dir)
    for key in (
        "generator",
        "discriminator",
        "opt_g",
        "opt_d",
        "rng",
        "data",
        "fixed_noise",
        "log_window",
    ):
        assert_same_tensors(a[key], b[key], key)
    # The logged losses and D outputs are the same numbers at every logged step.
    sa, _, _ = read_tensorboard(full.run_dir)
    sb, _, _ = read_tensorboard(resumed.run_dir)
    for tag in ("loss/D", "loss/G", "D/real", "D/fake"):
        assert sa[tag] == sb[tag], tag
        assert [s for s, _ in sa[tag]] == list(range(log_every, 7, log_every))
    # The evaluation at iteration 3 (or 6) saw the same generator in both runs.
    rows_a = {
        r["iteration"]: r
        for r in map(json.loads, (full.run_dir / "metrics.jsonl").read_text().splitlines())
    }
    rows_b = {
        r["iteration"]: r
        for r in map(json.loads, (resumed.run_dir / "metrics.jsonl").read_text().splitlines())
    }
    for it in (3, 6):
        assert rows_a[it]["weights_checksum"] == rows_b[it]["weights_checksum"]


def test_evaluator_hook_metrics_snapshots_best(tmp_path):
    ev = FakeEvaluator([30.0, 20.0, 25.0], sleep_s=0.2)
    cfg = tiny_cfg(tmp_path, iters=6, fid_every=2, ckpt_every=3, sample_mode="running", log_every=1)
    t0 = time.perf_counter()
    result = train(cfg, evaluator=ev, images=tiny_images(), progress=False)
    wall = time.perf_counter() - t0
    run = result.run_dir
    assert ev.calls == [("running", 8)] * 3

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4, 6]
    assert [r["images_seen"] for r in rows] == [16, 32, 48]
    assert [r["fid"] for r in rows] == [30.0, 20.0, 25.0]
    for r in rows:
        assert r["sample_mode"] == "running" and r["num_samples"] == 10_000 and r["kid"] == 0.5
        assert r["eval_seconds"] >= 0.2
    seconds = [r["train_seconds"] for r in rows]
    assert seconds == sorted(seconds) and seconds[-1] < wall - 3 * 0.2  # evaluation excluded

    assert [i for i, _ in RunFolder(run).snapshots()] == [2, 4, 6]  # at every evaluation only
    gen, snap_cfg, it = C.load_generator(RunFolder(run).snapshot_file(4))
    assert it == 4 and snap_cfg.run_name == "run"
    best = torch.load(RunFolder(run).best_file, weights_only=True)
    assert best["iteration"] == 4 and best["metrics"]["fid"] == 20.0
    assert_same_tensors(
        best["generator"],
        torch.load(RunFolder(run).snapshot_file(4), weights_only=True)["generator"],
    )
    assert result.best_fid == 20.0 and result.best_iteration == 4
    full = C.load_checkpoint(RunFolder(run).latest_checkpoint())
    assert (
        full["best"] == {"metric": "fid", "value": 20.0, "iteration": 4} and full["iteration"] == 6
    )

    scalars, _, _ = read_tensorboard(run)
    assert scalars["metrics/fid_10k"] == [(2, 30.0), (4, 20.0), (6, 25.0)]
    assert [s for s, _ in scalars["metrics/kid_10k"]] == [2, 4, 6]
    assert "metrics/num_samples_10k" not in scalars


def test_train_seconds_and_best_survive_resume(tmp_path):
    images = tiny_images()
    first = train(
        tiny_cfg(tmp_path, iters=4, fid_every=2),
        images=images,
        progress=False,
        evaluator=FakeEvaluator([10.0, 5.0]),
    )
    second = train(
        tiny_cfg(tmp_path, iters=8, fid_every=2),
        images=images,
        progress=False,
        resume=first.run_dir,
        evaluator=FakeEvaluator([7.0, 6.0]),
    )
    rows = [
        json.loads(line) for line in (second.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["iteration"] for r in rows] == [2, 4, 6, 8]
    assert [r["train_seconds"] for r in rows] == sorted(r["train_seconds"] for r in rows)
    assert second.train_seconds > first.train_seconds
    assert second.best_fid == 5.0 and second.best_iteration == 4  # 7 and 6 are not better
    assert torch.load(RunFolder(second.run_dir).best_file, weights_only=True)["iteration"] == 4


def test_resume_drops_metrics_rows_written_after_the_checkpoint(tmp_path):
    images = tiny_images()
    first = train(
        tiny_cfg(tmp_path, iters=4, fid_every=2, ckpt_every=2),
        images=images,
        progress=False,
        evaluator=FakeEvaluator([10.0, 5.0]),
    )
    # as if the run crashed before its last checkpoint
    RunFolder(first.run_dir).checkpoint_file(4).unlink()
    train(
        tiny_cfg(tmp_path, iters=4, fid_every=2),
        images=images,
        progress=False,
        resume=first.run_dir,
        evaluator=FakeEvaluator([11.0]),
    )
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["fid"]) for r in rows] == [(2, 10.0), (4, 11.0)]


def test_tensorboard_contents(tmp_path):
    cfg = tiny_cfg(tmp_path, mn_layers="0,2", mn_components=3, iters=4, log_every=2, sample_every=2)
    result = train(cfg, images=tiny_images(), progress=False)
    scalars, images, texts = read_tensorboard(result.run_dir)
    for tag in ("loss/D", "loss/G", "D/real", "D/fake", "time/it_per_s", "progress/images_seen"):
        assert [s for s, _ in scalars[tag]] == [2, 4], tag
        assert all(math.isfinite(v) for _, v in scalars[tag])
    assert all(0 < v < 1 for _, v in scalars["D/real"] + scalars["D/fake"])
    for layer in (0, 2):
        ent = scalars[f"mn/layer{layer}/posterior_entropy"]
        eff = scalars[f"mn/layer{layer}/effective_components"]
        weights = [scalars[f"mn/layer{layer}/weight_sorted_{k}"][-1][1] for k in range(3)]
        assert 0 <= ent[-1][1] <= math.log(3) + 1e-5 and 1 - 1e-5 <= eff[-1][1] <= 3 + 1e-5
        assert weights == sorted(weights, reverse=True) and abs(sum(weights) - 1) < 1e-5
    assert not any(t.startswith("mn/layer1/") for t in scalars)  # layer 1 is BatchNorm
    assert images == {"samples/batch": [2, 4]}
    assert any(t.startswith("config") for t in texts)


def test_run_folder_layout_and_keep_last(tmp_path):
    result = train(
        tiny_cfg(tmp_path, iters=7, ckpt_every=2, keep_last=2), images=tiny_images(), progress=False
    )
    run = result.run_dir
    assert [i for i, _ in RunFolder(run).checkpoints()] == [6, 7]  # every 2, the end; last 2 kept
    # no evaluator: at checkpoints
    assert [i for i, _ in RunFolder(run).snapshots()] == [2, 4, 6, 7]
    saved = json.loads((run / "config.json").read_text())
    assert saved["run_name"] == "run" and saved["iters"] == 7 and saved["mn_layers"] == [0, 1]
    assert list(run.glob("events.out.tfevents.*"))
    assert not list(run.rglob("*.tmp"))
    payload = torch.load(RunFolder(run).checkpoint_file(7), weights_only=True)
    assert payload["kind"] == "full" and payload["images_seen"] == 56


def test_existing_run_folder_is_refused_untouched(tmp_path):
    first = train(tiny_cfg(tmp_path, iters=2), images=tiny_images(), progress=False)
    before = {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*")}
    with pytest.raises(
        ConfigError, match=r"--run-name 'run': .* already exists; continue that run with --resume"
    ):
        train(tiny_cfg(tmp_path, iters=2), images=tiny_images(), progress=False)
    assert {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*")} == before


def test_resume_refuses_other_architecture(tmp_path):
    first = train(tiny_cfg(tmp_path, iters=2), images=tiny_images(), progress=False)
    with pytest.raises(ConfigError, match=r"--ngf 16: conflicts with the resumed run's ngf=8"):
        train(
            tiny_cfg(tmp_path, iters=4, ngf=16),
            images=tiny_images(),
            progress=False,
            resume=first.run_dir,
        )


@pytest.mark.parametrize(
    "speed", [dict(amp="bf16"), dict(channels_last=True), dict(amp="bf16", channels_last=True)]
)
def test_speed_switches_match_fp32(tmp_path, speed):
    images = tiny_images()
    kw = dict(iters=3, log_every=1, mn_layers="0,1")
    ref = train(tiny_cfg(tmp_path, run_name="ref", **kw), images=images, progress=False)
    fast = train(tiny_cfg(tmp_path, run_name="fast", **kw, **speed), images=images, progress=False)
    a, _, _ = read_tensorboard(ref.run_dir)
    b, _, _ = read_tensorboard(fast.run_dir)
    tol = 3e-2 if speed.get("amp") == "bf16" else 1e-4
    for tag in ("loss/D", "loss/G", "D/real", "D/fake"):
        (_, va), (_, vb) = a[tag][0], b[tag][0]  # the first step: same weights, same batch
        assert math.isfinite(vb) and abs(va - vb) <= tol * abs(va), (tag, va, vb)
        assert all(math.isfinite(v) for _, v in b[tag])
    # Checkpoints are layout-independent: a channels_last run's generator loads anywhere.
    gen, _, _ = C.load_generator(fast.checkpoint)
    assert torch.isfinite(gen.sample(torch.randn(8, 100))).all()


def test_compile_matches_eager(tmp_path):
    # aot_eager traces G and D through dynamo and AOTAutograd like inductor does, without building
    # C++ kernels (minutes on 2 cores); the slow test in test_step.py compiles with inductor.
    images = tiny_images()
    kw = dict(iters=3, log_every=1, mn_layers="none")
    ref = train(tiny_cfg(tmp_path, run_name="eager", **kw), images=images, progress=False)
    comp = train(
        tiny_cfg(tmp_path, run_name="compiled", compile=True, **kw),
        images=images,
        progress=False,
        compile_backend="aot_eager",
    )
    a, _, _ = read_tensorboard(ref.run_dir)
    b, _, _ = read_tensorboard(comp.run_dir)
    for tag in ("loss/D", "loss/G"):
        assert len(a[tag]) == len(b[tag]) == 3, tag  # zip below must not pass on empty logs
        for (sa, va), (sb, vb) in zip(a[tag], b[tag]):
            assert sa == sb and abs(va - vb) <= 1e-4 * abs(va)
    ga = C.load_checkpoint(ref.checkpoint)["generator"]
    gb = C.load_checkpoint(comp.checkpoint)["generator"]
    assert ga.keys() == gb.keys()  # no "_orig_mod." prefixes in a compiled run's checkpoint
    # Adam's first steps move a weight by about lr * sign(gradient) whatever the gradient's size,
    # so float noise on a near-zero gradient can flip one weight's step: bounded by 2 lr a step.
    lr, iters = comp.config.lr, comp.iteration
    for k in ga:
        diff = (ga[k].float() - gb[k].float()).abs()
        assert diff.max() <= 2 * lr * iters and diff.mean() <= 0.02 * lr * iters, k


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--amp 'fp16' needs a CUDA device"):
        train(tiny_cfg(tmp_path, amp="fp16"), images=tiny_images(), progress=False)
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.parametrize("native", [True, False])
def test_amp_follows_the_cpus_bf16(tmp_path, monkeypatch, capsys, native):
    """--amp auto picks bf16 only where the CPU has it; --amp bf16 without it warns (emulated
    bf16 is ~20x slower); the run records what it chose and the CPU capability."""
    monkeypatch.setattr(device_helpers, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert device_helpers.resolve_amp("auto", cpu) == ("bf16" if native else "none", None)
    assert device_helpers.resolve_amp("none", cpu) == ("none", None)
    chosen, warning = device_helpers.resolve_amp("bf16", cpu)
    assert chosen == "bf16" and (warning is None) == native
    if not native:
        assert (
            "has no native bf16" in warning and "~20x slower" in warning and "--amp auto" in warning
        )
    train(
        tiny_cfg(tmp_path, amp="bf16", iters=2, run_name="bf16"),
        images=tiny_images(),
        progress=False,
    )
    assert ("has no native bf16" in capsys.readouterr().err) == (not native)
    train(
        tiny_cfg(tmp_path, amp="auto", iters=2, run_name="auto"),
        images=tiny_images(),
        progress=False,
    )
    cfg = json.loads((tmp_path / "runs" / "auto" / "config.json").read_text())
    assert cfg["amp"] == "auto" and cfg["extra"]["amp"] == ("bf16" if native else "none")
    assert cfg["extra"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("nan_at, log_every", [(5, 2), (3, 100)])
def test_nonfinite_training_stops_and_keeps_finite_checkpoints(tmp_path, nan_at, log_every):
    """A NaN injected into G's weights after iteration ``nan_at``: the run stops at the next
    check, writes nothing from the NaN state, prunes nothing, and says where it happened."""

    def poison(iteration, G, D):
        if iteration == nan_at:
            with torch.no_grad():
                next(G.parameters()).fill_(float("nan"))

    cfg = tiny_cfg(tmp_path, iters=12, ckpt_every=2, keep_last=2, log_every=log_every, fid_every=2)
    result = train(
        cfg,
        images=tiny_images(),
        progress=False,
        step_hook=poison,
        evaluator=FakeEvaluator([50.0 - i for i in range(6)]),
    )
    assert result.stopped_by == "non-finite"
    run_dir = tmp_path / "runs" / "run"
    kept = RunFolder(run_dir).checkpoints()
    # the finite ones, none pruned
    assert [i for i, _ in kept] == list(range(2, nan_at + 1, 2))[-2:]
    for _, path in kept:  # finite and loadable
        payload = C.load_checkpoint(path)
        assert all(
            torch.isfinite(t).all() for t in payload["generator"].values() if t.is_floating_point()
        )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in rows) <= nan_at
    assert all(i <= nan_at for i, _ in RunFolder(run_dir).snapshots())


def test_train_cli_exit_code_for_nonfinite(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from conftest import load_script
    import dcgan_mn.training as T

    def fake_train(cfg, **kw):
        return T.TrainResult(
            run_dir=tmp_path,
            config=cfg,
            iteration=3,
            images_seen=24,
            train_seconds=1.0,
            stopped_by="non-finite",
            checkpoint=None,
            best_metric="fid",
            best_value=None,
            best_iteration=None,
            last_log={},
        )

    monkeypatch.setattr(T, "train", fake_train)
    cli = load_script("train.py", "main")
    res = CliRunner().invoke(
        cli, ["--fid-every", "0", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    )
    assert res.exit_code == 4


def test_metrics_jsonl_helpers(tmp_path, capsys):
    from dcgan_mn.fileio import append_jsonl, read_jsonl

    folder = RunFolder(tmp_path)
    path = folder.metrics_file
    assert folder.drop_metrics_after(5) == 0 and not path.exists()
    for it in (2, 4, 6):
        append_jsonl(path, {"iteration": it, "fid": float("nan") if it == 6 else it / 2})
    with open(path, "a") as f:
        f.write('{"iteration": 8, "fi')  # a crash in the middle of a line
    assert [r["iteration"] for r in read_jsonl(path)] == [2, 4, 6]
    assert f"{path}: ignoring line 4, cut short" in capsys.readouterr().err  # said, not silent
    assert read_jsonl(path)[-1]["fid"] is None  # NaN is written as null: every line stays JSON
    assert folder.drop_metrics_after(4) == 1
    assert [r["iteration"] for r in read_jsonl(path)] == [2, 4] and path.read_text().endswith("\n")
    path.write_text('{"iteration": 2}\nnot json\n{"iteration": 4}\n')
    with pytest.raises(ValueError, match=f"{path}: line 2 is not JSON"):
        read_jsonl(path)


class TinyFeatures:
    """A small injected feature network (uint8 [N, 3, H, W] -> [N, 16]) for the real evaluator."""

    dims, weights_sha256, batch_size = 16, "ab" * 32, 32

    def __init__(self):
        self.proj = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))

    def __call__(self, images):
        # [N, 48]
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return torch.tanh(pooled @ self.proj)  # [N, 16]


def test_with_the_real_evaluator(tmp_path):
    """train() + metrics.build_evaluator (tiny injected features, an image-folder reference)."""
    from PIL import Image

    from dcgan_mn import metrics

    images = tiny_images(40)
    (tmp_path / "ref").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "ref" / f"{i}.png")
    cfg = tiny_cfg(
        tmp_path, iters=4, fid_every=2, fid_samples=24, ref=str(tmp_path / "ref"), dims=64
    )
    evaluator = metrics.build_evaluator(
        cfg, "cpu", feature_extractor=TinyFeatures(), cache_dir=tmp_path / "cache"
    )
    result = train(cfg, evaluator=evaluator, images=images, progress=False)
    rows = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["iteration"] for r in rows] == [2, 4]
    for r in rows:
        assert r["num_samples"] == 24 and r["sample_mode"] == "batch" and math.isfinite(r["fid"])
        assert r["weights_sha256"] == "ab" * 32 and "kid" in r and "precision" in r
    scalars, _, _ = read_tensorboard(result.run_dir)
    assert [s for s, _ in scalars["metrics/fid_24"]] == [2, 4]


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch):
    """ENOSPC injected at the writer (the fsync of the iteration-4 checkpoint): one error naming
    the file and the reason, no temporary file left, the iteration-2 checkpoint intact; train.py
    says how to continue."""
    import errno

    import dcgan_mn.fileio as F
    from click.testing import CliRunner

    from conftest import load_script

    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and "ckpt-00000004" in os.readlink(
            f"/proc/self/fd/{fd}"
        ):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(F.os, "fsync", fsync)
    cfg = tiny_cfg(tmp_path, iters=6, ckpt_every=2)
    with pytest.raises(
        F.WriteError, match=r"cannot write .*ckpt-00000004\.pt: No space left on device \[ENOSPC\]"
    ):
        train(cfg, images=tiny_images(), progress=False)
    run_dir = tmp_path / "runs" / "run"
    assert [i for i, _ in RunFolder(run_dir).checkpoints()] == [2]
    assert C.load_checkpoint(RunFolder(run_dir).checkpoint_file(2))["iteration"] == 2
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    # The CLI: one line, the command to continue, exit 1.
    cli = load_script("train.py", "main")
    res = CliRunner().invoke(
        cli,
        [
            *"--dataset stacked-digits --stack-size 64 --ngf 8 --ndf 8 --batch-size 8 --mn-fit-points 64 --iters 6 --ckpt-every 2 --fid-every 0 --device cpu --no-progress --out".split(),
            str(tmp_path / "cli"),
            "--run-name",
            "r",
        ],
    )
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "No space left on device [ENOSPC]" in res.output
    assert f"python train.py --resume {tmp_path / 'cli' / 'r'}" in res.output


def test_write_error_on_resuming_a_folder_without_checkpoint_names_that_folder(
    tmp_path, monkeypatch
):
    """A run killed before its first checkpoint is resumed by its folder; a write failure there
    names that folder's --resume command (it once took the folder's parent)."""
    import errno

    import dcgan_mn.fileio as F
    from click.testing import CliRunner

    from conftest import load_script

    real_fsync = os.fsync

    def fsync(fd):
        if "ckpt-00000002" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(F.os, "fsync", fsync)
    cli = load_script("train.py", "main")
    flags = "--iters 4 --ckpt-every 2 --fid-every 0 --device cpu --no-progress".split()
    run = tmp_path / "cli" / "r"
    res = CliRunner().invoke(
        cli,
        [
            *"--dataset stacked-digits --stack-size 64 --ngf 8 --ndf 8 --batch-size 8 --mn-fit-points 64".split(),
            *flags,
            "--out",
            str(tmp_path / "cli"),
            "--run-name",
            "r",
        ],
    )
    assert (
        res.exit_code == 1
        and RunFolder(run).config_file.is_file()
        and not RunFolder(run).checkpoints()
    )
    res = CliRunner().invoke(cli, ["--resume", str(run), *flags])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "No space left on device [ENOSPC]" in res.output
    assert f"python train.py --resume {run}" in res.output


def test_run_files_have_the_umasks_permissions(tmp_path):
    """Checkpoints, config.json, best.pt and snapshots are written through temporary files
    (private, 0600, while they are written) and end with what open() would give under the
    umask, so a group's collaborators can read a shared run."""
    import stat

    old = os.umask(0o022)
    try:
        result = train(
            tiny_cfg(tmp_path, iters=2, ckpt_every=2, fid_every=2),
            images=tiny_images(),
            progress=False,
            evaluator=FakeEvaluator([10.0]),
        )
    finally:
        os.umask(old)
    files = [p for p in result.run_dir.rglob("*") if p.is_file() and "events.out" not in p.name]
    names = {p.name for p in files}
    assert {
        "config.json",
        "metrics.jsonl",
        "best.pt",
        "ckpt-00000002.pt",
        "G-00000002.pt",
    } <= names, names
    for p in files:
        if p.name != "run.lock":
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p.name, oct(p.stat().st_mode))


TMPFS_CHECK = """
import sys, torch
from dcgan_mn.runfolder import RunFolder
folder = RunFolder(sys.argv[1])
kept = folder.checkpoints()
print("kept", [i for i, _ in kept])
print("loads", all(torch.load(p, weights_only=True)["iteration"] == i for i, p in kept))
print("tmp", sorted(p.name for p in folder.path.rglob("*.tmp")))
"""


def test_full_disk_on_a_real_small_tmpfs(tmp_path):
    """A real full filesystem: train.py writes to a 3.5 MB tmpfs (mounted in a user and mount
    namespace, so no root is needed where the kernel allows it; skipped where it does not). The
    first checkpoint and snapshot fit, the second checkpoint does not: one line naming the file
    and ENOSPC, exit 1, the first checkpoint intact and loadable, no temporary file left."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here")
    mnt = tmp_path / "small"
    mnt.mkdir()
    probe = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    run_dir = mnt / "runs" / "r"
    train_cmd = " ".join(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *"--dataset stacked-digits --stack-size 64 --ngf 8 --ndf 8 --batch-size 8 --mn-fit-points 64 --iters 6 --ckpt-every 2 --fid-every 0 --sample-every 0 --device cpu --no-progress --out".split(),
            str(mnt / "runs"),
            "--run-name",
            "r",
        ]
    )
    script = (
        f"mount -t tmpfs -o size=3500k tmpfs {mnt} && {{ {train_cmd}; echo rc=$?; "
        f"{sys.executable} -c '{TMPFS_CHECK}' {run_dir}; }}"
    )
    res = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert "rc=1" in res.stdout, out
    assert (
        f"cannot write {run_dir / 'ckpt-00000004.pt'}: No space left on device [ENOSPC]" in out
    ), out
    assert f"python train.py --resume {run_dir}" in out and "Traceback" not in out
    assert "kept [2]" in res.stdout and "loads True" in res.stdout and "tmp []" in res.stdout, out


def test_resume_of_a_folder_without_checkpoint_restarts_it(tmp_path, capsys):
    """A run killed before its first checkpoint: --resume FOLDER starts it again from iteration
    0 with its saved config, and ends exactly where an uninterrupted run does."""

    class Killed(Exception):
        pass

    def die(iteration, G, D):
        if iteration == 3:
            raise Killed

    kw = dict(iters=6, ckpt_every=0, fid_every=2, log_every=2)
    with pytest.raises(Killed):
        train(
            tiny_cfg(tmp_path, run_name="cut", **kw),
            images=tiny_images(),
            progress=False,
            evaluator=FakeEvaluator([9, 8, 7, 6]),
            step_hook=die,
        )
    cut = tmp_path / "runs" / "cut"
    assert (cut / "config.json").is_file() and not RunFolder(cut).checkpoints()
    resumed = train(
        tiny_cfg(tmp_path, run_name="cut", **kw),
        images=tiny_images(),
        progress=False,
        evaluator=FakeEvaluator([9, 8, 7]),
        resume=cut,
    )
    assert "has no checkpoint yet: restarting it from iteration 0" in capsys.readouterr().err
    full = train(
        tiny_cfg(tmp_path, run_name="full", **kw),
        images=tiny_images(),
        progress=False,
        evaluator=FakeEvaluator([9, 8, 7]),
    )
    assert resumed.iteration == 6
    for key in ("generator", "discriminator", "opt_g", "rng"):
        assert_same_tensors(state_of(full.run_dir)[key], state_of(cut)[key], key)
    rows = [json.loads(x)["iteration"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6]  # the dead run's row at 2 was dropped, not doubled


def test_resume_if_exists_starts_or_continues(tmp_path):
    from click.testing import CliRunner

    from conftest import load_script

    cli = load_script("train.py", "main")
    args = [
        *"--dataset stacked-digits --stack-size 64 --ngf 8 --ndf 8 --batch-size 8 --mn-fit-points 64 --fid-every 0 --device cpu --no-progress --out".split(),
        str(tmp_path),
        "--run-name",
        "job",
        "--resume-if-exists",
    ]
    first = CliRunner().invoke(cli, [*args, "--iters", "2"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(cli, [*args, "--iters", "4"])
    assert second.exit_code == 0, second.output
    assert (
        "resuming" in second.output
        and [i for i, _ in RunFolder(tmp_path / "job").checkpoints()][-1] == 4
    )
    bad = CliRunner().invoke(cli, ["--resume-if-exists", "--no-progress"])
    assert bad.exit_code == 2 and "give --run-name" in bad.output


def test_tf_dcgan_trains_and_resumes_exactly(tmp_path):
    """--g-arch tf-dcgan through the whole loop: checkpoints load back into the same
    architecture, and a resumed run ends bitwise where an uninterrupted one does."""
    kw = dict(g_arch="tf-dcgan", mn_layers="0,3", ckpt_every=2)
    straight = train(
        tiny_cfg(tmp_path, run_name="straight", iters=4, **kw), images=tiny_images(), progress=False
    )
    first = train(
        tiny_cfg(tmp_path, run_name="cut", iters=2, **kw), images=tiny_images(), progress=False
    )
    resumed = train(
        tiny_cfg(tmp_path, run_name="cut", iters=4, **kw),
        images=tiny_images(),
        progress=False,
        resume=first.run_dir,
    )
    a, b = state_of(straight.run_dir), state_of(resumed.run_dir)
    assert_same_tensors(a["generator"], b["generator"])
    gen, cfg, _ = C.load_generator(RunFolder(resumed.run_dir).latest_checkpoint())
    assert cfg.g_arch == "tf-dcgan" and len(gen.norm_layers) == 4


def test_resume_past_a_corrupt_newest_checkpoint_is_exact(tmp_path, capsys):
    """The newest checkpoint is corrupt: --resume FOLDER continues from the newest readable one,
    moves the corrupt one aside (renamed *.corrupt, bytes kept) with one warning line, and ends
    bitwise where an uninterrupted run ends."""
    kw = dict(iters=6, ckpt_every=2, keep_last=5, log_every=2, fid_every=2)
    full = train(
        tiny_cfg(tmp_path, run_name="full", **kw),
        images=tiny_images(),
        progress=False,
        evaluator=FakeEvaluator([9, 8, 7]),
    )
    part = train(
        tiny_cfg(tmp_path, run_name="part", **{**kw, "iters": 4}),
        images=tiny_images(),
        progress=False,
        evaluator=FakeEvaluator([9, 8]),
    )
    folder = RunFolder(part.run_dir)
    newest = folder.checkpoint_file(4)
    cut = newest.read_bytes()[:1000]
    newest.write_bytes(cut)
    capsys.readouterr()
    resumed = train(
        tiny_cfg(tmp_path, run_name="part", **kw),
        images=tiny_images(),
        progress=False,
        resume=part.run_dir,
        evaluator=FakeEvaluator([8, 7]),
    )
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert (
        len(warnings) == 1
        and "ckpt-00000004.pt" in warnings[0]
        and "ckpt-00000004.pt.corrupt" in warnings[0]
    )
    assert "ckpt-00000002.pt" in warnings[0], warnings
    assert "resuming" in err and "at iteration 2" in err
    assert newest.with_name("ckpt-00000004.pt.corrupt").read_bytes() == cut  # kept, not deleted
    assert resumed.iteration == 6
    a, b = state_of(full.run_dir), state_of(resumed.run_dir)
    for key in (
        "generator",
        "discriminator",
        "opt_g",
        "opt_d",
        "rng",
        "data",
        "fixed_noise",
        "log_window",
    ):
        assert_same_tensors(a[key], b[key], key)
    assert [i for i, _ in folder.checkpoints()] == [2, 4, 6]
    rows = [json.loads(x)["iteration"] for x in (folder.metrics_file).read_text().splitlines()]
    assert rows == [2, 4, 6]


def test_resume_with_every_checkpoint_corrupt_is_refused_untouched(tmp_path):
    part = train(
        tiny_cfg(tmp_path, iters=4, ckpt_every=2, keep_last=5), images=tiny_images(), progress=False
    )
    folder = RunFolder(part.run_dir)
    for _, p in folder.checkpoints():
        p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(C.CheckpointError, match="ckpt-00000004.pt.*unreadable"):
        train(
            tiny_cfg(tmp_path, iters=6, ckpt_every=2, keep_last=5),
            images=tiny_images(),
            progress=False,
            resume=part.run_dir,
        )
    assert [i for i, _ in folder.checkpoints()] == [2, 4] and not list(
        folder.path.glob("*.corrupt")
    )


def test_rows_record_the_load_and_the_epoch_is_fractional(tmp_path, monkeypatch):
    """Every metrics row says how loaded the machine was (load average per core; None where
    there is none); progress/epoch counts the share of an epoch seen, not only whole epochs."""
    run = train(
        tiny_cfg(tmp_path, iters=6, log_every=2, fid_every=3),
        images=tiny_images(),
        progress=False,
        evaluator=FakeEvaluator([9, 8]),
    )
    rows = RunFolder(run.run_dir).metrics_rows()
    expect = round(os.getloadavg()[0] / os.cpu_count(), 2)
    for r in rows:
        assert isinstance(r["load_per_core"], float) and abs(r["load_per_core"] - expect) < 2.0
    scalars, _, _ = read_tensorboard(run.run_dir)
    assert [v for _, v in scalars["progress/epoch"]] == [0.25, 0.5, 0.75]  # 64 images, batches of 8

    def no_loadavg():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_loadavg)
    other = train(
        tiny_cfg(tmp_path, run_name="other", iters=3, fid_every=3),
        images=tiny_images(),
        progress=False,
        evaluator=FakeEvaluator([9]),
    )
    assert RunFolder(other.run_dir).metrics_rows()[0]["load_per_core"] is None
