"""Mixture Normalization: the functional core, the fused path and the module.

The reference for everything is ``loop_reference`` below: a deliberately naive implementation
that forms the [P, K, C] tensor and loops over components, written from docs/mixture-normalization.md.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from conftest import assert_eval_is_per_sample
from dcgan_mn.norms import (
    Mixture,
    MixtureNorm2d,
    ModeNorm2d,
    fit_mixture,
    make_norm2d,
    mixture_norm,
)
from dcgan_mn.norms.estimators import estimate_mixture, sample_fit_points
from dcgan_mn.norms.functional import (
    _MixtureAffine,
    _PosteriorMoments,
    _vector_mixture_norm,
    _vector_mixture_norm_fixed,
)
from dcgan_mn.norms.mixture import match_components, mixture_posteriors, moments_to_stats
from dcgan_mn.norms.reference import mixture_moments, mixture_norm_reference, normalize_reference

F64 = torch.float64


def to_points(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> points [P, C] (p = (n, h, w) in row-major order)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def from_points(points: torch.Tensor, shape) -> torch.Tensor:
    n, c, h, w = shape
    return points.reshape(n, h, w, c).permute(0, 3, 1, 2)


def loop_reference(points: torch.Tensor, mixture: Mixture, eps: float):
    """Slow, obvious MN (docs/mixture-normalization.md): returns x_hat [P, C], tau, lam, E, Var, n_eff."""
    weight, mean, var = mixture
    k = weight.shape[0]
    diff = points[:, None, :] - mean[None, :, :]  # [P, K, C]
    log_dens = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)  # [P, K]
    tau = torch.softmax(torch.log(weight) + log_dens, dim=1)  # [P, K]
    x_hat = torch.zeros_like(points)
    lams, means, variances, n_effs = [], [], [], []
    for j in range(k):
        w = tau[:, j] / tau[:, j].sum()  # normalized contribution [P]
        e = (w[:, None] * points).sum(0)  # [C]
        v = (w[:, None] * (points - e) ** 2).sum(0)  # [C] biased, two-pass
        lam = tau[:, j].mean()
        x_hat = x_hat + tau[:, j : j + 1] / lam.sqrt() * (points - e) / (v + eps).sqrt()
        lams.append(lam), means.append(e), variances.append(v)
        n_effs.append(1.0 / (w**2).sum())
    stacked = (torch.stack(t) for t in (lams, means, variances, n_effs))
    return (x_hat, tau, *stacked)


# The readings of the paper we could not settle (defaults first); the estimator has its own tests.
SWITCHES = [
    dict(),
    dict(posterior_grad=False),
    dict(lambda_scale=False),
    dict(posterior_grad=False, lambda_scale=False),
]


# gradcheck compares with finite differences of the function itself, so it applies where the
# gradient claims to be the function's: posterior_grad=False is a deliberate stop-gradient,
# checked against the function with its posteriors held constant instead.
GRAD_SWITCHES = [s for s in SWITCHES if s.get("posterior_grad", True)]


def switch_id(switches: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in switches.items()) or "defaults"


def bimodal(shape, dtype=torch.float32, seed=0, gap=3.0) -> torch.Tensor:
    """A batch whose points come from a few well-separated modes (MN's intended regime)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g, dtype=dtype)
    modes = torch.randn(3, c, generator=g, dtype=dtype) * gap
    which = torch.randint(0, 3, (n, h, w), generator=g)
    return x + modes[which].permute(0, 3, 1, 2)


def random_mixture(c: int, k: int, seed: int = 0, dtype=F64) -> Mixture:
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(k, generator=g, dtype=dtype) + 0.2
    return Mixture(
        weight / weight.sum(),
        torch.randn(k, c, generator=g, dtype=dtype) * 2,
        torch.rand(k, c, generator=g, dtype=dtype) + 0.5,
    )


# --------------------------------------------------------------------------------------------
# K = 1 is BatchNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (3, 6, 1, 1), (1, 5, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_k1_equals_batchnorm(shape, affine, track, momentum):
    torch.manual_seed(0)
    c = shape[1]
    bn = nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track).double()
    mn = MixtureNorm2d(
        c, num_components=1, momentum=momentum, affine=affine, track_running_stats=track
    ).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
            mn.weight.copy_(bn.weight), mn.bias.copy_(bn.bias)
    for step in range(4):  # several steps: running buffers accumulate
        x = (torch.randn(shape, dtype=F64) * (1 + step) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(shape, dtype=F64)
        y_bn, y_mn = bn(x), mn(x2)
        torch.testing.assert_close(y_mn, y_bn, rtol=1e-9, atol=1e-10)
        y_bn.backward(g), y_mn.backward(g)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-8, atol=1e-10)
        if affine:
            torch.testing.assert_close(mn.weight.grad, bn.weight.grad, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(mn.bias.grad, bn.bias.grad, rtol=1e-8, atol=1e-10)
        if track:
            torch.testing.assert_close(mn.running_mean[0], bn.running_mean, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(mn.running_var[0], bn.running_var, rtol=1e-9, atol=1e-12)
            assert int(mn.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
            assert mn.running_weight.item() == 1.0
    bn.eval(), mn.eval()
    x = torch.randn(shape, dtype=F64) * 2 + 1
    if not track and shape[0] * shape[2] * shape[3] == 1:
        return
    torch.testing.assert_close(mn(x), bn(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (3, 6, 2, 1)])
def test_k1_mixture_path_equals_batchnorm(shape):
    """The module runs BatchNorm's kernel at K = 1; the mixture path it bypasses is BatchNorm
    too: output, input and affine gradients, and the statistics (n_eff = P)."""
    torch.manual_seed(0)
    c = shape[1]
    bn = nn.BatchNorm2d(c).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    x = (torch.randn(shape, dtype=F64) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    gamma = bn.weight.detach().clone().requires_grad_()
    beta = bn.bias.detach().clone().requires_grad_()
    points = x2.detach().transpose(0, 1).reshape(c, -1).t()  # [P, C]
    mixture = Mixture(
        torch.ones(1, dtype=F64),
        points.mean(0, keepdim=True),
        points.var(0, unbiased=False, keepdim=True),
    )
    y, tau, (lam, mean, var, n_eff) = _vector_mixture_norm(
        x2.flatten(2), mixture, bn.eps, gamma, beta
    )
    y_bn = bn(x)
    torch.testing.assert_close(y.view(shape), y_bn, rtol=1e-10, atol=1e-10)
    g = torch.randn(shape, dtype=F64)
    y_bn.backward(g), y.view(shape).backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gamma.grad, bn.weight.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(beta.grad, bn.bias.grad, rtol=1e-8, atol=1e-10)
    assert torch.equal(tau, torch.ones_like(tau)) and lam.item() == 1.0
    assert n_eff.item() == pytest.approx(points.shape[0])
    torch.testing.assert_close(mean[0], points.mean(0))
    torch.testing.assert_close(var[0], points.var(0, unbiased=False))


def test_k1_float32_close_to_batchnorm():
    torch.manual_seed(1)
    bn, mn = nn.BatchNorm2d(16), MixtureNorm2d(16, num_components=1)
    x = torch.randn(8, 16, 6, 6) * 3 + 2
    torch.testing.assert_close(mn(x), bn(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mn.running_var[0], bn.running_var, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The math for K > 1: loop reference, reference path, fused path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("shape", [(4, 5, 3, 3), (2, 3, 4, 1)])
def test_reference_and_fused_match_loop(k, shape):
    torch.manual_seed(0)
    x = bimodal(shape, F64)
    points = to_points(x)
    mixture = fit_mixture(points, k)
    eps = 1e-5
    loop = loop_reference(points, mixture, eps)
    # vectorised reference on points
    x_hat, tau, (lam, mean, var, n_eff) = mixture_norm_reference(points, mixture, eps)
    for got, want in zip((x_hat, tau, lam, mean, var, n_eff), loop):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # fused path on [N, C, L]
    y, tau_f, stats_f = _vector_mixture_norm(x.flatten(2), mixture, eps)
    torch.testing.assert_close(to_points(y.view(shape)), loop[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(tau_f.transpose(1, 2).reshape(-1, k), loop[1])
    for got, want in zip(stats_f, loop[2:]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_gradients_match_loop(k, affine):
    torch.manual_seed(0)
    shape = (3, 4, 3, 2)
    x = bimodal(shape, F64, seed=3)
    mixture = fit_mixture(to_points(x), k)
    gamma = (torch.rand(4, dtype=F64) + 0.5).requires_grad_() if affine else None
    beta = torch.randn(4, dtype=F64).requires_grad_() if affine else None
    g = torch.randn(shape, dtype=F64)

    x1 = x.clone().requires_grad_()
    y1 = loop_reference(to_points(x1), mixture, 1e-5)[0]
    if affine:
        y1 = y1 * gamma + beta
    params = [x1] + ([gamma, beta] if affine else [])
    want = torch.autograd.grad(from_points(y1, shape), params, g)

    x2 = x.clone().requires_grad_()
    y2 = _vector_mixture_norm(x2.flatten(2), mixture, 1e-5, gamma, beta)[0].view(shape)
    got = torch.autograd.grad(y2, [x2] + params[1:], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (16, 6, 2, 2), (3, 5, 4, 4)])
@pytest.mark.parametrize("k", [3, 4])
def test_zero_batch_mean_per_channel(shape, k):
    torch.manual_seed(0)
    mn = MixtureNorm2d(shape[1], num_components=k, affine=False)
    for x in (bimodal(shape), torch.randn(shape) * 5 + 3):
        y = mn(x)
        assert y.mean((0, 2, 3)).abs().max() < 1e-5
    mn64 = MixtureNorm2d(shape[1], num_components=k, affine=False).double()
    y = mn64(bimodal(shape, F64))
    assert y.mean((0, 2, 3)).abs().max() < 1e-12


@pytest.mark.parametrize("k", [2, 3, 4])
def test_invariant_to_component_relabelling(k):
    x = bimodal((4, 5, 3, 3), F64).requires_grad_()
    mixture = random_mixture(5, k, seed=k)
    g = torch.randn_like(x)
    base = _vector_mixture_norm(x.flatten(2), mixture, 1e-5)[0]
    (grad_base,) = torch.autograd.grad(base, x, g.flatten(2))
    for perm in list(itertools.permutations(range(k)))[1:4]:
        perm = torch.tensor(perm)
        relabelled = Mixture(*(t[perm] for t in mixture))
        y = _vector_mixture_norm(x.flatten(2), relabelled, 1e-5)[0]
        torch.testing.assert_close(y, base, rtol=1e-10, atol=1e-12)
        (grad,) = torch.autograd.grad(y, x, g.flatten(2))
        torch.testing.assert_close(grad, grad_base, rtol=1e-9, atol=1e-11)
        ref = mixture_norm_reference(to_points(x), relabelled, 1e-5)[0]
        torch.testing.assert_close(
            from_points(ref, x.shape).flatten(2), base, rtol=1e-9, atol=1e-11
        )


def test_posteriors_and_moments_reference():
    """mixture_posteriors / mixture_moments / moments_to_stats agree with the loop."""
    points = to_points(bimodal((3, 4, 2, 2), F64))
    mixture = random_mixture(4, 3)
    loop = loop_reference(points, mixture, 1e-5)
    tau = mixture_posteriors(points, mixture)
    torch.testing.assert_close(tau, loop[1])
    shift = torch.randn(4, dtype=F64)  # any shift gives the same statistics
    lam, mean, var, n_eff = moments_to_stats(mixture_moments(points, tau, shift))
    for got, want in zip((lam, mean, var, n_eff), loop[2:]):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("switches", GRAD_SWITCHES, ids=switch_id)
def test_gradcheck_fused(k, switches):
    x = bimodal((3, 4, 2, 2), F64, seed=1).flatten(2).requires_grad_()
    mixture = fit_mixture(x.detach(), k, generator=torch.Generator().manual_seed(0))
    gamma = (torch.rand(4, dtype=F64) + 0.5).requires_grad_()
    beta = torch.randn(4, dtype=F64).requires_grad_()
    fn = lambda x, g, b: _vector_mixture_norm(x, mixture, 1e-3, g, b, **switches)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, gamma, beta))


def test_gradcheck_fused_pieces():
    """Each autograd Function on its own, every differentiable input at once."""
    n, c, length, k = 2, 3, 4, 3
    x = torch.randn(n, c, length, dtype=F64, requires_grad=True)
    mix = random_mixture(c, k)
    lin, quad = (mix.mean / mix.var).t(), (-0.5 / mix.var).t()
    bias = torch.randn(k, dtype=F64)
    shift = torch.randn(c, dtype=F64)

    def posterior_moments(x):
        xc, tau, s1, s2 = _PosteriorMoments.apply(x, shift, lin, quad, bias, True)
        return xc, tau, s1, s2

    assert torch.autograd.gradcheck(posterior_moments, (x,))
    assert torch.autograd.gradcheck(
        lambda x: _PosteriorMoments.apply(x, shift, lin, quad, bias, False), (x,)
    )
    tau = torch.softmax(torch.randn(n, k, length, dtype=F64), 1).requires_grad_()
    lam = (torch.rand(k, dtype=F64) + 0.2).requires_grad_()
    mean = torch.randn(k, c, dtype=F64, requires_grad=True)
    var = (torch.rand(k, c, dtype=F64) + 0.3).requires_grad_()
    gamma = torch.randn(c, dtype=F64, requires_grad=True)
    beta = torch.randn(c, dtype=F64, requires_grad=True)
    affine = lambda *a: _MixtureAffine.apply(*a, 1e-3)  # noqa: E731
    assert torch.autograd.gradcheck(affine, (x, tau, lam, mean, var, gamma, beta))
    assert torch.autograd.gradcheck(affine, (x, tau, lam, mean, var, None, None))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("switches", GRAD_SWITCHES, ids=switch_id)
def test_gradcheck_module(k, switches):
    """The whole module in training mode with the mixture held fixed.

    The fitted mixture is a (piecewise continuous) function of x that MN deliberately does not
    differentiate, so finite differences only agree with autograd once the fit is frozen: fit
    once with a seeded RNG and have the module reuse that mixture.
    """
    mn = MixtureNorm2d(3, num_components=k, eps=1e-3, fit_points=8, **switches).double()
    x = bimodal((2, 3, 3, 2), F64, seed=5).requires_grad_()
    torch.manual_seed(0)
    frozen = mn._fit_batch_mixture(x.detach().flatten(2), F64)
    mn._fit_batch_mixture = lambda x, dtype: frozen
    assert torch.autograd.gradcheck(mn, (x,))
    # and the frozen fit is what the seeded module would have used
    del mn._fit_batch_mixture
    torch.manual_seed(0)
    y = mn(x)
    torch.testing.assert_close(
        y,
        _vector_mixture_norm(x.flatten(2), frozen, 1e-3, mn.weight, mn.bias, **switches)[0].view(
            x.shape
        ),
    )


@pytest.mark.parametrize("switches", GRAD_SWITCHES, ids=switch_id)
def test_gradcheck_eval_running(switches):
    mn = MixtureNorm2d(3, num_components=3, eps=1e-3, **switches).double()
    for s in range(3):
        mn(bimodal((4, 3, 3, 3), F64, seed=s))
    mn.eval()
    x = bimodal((2, 3, 2, 2), F64, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(mn, (x,))


@pytest.mark.parametrize("switches", GRAD_SWITCHES, ids=switch_id)
def test_gradcheck_reference(switches):
    points = to_points(bimodal((2, 3, 2, 2), F64)).requires_grad_()
    mixture = random_mixture(3, 3)
    fn = lambda p: mixture_norm_reference(p, mixture, 1e-3, **switches)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (points,))


@pytest.mark.parametrize("lambda_scale", [True, False])
def test_posterior_grad_off_is_the_gradient_with_constant_posteriors(lambda_scale):
    """posterior_grad=False: the module's gradient is the true gradient (gradcheck) of MN with
    the posteriors held at their values, built from the reference pieces that take tau."""
    x0 = bimodal((2, 3, 3, 2), F64, seed=4)
    mixture = random_mixture(3, 3)
    points0 = to_points(x0)
    shift = (mixture.weight.unsqueeze(1) * mixture.mean).sum(0)
    tau0 = mixture_posteriors(
        points0 - shift, Mixture(mixture.weight, mixture.mean - shift, mixture.var)
    )

    def constant_posteriors(points):  # MN of points with tau fixed at tau0
        lam, mean, var, _ = moments_to_stats(mixture_moments(points, tau0, shift))
        return normalize_reference(points, tau0, lam, mean, var, 1e-3, lambda_scale)

    p = points0.clone().requires_grad_()
    assert torch.autograd.gradcheck(constant_posteriors, (p,))
    g = torch.randn(points0.shape, dtype=F64)
    constant_posteriors(p).backward(g)
    xb = x0.flatten(2).clone().requires_grad_()
    y, _, _ = _vector_mixture_norm(
        xb, mixture, 1e-3, posterior_grad=False, lambda_scale=lambda_scale
    )
    y.transpose(1, 2).reshape(-1, 3).backward(g)
    torch.testing.assert_close(xb.grad.transpose(1, 2).reshape(-1, 3), p.grad)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
def test_switches_fused_matches_reference(k, switches):
    """Every reading of the switches: the fused path the module runs equals the reference on
    points, output and gradients (input, gamma, beta)."""
    x = bimodal((3, 4, 3, 3), F64, seed=2)
    mixture = fit_mixture(to_points(x), k, generator=torch.Generator().manual_seed(0))
    gamma = torch.rand(4, dtype=F64) + 0.5
    beta = torch.randn(4, dtype=F64)
    g = torch.randn(to_points(x).shape, dtype=F64)
    xa = to_points(x).requires_grad_()
    ga, ba = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    x_hat, _, stats_ref = mixture_norm_reference(xa, mixture, 1e-3, **switches)
    y_ref = x_hat * ga + ba  # [P, C]
    y_ref.backward(g)
    xb = x.flatten(2).clone().requires_grad_()
    gb, bb = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    y, _, stats = _vector_mixture_norm(xb, mixture, 1e-3, gb, bb, **switches)
    y_points = y.transpose(1, 2).reshape(-1, 4)  # [P, C]
    torch.testing.assert_close(y_points, y_ref)
    y_points.backward(g)
    torch.testing.assert_close(xb.grad.transpose(1, 2).reshape(-1, 4), xa.grad)
    torch.testing.assert_close(gb.grad, ga.grad)
    torch.testing.assert_close(bb.grad, ba.grad)
    for a, b in zip(stats, stats_ref):
        torch.testing.assert_close(a, b)


def test_switches_change_what_they_should():
    """lambda_scale changes the output (K > 1), posterior_grad only the gradients; with K = 1
    neither changes anything (BatchNorm)."""
    x = bimodal((4, 3, 4, 4), F64, seed=3)
    g = torch.randn(x.shape, dtype=F64)

    def run(k, **switches):
        torch.manual_seed(0)
        mn = MixtureNorm2d(3, num_components=k, **switches).double()
        xi = x.clone().requires_grad_()
        y = mn(xi)
        y.backward(g)
        return y.detach(), xi.grad

    for k in (1, 3):
        y0, g0 = run(k)
        y_nl, g_nl = run(k, lambda_scale=False)
        y_np, g_np = run(k, posterior_grad=False)
        torch.testing.assert_close(y_np, y0)  # posterior_grad never changes the output
        if k == 1:
            torch.testing.assert_close(y_nl, y0)
            torch.testing.assert_close(g_np, g0)
            torch.testing.assert_close(g_nl, g0)
        else:
            assert not torch.allclose(y_nl, y0)
            assert not torch.allclose(g_np, g0)
            assert not torch.allclose(g_nl, g0)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_lambda_scale_second_moment_is_about_k(k):
    """With well-separated, equally weighted components every posterior is ~0 or ~1, so
    x_hat ~ sqrt(K) * (x - E_k) / sd_k: the output's second moment is ~K with the factor
    (the first layer's gain starts sqrt(K) above BatchNorm's) and ~1 without it."""
    g = torch.Generator().manual_seed(k)
    c, per = 4, 400
    centres = torch.randn(k, c, generator=g, dtype=F64) * 60.0  # far apart
    points = torch.cat([centres[j] + torch.randn(per, c, generator=g, dtype=F64) for j in range(k)])
    mixture = Mixture(torch.full((k,), 1.0 / k, dtype=F64), centres, torch.ones(k, c, dtype=F64))
    with_scale = mixture_norm_reference(points, mixture, 1e-5)[0]
    without = mixture_norm_reference(points, mixture, 1e-5, lambda_scale=False)[0]
    assert with_scale.pow(2).mean().item() == pytest.approx(k, rel=0.05)
    assert without.pow(2).mean().item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
def test_switches_finite_on_degenerate_batches(switches):
    for x in (torch.ones(2, 3, 4, 4), torch.zeros(3, 3, 2, 2), torch.randn(1, 3, 1, 2) * 1e4):
        mn = MixtureNorm2d(3, num_components=3, **switches)
        xi = x.clone().requires_grad_()
        y = mn(xi)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xi.grad).all()


# --------------------------------------------------------------------------------------------
# Degenerate batches
# --------------------------------------------------------------------------------------------


def _degenerate_batches():
    c = 4
    two = torch.zeros(6, c, 3, 3)
    two[3:] = 1.0
    yield "constant", torch.full((4, c, 3, 3), 2.5)
    yield "zeros", torch.zeros(4, c, 2, 2)
    yield "two_points", two
    yield "fewer_points_than_k", torch.randn(2, c, 1, 1)
    yield "huge", 1e4 + torch.randn(4, c, 3, 3)
    yield "huge_constant_offset", 1e4 + 1e-2 * torch.randn(4, c, 3, 3)
    yield "tiny", 1e-6 * torch.randn(4, c, 3, 3)
    outlier = torch.cat([torch.randn(4, c - 1, 3, 3), 1e3 * torch.ones(4, 1, 3, 3)], 1)
    yield "one_channel_outlier", outlier


@pytest.mark.parametrize(
    "name,x", [pytest.param(name, x, id=name) for name, x in _degenerate_batches()]
)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_degenerate_batches_finite(name, x, k, dtype):
    torch.manual_seed(0)
    mn = MixtureNorm2d(x.shape[1], num_components=k).to(dtype)
    x = x.detach().to(dtype).clone().requires_grad_()
    for _ in range(2):
        y = mn(x)
        assert torch.isfinite(y).all(), name
        y.backward(torch.randn_like(y))
        assert torch.isfinite(x.grad).all(), name
        assert torch.isfinite(mn.weight.grad).all() and torch.isfinite(mn.bias.grad).all()
    for buf in (mn.running_weight, mn.running_mean, mn.running_var):
        assert torch.isfinite(buf).all()
    assert mn.running_var.max() < 1e12
    mn.eval()
    assert torch.isfinite(mn(x)).all()
    telemetry = mn.telemetry()
    assert all(torch.isfinite(v).all() for v in telemetry.values())


def test_huge_offset_is_shift_invariant_in_float64():
    x = bimodal((4, 3, 3, 3), F64)
    mn = MixtureNorm2d(3, num_components=3, affine=False).double()
    torch.manual_seed(0)
    y0 = mn(x)
    torch.manual_seed(0)
    y1 = mn(x + 1e4)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)


def test_fit_mixture_degenerate_and_reproducible():
    points = torch.zeros(10, 3)
    mix = fit_mixture(points, 3)
    assert torch.isfinite(torch.cat([t.flatten() for t in mix])).all()
    torch.testing.assert_close(mix.weight.sum(), torch.tensor(1.0))
    assert (mix.var >= 1e-5).all()
    pts = torch.randn(500, 4)
    a = fit_mixture(pts, 3, fit_points=100, generator=torch.Generator().manual_seed(3))
    b = fit_mixture(pts, 3, fit_points=100, generator=torch.Generator().manual_seed(3))
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t)


def naive_em(points, init_mean, iters, eps):
    """Diagonal-GMM EM written per component with torch.distributions (the reference)."""
    m, c = points.shape
    k = init_mean.shape[0]
    mean = [init_mean[j].clone() for j in range(k)]
    var = [points.var(0, unbiased=False).clamp_min(eps) for _ in range(k)]
    weight = [torch.tensor(1.0 / k, dtype=points.dtype) for _ in range(k)]
    for _ in range(iters):
        # [M, K]
        log_joint = torch.stack(
            [
                torch.distributions.Normal(mean[j], var[j].sqrt()).log_prob(points).sum(1)
                + weight[j].log()
                for j in range(k)
            ],
            1,
        )
        resp = (log_joint - log_joint.logsumexp(1, keepdim=True)).exp()
        for j in range(k):
            r = resp[:, j]
            mass = r.sum()
            mean[j] = (r[:, None] * points).sum(0) / mass
            var[j] = ((r[:, None] * (points - mean[j]) ** 2).sum(0) / mass).clamp_min(eps)
            weight[j] = mass / m
    return torch.stack(weight), torch.stack(mean), torch.stack(var)


@pytest.mark.parametrize("k,iters", [(2, 1), (3, 4), (5, 2)])
def test_em_mixture_matches_naive_em(k, iters):
    points = to_points(bimodal((6, 4, 5, 5), dtype=F64, seed=k))  # [150, 4]
    init = points[torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:k]]
    got = estimate_mixture(points, k, estimator="em", em_iters=iters, eps=1e-5, init_mean=init)
    weight, mean, var = naive_em(points, init, iters, 1e-5)
    torch.testing.assert_close(got.weight, weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.mean, mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got.var, var, rtol=1e-9, atol=1e-10)


def test_em_estimator_in_the_module():
    """estimator="em" fits with EM (the module's output is MN under the EM fit of
    ``estimate_mixture``), K = 1 stays BatchNorm, and it is finite on a constant batch."""
    torch.manual_seed(0)
    x = bimodal((4, 3, 6, 6), dtype=F64)
    mn = MixtureNorm2d(3, num_components=3, estimator="em", em_iters=2, fit_points=64).double()
    torch.manual_seed(1)
    y = mn(x)
    torch.manual_seed(1)
    mixture = fit_mixture(to_points(x), 3, fit_points=64, estimator="em", em_iters=2, eps=mn.eps)
    x_hat, _, _ = mixture_norm_reference(to_points(x), mixture, mn.eps)
    torch.testing.assert_close(to_points(y), x_hat)
    assert "estimator=em, em_iters=2" in repr(mn)
    km = estimate_mixture(to_points(x), 1, estimator="em")
    torch.testing.assert_close(km.mean[0], to_points(x).mean(0))
    const = MixtureNorm2d(3, num_components=3, estimator="em")(torch.ones(2, 3, 4, 4))
    assert torch.isfinite(const).all()
    with pytest.raises(ValueError, match="estimator must be one of"):
        MixtureNorm2d(3, estimator="gibbs")


def test_config_estimators_are_the_layers():
    from dcgan_mn import config
    from dcgan_mn.norms import ESTIMATORS

    assert config.ESTIMATORS is ESTIMATORS  # read from the layer, not copied


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    labels = torch.arange(300) % 3
    points = centres[labels] + 0.1 * torch.randn(300, 2, generator=g)
    mix = estimate_mixture(points, 3, estimator="kmeans", kmeans_iters=5, generator=g)
    order = mix.mean[:, 0].argsort()
    torch.testing.assert_close(mix.mean[order], centres, atol=0.05, rtol=0)
    torch.testing.assert_close(mix.weight, torch.full((3,), 1 / 3), atol=1e-6, rtol=0)
    assert (mix.var < 0.05).all()


def test_sample_fit_points_same_subset_for_both_layouts():
    x = torch.randn(4, 3, 5, 5)
    a = sample_fit_points(to_points(x), 20, torch.Generator().manual_seed(1))
    b = sample_fit_points(x.flatten(2), 20, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert sample_fit_points(x.flatten(2), 1000).shape == (100, 3)


# --------------------------------------------------------------------------------------------
# Running statistics
# --------------------------------------------------------------------------------------------


def _batch_stats_for(mn: MixtureNorm2d, x: torch.Tensor, seed: int):
    """The statistics the module will compute for x when the RNG is seeded with ``seed``."""
    torch.manual_seed(seed)
    mixture = fit_mixture(
        to_points(x),
        mn.num_components,
        fit_points=mn.fit_points,
        kmeans_iters=mn.kmeans_iters,
        eps=mn.eps,
    )
    _, _, lam, mean, var, n_eff = loop_reference(to_points(x), mixture, mn.eps)
    return lam, mean, var, n_eff


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_update_by_hand(momentum):
    k = 3
    mn = MixtureNorm2d(4, num_components=k, momentum=momentum, fit_points=40).double()
    run_w = torch.full((k,), 1 / k, dtype=F64)
    run_m = torch.zeros(k, 4, dtype=F64)
    run_v = torch.ones(k, 4, dtype=F64)
    for step in range(4):
        x = bimodal((4, 4, 3, 3), F64, seed=step)
        lam, mean, var, n_eff = _batch_stats_for(mn, x, seed=step)
        # brute-force matching: batch component perm[j] goes to running component j
        best = min(
            itertools.permutations(range(k)),
            key=lambda p: sum(((mean[p[j]] - run_m[j]) ** 2).sum() for j in range(k)),
        )
        p = list(best)
        factor = 1.0 / (step + 1) if momentum is None else momentum
        unbiased = var * (n_eff / (n_eff - 1)).unsqueeze(1)
        run_w = (1 - factor) * run_w + factor * lam[p]
        run_m = (1 - factor) * run_m + factor * mean[p]
        run_v = (1 - factor) * run_v + factor * unbiased[p]
        torch.manual_seed(step)
        mn(x)
        torch.testing.assert_close(mn.running_weight, run_w)
        torch.testing.assert_close(mn.running_mean, run_m)
        torch.testing.assert_close(mn.running_var, run_v)
        assert int(mn.num_batches_tracked) == step + 1
        torch.testing.assert_close(mn.running_weight.sum(), torch.tensor(1.0, dtype=F64))


def test_match_components():
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 5, 8):  # 8 takes the greedy path
        running = torch.randn(k, 6, generator=g) * 5
        perm = torch.randperm(k, generator=g)
        batch = torch.empty_like(running)
        batch[perm] = running + 0.01 * torch.randn(k, 6, generator=g)
        assert torch.equal(match_components(batch, running), perm)


def test_eval_with_running_stats_is_per_sample():
    torch.manual_seed(0)
    mn = MixtureNorm2d(5, num_components=3)
    for s in range(5):
        mn(bimodal((8, 5, 4, 4), seed=s))
    assert_eval_is_per_sample(mn, bimodal((6, 5, 4, 4), seed=10), rtol=1e-5, atol=1e-6)


def test_eval_without_running_stats_uses_batch():
    torch.manual_seed(0)
    mn = MixtureNorm2d(3, num_components=3, track_running_stats=False)
    x = bimodal((4, 3, 3, 3))
    torch.manual_seed(1)
    y_train = mn(x)
    mn.eval()
    torch.manual_seed(1)
    torch.testing.assert_close(mn(x), y_train)
    assert mn.running_mean is None and "running_mean" not in mn.state_dict()


def test_module_matches_functional_core():
    torch.manual_seed(0)
    mn = MixtureNorm2d(4, num_components=3, fit_points=30)
    with torch.no_grad():
        mn.weight.uniform_(0.5, 1.5), mn.bias.uniform_(-1, 1)
    x = bimodal((4, 4, 3, 3))
    torch.manual_seed(7)
    y = mn(x)
    torch.manual_seed(7)
    mixture = fit_mixture(to_points(x), 3, fit_points=30, kmeans_iters=2, eps=1e-5)
    x_hat = mixture_norm_reference(to_points(x), mixture, 1e-5)[0]
    want = from_points(x_hat * mn.weight + mn.bias, x.shape)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = MixtureNorm2d(4, num_components=3, momentum=0.2)
    for s in range(3):
        a(bimodal((4, 4, 3, 3), seed=s))
    sd = a.state_dict()
    assert set(sd) == {
        "weight",
        "bias",
        "running_weight",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    b = MixtureNorm2d(4, num_components=3, momentum=0.2)
    b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, sd[k]), k
    a.eval(), b.eval()
    x = bimodal((2, 4, 3, 3), seed=9)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        MixtureNorm2d(4, num_components=2).load_state_dict(sd)
    # torch.save / torch.load(weights_only=True) round trip
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_reset_and_repr():
    mn = MixtureNorm2d(4, num_components=3, fit_points=64, kmeans_iters=1)
    mn(bimodal((4, 4, 3, 3)))
    mn.reset_running_stats()
    assert torch.equal(mn.running_weight, torch.full((3,), 1 / 3))
    assert mn.running_mean.abs().sum() == 0 and torch.equal(mn.running_var, torch.ones(3, 4))
    assert int(mn.num_batches_tracked) == 0
    text = repr(mn)
    for part in (
        "4",
        "num_components=3",
        "eps=1e-05",
        "momentum=0.1",
        "affine=True",
        "fit_points=64",
        "kmeans_iters=1",
    ):
        assert part in text


def test_telemetry():
    mn = MixtureNorm2d(4, num_components=3)
    assert mn.telemetry() == {}
    mn(bimodal((4, 4, 3, 3)))
    t = mn.telemetry()
    assert t["mixture_weight"].shape == (3,)
    torch.testing.assert_close(t["mixture_weight"].sum(), torch.tensor(1.0))
    assert 0 <= t["posterior_entropy"].item() <= math.log(3) + 1e-6
    assert 1 - 1e-6 <= t["effective_components"].item() <= 3 + 1e-6
    assert not t["mixture_weight"].requires_grad


# --------------------------------------------------------------------------------------------
# dtype and memory format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_channels_last(k):
    torch.manual_seed(0)
    mn = MixtureNorm2d(6, num_components=k)
    x = bimodal((4, 6, 5, 3))
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_nc = x.clone().requires_grad_()
    g = torch.randn(4, 6, 5, 3)
    torch.manual_seed(1)
    y_cl = mn(x_cl)
    torch.manual_seed(1)
    y_nc = mn(x_nc)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    assert y_nc.is_contiguous()
    torch.testing.assert_close(y_cl, y_nc)
    y_cl.backward(g.contiguous(memory_format=torch.channels_last)), y_nc.backward(g)
    torch.testing.assert_close(x_cl.grad, x_nc.grad)
    mn.eval()
    torch.testing.assert_close(mn(x_cl), mn(x_nc))
    assert mn(x_cl).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("k", [1, 3])
def test_bf16_autocast(k):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    mn = MixtureNorm2d(8, num_components=k)
    x = torch.randn(4, 3, 6, 6)
    torch.manual_seed(1)
    ref = mn(conv(x))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = mn(h)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().mean() < 0.05
    y.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and mn.weight.grad.dtype == torch.float32
    # a bf16 module and input (no autocast) keeps bf16 in and out
    mn16 = MixtureNorm2d(8, num_components=k).to(torch.bfloat16)
    assert mn16(h.detach()).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, k_arg", [(MixtureNorm2d, "num_components"), (ModeNorm2d, "num_modes")]
)
def test_clear_errors_shared_by_component_norms(cls, k_arg):
    """The input and hyper-parameter checks Mixture and Mode Normalization share (their base)."""
    m = cls(4)
    with pytest.raises(ValueError, match="4-D input"):
        m(torch.randn(4, 4, 3))
    with pytest.raises(ValueError, match="4-D input"):
        m(torch.randn(2, 4, 3, 3, 1))
    with pytest.raises(ValueError, match="got 5 channels"):
        m(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cls(4, track_running_stats=False).eval()(torch.randn(1, 4, 1, 1))
    m.eval()
    assert m(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)  # running stats: fine
    with pytest.raises(ValueError, match=rf"{k_arg} \(K\) must be >= 1, got 0"):
        cls(4, **{k_arg: 0})
    with pytest.raises(ValueError, match="num_features"):
        cls(0)
    with pytest.raises(ValueError, match="eps"):
        cls(4, eps=0.0)


def test_clear_errors():
    with pytest.raises(ValueError, match="fit_points"):
        MixtureNorm2d(4, num_components=3, fit_points=2)
    with pytest.raises(ValueError, match="kmeans_iters"):
        MixtureNorm2d(4, kmeans_iters=-1)
    with pytest.raises(ValueError, match="unknown norm kind 'ln'"):
        make_norm2d(4, "ln")
    assert isinstance(make_norm2d(4, "bn"), nn.BatchNorm2d)
    made = make_norm2d(4, "mn", num_components=2, fit_points=99)
    assert isinstance(made, MixtureNorm2d) and made.num_components == 2 and made.fit_points == 99


def test_double_backward_is_refused_clearly():
    mn = MixtureNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    (g,) = torch.autograd.grad(mn(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()


def test_fused_matches_fixed_stats_path_in_eval():
    """_vector_mixture_norm_fixed (eval) equals the reference with the running mixture."""
    mix = random_mixture(3, 3)
    x = bimodal((2, 3, 2, 2), F64)
    y = _vector_mixture_norm_fixed(x.flatten(2), *mix, 1e-5, None, None)
    tau = mixture_posteriors(to_points(x), mix)
    x_hat = normalize_reference(to_points(x), tau, *mix, 1e-5)
    torch.testing.assert_close(to_points(y.view(x.shape)), x_hat)


@pytest.mark.parametrize("k", [1, 3])
def test_backward_twice_with_retain_graph_and_two_calls_in_one_graph(k):
    """The fused backward reuses buffers; a second backward (retain_graph) must still agree,
    and so must a layer applied twice before one backward."""
    torch.manual_seed(0)
    mn = MixtureNorm2d(4, num_components=k).double()
    x = bimodal((4, 4, 3, 3), F64).requires_grad_()
    g = torch.randn(4, 4, 3, 3, dtype=F64)
    y = mn(x)
    (first,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (second,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    x2 = bimodal((4, 4, 3, 3), F64, seed=4).requires_grad_()
    torch.manual_seed(1)
    y1, y2 = mn(x), mn(x2)
    gx, gx2 = torch.autograd.grad((y1 * g).sum() + (y2 * g).sum(), [x, x2])
    torch.manual_seed(1)
    (want1,) = torch.autograd.grad((mn(x) * g).sum(), x)
    (want2,) = torch.autograd.grad((mn(x2) * g).sum(), x2)
    torch.testing.assert_close(gx, want1)
    torch.testing.assert_close(gx2, want2)


def test_running_var_correction_is_capped_for_tiny_components():
    """n_eff / (n_eff - 1) for n_eff >= 2 (BN's correction), n_eff itself below 2: a component
    holding about one point's worth of posterior mass cannot blow the running variance up."""
    mn = MixtureNorm2d(2, num_components=3, momentum=None).double()
    lam = torch.tensor([0.5, 0.49, 0.01], dtype=F64)
    mean = torch.zeros(3, 2, dtype=F64)
    var = torch.ones(3, 2, dtype=F64)
    n_eff = torch.tensor([10.0, 2.0, 1.0 + 1e-9], dtype=F64)
    mn._update_running(lam, mean, var, n_eff)  # momentum None, first batch: factor 1
    want = torch.tensor([10 / 9, 2.0, 1.0 + 1e-9], dtype=F64)
    torch.testing.assert_close(mn.running_var, want.unsqueeze(1).expand(3, 2))
    torch.testing.assert_close(mn.running_weight, lam)


# --------------------------------------------------------------------------------------------
# point = "channel": one independent 1-D mixture per channel
# --------------------------------------------------------------------------------------------


def per_channel_reference(x, mixture, eps, gamma, beta, **switches):
    """The vector reading run on each channel alone (C = 1): what point='channel' must equal."""
    n, c, h, w = x.shape
    ys, stats = [], []
    for ch in range(c):
        points = x[:, ch].reshape(-1, 1)  # [P, 1]
        mix = Mixture(
            mixture.weight[:, ch], mixture.mean[:, ch : ch + 1], mixture.var[:, ch : ch + 1]
        )
        x_hat, _, st = mixture_norm_reference(points, mix, eps, **switches)
        ys.append(x_hat[:, 0] * gamma[ch] + beta[ch])
        stats.append(st)
    y = torch.stack(ys, 1).view(n, h, w, c).permute(0, 3, 1, 2)  # points are (n, h, w)-ordered
    return y, stats


def random_channel_mixture(c, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(k, c, generator=g, dtype=F64) + 0.2
    return Mixture(
        weight / weight.sum(0),
        torch.randn(k, c, generator=g, dtype=F64) * 2,
        torch.rand(k, c, generator=g, dtype=F64) + 0.5,
    )


@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
def test_channel_reading_is_the_vector_reading_per_channel(switches):
    x = bimodal((3, 4, 3, 2), F64, seed=6)
    mixture = random_channel_mixture(4, 3)
    gamma, beta = torch.rand(4, dtype=F64) + 0.5, torch.randn(4, dtype=F64)
    xa = x.clone().requires_grad_()
    ga, ba = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    y_ref, stats_ref = per_channel_reference(xa, mixture, 1e-3, ga, ba, **switches)
    xb = x.clone().requires_grad_()
    gb, bb = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    y, tau, (lam, mean, var, n_eff) = mixture_norm(
        xb.flatten(2), mixture, 1e-3, gb, bb, batch_stats=True, point="channel", **switches
    )
    torch.testing.assert_close(y.view(x.shape), y_ref)
    assert tau.shape == (3, 4, 3, 6)
    for ch, (l_r, m_r, v_r, n_r) in enumerate(stats_ref):
        torch.testing.assert_close(lam[:, ch], l_r)
        torch.testing.assert_close(mean[:, ch], m_r[:, 0])
        torch.testing.assert_close(var[:, ch], v_r[:, 0])
        torch.testing.assert_close(n_eff[:, ch], n_r)
    g = torch.randn(x.shape, dtype=F64)
    y_ref.backward(g), y.view(x.shape).backward(g)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(gb.grad, ga.grad)
    torch.testing.assert_close(bb.grad, ba.grad)


@pytest.mark.parametrize("estimator", ["kmeans", "em"])
def test_channel_fit_is_the_vector_fit_per_channel(estimator):
    points = to_points(bimodal((4, 3, 5, 5), F64, seed=7))  # [100, 3]
    init = points[torch.randperm(100, generator=torch.Generator().manual_seed(1))[:3]]  # [K, C]
    got = estimate_mixture(
        points, 3, point="channel", estimator=estimator, kmeans_iters=2, em_iters=3, init_mean=init
    )
    for ch in range(3):
        one = points[:, ch : ch + 1]
        if estimator == "kmeans":
            ref = estimate_mixture(
                one, 3, estimator="kmeans", kmeans_iters=2, init_mean=init[:, ch : ch + 1]
            )
        else:
            ref = estimate_mixture(
                one, 3, estimator="em", em_iters=3, init_mean=init[:, ch : ch + 1]
            )
        torch.testing.assert_close(got.weight[:, ch], ref.weight)
        torch.testing.assert_close(got.mean[:, ch], ref.mean[:, 0])
        torch.testing.assert_close(got.var[:, ch], ref.var[:, 0])


def test_channel_matching_is_optimal():
    from dcgan_mn.norms.mixture import match_components_per_channel

    g = torch.Generator().manual_seed(2)
    for k in (2, 3, 5):
        batch, running = torch.randn(k, 6, generator=g), torch.randn(k, 6, generator=g)
        perm = match_components_per_channel(batch, running)  # [K, C]
        for ch in range(6):
            brute = match_components(batch[:, ch : ch + 1], running[:, ch : ch + 1])
            cost = lambda p: (batch[p, ch] - running[:, ch]).square().sum()  # noqa: E731
            torch.testing.assert_close(cost(perm[:, ch]), cost(brute))


def test_channel_module():
    """The module with point='channel': running weights per channel, eval per sample from the
    running mixtures, finite on degenerate batches, a clear refusal of synchronization, and an
    output that differs from the vector reading."""
    torch.manual_seed(0)
    mn = MixtureNorm2d(4, num_components=3, point="channel", fit_points=64).double()
    assert mn.running_weight.shape == (3, 4) and "point=channel" in repr(mn)
    for s in range(4):
        y = mn(bimodal((4, 4, 3, 3), F64, seed=s))
    torch.testing.assert_close(mn.running_weight.sum(0), torch.ones(4, dtype=F64))
    t = mn.telemetry()
    assert t["mixture_weight"].shape == (3,) and 1.0 <= t["effective_components"].item() <= 3.0
    torch.manual_seed(0)
    vec = MixtureNorm2d(4, num_components=3, fit_points=64).double()
    torch.manual_seed(0)
    assert not torch.allclose(vec(bimodal((4, 4, 3, 3), F64, seed=3)), y)
    mn.eval()
    x = bimodal((5, 4, 2, 2), F64, seed=9)
    torch.testing.assert_close(mn(x)[:2], mn(x[:2]))  # a sample's output ignores its batch
    xi = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(mn, (xi,))
    mn.train()
    for bad in (torch.ones(2, 4, 3, 3, dtype=F64), torch.zeros(1, 4, 1, 2, dtype=F64)):
        xb = bad.clone().requires_grad_()
        out = mn(xb)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(xb.grad).all()
    state = mn.state_dict()
    again = MixtureNorm2d(4, num_components=3, point="channel").double()
    again.load_state_dict(state)
    assert all(torch.equal(state[k], again.state_dict()[k]) for k in state)
    from dcgan_mn.sync import SyncMixtureNorm2d

    with pytest.raises(ValueError, match="point='vector' only"):
        SyncMixtureNorm2d(4, num_components=3, point="channel")
    with pytest.raises(ValueError, match="point must be one of"):
        MixtureNorm2d(4, point="pixel")
