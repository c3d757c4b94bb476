"""Checkpoint files: weights_only round trips, atomic writes, clear errors, run-folder helpers."""

import random

import numpy as np
import pytest
import torch

from dcgan_mn.runfolder import RunFolder, resolve_resume
from dcgan_mn import checkpoint as C
from dcgan_mn.config import TrainConfig
from dcgan_mn.models import Generator


def tiny_cfg(**kw):
    return TrainConfig(ngf=4, ndf=4, batch_size=8, **kw)


def make_gen(cfg, seed=0):
    torch.manual_seed(seed)
    return Generator(**cfg.model_kwargs())


@pytest.mark.parametrize("mn_layers", ["none", "0,1", "all"])
def test_generator_snapshot_round_trip(tmp_path, mn_layers):
    cfg = tiny_cfg(mn_layers=mn_layers)
    gen = make_gen(cfg)
    gen(torch.randn(8, cfg.z_dim))  # move the running statistics away from their init
    path = C.save_checkpoint(
        RunFolder(tmp_path).snapshot_file(120), C.generator_payload(gen, cfg, 120, 960)
    )
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dcgan_mn" and raw["schema"] == C.SCHEMA and raw["kind"] == "generator"
    loaded, cfg2, iteration = C.load_generator(path, "cpu")
    assert cfg2 == cfg and iteration == 120
    for (k, a), (k2, b) in zip(gen.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert RunFolder(tmp_path).snapshots() == [(120, path)]


@pytest.mark.parametrize(
    "readings",
    [dict(mn_estimator="em", mn_em_iters=2), dict(mn_posterior_grad=False, mn_lambda_scale=False)],
)
def test_mn_readings_round_trip(tmp_path, readings):
    """MN's switches travel in the checkpoint's config: the loaded generator's layers have them,
    and it computes what the saved one computes."""
    from dcgan_mn.norms import MixtureNorm2d

    cfg = tiny_cfg(mn_layers="all", **readings)
    gen = make_gen(cfg)
    gen(torch.randn(8, cfg.z_dim))
    path = C.save_checkpoint(
        RunFolder(tmp_path).snapshot_file(4), C.generator_payload(gen, cfg, 4, 32)
    )
    loaded, cfg2, _ = C.load_generator(path, "cpu")
    assert cfg2 == cfg
    for layer in loaded.norm_layers:
        assert isinstance(layer, MixtureNorm2d)
        assert (layer.estimator, layer.em_iters, layer.posterior_grad, layer.lambda_scale) == (
            cfg.mn_estimator,
            cfg.mn_em_iters,
            cfg.mn_posterior_grad,
            cfg.mn_lambda_scale,
        )
    z = torch.randn(8, cfg.z_dim)
    torch.manual_seed(1)
    a = gen(z)
    torch.manual_seed(1)
    assert torch.equal(loaded(z), a)


def test_load_generator_from_full_checkpoint(tmp_path):
    cfg = tiny_cfg()
    gen = make_gen(cfg)
    payload = C.generator_payload(gen, cfg, 7, 56)
    payload.update(
        kind="full",
        discriminator={},
        opt_g={},
        opt_d={},
        rng=C.capture_rng_state(),
        fixed_noise=torch.randn(64, cfg.z_dim),
    )
    path = C.save_checkpoint(RunFolder(tmp_path).checkpoint_file(7), payload)
    assert C.load_generator(path)[2] == 7
    assert RunFolder(tmp_path).latest_checkpoint() == path


def test_other_architecture_is_refused(tmp_path):
    cfg = tiny_cfg(mn_layers="0,1")
    # BN weights, MN config
    payload = C.generator_payload(make_gen(tiny_cfg(mn_layers="none")), cfg, 1, 8)
    path = C.save_checkpoint(tmp_path / "g.pt", payload)
    with pytest.raises(C.CheckpointError, match="do not fit the architecture") as e:
        C.load_generator(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "no such file"),
        (
            "garbage",
            r"unreadable: corrupt, truncated or not a torch file \((UnpicklingError|RuntimeError)\)$",
        ),
        (
            "truncated",
            r"unreadable: corrupt, truncated or not a torch file \((RuntimeError|BadZipFile|EOFError)\)$",
        ),
        ("foreign", "not a dcgan_mn checkpoint"),
        ("plain_state_dict", "not a dcgan_mn checkpoint"),
        ("schema", "schema 99"),
        ("incomplete", "incomplete"),
    ],
)
def test_bad_checkpoints(tmp_path, case, match):
    path = tmp_path / "x.pt"
    cfg = tiny_cfg()
    good = C.generator_payload(make_gen(cfg), cfg, 1, 8)
    if case == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif case == "truncated":
        C.save_checkpoint(path, good)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    elif case == "plain_state_dict":
        torch.save(make_gen(cfg).state_dict(), path)
    elif case == "schema":
        torch.save({**good, "format": "dcgan_mn", "schema": 99}, path)
    elif case == "incomplete":
        C.save_checkpoint(path, {**good, "kind": "full"})
    with pytest.raises(C.CheckpointError, match=match) as e:
        C.load_generator(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_atomic_write_keeps_old_file_when_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-00000001.pt"
    C.save_checkpoint(path, {"kind": "generator", "value": torch.ones(2)})
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt  # e.g. a signal in the middle of writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, {"kind": "generator", "value": torch.zeros(2)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left


def test_rng_state_round_trip_is_weights_only(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    random.gauss(0, 1)
    np.random.standard_normal()
    state = C.capture_rng_state("cpu")
    expected = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.standard_normal())
    C.save_checkpoint(tmp_path / "r.pt", {"rng": state})
    loaded = torch.load(tmp_path / "r.pt", weights_only=True)["rng"]
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    C.restore_rng_state(loaded, "cpu")
    got = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.standard_normal())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_prune_and_resolve_resume(tmp_path):
    for it in (10, 20, 30, 40):
        C.save_checkpoint(RunFolder(tmp_path).checkpoint_file(it), {"kind": "full"})
    (tmp_path / "ckpt-notanumber.pt").write_text("")
    deleted = RunFolder(tmp_path).prune_checkpoints(2)
    assert [p.name for p in deleted] == ["ckpt-00000010.pt", "ckpt-00000020.pt"]
    assert [i for i, _ in RunFolder(tmp_path).checkpoints()] == [30, 40]
    folder, path = resolve_resume(tmp_path)
    assert (folder.path, path) == (tmp_path, RunFolder(tmp_path).checkpoint_file(40))
    folder, path = resolve_resume(RunFolder(tmp_path).checkpoint_file(30))
    assert (folder.path, path) == (tmp_path, RunFolder(tmp_path).checkpoint_file(30))
    with pytest.raises(C.CheckpointError, match="--resume .*: no such file or folder"):
        resolve_resume(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(C.CheckpointError, match="no full checkpoints"):
        resolve_resume(empty)


@pytest.mark.parametrize("text", ["hello\n", "# notes\nlr = 0.0002\n", '{"iteration": 3}\n'])
def test_text_file_is_unreadable_not_a_traceback(tmp_path, text):
    """A text file where a checkpoint is expected (``--resume hello.txt``, ``evaluate.py modes
    hello.txt``): torch's weights_only unpickler raises KeyError on it; ours is one line."""
    path = tmp_path / "hello.txt"
    path.write_text(text)
    with pytest.raises(
        C.CheckpointError, match=r"unreadable: corrupt, truncated or not a torch file"
    ) as e:
        C.load_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
