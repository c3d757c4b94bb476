"""The averaged generator (``--g-ema``): the schedule against its closed form, the update against
torch's ``AveragedModel``, standing statistics against ``update_bn`` and a by-hand accumulation,
and in training: averaging never perturbs G, D or the optimizers, resume mid ramp-up is bitwise,
G_ema's metrics are columns of their own, and ``evaluate.py`` scores G_ema with ``--ema``."""

import json
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from conftest import invoker, load_script, read_tensorboard
from dcgan_mn import checkpoint as C
from dcgan_mn.config import ConfigError
from dcgan_mn.ema import EmaSchedule, GeneratorEMA, standing_statistics
from dcgan_mn.metrics.specs import METRICS, averaged_result
from dcgan_mn.models import Generator
from dcgan_mn.norms import MixtureNorm2d
from dcgan_mn.runfolder import RunFolder
from dcgan_mn.training import train
from conftest import tiny_cfg, tiny_images

pytestmark = pytest.mark.usefixtures("train_single_thread")


def nudge(model, seed):
    """Move every weight a little (a stand-in for an optimizer step)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---- the schedule and the update ------------------------------------------------------------------


@pytest.mark.parametrize(
    "half_life,rampup,start", [(10.0, 0.0, 0), (500.0, 0.05, 0), (4.0, 0.5, 3)]
)
def test_schedule_is_the_closed_form(half_life, rampup, start):
    s = EmaSchedule(half_life, rampup, start)
    for t in range(0, 60):
        h = half_life if rampup == 0 else min(half_life, rampup * (t - start))
        want = 0.0 if t < start or h <= 0 else 0.5 ** (1 / h)
        assert s.decay(t) == pytest.approx(want, abs=0)
    # StyleGAN2-ADA's numbers: ema_kimg 10 at batch 64 is a half-life of 156.25 iterations;
    # after that many updates at a constant decay, the old weights' share is one half.
    assert EmaSchedule(156.25).decay(10**6) ** 156.25 == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("rampup", [0.0, 0.5])
def test_update_equals_averaged_model_and_the_closed_form(rampup):
    torch.manual_seed(0)
    G = Generator(ngf=8, mn_layers="0")
    schedule = EmaSchedule(3.0, rampup)
    ema = GeneratorEMA(G, schedule)
    closed = {n: p.detach().clone() for n, p in G.named_parameters()}
    for t in range(6):
        nudge(G, t)
        decay = schedule.decay(t)
        # torch's own EMA, one AveragedModel per decay (the decay changes with the ramp-up),
        # started from our average of the step before
        reference = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(decay))
        reference.module.load_state_dict(ema.G_ema.state_dict())
        reference.n_averaged.fill_(1)
        reference.update_parameters(G)
        ema.prepare(t)
        ema.update()
        for (name, mine), theirs in zip(
            ema.G_ema.named_parameters(), reference.module.parameters()
        ):
            assert torch.equal(mine, theirs), (t, name)
            closed[name] = (
                decay * closed[name] + (1 - decay) * dict(G.named_parameters())[name].detach()
            )
            torch.testing.assert_close(mine, closed[name], rtol=1e-6, atol=1e-7)


def test_decay_zero_is_a_bitwise_copy():
    torch.manual_seed(1)
    G = Generator(ngf=8)
    ema = GeneratorEMA(G, EmaSchedule(100.0, start=5))  # before --g-ema-start: a copy of G
    for t in range(3):
        nudge(G, t)
        ema.prepare(t)
        ema.update()
        for mine, theirs in zip(ema.G_ema.parameters(), G.parameters()):
            assert torch.equal(mine, theirs)


# ---- normalization state ---------------------------------------------------------------------------


def test_standing_statistics_equal_update_bn_for_batchnorm():
    torch.manual_seed(2)
    G = Generator(ngf=8, mn_layers="none")
    other = Generator(ngf=8, mn_layers="none")
    other.load_state_dict(G.state_dict())
    batches = [torch.randn(16, 100) for _ in range(5)]
    standing_statistics(G, batches)
    update_bn(batches, other)
    for (name, mine), theirs in zip(G.state_dict().items(), other.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_standing_statistics_for_mn_are_the_cumulative_matched_mixture():
    """MN's recomputed running mixture is the plain average of each batch's matched statistics
    (weights, means, unbiased variances), exactly as training folds one batch."""
    torch.manual_seed(3)
    layer = MixtureNorm2d(4, num_components=3, fit_points=64)
    layer.running_mean.normal_()  # a stale mixture the pass must forget
    batches = [torch.randn(8, 4, 3, 3) * 2 + i for i in range(4)]
    probe = MixtureNorm2d(4, num_components=3, fit_points=64)
    probe.train()
    # By hand: each batch's statistics from a fresh layer with momentum 1 (its running state is
    # that batch's matched statistics), matched against the running average so far.
    torch.manual_seed(7)
    weight = mean = var = None
    for i, x in enumerate(batches):
        probe.reset_running_stats()
        probe.momentum = 1.0
        # match the batch's components to the running mixture, as training does
        if mean is not None:
            probe.running_mean.copy_(mean)
        probe(x)
        w_i, m_i, v_i = (
            probe.running_weight.clone(),
            probe.running_mean.clone(),
            probe.running_var.clone(),
        )
        if mean is None:
            weight, mean, var = w_i, m_i, v_i
        else:
            weight = weight + (w_i - weight) / (i + 1)
            mean = mean + (m_i - mean) / (i + 1)
            var = var + (v_i - var) / (i + 1)
    torch.manual_seed(7)
    standing_statistics(layer, batches)
    torch.testing.assert_close(layer.running_weight, weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var, var, rtol=1e-6, atol=1e-6)
    assert int(layer.num_batches_tracked) == len(batches) and layer.momentum == 0.1


@pytest.mark.parametrize("norms", ["bn,bn,bn", "mn,mn,bn", "mode,mode,bn"])
def test_norm_state_copy_and_standing(norms):
    torch.manual_seed(4)
    G = Generator(ngf=8, norms=norms.split(","))
    G(torch.randn(16, 100))  # G's running statistics move away from their initial values
    copied = GeneratorEMA(G, EmaSchedule(10.0), stats="copy")
    copied.ready_for_use()
    for mine, theirs in zip(copied.G_ema.buffers(), G.buffers()):
        assert torch.equal(mine, theirs)
    standing = GeneratorEMA(
        G, EmaSchedule(10.0), stats="standing", standing_batches=3, batch_size=16
    )
    rng = torch.get_rng_state()
    standing.ready_for_use()
    assert torch.equal(torch.get_rng_state(), rng)  # its own streams: training's RNG is untouched
    first = {k: v.clone() for k, v in standing.G_ema.state_dict().items()}
    standing.ready_for_use()  # the same latents and draws every time: the same statistics
    for k, v in standing.G_ema.state_dict().items():
        assert torch.equal(v, first[k]), k
        if k.endswith("num_batches_tracked"):
            assert int(v) == 3, k


# ---- in training -----------------------------------------------------------------------------------


class TwoMetrics:
    """A small evaluator with an Inception-family metric whose value depends on the weights."""

    directions = {"fid": "min"}
    primary_metric = "fid"

    def __call__(self, generator, *, sample_mode, batch_size):
        torch.randn(10)  # must not change training's random stream
        checksum = float(sum(p.detach().double().abs().sum() for p in generator.parameters()))
        return {"fid": checksum, "num_samples": 100, "sample_mode": sample_mode}


def checkpoint_of(run):
    return C.load_checkpoint(RunFolder(run.run_dir).latest_checkpoint())


@pytest.mark.parametrize("mn_layers", ["0,1", "none"])
def test_averaging_never_perturbs_training(tmp_path, mn_layers):
    images = tiny_images()
    kw = dict(mn_layers=mn_layers, iters=6, fid_every=3, sample_every=3)
    plain = train(
        tiny_cfg(tmp_path, run_name="plain", **kw),
        images=images,
        progress=False,
        evaluator=TwoMetrics(),
    )
    averaged = train(
        tiny_cfg(tmp_path, run_name="ema", g_ema=2.0, g_ema_rampup=0.5, **kw),
        images=images,
        progress=False,
        evaluator=TwoMetrics(),
    )
    a, b = checkpoint_of(plain), checkpoint_of(averaged)
    for key in ("generator", "discriminator", "opt_g", "opt_d", "rng", "data", "log_window"):
        assert json.dumps(key) and _same(a[key], b[key]), key
    assert "generator_ema" in b and "generator_ema" not in a
    assert any(
        not torch.equal(b["generator_ema"][k], b["generator"][k])
        for k in b["generator"]
        if b["generator"][k].is_floating_point()
    )
    rows = RunFolder(averaged.run_dir).metrics_rows()
    assert [r["iteration"] for r in rows] == [3, 6]
    assert all("fid" in r and "fid_ema" in r and r["fid"] != r["fid_ema"] for r in rows)
    scalars, images_tb, _ = read_tensorboard(averaged.run_dir)
    assert "metrics/fid_100" in scalars and "metrics/fid_100_ema" in scalars
    assert "samples/batch" in images_tb and "samples_ema/batch" in images_tb
    # every snapshot holds G_ema too, for re-scoring and evaluate.py --ema
    for _, path in RunFolder(averaged.run_dir).snapshots():
        assert C.has_averaged_generator(path)


def _same(x, y):
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


def test_resume_mid_rampup_is_bitwise(tmp_path):
    images = tiny_images()
    kw = dict(mn_layers="0,1", g_ema=50.0, g_ema_rampup=0.5, g_ema_start=1, fid_every=3, iters=8)
    full = train(
        tiny_cfg(tmp_path, run_name="full", **kw),
        images=images,
        progress=False,
        evaluator=TwoMetrics(),
    )
    part = train(
        tiny_cfg(tmp_path, run_name="part", **{**kw, "iters": 4}),
        images=images,
        progress=False,
        evaluator=TwoMetrics(),
    )
    resumed = train(
        tiny_cfg(tmp_path, run_name="part", **kw),
        images=images,
        progress=False,
        resume=part.run_dir,
        evaluator=TwoMetrics(),
    )
    a, b = checkpoint_of(full), checkpoint_of(resumed)
    for key in ("generator", "generator_ema", "discriminator", "opt_g", "opt_d", "rng"):
        assert _same(a[key], b[key]), key
    fids = {r["iteration"]: r["fid_ema"] for r in RunFolder(full.run_dir).metrics_rows()}
    again = {r["iteration"]: r["fid_ema"] for r in RunFolder(resumed.run_dir).metrics_rows()}
    assert [3, 6, 8] == sorted(fids) and all(fids[it] == again[it] for it in fids)


def test_best_follows_the_named_metric_in_its_direction(tmp_path):
    class Rising:
        directions = {"modes": "max", "cfd": "min"}
        primary_metric = "cfd"

        def __init__(self):
            self.calls = 0

        def __call__(self, generator, *, sample_mode, batch_size):
            self.calls += 1  # G then G_ema at each evaluation: G_ema's modes 10, 30, 20
            ema_modes = {2: 10, 4: 30, 6: 20}.get(self.calls, 0)
            return {"modes": ema_modes, "cfd": 1.0, "mode_samples": 100, "sample_mode": sample_mode}

    run = train(
        tiny_cfg(tmp_path, g_ema=5.0, fid_every=2, best_metric="modes_ema"),
        images=tiny_images(),
        progress=False,
        evaluator=Rising(),
    )
    assert (run.best_metric, run.best_value, run.best_iteration) == ("modes_ema", 30, 4)
    best = C.load_checkpoint(RunFolder(run.run_dir).best_file)
    assert best["iteration"] == 4 and "generator_ema" in best


def test_best_metric_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="--best-metric 'fid_ema'.*give --g-ema"):
        tiny_cfg(tmp_path, best_metric="fid_ema")
    with pytest.raises(ConfigError, match="--best-metric 'nope'"):
        tiny_cfg(tmp_path, best_metric="nope")
    with pytest.raises(ConfigError, match="--best-metric 'modes'.*scores fid, fid_ema"):
        train(
            tiny_cfg(tmp_path, g_ema=5.0, fid_every=2, best_metric="modes"),
            images=tiny_images(),
            progress=False,
            evaluator=TwoMetrics(),
        )
    assert not (tmp_path / "runs" / "run").exists()


def test_averaged_metrics_are_registered():
    for name, spec in list(METRICS.items()):
        if not spec.averaged:
            twin = METRICS[f"{name}_ema"]
            assert (twin.direction, twin.count_key, twin.averaged) == (
                spec.direction,
                spec.count_key,
                True,
            )
    row = averaged_result(
        {"fid": 3.0, "kid_std": 0.1, "num_samples": 10, "sample_mode": "batch", "seed": 0}
    )
    assert row == {"fid_ema": 3.0, "kid_std_ema": 0.1}


# ---- evaluate.py and re-scoring --------------------------------------------------------------------


@pytest.fixture
def stacked_ema_run(tmp_path, modes_cache, monkeypatch):
    monkeypatch.setenv("DCGAN_MN_CACHE_DIR", str(modes_cache))
    from dcgan_mn.metrics import build_evaluator

    cfg = tiny_cfg(
        tmp_path,
        dataset="stacked-digits",
        stack_size=256,
        inception_metrics=False,
        g_ema=3.0,
        iters=4,
        fid_every=2,
        mode_samples=40,
    )
    evaluator = build_evaluator(cfg, "cpu", cache_dir=modes_cache)
    return train(cfg, evaluator=evaluator, progress=False), modes_cache


def test_evaluate_modes_ema_reproduces_the_training_row(stacked_ema_run):
    run, cache = stacked_ema_run
    evaluate = invoker(load_script("evaluate.py", "cli"))
    last = RunFolder(run.run_dir).metrics_rows()[-1]
    for ema, suffix in ((False, ""), (True, "_ema")):
        args = [
            *["modes", RunFolder(run.run_dir).snapshots()[-1][1], "--samples", 40],
            *["--cache-dir", cache, "--device", "cpu"],
            *(["--ema"] if ema else []),
        ]
        result = evaluate(*args)
        assert result.exit_code == 0, result.output
        # progress on, stderr not a terminal: no bars redrawn in a log
        assert "\r" not in result.output
        report = json.loads(result.stdout)
        assert report["modes"] == last[f"modes{suffix}"] and report["cfd"] == pytest.approx(
            last[f"cfd{suffix}"]
        )
        assert report["generator"] == ("G_ema" if ema else "G")


def test_rescore_scores_the_averaged_generator_too(stacked_ema_run):
    from dcgan_mn.rescore import rescore_run, seed_rows

    run, cache = stacked_ema_run
    added = rescore_run(run.run_dir, "modes_ema", 2, cache_dir=cache)
    assert added == 2  # two evaluations, one extra seed each
    rows = seed_rows(run.run_dir)
    assert all("modes" in r and "modes_ema" in r and r["seed"] == 1 for r in rows)
    assert rescore_run(run.run_dir, "cfd", 2, cache_dir=cache) == 0  # one re-scoring served both


def test_ema_of_a_run_without_it_is_one_line(tmp_path):
    run = train(tiny_cfg(tmp_path, fid_every=0), images=tiny_images(), progress=False)
    result = invoker(load_script("evaluate.py", "cli"))(
        "samples", run.run_dir, "--num", 4, "--out", tmp_path / "s", "--ema", "--no-progress"
    )
    assert result.exit_code != 0
    assert "no averaged generator" in result.output and "--g-ema" in result.output
    assert "Traceback" not in result.output


def test_train_cli_flags(tmp_path):
    main = load_script("train.py", "main")
    result = invoker(main)(
        *"--dry-run --g-ema 7812.5 --g-ema-rampup 0.05 --g-ema-stats copy --device cpu".split(),
        *["--out", tmp_path],
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert (cfg["g_ema"], cfg["g_ema_rampup"], cfg["g_ema_stats"]) == (7812.5, 0.05, "copy")
    bad = invoker(main)("--dry-run", "--g-ema", "-1", "--out", tmp_path)
    assert bad.exit_code == 2 and "--g-ema" in bad.output
    assert math.isfinite(EmaSchedule(cfg["g_ema"], cfg["g_ema_rampup"]).decay(2000))


# ---- on the device, inside the step ----------------------------------------------------------------


def test_compiled_step_with_g_ema_is_one_graph_without_recompiling(tmp_path):
    """The whole iteration, EMA update included, traces with fullgraph=True (a graph break
    raises), and the per-step weight is a device tensor: no recompilation as the decay ramps
    (aot_eager: dynamo and AOTAutograd as inductor sees them, without building C++ kernels)."""
    import torch._dynamo

    images = tiny_images()
    kw = dict(iters=4, log_every=1, mn_layers="none", g_ema=4.0, g_ema_rampup=0.5)
    eager = train(tiny_cfg(tmp_path, run_name="eager", **kw), images=images, progress=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = train(
            tiny_cfg(tmp_path, run_name="compiled", compile=True, **kw),
            images=images,
            progress=False,
            compile_backend="aot_eager",
        )
    a, b = C.load_checkpoint(eager.checkpoint), C.load_checkpoint(compiled.checkpoint)
    for k, v in a["generator_ema"].items():
        torch.testing.assert_close(b["generator_ema"][k], v, rtol=0, atol=4 * 2e-4 * 4, msg=k)


def test_the_ema_update_adds_no_host_sync():
    from dcgan_mn.kernels import count_ops

    G = Generator(ngf=8, mn_layers="0,1")
    ema = GeneratorEMA(G, EmaSchedule(10.0, 0.05))

    def update():
        ema.prepare(100)
        ema.update()

    update()
    counted = count_ops(update)
    assert counted.syncs == 0, counted.sync_names
    assert 1 <= counted.kernels <= 3  # one fill and one foreach lerp, not one kernel per tensor
