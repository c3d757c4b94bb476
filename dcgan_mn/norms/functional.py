"""Steps 2-5 of Mixture Normalization as the module runs them, behind one front door.

``mixture_norm`` is to ``MixtureNorm2d`` what ``torch.nn.functional.batch_norm`` is to
``nn.BatchNorm2d``: a pure function of the batch, the mixture (fitted to the batch, or the
running one) and the affine parameters. Behind it, one private function per reading and kind
of statistics:

* the vector reading's fused path on [N, C, L] (``_vector_mixture_norm`` with batch statistics,
  ``_vector_mixture_norm_fixed`` with given ones): the math of ``reference.py`` in two autograd
  Functions with hand-written backward passes that read and write the activations far fewer
  times than autograd would (MN is memory-bound: this made a training step of the layer about
  3x faster on CPU);
* the per-channel reading (``_channel_reading``): plain autograd ops on [N, C, K, L]; the
  tests check it against the vector reading run on each channel alone (C = 1).

The fused path is split where the moments are, so that synchronized MN can all-reduce them with
ordinary autograd-aware collectives in between:

  _PosteriorMoments: x -> xc = x - shift, tau [N, K, L], S1 = sum tau xc, S2 = sum tau xc^2
  _MixtureAffine:    (xc, tau, lambda, E, Var, gamma, beta) -> y

Every contraction is a batched matmul with K (or 2K) on the small side; posteriors live in
[N, K, L] so that the products over C read the activations in their natural layout.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .mixture import _LOG_2PI, _TINY, Mixture, MixtureMoments, _centred_stats, _mixture_shift

__all__ = ["mixture_norm"]

Stats = tuple[Tensor, Tensor, Tensor, Tensor]  # (lambda, E, Var, n_eff)
Reduce = Callable[[MixtureMoments], MixtureMoments]


def _logit_params(mixture: Mixture) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients of the log joint density, linear in x and x^2: for a point x,

        log weight_k + log N(x | mean_k, var_k) = bias_k + x . lin[:, k] + x^2 . quad[:, k]

    with lin [C, K], quad [C, K], bias [K].
    """
    weight, mean, var = (t.detach() for t in mixture)
    inv_var = var.reciprocal()  # [K, C]
    lin = (mean * inv_var).t()  # [C, K]
    quad = (-0.5 * inv_var).t()  # [C, K]
    # [K]
    bias = (
        weight.clamp_min(_TINY).log()
        - 0.5 * (var.log().sum(1) + var.shape[1] * _LOG_2PI)
        - 0.5 * (mean * mean * inv_var).sum(1)
    )
    return lin, quad, bias


def _flush_subnormals_(t: Tensor) -> Tensor:
    """Set entries smaller in magnitude than the dtype's smallest normal number to zero.

    Posteriors of well-separated components underflow into the subnormal range (logit gaps of
    about 90 in float32), and a matrix product with subnormal operands runs many times slower
    on x86 CPUs. Flushing them is what a GPU (or an FTZ CPU mode) does anyway and changes
    results by less than 1e-38 relative to the posteriors, which sum to 1.
    """
    return t.masked_fill_(t.abs() < torch.finfo(t.dtype).tiny, 0.0)


def _bmm_left(w: Tensor, u: Tensor) -> Tensor:
    """w [A, B] applied to every u[n] [B, L]: [N, A, L]."""
    return torch.bmm(w.expand(u.shape[0], *w.shape), u)


class _PosteriorMoments(torch.autograd.Function):
    """xc = x - shift; tau = softmax_k(bias + lin^T xc + quad^T xc^2); S1, S2 = tau-weighted sums.

    Inputs: x [N, C, L] (any float dtype), shift [C], lin [C, K], quad [C, K], bias [K]
    (constants: no gradient), need_moments. Outputs: xc [N, C, L], tau [N, K, L] and, if
    need_moments, S1 [K, C] = sum_{n,l} tau xc and S2 [K, C] = sum_{n,l} tau xc^2.

    On a CPU, allocating a fresh activation-sized tensor costs about as much as a pass over it
    (page faults), so the backward pass writes into buffers it already has: the incoming
    gradient of xc (only ever produced by _MixtureAffine.backward, for this Function alone) and
    the saved xc^2 once it has been read (recomputed if backward runs again, retain_graph).
    """

    @staticmethod
    def forward(ctx, x, shift, lin, quad, bias, need_moments, posterior_grad=True):
        k = bias.shape[0]
        xc = torch.empty(x.shape, dtype=shift.dtype, device=x.device)  # [N, C, L] contiguous
        torch.sub(x, shift.unsqueeze(1), out=xc)  # (also turns channels_last into [N, C, L])
        xsq = xc * xc  # [N, C, L]
        if k == 1:
            tau = xc.new_ones(xc.shape[0], 1, xc.shape[2])  # [N, 1, L]
        else:
            logits = torch.baddbmm(bias.unsqueeze(1), lin.t().expand(xc.shape[0], -1, -1), xc)
            logits.baddbmm_(quad.t().expand(xc.shape[0], -1, -1), xsq)  # [N, K, L]
            tau = _flush_subnormals_(torch.softmax(logits, dim=1))  # [N, K, L]
        ctx.save_for_backward(xc, tau, lin, quad)
        ctx.xsq = xsq  # an intermediate: kept on ctx so that backward may reuse its memory
        ctx.xsq_clobbered = False
        ctx.need_moments = need_moments
        ctx.posterior_grad = posterior_grad
        if not need_moments:
            return xc, tau
        s1 = torch.bmm(tau, xc.transpose(1, 2)).sum(0)  # [K, C]
        s2 = torch.bmm(tau, xsq.transpose(1, 2)).sum(0)  # [K, C]
        return xc, tau, s1, s2

    @staticmethod
    @once_differentiable
    def backward(ctx, g_xc, g_tau, g_s1=None, g_s2=None):
        xc, tau, lin, quad = ctx.saved_tensors
        xsq = xc * xc if ctx.xsq_clobbered else ctx.xsq
        n, k = tau.shape[0], tau.shape[1]
        with torch.autocast(device_type=xc.device.type, enabled=False):
            g_s1 = torch.zeros_like(lin.t()) if g_s1 is None else g_s1  # [K, C]
            g_s2 = torch.zeros_like(lin.t()) if g_s2 is None else g_s2  # [K, C]
            # S1 = sum tau xc and S2 = sum tau xc^2 reach x directly and through tau.
            if k == 1 or not ctx.posterior_grad:
                u = tau  # [N, K, L]  (tau is constant: no posterior term)
                b_lin, b_quad = g_s1.t(), 2.0 * g_s2.t()  # [C, K]
            else:
                g = torch.zeros_like(tau) if g_tau is None else g_tau.clone()  # [N, K, L]
                if ctx.need_moments:  # total dL/dtau
                    g.baddbmm_(g_s1.expand(n, -1, -1), xc).baddbmm_(g_s2.expand(n, -1, -1), xsq)
                # softmax backward: dL/dlogits = tau * (g - sum_k tau g)
                g_logits = tau * (g - (tau * g).sum(1, keepdim=True))  # [N, K, L]
                _flush_subnormals_(g_logits)
                # logits = bias + lin^T xc + quad^T xc^2: stack [logits | moments] terms
                u = torch.cat([g_logits, tau], 1)  # [N, 2K, L]
                b_lin = torch.cat([lin, g_s1.t()], 1)  # [C, 2K]
                b_quad = 2.0 * torch.cat([quad, g_s2.t()], 1)  # [C, 2K]
            # dL/dx = g_xc + b_lin u + xc * (b_quad u), accumulated in g_xc's memory
            g_x = _bmm_left(b_lin, u) if g_xc is None else g_xc.baddbmm_(b_lin.expand(n, -1, -1), u)
            scratch = torch.bmm(b_quad.expand(n, -1, -1), u, out=xsq)  # xsq is no longer needed
            ctx.xsq_clobbered = True
            g_x.addcmul_(xc, scratch)
        return g_x, None, None, None, None, None, None


class _MixtureAffine(torch.autograd.Function):
    """y = gamma * sum_k a[k] * (xc - E_k) * R_k + beta, with a = tau / sqrt(lambda) and
    R = 1 / sqrt(Var + eps); computed as y = xc * M1 + M2 where M1 = (R gamma)^T a and
    M2 = beta - (E R gamma)^T a are [N, C, L] batched products with K on the inside.

    Inputs: xc [N, C, L], tau [N, K, L], lam [K], mean [K, C] (centred like xc), var [K, C],
    gamma [C] or None, beta [C] or None, eps. Output y [N, C, L]. One activation-sized tensor is
    allocated forward (y) and one backward (M1, then dL/dxc in the same memory).
    """

    @staticmethod
    def forward(ctx, xc, tau, lam, mean, var, gamma, beta, eps, lambda_scale=True):
        n, k = tau.shape[0], tau.shape[1]
        if lambda_scale:
            inv_sqrt_lam = lam.clamp_min(_TINY).rsqrt()  # [K]
            a = tau * inv_sqrt_lam.unsqueeze(1)  # [N, K, L]
        else:  # a grad-free alias of tau (no copy; ctx may hold it without a reference cycle)
            a = tau.detach()  # [N, K, L]
        ctx.lambda_scale = lambda_scale
        r = (var + eps).rsqrt()  # [K, C]
        scale = r if gamma is None else r * gamma  # [K, C]
        offset = -mean * scale  # [K, C]
        if beta is not None:  # beta rides along as a (K+1)-th component with a = 1
            a = torch.cat([a, a.new_ones(n, 1, a.shape[2])], 1)  # [N, K+1, L]
            offset = torch.cat([offset, beta.unsqueeze(0)])  # [K+1, C]
        y = _bmm_left(scale.t(), a[:, :k]).mul_(xc)  # [N, C, L]  xc * M1
        y.baddbmm_(offset.t().expand(n, -1, -1), a)  # + M2
        ctx.save_for_backward(xc, tau, lam, mean, r, scale, offset[:k], gamma)
        ctx.a = a  # an intermediate, [N, K(+1), L]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y):
        xc, tau, lam, mean, r, scale, offset, gamma = ctx.saved_tensors
        n, k = tau.shape[0], tau.shape[1]
        a_beta = ctx.a  # [N, K+1, L] with a row of ones for beta, or [N, K, L]
        a = a_beta[:, :k]  # [N, K, L]
        need = ctx.needs_input_grad
        g_xc = g_tau = g_lam = g_mean = g_var = g_gamma = g_beta = None
        with torch.autocast(device_type=xc.device.type, enabled=False):
            g_y = g_y.contiguous()  # [N, C, L]
            buf = None
            if any(need[1:6]):
                buf = g_y * xc  # [N, C, L]  dL/dy * xc
            if need[1] or (need[2] and ctx.lambda_scale):
                # dL/da[n, k, l] = sum_c g_y (scale_k xc + offset_k)
                g_a = _bmm_left(scale, buf).baddbmm_(offset.expand(n, -1, -1), g_y)  # [N, K, L]
                inv_sqrt_lam = lam.clamp_min(_TINY).rsqrt()  # [K]
                if need[1]:
                    # [N, K, L]
                    g_tau = g_a * inv_sqrt_lam.unsqueeze(1) if ctx.lambda_scale else g_a
                if need[2] and ctx.lambda_scale:
                    g_lam = -0.5 * inv_sqrt_lam.pow(3) * (g_a * tau).sum((0, 2))  # [K]
                    g_lam = torch.where(lam > _TINY, g_lam, torch.zeros_like(g_lam))
            if any(need[3:7]):
                # Sums over points of a_k * g_y (and of g_y: dL/dbeta from the row of ones).
                ag = torch.bmm(a_beta, g_y.transpose(1, 2)).sum(0)  # [K(+1), C]
                if need[6]:
                    g_beta = ag[k]  # [C]
                ag = ag[:k]  # [K, C]
            if need[3] or need[4] or need[5]:
                agx = torch.bmm(a, buf.transpose(1, 2)).sum(0)  # [K, C]  sum of a_k g_y xc
                g_scaled = agx - mean * ag  # [K, C]  dL/d(R gamma)
                if need[3]:
                    g_mean = -scale * ag
                if need[4]:
                    g_var = -0.5 * r.pow(3) * (g_scaled if gamma is None else g_scaled * gamma)
                if need[5]:
                    g_gamma = (r * g_scaled).sum(0)  # [C]
            if need[0]:  # dL/dxc = g_y * M1, written over dL/dy * xc (no longer needed)
                m1 = torch.bmm(scale.t().expand(n, -1, -1), a, out=buf)  # [N, C, L]
                g_xc = m1.mul_(g_y)
        return g_xc, g_tau, g_lam, g_mean, g_var, g_gamma, g_beta, None, None


def _vector_mixture_norm(
    x, mixture, eps, weight=None, bias=None, reduce=None, *, posterior_grad=True, lambda_scale=True
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Training-mode MN of a batch x [N, C, L] under a fitted ``Mixture``, then the affine
    (``weight``, ``bias`` [C] or None); ``reduce`` sums the moments across processes.

    The fused equivalent of ``reference.mixture_norm_reference`` followed by ``y = weight * x_hat + bias``
    (with the same switches); computes in the dtype of the mixture. Returns y [N, C, L]
    (contiguous), the posteriors tau [N, K, L] and (lambda [K], E [K, C], Var [K, C], n_eff [K]).
    """
    shift = _mixture_shift(mixture)  # [C]
    lin, quad, logit_bias = _logit_params(
        Mixture(mixture.weight, mixture.mean - shift, mixture.var)
    )
    xc, tau, s1, s2 = _PosteriorMoments.apply(x, shift, lin, quad, logit_bias, True, posterior_grad)
    if not posterior_grad:
        tau = tau.detach()  # constants: lambda and the affine's posteriors carry no gradient
    moments = MixtureMoments(
        count=xc.new_full((), float(x.shape[0] * x.shape[2])),  # (a fill, not a host copy)
        mass=tau.sum((0, 2)),  # [K]
        sum_sq_tau=tau.square().sum((0, 2)),  # [K]
        sum_x=s1,
        sum_xx=s2,
        shift=shift,
    )
    if reduce is not None:
        moments = reduce(moments)
    lam, mean_c, var, n_eff = _centred_stats(moments)
    # [N, C, L]
    y = _MixtureAffine.apply(xc, tau, lam, mean_c, var, weight, bias, eps, lambda_scale)
    return y, tau, (lam, mean_c + shift, var, n_eff)


def _vector_mixture_norm_fixed(
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gamma: Optional[Tensor],
    beta: Optional[Tensor],
    *,
    posterior_grad: bool = True,
    lambda_scale: bool = True,
) -> Tensor:
    """MN of x [N, C, L] with given statistics (eval with running statistics): posteriors from
    the mixture (weight, mean, var floored by eps), normalization by the same statistics."""
    mixture = Mixture(weight, mean, var)
    shift = _mixture_shift(mixture)  # [C]
    lin, quad, logit_bias = _logit_params(Mixture(weight, mean - shift, var.clamp_min(eps)))
    xc, tau = _PosteriorMoments.apply(x, shift, lin, quad, logit_bias, False, posterior_grad)
    if not posterior_grad:
        tau = tau.detach()
    return _MixtureAffine.apply(xc, tau, weight, mean - shift, var, gamma, beta, eps, lambda_scale)


def _channel_reading(
    x, mixture, eps, gamma, beta, batch_stats, reduce, posterior_grad, lambda_scale
):
    """One 1-D mixture per channel (weight, mean, var [K, C]), in plain autograd ops, then the
    affine; never summed across processes. With ``batch_stats``: posterior-weighted batch
    statistics per (component, channel), and returns y [N, C, L], the posteriors tau
    [N, C, K, L] and (lambda, E, Var, n_eff), each [K, C]; without (eval with running
    statistics), the mixture's own, and returns (y, None, None)."""
    if reduce is not None:
        raise ValueError("MixtureNorm2d(point='channel') is not synchronized across processes")
    x = x.to(mixture.mean.dtype)
    weight, mean, var = (t.detach() for t in mixture)
    n, c, length = x.shape
    shift = (weight * mean).sum(0)  # [C]  (conditioning only, as in the vector reading)
    xc = (x - shift.unsqueeze(1)).unsqueeze(2)  # [N, C, 1, L]
    mc, vc = (mean - shift).t(), var.clamp_min(eps).t()  # [C, K]
    log_prior = (weight.t().clamp_min(_TINY).log() - 0.5 * vc.log())[..., None]  # [C, K, 1]
    logits = log_prior - 0.5 * (xc - mc[..., None]).square() / vc[..., None]  # [N, C, K, L]
    tau = torch.softmax(logits, 2)  # [N, C, K, L]
    if not posterior_grad:
        tau = tau.detach()
    if not batch_stats:
        lam, e, v, n_eff = weight.t(), mc, var.t(), torch.full_like(mc, float(n * length))  # [C, K]
    else:
        mass = tau.sum((0, 3))  # [C, K]
        inv_mass = mass.clamp_min(_TINY).reciprocal()
        lam = mass / (n * length)  # [C, K]
        e = (tau * xc).sum((0, 3)) * inv_mass  # [C, K]
        v = ((tau * xc.square()).sum((0, 3)) * inv_mass - e.square()).clamp_min(0.0)  # [C, K]
        n_eff = mass.square() / tau.square().sum((0, 3)).clamp_min(_TINY)  # [C, K]
    a = tau * lam.clamp_min(_TINY).rsqrt()[..., None] if lambda_scale else tau  # [N, C, K, L]
    x_hat = (a * (xc - e[..., None]) * (v + eps).rsqrt()[..., None]).sum(2)  # [N, C, L]
    y = x_hat if gamma is None else x_hat * gamma.unsqueeze(1)
    if beta is not None:
        y = y + beta.unsqueeze(1)
    if not batch_stats:
        return y.contiguous(), None, None
    stats = (lam.t(), (e + shift.unsqueeze(1)).t(), v.t(), n_eff.t())  # [K, C] each
    return y.contiguous(), tau, stats


def _vector_reading(
    x, mixture, eps, weight, bias, batch_stats, reduce, posterior_grad, lambda_scale
):
    """One mixture over the C-vectors: the fused path."""
    if batch_stats:
        return _vector_mixture_norm(
            x,
            mixture,
            eps,
            weight,
            bias,
            reduce,
            posterior_grad=posterior_grad,
            lambda_scale=lambda_scale,
        )
    y = _vector_mixture_norm_fixed(
        x, *mixture, eps, weight, bias, posterior_grad=posterior_grad, lambda_scale=lambda_scale
    )
    return y, None, None


# The normalization of each reading (``mixture.POINTS``).
_READING_FNS = {"vector": _vector_reading, "channel": _channel_reading}


def mixture_norm(
    x: Tensor,
    mixture: Mixture,
    eps: float,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    batch_stats: bool,
    point: str = "vector",
    reduce: Optional[Reduce] = None,
    posterior_grad: bool = True,
    lambda_scale: bool = True,
) -> tuple[Tensor, Optional[Tensor], Optional[Stats]]:
    """Mixture Normalization of x [N, C, L], then the affine ``weight * x_hat + bias``.

    ``batch_stats=True`` (training, or eval without running statistics): ``mixture`` is the one
    fitted to this batch; it gives the posteriors, and the statistics are the batch's
    posterior-weighted ones (summed across processes by ``reduce``, vector reading only).
    ``batch_stats=False``: ``mixture`` holds the running statistics, which give both the
    posteriors and the normalization, so a sample's output does not depend on its batch.

    ``point`` is the reading (``mixture.READINGS``): ``mixture`` is weight [K], mean and var [K, C]
    for ``"vector"``, weight, mean, var [K, C] for ``"channel"``. Computes in the mixture's
    dtype. Returns y [N, C, L] (contiguous) and, with batch statistics, the posteriors tau
    ([N, K, L] or [N, C, K, L]) and (lambda, E, Var, n_eff) for the running update; otherwise
    (y, None, None).
    """
    return _READING_FNS[point](
        x, mixture, eps, weight, bias, batch_stats, reduce, posterior_grad, lambda_scale
    )
