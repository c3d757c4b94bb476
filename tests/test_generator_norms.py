"""The generator's norm per layer (--g-norms: bn, mn, mode, group, none): the choice round-trips
through the config, checkpoints, HParams and the run name; a resume refuses a changed one; each
norm trains, resumes bitwise, samples in both modes without touching buffers, and compiles."""

import json

import pytest
import torch
from torch import nn

from conftest import load_script, read_tensorboard
from dcgan_mn import checkpoint as C
from dcgan_mn.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    default_run_name,
    resume_config,
)
from dcgan_mn.log import run_hparams
from dcgan_mn.models import Generator
from dcgan_mn.training import train
from dcgan_mn.norms import MixtureNorm2d, ModeNorm2d, NormSpec, norm_specs
from conftest import FakeEvaluator, assert_same_tensors, state_of, tiny_cfg, tiny_images

pytestmark = pytest.mark.usefixtures("train_single_thread")

KINDS = {
    "bn": nn.BatchNorm2d,
    "mn": MixtureNorm2d,
    "mode": ModeNorm2d,
    "group": nn.GroupNorm,
    "none": nn.Identity,
}


@pytest.mark.parametrize(
    "arch,norms", [("dcgan32", "mode,mn,bn"), ("tf-dcgan", "mode,group,mn,none")]
)
def test_the_configs_norm_specs_build_the_generator_its_names_build(arch, norms):
    # The config turns the flags into NormSpecs once; a caller with names gets the same model,
    # bitwise (each norm is built where it sits, so the RNG is drawn in the same order).
    cfg = TrainConfig(
        g_arch=arch, g_norms=norms, mode_components=3, mn_components=2, mn_point="channel", ngf=8
    )
    specs = cfg.model_kwargs()["norms"]
    assert [s.kind for s in specs] == norms.split(",") and hash(specs) == hash(tuple(specs))
    torch.manual_seed(0)
    from_specs = Generator(**cfg.model_kwargs())
    torch.manual_seed(0)
    from_names = Generator(
        ngf=8,
        arch=arch,
        norms=norms.split(","),
        num_components=2,
        mode_components=3,
        point="channel",
        fit_points=cfg.mn_fit_points,
    )
    assert_same_tensors(from_specs.state_dict(), from_names.state_dict())
    assert from_specs.norm_kinds == from_names.norm_kinds == norms
    assert specs == norm_specs(
        norms.split(","), 2, 3, **dict(next(s for s in specs if s.kind == "mn").options)
    )
    with pytest.raises(ValueError, match="unknown norm kind 'ln'; expected one of 'bn', 'mn'"):
        NormSpec("ln")


@pytest.mark.parametrize(
    "arch,norms",
    [("dcgan32", "mode,mode,bn"), ("dcgan32", "group,mn,none"), ("tf-dcgan", "mode,group,mn,bn")],
)
def test_per_layer_norms_round_trip(tmp_path, arch, norms):
    cfg = TrainConfig(g_arch=arch, g_norms=norms, mode_components=3, ngf=8)
    kinds = tuple(norms.split(","))
    assert cfg.norm_kinds() == kinds and cfg.mn_layers == tuple(
        i for i, k in enumerate(kinds) if k == "mn"
    )
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.norm_kinds() == kinds
    G = Generator(**cfg.model_kwargs())
    assert [type(m) for m in G.norm_layers] == [KINDS[k] for k in kinds]
    assert all(m.num_modes == 3 for m in G.norm_layers if isinstance(m, ModeNorm2d))
    assert G.norm_kinds == norms and run_hparams(cfg, G)["norms"] == norms
    assert "-".join(kinds) in default_run_name(cfg)
    # A generator snapshot rebuilds the same layers from its config.
    path = C.save_checkpoint(tmp_path / "g.pt", C.generator_payload(G, cfg, 1, 8))
    loaded, loaded_cfg, _ = C.load_generator(path)
    assert loaded_cfg.norm_kinds() == kinds
    assert_same_tensors(loaded.state_dict(), G.state_dict())


def test_bad_and_conflicting_norms():
    with pytest.raises(ConfigError, match=r"--g-norms 'mode,bn': expected 3 comma-separated norms"):
        TrainConfig(g_norms="mode,bn")
    with pytest.raises(ConfigError, match=r"each one of bn, mn, mode, group, none"):
        TrainConfig(g_norms="bn,layer,bn")
    with pytest.raises(ConfigError, match=r"--mode-components 0"):
        TrainConfig(g_norms="mode,bn,bn", mode_components=0)
    with pytest.raises(ConfigError, match=r"--sync-norm synchronizes BN and MN statistics only"):
        TrainConfig(g_norms="mode,bn,bn", sync_norm=True)
    saved = TrainConfig(g_norms="mode,mode,bn")
    with pytest.raises(
        ConfigError,
        match=r"--g-norms 'group,mode,bn': conflicts with the resumed run's "
        r"g_norms='mode,mode,bn'",
    ):
        resume_config(saved, {"g_norms": "group,mode,bn"})
    with pytest.raises(ConfigError, match=r"--mode-components"):
        resume_config(saved, {"mode_components": 4})
    # The same norms spelt out are no change, for a run that said them with --mn-layers.
    assert resume_config(TrainConfig(mn_layers="0,1"), {"g_norms": "mn,mn,bn"}).g_norms is None
    # The CLI: --g-norms and --mn-layers together are ambiguous.
    res = (
        __import__("click.testing")
        .testing.CliRunner()
        .invoke(
            load_script("train.py", "main"),
            ["--g-norms", "mode,mode,bn", "--mn-layers", "0", "--dry-run"],
        )
    )
    assert res.exit_code == 2 and "give it or --mn-layers, not both" in res.output


@pytest.mark.parametrize("norms", ["mode,mode,bn", "group,group,none"])
def test_each_norm_trains_and_resumes_bitwise(tmp_path, norms):
    images = tiny_images()
    kw = dict(g_norms=norms, log_every=1, fid_every=3, iters=4)
    full = train(
        tiny_cfg(tmp_path, run_name="full", **kw),
        images=images,
        progress=False,
        evaluator=FakeEvaluator([9, 8]),
    )
    part = train(
        tiny_cfg(tmp_path, run_name="part", **{**kw, "iters": 2}),
        images=images,
        progress=False,
        evaluator=FakeEvaluator([9, 8]),
    )
    train(
        tiny_cfg(tmp_path, run_name="part", **kw),
        images=images,
        progress=False,
        resume=part.run_dir,
        evaluator=FakeEvaluator([9, 8]),
    )
    a, b = state_of(full.run_dir), state_of(part.run_dir)
    for key in ("generator", "discriminator", "opt_g", "opt_d", "rng", "data", "log_window"):
        assert_same_tensors(a[key], b[key], key)
    scalars, _, _ = read_tensorboard(full.run_dir)
    if "mode" in norms:  # Mode Normalization's telemetry, like MN's
        assert (
            "mode/layer0/gate_entropy" in scalars and "mode/layer1/gate_weight_sorted_1" in scalars
        )
    # Sampling in either mode leaves every buffer as it was.
    G, cfg, _ = C.load_generator(full.checkpoint)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    for mode in ("batch", "running"):
        assert torch.isfinite(G.sample(torch.randn(16, cfg.z_dim), mode=mode, batch_size=8)).all()
    assert_same_tensors(G.state_dict(), before)


def test_mode_norm_generator_compiles_as_one_step(tmp_path):
    """The whole iteration traces with fullgraph=True with Mode Normalization in G (aot_eager:
    dynamo and AOTAutograd as inductor sees them, without building C++ kernels)."""
    images = tiny_images()
    kw = dict(g_norms="mode,mode,bn", iters=3, log_every=1)
    ref = train(tiny_cfg(tmp_path, run_name="eager", **kw), images=images, progress=False)
    comp = train(
        tiny_cfg(tmp_path, run_name="compiled", compile=True, **kw),
        images=images,
        progress=False,
        compile_backend="aot_eager",
    )
    a, _, _ = read_tensorboard(ref.run_dir)
    b, _, _ = read_tensorboard(comp.run_dir)
    assert len(a["loss/D"]) == len(b["loss/D"]) == 3
    for (sa, va), (sb, vb) in zip(a["loss/D"], b["loss/D"]):
        assert sa == sb and abs(va - vb) <= 1e-4 * abs(va)
