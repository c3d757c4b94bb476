"""Mode Normalization (Deecke, Murray & Bilen, ICLR 2019): module, functional core, factory.

The reference is ``naive_mode_norm``: a deliberately slow loop over modes and samples written
straight from the paper's equations.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import assert_eval_is_per_sample
from dcgan_mn.kernels import count_ops
from dcgan_mn.norms import NORM_KINDS, MixtureNorm2d, ModeNorm2d, make_norm2d, mode_norm
from dcgan_mn.step import compile_step_config

F64 = torch.float64


def multimodal(shape, dtype=torch.float32, seed=0, gap=3.0) -> torch.Tensor:
    """A batch whose *samples* come from a few well-separated modes (ModeNorm's regime)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    modes = torch.randn(3, c, 1, 1, generator=g, dtype=dtype) * gap
    which = torch.arange(n) % 3
    return torch.randn(shape, generator=g, dtype=dtype) + modes[which]


def randomized(m: ModeNorm2d, seed: int = 0) -> ModeNorm2d:
    """Gates far from uniform and a non-trivial affine, so that every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.gate_weight.copy_(torch.randn(m.gate_weight.shape, generator=g))
        m.gate_bias.copy_(torch.randn(m.gate_bias.shape, generator=g))
        if m.affine:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return m


def naive_mode_norm(x, gate_weight, gate_bias, gamma, beta, eps):
    """The paper's equations, one mode and one sample at a time. Returns y, the gates and per
    mode (mu [C], biased var [C], n_eff)."""
    n, c, h, w = x.shape
    k_modes = gate_weight.shape[0]
    gates = []
    for i in range(n):
        phi = x[i].mean((1, 2))  # [C] average pooling
        gates.append(torch.softmax(gate_weight @ phi + gate_bias, 0))  # [K]
    g = torch.stack(gates)  # [N, K]
    outs = [torch.zeros_like(x[i]) for i in range(n)]
    stats = []
    for k in range(k_modes):
        total = sum(g[i, k] for i in range(n))
        mu = sum(g[i, k] / total * x[i].mean((1, 2)) for i in range(n))  # [C]
        var = sum(
            g[i, k] / total * ((x[i] - mu[:, None, None]) ** 2).mean((1, 2)) for i in range(n)
        )
        for i in range(n):
            outs[i] = outs[i] + g[i, k] * (x[i] - mu[:, None, None]) / torch.sqrt(
                var[:, None, None] + eps
            )
        n_eff = h * w * total**2 / sum(g[i, k] ** 2 for i in range(n))
        stats.append((mu, var, n_eff))
    y = torch.stack(outs) * gamma[:, None, None] + beta[:, None, None]
    return y, g, stats


# --------------------------------------------------------------------------------------------
# K = 1 is BatchNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(8, 5, 4, 4), (2, 3, 1, 1), (1, 4, 3, 2)])
def test_k1_equals_batchnorm(momentum, affine, shape):
    torch.manual_seed(0)
    mode = ModeNorm2d(shape[1], num_modes=1, momentum=momentum, affine=affine)
    bn = nn.BatchNorm2d(shape[1], momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            mode.weight.uniform_(0.5, 1.5), mode.bias.uniform_(-1, 1)
            bn.weight.copy_(mode.weight), bn.bias.copy_(mode.bias)
    for step in range(3):
        x = multimodal(shape, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = mode(xa), bn(xb)
        torch.testing.assert_close(ya, yb)
        gy = torch.randn(shape)
        ya.backward(gy), yb.backward(gy)
        torch.testing.assert_close(xa.grad, xb.grad)
        torch.testing.assert_close(mode.running_mean[0], bn.running_mean)
        torch.testing.assert_close(mode.running_var[0], bn.running_var)
        assert int(mode.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
    if affine:
        torch.testing.assert_close(mode.weight.grad, bn.weight.grad)
        torch.testing.assert_close(mode.bias.grad, bn.bias.grad)
    mode.eval(), bn.eval()
    x = multimodal((3,) + shape[1:], seed=9)
    torch.testing.assert_close(mode(x), bn(x))


def test_k1_without_running_stats_is_batchnorm_in_eval():
    mode = ModeNorm2d(3, num_modes=1, track_running_stats=False).eval()
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = multimodal((4, 3, 2, 2))
    torch.testing.assert_close(mode(x), bn(x))
    assert mode.running_mean is None and "running_mean" not in mode.state_dict()


# --------------------------------------------------------------------------------------------
# Against the paper's equations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 3, 2, 1)])
def test_matches_naive_loop_values_and_gradients(k, shape):
    m = randomized(ModeNorm2d(shape[1], num_modes=k).double(), seed=k)
    x = multimodal(shape, F64, seed=k)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = m(xa)
    params = [m.gate_weight, m.gate_bias, m.weight, m.bias]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    y_ref, g_ref, _ = naive_mode_norm(xb, *ref_params, m.eps)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(m.telemetry()["gate_weight"], g_ref.mean(0).detach())
    gy = torch.randn(shape, dtype=F64)
    got = torch.autograd.grad(y, [xa, *params], gy)
    want = torch.autograd.grad(y_ref, [xb, *ref_params], gy)
    for a, b, name in zip(got, want, ["x", "gate_weight", "gate_bias", "weight", "bias"]):
        torch.testing.assert_close(a, b, msg=lambda s, name=name: f"{name}: {s}")
    assert got[1].abs().sum() > 0  # the gate learns from the loss


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_update_by_hand(momentum):
    k, c = 3, 4
    m = randomized(ModeNorm2d(c, num_modes=k, momentum=momentum).double())
    run_m, run_v = torch.zeros(k, c, dtype=F64), torch.ones(k, c, dtype=F64)
    for step in range(3):
        x = multimodal((6, c, 3, 2), F64, seed=step)
        with torch.no_grad():
            _, _, stats = naive_mode_norm(x, m.gate_weight, m.gate_bias, m.weight, m.bias, m.eps)
        factor = 1.0 / (step + 1) if momentum is None else momentum
        for j, (mu, var, n_eff) in enumerate(stats):
            run_m[j] = (1 - factor) * run_m[j] + factor * mu
            run_v[j] = (1 - factor) * run_v[j] + factor * var * n_eff / max(n_eff - 1, 1)
        m(x)
        torch.testing.assert_close(m.running_mean, run_m)
        torch.testing.assert_close(m.running_var, run_v)
    m.eval()
    x = multimodal((4, c, 3, 3), F64, seed=7)
    gates = torch.softmax(x.mean((2, 3)) @ m.gate_weight.t() + m.gate_bias, 1)  # [N, K]
    want = sum(
        gates[:, j, None, None, None]
        * (x - run_m[j, :, None, None])
        / torch.sqrt(run_v[j, :, None, None] + m.eps)
        for j in range(k)
    )
    want = want * m.weight[:, None, None] + m.bias[:, None, None]
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(k, training):
    g = torch.Generator().manual_seed(k)
    x = multimodal((4, 3, 2, 2), F64, seed=1).requires_grad_()
    gate_w = torch.randn(k, 3, generator=g, dtype=F64, requires_grad=True)
    gate_b = torch.randn(k, generator=g, dtype=F64, requires_grad=True)
    gamma = (torch.rand(3, generator=g, dtype=F64) + 0.5).requires_grad_()
    beta = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    run_m = torch.randn(k, 3, generator=g, dtype=F64)
    run_v = torch.rand(k, 3, generator=g, dtype=F64) + 0.5

    def fn(x, gate_w, gate_b, gamma, beta):
        return mode_norm(x, gate_w, gate_b, run_m, run_v, gamma, beta, training=training)[0]

    assert torch.autograd.gradcheck(fn, (x, gate_w, gate_b, gamma, beta))


# --------------------------------------------------------------------------------------------
# Degenerate batches, eval, errors, bookkeeping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    "name,x",
    [
        ("constant", torch.ones(4, 3, 3, 3)),
        ("zeros", torch.zeros(2, 3, 2, 2)),
        ("batch_of_2", torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))),
        ("two_values", torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(1))),
        ("one_sample", torch.randn(1, 3, 2, 1, generator=torch.Generator().manual_seed(2))),
    ],
)
def test_finite_on_degenerate_batches(k, dtype, name, x):
    m = randomized(ModeNorm2d(3, num_modes=k)).to(dtype)
    xi = x.to(dtype).clone().requires_grad_()
    y = m(xi)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(xi.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert torch.isfinite(m.running_var).all() and (m.running_var >= 0).all()
    m.eval()
    assert torch.isfinite(m(x.to(dtype))).all()


def test_eval_output_of_a_sample_ignores_the_batch():
    torch.manual_seed(0)
    m = randomized(ModeNorm2d(5, num_modes=3))
    for s in range(4):
        m(multimodal((8, 5, 3, 3), seed=s))
    assert_eval_is_per_sample(m, multimodal((6, 5, 3, 3), seed=10))


def test_training_output_depends_on_the_batch():
    m = randomized(ModeNorm2d(3, num_modes=2))
    x = multimodal((4, 3, 2, 2))
    assert not torch.allclose(m(x)[:2], m(x[:2]))


def test_state_reset_repr_and_telemetry():
    m = ModeNorm2d(4, num_modes=3, momentum=0.2)
    assert m.telemetry() == {}
    assert set(m.state_dict()) == {
        "gate_weight",
        "gate_bias",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert m.running_mean.shape == m.running_var.shape == (3, 4)
    m(multimodal((6, 4, 3, 3)))
    t = m.telemetry()
    assert t["gate_weight"].shape == (3,) and not t["gate_weight"].requires_grad
    torch.testing.assert_close(t["gate_weight"].sum(), torch.tensor(1.0))
    assert 0.0 <= t["gate_entropy"].item() <= math.log(3) + 1e-6
    other = ModeNorm2d(4, num_modes=3, momentum=0.2)
    other.load_state_dict(m.state_dict())
    m.eval(), other.eval()
    x = multimodal((2, 4, 3, 3), seed=5)
    torch.testing.assert_close(other(x), m(x), rtol=0, atol=0)
    m.reset_running_stats()
    assert m.running_mean.abs().sum() == 0 and torch.equal(m.running_var, torch.ones(3, 4))
    assert int(m.num_batches_tracked) == 0
    for part in (
        "4, num_modes=3",
        "eps=1e-05",
        "momentum=0.2",
        "affine=True",
        "track_running_stats=True",
    ):
        assert part in repr(m)
    fresh = ModeNorm2d(4, num_modes=3).eval()  # zero mean, unit variance: (nearly) the identity
    torch.testing.assert_close(fresh(x), x / math.sqrt(1 + fresh.eps))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_no_host_syncs(momentum):
    m = ModeNorm2d(8, num_modes=3, momentum=momentum)
    x = torch.randn(4, 8, 4, 4, requires_grad=True)

    def step():
        return torch.autograd.grad(m(x).sum(), [x, *m.parameters()])

    step()
    assert count_ops(step).syncs == 0


# --------------------------------------------------------------------------------------------
# torch.compile and the factory
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    m = randomized(ModeNorm2d(4, num_modes=3))
    x = multimodal((6, 4, 3, 3))

    def fwd_bwd(x):
        y = m(x)
        return y.detach(), torch.autograd.grad((y * y).sum(), [x, *m.parameters()])

    compiled = torch.compile(fwd_bwd, fullgraph=True)
    eager_ref = randomized(ModeNorm2d(4, num_modes=3))  # the same parameters, run eagerly
    xe = x.clone().requires_grad_()
    ye = eager_ref(xe)
    ge = torch.autograd.grad((ye * ye).sum(), [xe, *eager_ref.parameters()])
    with compile_step_config():  # torch 2.14: tracing torch.autograd.grad is an opt-in
        y, grads = compiled(x.clone().requires_grad_())
    torch.testing.assert_close(y, ye, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.running_mean, eager_ref.running_mean)
    torch.testing.assert_close(m.running_var, eager_ref.running_var)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_factory_builds_every_kind(kind):
    layer = make_norm2d(64, kind, num_components=2)
    expected = {
        "bn": nn.BatchNorm2d,
        "mn": MixtureNorm2d,
        "mode": ModeNorm2d,
        "group": nn.GroupNorm,
        "none": nn.Identity,
    }[kind]
    assert type(layer) is expected
    x = torch.randn(4, 64, 2, 2)
    assert layer(x).shape == x.shape
    if kind == "mode":
        assert layer.num_modes == 2
    if kind == "group":
        assert layer.num_groups == 32
    assert set(NORM_KINDS) == {"bn", "mn", "mode", "group", "none"}


def test_factory_group_counts_and_unknown_kind():
    assert make_norm2d(48, "group").num_groups == 16
    assert make_norm2d(3, "group").num_groups == 1
    assert make_norm2d(512, "group").num_groups == 32
    made = make_norm2d(8, "mode", num_components=4, momentum=None)
    assert made.num_modes == 4 and made.momentum is None
    with pytest.raises(ValueError, match="unknown norm kind 'ln'"):
        make_norm2d(4, "ln")
