"""The training iteration (dcgan_mn.step): its two spellings agree, it never waits on the host,
and it compiles into one graph (fullgraph) whose losses equal the eager ones."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dcgan_mn.kernels import count_ops
from dcgan_mn.models import Discriminator, Generator
from dcgan_mn.step import AdamUpdate, TrainStep

Z_DIM = 16
MN_SPECS = {"bn": (), "mn01": (0, 1)}


def make_step(mn_layers, *, capturable=True, seed=0) -> TrainStep:
    torch.manual_seed(seed)
    G = Generator(z_dim=Z_DIM, ngf=8, mn_layers=mn_layers, fit_points=64)
    D = Discriminator(ndf=8)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return TrainStep(
        G,
        D,
        opt_g,
        opt_d,
        autocast=contextlib.nullcontext,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        capturable=capturable,
    )


def batches(n: int, batch_size: int = 8):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.rand(batch_size, 3, 32, 32, generator=g) * 2 - 1,
            torch.randn(batch_size, Z_DIM, generator=g),
        )
        for _ in range(n)
    ]


def run(step: TrainStep, data, seed: int = 5):
    torch.manual_seed(seed)  # the MN layers' k-means draws
    return [step(real, z) for real, z in data]


@pytest.mark.parametrize("spec", MN_SPECS)
def test_capturable_equals_backward_and_adam_step(spec):
    """autograd.grad + torch's functional adam (AdamUpdate) is Adam.step after backward():
    the same losses, weights, buffers and optimizer state, bitwise."""
    a = make_step(MN_SPECS[spec], capturable=True)
    b = make_step(MN_SPECS[spec], capturable=False)
    assert a.capturable and not b.capturable
    data = batches(3)
    for oa, ob in zip(run(a, data), run(b, data)):
        for x, y in zip(oa, ob):
            assert torch.equal(x, y)
    for model in ("G", "D"):
        sa, sb = getattr(a, model).state_dict(), getattr(b, model).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), model
    for opt in ("opt_g", "opt_d"):
        sa, sb = getattr(a, opt).state_dict(), getattr(b, opt).state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for i in sa["state"]:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(sa["state"][i][key], sb["state"][i][key]), (opt, i, key)


def test_adam_update_refuses_other_optimizers():
    with pytest.raises(TypeError, match="torch.optim.Adam, got SGD"):
        AdamUpdate(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="--compile-mode 'fast'"):
        make_step(()).compile("fast")


@pytest.mark.parametrize("spec", MN_SPECS)
def test_models_never_wait_on_the_host(spec):
    """No aten op that reads a device value on the host in the iteration's forward and backward
    passes, MN included (k-means, component matching, running statistics stay on the device).
    Adam's update is left out: on a CPU its step counter is a host tensor (read with .item(),
    no device involved); on a GPU --compile makes it capturable, on the device."""
    from dcgan_mn.losses import discriminator_loss, generator_loss

    step = make_step(MN_SPECS[spec])
    real, z = batches(1)[0]

    def passes():
        fake = step.G(z)
        loss_d = discriminator_loss(step.D(real), step.D(fake.detach()))
        torch.autograd.grad(loss_d, list(step.D.parameters()))
        torch.autograd.grad(generator_loss(step.D(fake)), list(step.G.parameters()))

    passes()
    counted = count_ops(passes)
    assert counted.syncs == 0, counted.sync_names
    assert counted.kernels > 30  # the counter sees the passes at all


@pytest.mark.slow
@pytest.mark.parametrize("spec", MN_SPECS)
def test_whole_step_compiles_fullgraph_and_matches_eager(spec):
    """TorchInductor on this CPU: the iteration compiles as one graph (fullgraph=True raises on
    any graph break) and its losses equal eager ones to float tolerance. fallback_random makes
    the compiled k-means draw the same random numbers as eager."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    data = batches(3)
    eager = run(make_step(MN_SPECS[spec]), data)
    compiled_step = make_step(MN_SPECS[spec]).compile("default")
    with inductor_config.patch(fallback_random=True):
        compiled = run(compiled_step, data)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.loss_d, e.loss_d, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.loss_g, e.loss_g, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.real_logits, e.real_logits, rtol=1e-4, atol=1e-5)
    assert all(int(st["step"]) == 3 for st in compiled_step.opt_g.state.values())
