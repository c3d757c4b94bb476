"""TrainConfig: one source of truth, JSON round trips, one-line errors, resume rules."""

import dataclasses
import json

import pytest

from dcgan_mn.config import (
    RESUME_FIXED,
    ConfigError,
    TrainConfig,
    config_from_dict,
    default_run_name,
    flag_name,
    resume_config,
)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"mn_layers": "all", "amp": "bf16", "run_name": "x"},
        {"mn_layers": "none", "inception_weights": "/w.pth", "extra": {"k": 1}},
    ],
)
def test_json_round_trip(kw):
    cfg = TrainConfig(**kw)
    back = config_from_dict(json.loads(cfg.to_json()))
    assert back == cfg and back.extra == cfg.extra and isinstance(back.mn_layers, tuple)


@pytest.mark.parametrize(
    "spelling,layers",
    [("0,1", (0, 1)), (" 1 ,0", (0, 1)), ("none", ()), ("", ()), ("ALL", (0, 1, 2)), ([2], (2,))],
)
def test_mn_layer_spellings(spelling, layers):
    assert TrainConfig(mn_layers=spelling).mn_layers == layers


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"mn_layers": "4"}, "--mn-layers"),
        ({"mn_layers": "0,0"}, "--mn-layers"),
        ({"mn_components": 0}, "--mn-components 0"),
        ({"mn_fit_points": 2}, "--mn-fit-points 2"),
        ({"batch_size": 1}, "--batch-size 1"),
        ({"beta1": 1.0}, "--beta1 1.0"),
        ({"ckpt_every": -1}, "--ckpt-every -1"),
        ({"dims": 1000}, "--dims 1000"),
        ({"amp": "fp8"}, "--amp 'fp8'"),
        ({"device": "tpu"}, "--device 'tpu'"),
    ],
)
def test_invalid_values_name_flag_and_value(kw, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict({**TrainConfig().to_dict(), "warp_drive": True})


def test_resume_config():
    saved = TrainConfig(ngf=8, iters=100, run_name="r")
    assert resume_config(saved, {"iters": 500, "log_every": 7, "device": "cpu"}).iters == 500
    assert resume_config(saved, {"ngf": 8, "mn_layers": "0,1"}) == saved  # same values: fine
    for name in RESUME_FIXED:
        value = {
            "mn_layers": "all",
            "dataset": "folder",
            "sample_mode": "running",
            "ref": "x.npz",
            "hflip": True,
            "dims": 64,
            "lr": 0.1,
            "beta1": 0.1,
            "beta2": 0.5,
            "stack_size": 1000,
            "fid_protocol": "clean",
            "mn_estimator": "em",
            "mn_posterior_grad": False,
            "mn_lambda_scale": False,
            "g_arch": "tf-dcgan",
            "mn_point": "channel",
            "g_norms": "mode,mode,bn",
        }.get(name)
        if value is None:
            value = getattr(saved, name) + 1
        with pytest.raises(
            ConfigError, match=f"^{flag_name(name)} .*conflicts with the resumed run's {name}="
        ):
            resume_config(saved, {name: value})
    with pytest.raises(ConfigError, match="--out 'elsewhere': cannot be combined with --resume"):
        resume_config(saved, {"out": "elsewhere"})
    with pytest.raises(ConfigError, match="--iters -1"):
        resume_config(saved, {"iters": -1})


def test_frozen_and_default_run_name():
    cfg = TrainConfig(mn_layers="0,2", mn_components=5, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.iters = 1
    assert default_run_name(cfg, when=0).endswith("-mn02-k5-s3")
    assert default_run_name(TrainConfig(mn_layers="none"), when=0).endswith("-bn-s0")


def test_default_sample_every_gives_ten_grids_a_run_at_most_one_per_1000_iterations():
    assert TrainConfig(iters=1000).sample_every == 100  # the README's offline command: ten grids
    assert TrainConfig().sample_every == 1000  # 100k iterations: as before
    assert TrainConfig(iters=5).sample_every == 1
    assert TrainConfig(iters=1000, sample_every=0).sample_every == 0  # given: kept
