"""train.py end to end through click: defaults in --help, --dry-run, one-line errors that touch
nothing, resume rules, and SIGINT/SIGTERM in a real subprocess."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TRAIN_TINY, invoker, load_script, tiny_cfg, write_fake_cifar10
from dcgan_mn.runfolder import RunFolder
from dcgan_mn import checkpoint as C
from dcgan_mn.commands import script_path

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("train_single_thread")


cli = load_script("train.py", "main")
TINY = [*TRAIN_TINY, "--sample-every", "0", "--fid-every", "0"]
run = invoker(cli)


@pytest.fixture
def env(tmp_path):
    """(data root with a tiny CIFAR-10, output folder)."""
    return write_fake_cifar10(tmp_path / "data", images_per_batch=16), tmp_path / "runs"


def snapshot_tree(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")}


def error_line(result):
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_help_shows_every_default():
    out = run("--help").output
    for flag in "--mn-layers --mn-components --mn-fit-points --mn-kmeans-iters --z-dim --ngf --ndf --lr --beta1 --beta2 --batch-size --iters --seed --device --dataset --data-root --out --run-name --sample-mode --sample-every --log-every --ckpt-every --keep-last --fid-every --fid-samples --ref --inception-weights --dims --amp --channels-last --compile --sync-norm --resume --dry-run".split():
        assert flag in out, flag
    flat = " ".join(out.split())
    for default in [
        "[default: 0,1]",
        "[default: 64]",
        "[default: 100000]",
        "[default: auto]",
        "[default: checkpoints]",
        "[default: cifar10]",
        "[default: batch]",
        "[default: 2000]",
    ]:
        assert default in flat, default


def test_dry_run_prints_config_and_writes_nothing(env):
    data, out = env
    result = run(
        "--dry-run", "--out", out, "--mn-layers", "all", "--run-name", "x", "--iters", "10"
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)
    assert cfg["mn_layers"] == [0, 1, 2] and cfg["iters"] == 10 and cfg["run_name"] == "x"
    assert not out.exists()


@pytest.mark.parametrize(
    "args,flag_value",
    [
        (["--mn-layers", "3"], "--mn-layers"),
        (["--mn-layers", "0,x"], "'x'"),
        (["--mn-components", "0"], "--mn-components 0"),
        (["--iters", "-1"], "--iters -1"),
        (["--iters", "0"], "--iters 0: must be >= 1"),
        (["--batch-size", "1"], "--batch-size 1"),
        (["--keep-last", "0"], "--keep-last 0"),
        (["--log-every", "-5"], "--log-every -5"),
        (["--fid-samples", "1"], "--fid-samples 1"),
        (["--lr", "0"], "--lr 0.0"),
        (["--dataset", "imagenet"], "'imagenet'"),
        (["--sample-mode", "eval"], "'eval'"),
        (["--dims", "100"], "'100'"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--run-name", "a/b"], "--run-name 'a/b'"),
        (["--iters", "ten"], "'ten'"),
        (["--sync-norm"], "--sync-norm"),
    ],
)
def test_bad_flags_are_one_line_and_write_nothing(env, args, flag_value):
    data, out = env
    result = run(*TINY, "--data-root", data, "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert flag_value in error_line(result)
    assert not out.exists()


def test_cuda_without_cuda(env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data, out = env
    result = run(*TINY, "--data-root", data, "--out", out, "--device", "cuda")
    assert result.exit_code == 2 and "--device 'cuda': CUDA is not available" in error_line(result)
    result = run(*TINY, "--data-root", data, "--out", out, "--amp", "fp16")
    assert result.exit_code == 2 and "--amp 'fp16' needs a CUDA device" in error_line(result)
    assert not out.exists()


def test_offline_cifar10_and_empty_folder(tmp_path, monkeypatch):
    import torchvision.datasets.utils as U

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(U, "download_and_extract_archive", offline)
    out = tmp_path / "runs"
    result = run(*TINY, "--data-root", tmp_path / "data", "--out", out)
    assert result.exit_code == 1
    line = error_line(result)
    assert (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in line and "--data-root" in line
    )
    (tmp_path / "empty").mkdir()
    result = run(*TINY, "--dataset", "folder", "--data-root", tmp_path / "empty", "--out", out)
    assert result.exit_code == 1 and "no images" in error_line(result)
    assert not out.exists()


def test_image_folder_training(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        img = torch.randint(0, 256, (48, 40, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(img).save(tmp_path / f"{i}.{'png' if i % 2 else 'JPG'}")
    result = run(
        *TINY,
        "--dataset",
        "folder",
        "--data-root",
        tmp_path,
        "--out",
        tmp_path / "runs",
        "--run-name",
        "f",
        "--iters",
        "2",
    )
    assert result.exit_code == 0, result.output
    payload = C.load_checkpoint(tmp_path / "runs" / "f" / "ckpt-00000002.pt")
    assert payload["config"]["extra"]["num_train_images"] == 10


def test_train_existing_folder_and_resume_rules(env):
    data, out = env
    base = [*TINY, "--data-root", data, "--out", out, "--run-name", "r", "--log-every", "1"]
    first = run(*base, "--iters", "2", "--ckpt-every", "1")
    assert first.exit_code == 0, first.output
    run_dir = out / "r"
    before = snapshot_tree(run_dir)

    again = run(*base, "--iters", "2")  # a new run into an existing folder
    assert (
        again.exit_code == 2
        and "--run-name 'r'" in error_line(again)
        and "--resume" in error_line(again)
    )
    for args, expect in [
        (["--resume", run_dir, "--ngf", "16"], "--ngf 16: conflicts with the resumed run's ngf=8"),
        (["--resume", run_dir, "--mn-layers", "none"], "--mn-layers 'none': conflicts"),
        (["--resume", run_dir, "--lr", "0.1"], "--lr 0.1: conflicts"),
        (
            ["--resume", run_dir, "--run-name", "z"],
            "--run-name 'z': cannot be combined with --resume",
        ),
        (["--resume", run_dir / "nope"], "no such file or folder"),
        (
            ["--resume", run_dir, "--iters", "1"],
            "--iters 1: the resumed run is already at iteration 2",
        ),
        (
            ["--resume", RunFolder(run_dir).snapshot_file(2)],
            "a generator-only snapshot cannot be resumed",
        ),
        (
            ["--resume", RunFolder(run_dir).checkpoint_file(1)],
            "newer checkpoints (ckpt-00000002.pt)",
        ),
    ]:
        result = run("--no-progress", *args)
        assert result.exit_code in (1, 2) and expect in error_line(result), (args, result.output)
    assert snapshot_tree(run_dir) == before  # none of the refusals touched the run

    dry = run("--resume", run_dir, "--iters", "4", "--dry-run")
    assert json.loads(dry.output)["iters"] == 4 and dry.exit_code == 0
    # same value: fine
    resumed = run("--resume", run_dir, "--iters", "4", "--ngf", "8", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert [i for i, _ in RunFolder(run_dir).checkpoints()][-1] == 4
    assert json.loads((run_dir / "config.json").read_text())["iters"] == 4


@pytest.mark.parametrize("case", ["corrupt", "foreign", "mismatched_weights"])
def test_bad_resume_checkpoints(env, case):
    data, out = env
    assert (
        run(*TINY, "--data-root", data, "--out", out, "--run-name", "r", "--iters", "1").exit_code
        == 0
    )
    path = RunFolder(out / "r").checkpoint_file(1)
    if case == "corrupt":
        path.write_bytes(path.read_bytes()[:1000])
    elif case == "foreign":
        torch.save({"state_dict": {}}, path)
    else:  # weights of a BN generator under a config that says MN
        payload = C.load_checkpoint(path)
        from dcgan_mn.models import Generator

        payload["generator"] = Generator(z_dim=100, ngf=8, mn_layers="none").state_dict()
        C.save_checkpoint(path, payload)
    before = snapshot_tree(out / "r")
    result = run("--resume", out / "r", "--iters", "3", "--no-progress")
    assert result.exit_code == 1
    expect = {
        "corrupt": "unreadable",
        "foreign": "not a dcgan_mn checkpoint",
        "mismatched_weights": "do not fit the architecture",
    }[case]
    assert expect in error_line(result) and str(path) in error_line(result)
    assert snapshot_tree(out / "r") == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_checkpoint_and_exits_cleanly(env, sig):
    data, out = env
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        "--data-root",
        str(data),
        "--out",
        str(out),
        *"--run-name s --iters 100000 --ckpt-every 2 --log-every 1".split(),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    run_dir = out / "s"
    deadline = time.time() + 120
    while not RunFolder(run_dir).checkpoint_file(2).exists():  # the loop is running
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    stopped = RunFolder(run_dir).latest_checkpoint()
    iteration = C.load_checkpoint(stopped)["iteration"]
    assert iteration >= 2 and f"{sig.name}: stopped at iteration {iteration}" in stderr
    assert not list(run_dir.rglob("*.tmp"))
    resumed = run("--resume", run_dir, "--iters", iteration + 2, "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert C.load_checkpoint(RunFolder(run_dir).latest_checkpoint())["iteration"] == iteration + 2


def _immutable_folder(path):
    """``path`` made immutable with chattr +i (None where the kernel or filesystem refuses)."""
    import shutil

    path.mkdir()
    if shutil.which("chattr") is None:
        return None
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    return path if done.returncode == 0 else None


@pytest.mark.parametrize("case", ["file", "under_file", "proc", "immutable"])
def test_out_that_cannot_hold_a_run_is_one_line(env, tmp_path, case, monkeypatch):
    """--out at a file, under /proc or at an immutable folder: one line naming --out, the path
    and the reason (exit 2), before the evaluator is built (that can take minutes and print)."""
    import dcgan_mn.metrics

    def no_evaluator(*a, **k):
        raise AssertionError("the evaluator was built before --out was checked")

    monkeypatch.setattr(dcgan_mn.metrics, "build_evaluator", no_evaluator)
    data, _ = env
    out = {
        "file": tmp_path / "hello.txt",
        "under_file": tmp_path / "hello.txt" / "runs",
        "proc": Path("/proc/dcgan_mn_no_such_dir"),
        "immutable": tmp_path / "frozen",
    }[case]
    (tmp_path / "hello.txt").write_text("hello\n")
    if case == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    if case == "immutable" and _immutable_folder(out) is None:
        pytest.skip("chattr +i refused here")
    try:
        result = run(*TINY, "--data-root", data, "--out", out, "--iters", "1", "--fid-every", "1")
    finally:
        if case == "immutable":
            subprocess.run(["chattr", "-i", str(out)])
    assert not isinstance(result.exception, OSError), result.output
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"--out {str(out)!r}" in line, line
    expect = {
        "file": "is a file",
        "under_file": "which is a file",
        "proc": "No such file or directory",
        "immutable": "Operation not permitted",
    }[case]
    assert expect in line, line
    assert (tmp_path / "hello.txt").read_text() == "hello\n"


def test_resume_of_a_text_file_is_one_line(env, tmp_path):
    text = tmp_path / "hello.txt"
    text.write_text("hello\n")
    result = run("--resume", text, "--no-progress")
    assert result.exit_code == 1 and not isinstance(result.exception, KeyError), result.output
    line = error_line(result)
    assert str(text) in line and "unreadable" in line and "KeyError" in line


def test_corrupt_newest_checkpoint_is_set_aside_and_the_run_continues(env):
    data, out = env
    base = [*TINY, "--data-root", data, "--out", out, "--run-name", "r", "--keep-last", "3"]
    assert run(*base, "--iters", "2", "--ckpt-every", "1").exit_code == 0
    folder = RunFolder(out / "r")
    newest = folder.checkpoint_file(2)
    newest.write_bytes(newest.read_bytes()[:1000])
    # The older intact checkpoint alone is still refused (newer ones exist), pointing at the folder.
    older = run("--resume", folder.checkpoint_file(1), "--no-progress")
    assert older.exit_code == 1 and "resume the folder itself" in error_line(older)
    result = run("--resume", out / "r", "--iters", "3", "--no-progress")
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "ckpt-00000002.pt.corrupt" in warnings[0], result.output
    assert "Traceback" not in result.output
    assert [i for i, _ in folder.checkpoints()] == [1, 2, 3]
    assert newest.with_name("ckpt-00000002.pt.corrupt").is_file()


def test_resume_with_a_garbage_config_json_warns(env):
    data, out = env
    assert (
        run(*TINY, "--data-root", data, "--out", out, "--run-name", "r", "--iters", "1").exit_code
        == 0
    )
    config = out / "r" / "config.json"
    config.write_text("{garbage")
    result = run("--resume", out / "r", "--iters", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, result.output
    assert (
        str(config) in warnings[0]
        and "unreadable" in warnings[0]
        and "ckpt-00000001.pt" in warnings[0]
    )
    assert json.loads(config.read_text())["iters"] == 2  # rewritten from the checkpoint's config


@pytest.mark.parametrize("fid_every", ["0", "5"])
def test_ref_is_validated_even_when_not_evaluating(env, tmp_path, fid_every):
    data, out = env
    result = run(
        *TINY, "--data-root", data, "--out", out, "--ref", "nonsense", "--fid-every", fid_every
    )
    assert result.exit_code == 2 and "--ref 'nonsense'" in error_line(result), result.output
    missing = run(*TINY, "--data-root", data, "--out", out, "--ref", tmp_path / "stats.npz")
    assert missing.exit_code == 2 and "no such statistics file" in error_line(missing)
    assert not out.exists()
    (tmp_path / "refimgs").mkdir()
    np_file = tmp_path / "stats.npz"
    np_file.write_bytes(b"")
    for ok in ["cifar10-test", "stacked-digits", np_file, tmp_path / "refimgs"]:
        dry = run(*TINY, "--data-root", data, "--out", out, "--ref", ok, "--dry-run")
        assert dry.exit_code == 0, (ok, dry.output)


def test_ref_help_shows_its_default_once():
    flat = " ".join(run("--help").output.split())
    assert flat.count("[default: cifar10-train") == 1, flat


def test_resume_of_a_finished_run_says_so(env):
    """One line (where it stands, and the command that trains further), before anything is
    built or opened: no bars, and the run folder as it was."""
    data, out = env
    assert (
        run(*TINY, "--data-root", data, "--out", out, "--run-name", "r", "--iters", "2").exit_code
        == 0
    )
    before = snapshot_tree(out / "r")
    result = run("--resume", out / "r", "--progress")
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 1, result.output
    assert "already at --iters 2" in result.output and "pass --iters M" in result.output
    assert (
        f"{shlex.quote(sys.executable)} {script_path('train.py')} --resume {out / 'r'} --iters M"
        in result.output
    )
    assert snapshot_tree(out / "r") == before


def test_a_file_that_is_not_inception_weights_is_one_line(env, tmp_path):
    data, out = env
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 40)
    result = run(
        *TINY, "--data-root", data, "--out", out, "--fid-every", "2", "--inception-weights", garbage
    )
    assert result.exit_code == 1
    # no warning, no torch text
    assert result.output.splitlines() == [error_line(result)], result.output
    assert f"--inception-weights {str(garbage)!r}: not FID Inception weights" in result.output
    assert not out.exists()


@pytest.mark.parametrize("progress", ["--no-progress", "--progress"])
def test_logs_off_a_terminal_are_plain_lines(tmp_path, modes_cache, progress):
    """stderr redirected (a cluster job's log): with the bar on or off, one plain line per log
    window (iteration/total, images/s, losses, the last metric), no carriage returns or cursor
    codes; a line at an evaluated iteration shows that evaluation, so the last line agrees with
    metrics.jsonl's last row (and the final summary)."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *"--dataset stacked-digits --stack-size 64 --ngf 8 --ndf 8 --batch-size 8 --mn-fit-points 64 --device cpu --sample-every 0 --no-inception-metrics --fid-every 2 --mode-samples 64 --iters 4 --log-every 1 --out".split(),
        str(tmp_path / "runs"),
        "--run-name",
        "r",
        progress,
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DCGAN_MN_CACHE_DIR": str(modes_cache)},
    )
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "\x1b" not in log and "\r" not in log, repr(log)
    lines = [ln for ln in log.splitlines() if ln.startswith("iteration ")]
    assert [ln.split()[1] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"], log
    assert all("img/s" in ln and " D " in ln and " G " in ln for ln in lines), lines
    # evaluated at 2
    assert "cfd" not in lines[0] and "cfd" in lines[1] and "modes" in lines[1], lines
    last = [
        json.loads(r) for r in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()
    ][-1]
    assert (
        last["iteration"] == 4
        and f"cfd {last['cfd']:.2f}" in lines[-1]
        and f"modes {last['modes']}" in lines[-1]
    )


def test_offline_first_command_names_everything_missing(tmp_path, monkeypatch):
    """The README's first command offline: the first failure names the Inception weights AND
    CIFAR-10, and points at evaluate.py prepare; with --fid-every 0 the CIFAR-10 failure points
    there too; a --data-root that is a file is said to be one."""
    import torchvision.datasets.utils as U

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DCGAN_MN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(U, "download_and_extract_archive", offline)
    out, data = tmp_path / "runs", tmp_path / "data"
    EVALUATE = script_path("evaluate.py")
    result = run(*TINY, "--data-root", data, "--out", out, "--fid-samples", "8", "--fid-every", "2")
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert "Inception weights" in line and "--inception-weights" in line
    assert (
        "CIFAR-10" in line
        and str(data) in line
        and f"{shlex.quote(sys.executable)} {EVALUATE} prepare" in line
    ), line
    no_fid = run(*TINY, "--data-root", data, "--out", out)
    assert (
        no_fid.exit_code == 1
        and f"{shlex.quote(sys.executable)} {EVALUATE} prepare" in error_line(no_fid)
    )
    text = tmp_path / "hello.txt"
    text.write_text("hello\n")
    for dataset in ("cifar10", "folder"):
        as_file = run(*TINY, "--dataset", dataset, "--data-root", text, "--out", out)
        assert as_file.exit_code == 1 and "is a file" in error_line(as_file), as_file.output
        assert "download" not in error_line(as_file)
    assert not out.exists()


def unactivated_env() -> dict:
    """The environment of a shell where the venv was never activated: no VIRTUAL_ENV and no venv
    folder on PATH (PYTHONPATH stays: it points the interpreter at this checkout)."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return {**env, "PATH": path, "OMP_NUM_THREADS": "1"}


def test_the_printed_resume_command_runs_as_printed(tmp_path, capsys):
    """Ctrl-C prints the command that continues the run: it starts with the interpreter that is
    running (a venv's python need not be on PATH), and run as printed it finishes the run."""
    from dcgan_mn.training import train

    cfg = tiny_cfg(tmp_path, dataset="stacked-digits", stack_size=64, log_every=0, run_name="r")

    def interrupt(iteration, G, D):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(cfg, step_hook=interrupt, progress=False)
    assert result.stopped_by == "SIGINT" and result.iteration < cfg.iters
    said = [ln for ln in capsys.readouterr().err.splitlines() if "continue with: " in ln]
    assert len(said) == 1, said
    command = said[0].split("continue with: ", 1)[1]
    assert command.startswith(shlex.quote(sys.executable) + " "), command
    done = subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=300, env=unactivated_env()
    )
    assert done.returncode == 0, done.stderr
    assert (
        C.load_checkpoint(RunFolder(tmp_path / "runs" / "r").latest_checkpoint())["iteration"]
        == cfg.iters
    )
