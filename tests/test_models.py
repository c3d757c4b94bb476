"""DCGAN generator / discriminator: MN placement, shapes, sampling that changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcgan_mn.models import (
    NUM_G_NORM_LAYERS,
    SAMPLE_MODES,
    Discriminator,
    Generator,
    dcgan_init_,
    parse_mn_layers,
    preserved_norm_state,
)
from dcgan_mn.norms import MixtureNorm2d

NGF = 8  # small widths keep the tests fast; the layout is the same as ngf = 64


@pytest.mark.parametrize(
    "spec,want",
    [
        ("none", ()),
        ("", ()),
        (None, ()),
        ("all", (0, 1, 2)),
        ("ALL", (0, 1, 2)),
        ("0,1", (0, 1)),
        (" 1 , 0 ", (0, 1)),
        ("2", (2,)),
        ((2,), (2,)),
        ([1, 0], (0, 1)),
        ((), ()),
    ],
)
def test_parse_mn_layers(spec, want):
    assert parse_mn_layers(spec) == want


@pytest.mark.parametrize(
    "spec,match",
    [
        ("3", "unknown generator norm layer 3"),
        ("0,3", "unknown generator norm layer 3"),
        ("-1", "unknown generator norm layer -1"),
        ((5,), "unknown generator norm layer 5"),
        ("a", "invalid MN layer 'a'"),
        ("0,,1", "invalid MN layer ''"),
        ("0;1", "invalid MN layer '0;1'"),
        ("1,1", "duplicate"),
    ],
)
def test_parse_mn_layers_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mn_layers(spec)


@pytest.mark.parametrize("spec", ["none", "all", "0,1", (2,), (0,), "1,2"])
def test_generator_puts_mn_exactly_where_asked(spec):
    g = Generator(
        z_dim=16, ngf=NGF, mn_layers=spec, num_components=4, fit_points=64, kmeans_iters=1
    )
    wanted = parse_mn_layers(spec)
    assert g.mn_layers == wanted
    layers = g.norm_layers
    assert len(layers) == NUM_G_NORM_LAYERS
    widths = [8 * NGF, 4 * NGF, 2 * NGF]
    for i, layer in enumerate(layers):
        assert layer.num_features == widths[i]
        if i in wanted:
            assert type(layer) is MixtureNorm2d
            assert (layer.num_components, layer.fit_points, layer.kmeans_iters) == (4, 64, 1)
        else:
            assert type(layer) is nn.BatchNorm2d
    n_mn = sum(isinstance(m, MixtureNorm2d) for m in g.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    assert (n_mn, n_bn) == (len(wanted), NUM_G_NORM_LAYERS - len(wanted))


def test_generator_rejects_bad_layers_and_components():
    with pytest.raises(ValueError, match="unknown generator norm layer 3"):
        Generator(ngf=NGF, mn_layers="0,3")
    with pytest.raises(ValueError, match="num_components"):
        Generator(ngf=NGF, mn_layers="0", num_components=0)


@pytest.mark.parametrize("spec", ["none", "0,1", "all"])
def test_shapes_and_range(spec):
    torch.manual_seed(0)
    g, d = Generator(z_dim=16, ngf=NGF, mn_layers=spec), Discriminator(ndf=NGF)
    z = torch.randn(5, 16)
    img = g(z)
    assert img.shape == (5, 3, 32, 32)
    assert img.min() >= -1 and img.max() <= 1
    logits = d(img)
    assert logits.shape == (5,)
    with pytest.raises(ValueError, match=r"z of shape \[N, 16\]"):
        g(torch.randn(5, 17))
    with pytest.raises(ValueError, match=r"z of shape \[N, 16\]"):
        g(torch.randn(5, 16, 1, 1))


def test_default_architecture_sizes():
    g, d = Generator(), Discriminator()
    assert g.z_dim == 100 and g.mn_layers == (0, 1)
    assert [m.num_features for m in g.norm_layers] == [512, 256, 128]
    assert all(m.num_components == 3 for m in g.norm_layers[:2])
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 1]


def test_dcgan_init():
    torch.manual_seed(0)
    g = Generator(ngf=32, mn_layers="all")
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    gains = torch.cat([m.weight for m in g.norm_layers])
    assert abs(gains.mean().item() - 1) < 0.01 and 0.01 < gains.std().item() < 0.03
    assert all(m.bias.abs().sum() == 0 for m in g.norm_layers)
    d = Discriminator(ndf=NGF)
    nn.init.constant_(d.net[0].weight, 5.0)
    dcgan_init_(d)
    assert d.net[0].weight.abs().max() < 0.2


def _snapshot(g: Generator):
    return {k: v.clone() for k, v in g.state_dict().items()}


def _train_a_little(g: Generator, steps: int = 3):
    opt = torch.optim.SGD(g.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        g(torch.randn(8, g.z_dim)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("mode", SAMPLE_MODES)
@pytest.mark.parametrize("spec", ["none", "0,1", "all"])
def test_sampling_changes_nothing(mode, spec):
    torch.manual_seed(0)
    g = Generator(z_dim=16, ngf=NGF, mn_layers=spec)
    _train_a_little(g)
    g.train()
    before = _snapshot(g)
    telemetry = [m.telemetry() for m in g.norm_layers if isinstance(m, MixtureNorm2d)]
    rng = torch.get_rng_state()
    z = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    out = g.sample(z, mode, batch_size=4)
    assert out.shape == (10, 3, 32, 32) and out.abs().max() <= 1
    assert g.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = [m.telemetry() for m in g.norm_layers if isinstance(m, MixtureNorm2d)]
    for t0, t1 in zip(telemetry, after):
        assert all(torch.equal(t0[k], t1[k]) for k in t0)
    g.eval()
    g.sample(z, mode)
    assert not g.training
    # repeatable: the same call gives the same images (the RNG it used was restored)
    torch.testing.assert_close(g.sample(z, mode, batch_size=4), out)


@pytest.mark.parametrize("spec", ["none", "all"])
def test_running_sampling_is_batch_independent(spec):
    torch.manual_seed(0)
    g = Generator(z_dim=16, ngf=NGF, mn_layers=spec)
    _train_a_little(g, steps=4)
    z = torch.randn(6, 16)
    full = g.sample(z, "running")
    for i in range(6):
        torch.testing.assert_close(
            g.sample(z[i : i + 1], "running"), full[i : i + 1], rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(g.sample(z, "running", batch_size=2), full, rtol=1e-5, atol=1e-6)


def test_batch_sampling_uses_chunks_of_batch_size():
    torch.manual_seed(0)
    g = Generator(z_dim=16, ngf=NGF, mn_layers="none")
    z = torch.randn(8, 16)
    whole = g.sample(z, "batch", batch_size=4)
    torch.testing.assert_close(whole[:4], g.sample(z[:4], "batch"))
    torch.testing.assert_close(whole[4:], g.sample(z[4:], "batch"))


def test_sample_errors_and_preserved_state_on_error():
    g = Generator(z_dim=16, ngf=NGF, mn_layers="0")
    with pytest.raises(ValueError, match="unknown sample mode 'eval'"):
        g.sample(torch.randn(2, 16), "eval")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        g.sample(torch.randn(2, 16), "batch", batch_size=0)
    before = _snapshot(g)
    with pytest.raises(ValueError):
        with preserved_norm_state(g):
            g(torch.randn(4, 16))  # updates buffers ...
            raise ValueError("boom")  # ... and they are restored anyway
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("spec", ["0,1", "all"])
def test_gan_step_gradients_finite(spec):
    torch.manual_seed(0)
    g, d = Generator(z_dim=16, ngf=NGF, mn_layers=spec), Discriminator(ndf=NGF)
    fake = g(torch.randn(8, 16))
    loss = F.binary_cross_entropy_with_logits(d(fake), torch.ones(8))
    loss.backward()
    for p in g.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(torch.isfinite(m.running_mean).all() for m in g.norm_layers)


def test_generator_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    g = Generator(z_dim=16, ngf=NGF, mn_layers="all").to(memory_format=torch.channels_last)
    z = torch.randn(4, 16)
    torch.manual_seed(1)
    ref = g(z)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = g(z)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().mean() < 0.05


# --------------------------------------------------------------------------------------------
# tf-dcgan: the TTUR paper's TensorFlow DCGAN generator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,mn", [("none", ()), ("0,3", (0, 3)), ("all", (0, 1, 2, 3))])
def test_tf_dcgan_layer_table(spec, mn):
    """Linear z -> 2x2x8ngf, then four 5x5 stride-2 transposed convolutions; a norm after the
    linear layer and after each hidden transposed convolution (4, indexed from z)."""
    from dcgan_mn.models import _ConvTransposeSame, _Project

    ngf = 8
    g = Generator(z_dim=16, ngf=ngf, mn_layers=spec, arch="tf-dcgan", fit_points=64)
    norms = g.norm_layers
    assert [m.num_features for m in norms] == [8 * ngf, 4 * ngf, 2 * ngf, ngf]
    assert tuple(i for i, m in enumerate(norms) if isinstance(m, MixtureNorm2d)) == mn
    assert isinstance(g.net[0], _Project) and g.net[0].linear.bias is not None
    convs = [m for m in g.net if isinstance(m, _ConvTransposeSame)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (8 * ngf, 4 * ngf, (5, 5), (2, 2)),
        (4 * ngf, 2 * ngf, (5, 5), (2, 2)),
        (2 * ngf, ngf, (5, 5), (2, 2)),
        (ngf, 3, (5, 5), (2, 2)),
    ]
    shapes = []
    h = torch.randn(5, 16)
    for m in g.net:
        h = m(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes[0] == (8 * ngf, 2, 2) and shapes[-1] == (3, 32, 32)
    assert h.abs().max() <= 1.0
    assert all(torch.all(m.weight == 1) for m in norms)  # TensorFlow's batch_norm init: gains 1
    with pytest.raises(ValueError, match="layers 0..3"):
        Generator(mn_layers="4", arch="tf-dcgan")
    with pytest.raises(ValueError, match="unknown generator architecture"):
        Generator(arch="resnet")


def test_conv_transpose_same_is_the_adjoint_of_tf_same_conv():
    """TensorFlow defines conv2d_transpose as the gradient of conv2d; with padding "SAME",
    stride 2 and a 5x5 kernel that conv pads one row/column before and two after. Our layer
    must equal that adjoint, computed here independently with autograd."""
    import torch.nn.functional as F

    from dcgan_mn.models import _ConvTransposeSame

    torch.manual_seed(0)
    layer = _ConvTransposeSame(6, 4).double()
    with torch.no_grad():
        layer.bias.zero_()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    u = torch.zeros(2, 4, 6, 10, dtype=torch.float64, requires_grad=True)
    conv = F.conv2d(F.pad(u, (1, 2, 1, 2)), layer.weight, stride=2)  # [2, 6, 3, 5]: TF SAME
    (adjoint,) = torch.autograd.grad(conv, u, x)
    torch.testing.assert_close(layer(x), adjoint)


def test_tf_dcgan_config_and_run_name():
    from dcgan_mn.config import ConfigError, TrainConfig, default_run_name

    cfg = TrainConfig(g_arch="tf-dcgan", mn_layers="all")
    assert cfg.mn_layers == (0, 1, 2, 3)
    assert default_run_name(cfg, when=0).endswith("-tf-dcgan-mn0123-k3-s0")
    assert Generator(**cfg.model_kwargs()).arch == "tf-dcgan"
    with pytest.raises(ConfigError, match="--mn-layers"):
        TrainConfig(mn_layers="3")  # dcgan32 has layers 0..2
    with pytest.raises(ConfigError, match="--g-arch 'big'"):
        TrainConfig(g_arch="big")
