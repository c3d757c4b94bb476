"""Stacked digits end to end: exact resume on a stacked dataset, a stacked-digits run with no
Inception weights (mode metrics only), ``evaluate.py modes`` and ``compare --metric modes``."""

import json
import statistics

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TRAIN_TINY, invoker, load_script, read_tensorboard, tiny_cfg
from dcgan_mn.runfolder import RunFolder
from dcgan_mn import checkpoint as C
from dcgan_mn import compare as C_
from dcgan_mn import rescore as RS
from dcgan_mn import digits as DG
from dcgan_mn.training import train

pytestmark = pytest.mark.usefixtures("train_single_thread")

train_cli = load_script("train.py", "main")
eval_cli = load_script("evaluate.py", "cli")
TINY = [*TRAIN_TINY, "--sample-every", "2", "--log-every", "2"]


def test_stacked_dataset_resumes_exactly(tmp_path):
    kw = dict(dataset="stacked-digits", stack_size=40, stack_seed=3, hflip=False)
    full = train(tiny_cfg(tmp_path, run_name="full", **kw), progress=False)
    part = train(tiny_cfg(tmp_path, run_name="part", **{**kw, "iters": 3}), progress=False)
    resumed = train(tiny_cfg(tmp_path, run_name="part", **kw), progress=False, resume=part.run_dir)
    a = C.load_checkpoint(RunFolder(full.run_dir).latest_checkpoint())
    b = C.load_checkpoint(RunFolder(resumed.run_dir).latest_checkpoint())
    for key in ("generator", "discriminator", "data"):
        for k in a[key]:
            va, vb = a[key][k], b[key][k]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, (key, k)
    cfg = json.loads((full.run_dir / "config.json").read_text())
    assert (cfg["dataset"], cfg["stack_size"], cfg["stack_seed"]) == ("stacked-digits", 40, 3)
    assert cfg["extra"]["num_train_images"] == 40


@pytest.fixture
def mode_run(offline_hub):
    out = offline_hub / "runs"
    result = CliRunner().invoke(
        train_cli,
        [
            *TINY,
            *"--dataset stacked-digits --stack-size 64 --iters 4".split(),
            *"--fid-every 2 --mode-samples 48".split(),
            *["--out", str(out), "--run-name", "digits"],
        ],
    )
    assert result.exit_code == 0, result.output
    return out / "digits", result.output


def test_stacked_run_without_inception_writes_mode_rows(mode_run, modes_classifier):
    run_dir, output = mode_run
    # FID was not asked for: nothing to say about its weights
    assert "Inception" not in output, output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4]
    for r in rows:
        assert r["mode_samples"] == 48 and "fid" not in r
        assert 1 <= r["modes"] <= 48 and 0 <= r["kl_modes"] <= 6.91 and r["cfd"] > 0
        assert r["classifier_sha256"] == modes_classifier.sha256
    scalars, images, _ = read_tensorboard(run_dir)
    assert [s for s, _ in scalars["metrics/modes_48"]] == [2, 4]
    assert "metrics/cfd_48" in scalars and "metrics/kl_modes_48" in scalars
    assert images["samples/batch"] == [2, 4]
    best = C.load_checkpoint(RunFolder(run_dir).best_file)
    assert best["metrics"]["cfd"] == min(r["cfd"] for r in rows)
    assert "best cfd" in output
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["ref"] == "stacked-digits" and cfg["extra"]["evaluated"] == [
        "cfd",
        "kl_modes",
        "modes",
    ]


def test_asking_for_fid_on_stacked_digits_needs_the_weights(offline_hub):
    out = offline_hub / "runs"
    result = CliRunner().invoke(
        train_cli,
        [
            *TINY,
            *"--dataset stacked-digits --stack-size 64 --iters 2".split(),
            *"--fid-every 2 --mode-samples 48 --inception-metrics".split(),
            *["--out", str(out)],
        ],
    )
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert (
        len(errors) == 1 and "Inception weights" in errors[0] and "--inception-weights" in errors[0]
    ), result.output
    assert not out.exists()


def test_evaluate_modes_on_run_checkpoint_and_images(mode_run, modes_cache, tmp_path):
    run_dir, _ = mode_run
    invoke = invoker(eval_cli)
    common = ["--samples", "48", "--no-progress", "--cache-dir", modes_cache, "--device", "cpu"]
    # The run folder: every snapshot, the same numbers training logged (same latents, same mode).
    res = invoke("modes", run_dir, *common)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in report["results"]] == [2, 4]
    for got, logged in zip(report["results"], rows):
        assert (got["modes"], got["kl_modes"]) == (logged["modes"], logged["kl_modes"])
        assert got["cfd"] == pytest.approx(logged["cfd"], rel=1e-9)
        assert got["num_samples"] == 48
    # One checkpoint: the numbers at the top level.
    res = invoke("modes", RunFolder(run_dir).snapshot_file(4), *common)
    one = json.loads(res.stdout)
    for key in (
        "modes",
        "kl_modes",
        "cfd",
        "num_samples",
        "classifier_sha256",
        "classifier_accuracy",
    ):
        assert key in one, key
    # An image folder of real held-out stacked digits: needs --source.
    folder = tmp_path / "pngs"
    folder.mkdir()
    real = DG.load_stacked("stacked-digits", "test", size=30, seed=0)
    for i, img in enumerate(real.images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    res = invoke("modes", folder, *common)
    assert res.exit_code != 0 and "--source" in res.stderr
    res = invoke("modes", folder, "--source", "stacked-digits", *common)
    got = json.loads(res.stdout)
    assert got["num_samples"] == 30 and got["modes"] >= 28  # 30 random triples, nearly all distinct
    assert invoke("modes", run_dir, "--samples", "1").exit_code != 0


def test_compare_modes_knows_higher_is_better(mode_run, tmp_path):
    run_dir, _ = mode_run
    res = CliRunner().invoke(
        eval_cli,
        [
            *["compare", str(run_dir), "--baseline", str(run_dir), "--metric", "modes"],
            *["--out", str(tmp_path / "cmp"), "--no-progress"],
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert report["direction"] == "max" and "higher is better" in res.stdout
    assert report["num_samples"] == 48
    # The default three evaluation seeds: seeds 1 and 2 were scored from the snapshots once.
    extra = [json.loads(line) for line in (run_dir / RunFolder.EVAL_SEEDS).read_text().splitlines()]
    assert sorted((r["iteration"], r["seed"]) for r in extra) == [(2, 1), (2, 2), (4, 1), (4, 2)]
    means = [
        statistics.fmean(
            [row["modes"]] + [r["modes"] for r in extra if r["iteration"] == row["iteration"]]
        )
        for row in rows
    ]
    assert report["runs"]["baseline"][0]["best"] == pytest.approx(max(means))
    assert (
        report["evaluation_noise"]["eval_seeds"] == 3 and report["evaluation_noise"]["points"] == 4
    )
    # A second compare scores nothing more; --eval-seeds 1 reads the training rows alone.
    before = (run_dir / RunFolder.EVAL_SEEDS).read_text()
    res = CliRunner().invoke(
        eval_cli,
        [
            *["compare", str(run_dir), "--baseline", str(run_dir), "--metric", "cfd"],
            *["--out", str(tmp_path / "cmp2"), "--no-progress"],
        ],
    )
    assert res.exit_code == 0 and (run_dir / RunFolder.EVAL_SEEDS).read_text() == before
    one = C_.read_run(run_dir, metric="modes", eval_seeds=1)
    assert one.values == [float(r["modes"]) for r in rows] and one.spread is None


def test_rescoring_the_training_seed_reproduces_the_training_rows(
    mode_run, modes_classifier, tmp_path
):
    from dcgan_mn.metrics import build_evaluator
    from dcgan_mn.config import config_from_dict

    run_dir, _ = mode_run
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    evaluator = build_evaluator(
        cfg, "cpu", feature_extractor=None, mode_classifier=modes_classifier
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        G, _, _ = C.load_generator(RunFolder(run_dir).snapshot_file(row["iteration"]))
        again = evaluator.with_seed(0)(G, sample_mode=cfg.sample_mode, batch_size=cfg.batch_size)
        assert (again["modes"], again["kl_modes"], again["cfd"]) == (
            row["modes"],
            row["kl_modes"],
            row["cfd"],
        )
        other = evaluator.with_seed(1)(G, sample_mode=cfg.sample_mode, batch_size=cfg.batch_size)
        assert other["seed"] == 1 and other["cfd"] != row["cfd"]  # other latents, other score
    assert evaluator.seed == 0  # with_seed leaves the original alone
    # Re-scoring: the missing seeds once, then nothing; a run without snapshots says what to do.
    assert RS.rescore_run(run_dir, "cfd", 2, evaluator=evaluator) == 2
    assert RS.rescore_run(run_dir, "cfd", 2, evaluator=evaluator) == 0
    # one pass scored all metrics
    assert RS.rescore_run(run_dir, "modes", 2, evaluator=evaluator) == 0
    for snap in (run_dir / "snapshots").iterdir():
        snap.unlink()
    with pytest.raises(RS.RescoreError, match=r"iteration\(s\) \[2, 4\].*--eval-seeds 1"):
        RS.rescore_run(run_dir, "cfd", 3, evaluator=evaluator)
    curve = C_.read_run(run_dir, metric="cfd", eval_seeds=2)  # from eval_seeds.jsonl alone
    assert len(curve.seed_values) == 2 and all(len(p) == 2 for p in curve.seed_values)
    with pytest.raises(C_.CompareError, match="evaluation seed 2 .*--eval-seeds 3"):
        C_.read_run(run_dir, metric="cfd", eval_seeds=3)


def test_modes_help_explains_every_option():
    res = CliRunner().invoke(eval_cli, ["modes", "--help"])
    assert res.exit_code == 0
    for opt in tuple(
        "--source --samples --batch-size --sample-modes --device --data-root --cache-dir --seed --out --progress".split()
    ):
        assert opt in res.output, opt


def test_rows_point_to_the_environment_that_computed_them(mode_run):
    import torch as T

    from dcgan_mn.provenance import read_environments

    run_dir, _ = mode_run
    envs = read_environments(run_dir)
    assert len(envs) == 1 and len((run_dir / RunFolder.PROVENANCE).read_text().splitlines()) == 1
    ((key, env),) = envs.items()
    assert env["torch"] == T.__version__.split("+")[0] or env["torch"] == T.__version__
    assert env["cpu_capability"] == T.backends.cpu.get_cpu_capability() and env["device"] == "cpu"
    assert {"numpy", "scipy", "pytorch-fid", "torchvision", "python"} <= set(env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["env_key"] == key for r in rows)


def test_run_writes_one_hparams_session(mode_run):
    """TensorBoard's HParams dashboard: the run's norms, K, seed and data as hparams, and its
    best / final metrics as the session's metrics (read back with TensorBoard's own parsers)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata

    run_dir, _ = mode_run
    files = list((run_dir / "hparams").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = event_accumulator.EventAccumulator(str(files[0]), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hp = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
    assert hp == {
        "norms": "mn,mn,bn",
        "mn_components": 3,
        "seed": 0,
        "dataset": "stacked-digits",
        "mn_estimator": "kmeans",
        "mn_point": "vector",
        "mn_posterior_grad": True,
        "mn_lambda_scale": True,
    }
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    tags = {m.name.tag for m in experiment.metric_infos}
    assert {"hparams/best_modes", "hparams/final_cfd", "hparams/best_kl_modes"} <= tags
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]}
    assert scalars["hparams/best_modes"] == max(r["modes"] for r in rows)
    assert scalars["hparams/best_cfd"] == pytest.approx(min(r["cfd"] for r in rows), rel=1e-6)
    assert scalars["hparams/final_cfd"] == pytest.approx(rows[-1]["cfd"], rel=1e-6)
    assert scalars["hparams/iteration"] == 4


def test_side_by_side_reads_as_the_mode():
    real = DG.load_stacked("stacked-digits", "test", size=5, seed=1)
    row = DG.side_by_side(real.images)  # [5, 1, 32, 96]
    assert row.shape == (5, 1, 32, 96) and row.dtype == real.images.dtype
    for c in range(3):  # red's digit (the mode's hundreds) on the left
        assert torch.equal(row[:, 0, :, 32 * c : 32 * (c + 1)], real.images[:, c])


@pytest.mark.parametrize("stacked_grid,size", [("digits", (786, 274)), ("rgb", (274, 274))])
def test_a_stacked_run_draws_ten_grids_of_its_digits(tmp_path, stacked_grid, size):
    """Without --sample-every a run writes ten grids; a stacked run's grid puts each sample's
    three digits side by side (8 samples of 3 x 32 px a row), or draws them as RGB when asked."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(
        tmp_path,
        iters=20,
        log_every=0,
        sample_every=None,  # the default: ten grids
        dataset="stacked-digits",
        stack_size=64,
        stacked_grid=stacked_grid,
    )
    result = train(cfg, progress=False)
    acc = EventAccumulator(str(result.run_dir), size_guidance={"images": 0})
    acc.Reload()
    grids = acc.Images("samples/batch")
    assert [g.step for g in grids] == list(range(2, 21, 2))
    assert {(g.width, g.height) for g in grids} == {size}


def test_compare_without_metric_compares_what_best_pt_follows(mode_run, tmp_path):
    """The README's offline runs score mode metrics only: compare without --metric compares
    their headline metric (cfd, what best.pt follows), and says before re-scoring what it will
    do, about how long it takes and how to skip it; --metric fid names the metrics they have."""
    run_dir, _ = mode_run
    res = CliRunner().invoke(
        eval_cli,
        [
            *["compare", str(run_dir), "--baseline", str(run_dir)],
            *["--out", str(tmp_path / "cmp"), "--no-progress"],
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["metric"] == "cfd"
    lines = res.stderr.splitlines()
    assert lines[0].startswith("comparing cfd"), lines
    plan = lines[1]
    assert (
        plan.startswith("re-scoring the evaluated snapshots")
        and "(--eval-seeds 3: 4 scorings in 1 run)" in plan
    )
    assert "about " in plan, plan
    assert RunFolder.EVAL_SEEDS in plan and "--eval-seeds 1 skips it" in plan, plan
    # the run named twice: once
    assert len((run_dir / RunFolder.EVAL_SEEDS).read_text().splitlines()) == 4
    res = CliRunner().invoke(
        eval_cli,
        [
            *["compare", str(run_dir), "--baseline", str(run_dir), "--metric", "fid"],
            *["--out", str(tmp_path / "cmp2"), "--no-progress"],
        ],
    )
    assert res.exit_code == 1
    assert (
        "has no 'fid' values; it has modes, kl_modes, cfd (choose one with --metric)" in res.stderr
    ), res.stderr


def test_runs_that_follow_different_metrics_need_metric(tmp_path):
    for name, row in [
        ("a", {"fid": 30.0, "num_samples": 10}),
        ("b", {"cfd": 5.0, "mode_samples": 10}),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"iteration": 2, **row}) + "\n")
    assert (
        C_.headline_metric([tmp_path / "a"]) == "fid"
        and C_.headline_metric([tmp_path / "b"]) == "cfd"
    )
    (tmp_path / "b" / "config.json").write_text(json.dumps({"best_metric": "modes"}))
    assert C_.headline_metric([tmp_path / "b"]) == "modes"
    with pytest.raises(
        C_.CompareError, match=r"different metrics \(fid: a; modes: b\): choose one with --metric"
    ):
        C_.headline_metric([tmp_path / "a", tmp_path / "b"])
