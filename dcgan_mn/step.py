"""One DCGAN training iteration as one function: what ``--compile`` turns into one graph.

An iteration is a discriminator step (D(x) up, D(G(z)) down; G's output detached) then a
generator step through the same fakes (the non-saturating loss), each followed by its Adam
update. G runs forward once per iteration.

Two spellings of the same iteration:

* **capturable** (single process, no fp16 loss scaling): gradients with ``torch.autograd.grad``
  and Adam's update through torch's functional ``adam`` (``AdamUpdate``: ``Adam.step`` itself
  breaks the graph). Nothing in it reads a value on the host, so ``torch.compile(fullgraph=True)``
  traces the whole iteration (both forward and backward passes and both updates) into one
  graph, which ``mode="reduce-overhead"`` replays as a CUDA graph.
* **backward** (DDP, or fp16 with a GradScaler): ``loss.backward()`` and ``scaler.step(opt)``,
  because DDP reduces gradients in hooks that fire during ``backward()`` and the scaler reads
  an inf flag on the host. Here ``--compile`` compiles G and D separately.

Both compute the same numbers (tested: their losses and weights agree to float tolerance).
With ``--g-ema`` both end by moving the averaged generator towards G (``ema.GeneratorEMA``):
inside the graph, with a device-side weight set before the call.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .config import COMPILE_MODES
from .ema import GeneratorEMA
from .losses import discriminator_loss, generator_loss

__all__ = ["AdamUpdate", "StepOutput", "StepWindow", "TrainStep", "compile_step_config"]


class StepOutput(NamedTuple):
    """What one iteration leaves for logging: detached device tensors, never read here."""

    loss_d: Tensor  # []
    loss_g: Tensor  # []
    real_logits: Tensor  # [b]
    fake_logits: Tensor  # [b]


class AdamUpdate:
    """``torch.optim.Adam``'s update, called through torch's functional ``adam`` with the
    optimizer's own state and hyper-parameters, so that it traces into a graph.

    ``Adam.step`` cannot be part of a fullgraph: its wrapper calls ``torch._dynamo.graph_break()``
    and TorchDynamo's optimizer support refuses the gradients it would read from ``p.grad``.
    The functional form takes the gradients as a list instead. The state is created here the
    way ``Adam`` creates it on its first step, so checkpoints (``opt.state_dict()``) are the
    same either way; ``tests/test_step.py`` checks the weights against ``Adam.step``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if type(optimizer) is not torch.optim.Adam:
            raise TypeError(
                f"the capturable step needs torch.optim.Adam, got {type(optimizer).__name__}"
            )
        from torch.optim.adam import adam

        self.optimizer = optimizer
        self._adam = adam
        self._accepts = set(inspect.signature(adam).parameters)

    def init_state(self) -> None:
        """Adam's lazy state for every parameter that has none yet (as ``Adam._init_group``)."""
        try:
            from torch.optim.optimizer import _get_scalar_dtype
        except ImportError:  # older torch: float32 unless float64 is the default

            def _get_scalar_dtype(is_fused=None):
                return (
                    torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                )

        for group in self.optimizer.param_groups:
            on_device = group["capturable"] or group["fused"]
            for p in group["params"]:
                state = self.optimizer.state[p]
                if len(state) > 0:
                    continue
                state["step"] = (
                    torch.zeros(
                        (), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device
                    )
                    if on_device
                    else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )

    @torch.no_grad()
    def __call__(self, grads: list) -> None:
        """One update of every parameter with gradient ``grads`` (in ``param_groups`` order)."""
        start = 0
        for group in self.optimizer.param_groups:
            params = group["params"]
            group_grads = grads[start : start + len(params)]
            start += len(params)
            states = [self.optimizer.state[p] for p in params]
            options = {
                "amsgrad": group["amsgrad"],
                "beta1": group["betas"][0],
                "beta2": group["betas"][1],
                "lr": group["lr"],
                "weight_decay": group["weight_decay"],
                "eps": group["eps"],
                "maximize": group["maximize"],
                "foreach": group["foreach"],
                "capturable": group["capturable"],
                "differentiable": group["differentiable"],
                "fused": group["fused"],
                "has_complex": False,
                "decoupled_weight_decay": group.get("decoupled_weight_decay", False),
            }
            self._adam(
                list(params),
                list(group_grads),
                [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states],
                [st["max_exp_avg_sq"] for st in states] if group["amsgrad"] else [],
                [st["step"] for st in states],
                **{k: v for k, v in options.items() if k in self._accepts},
            )


def compile_step_config() -> contextlib.AbstractContextManager:
    """TorchDynamo settings the capturable step needs: tracing ``torch.autograd.grad`` (an
    opt-in in torch 2.14; a no-op context where the setting does not exist)."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "trace_autograd_ops"):
        return dynamo_config.patch(trace_autograd_ops=True)
    return contextlib.nullcontext()


class TrainStep:
    """``step(real, z) -> StepOutput``: one D update then one G update.

    ``G_forward``/``D_forward`` are what the backward spelling calls (DDP wrappers, or compiled
    modules); the capturable spelling always calls the plain modules, since the whole step is
    compiled at once. ``D_frozen`` is what the generator step calls under DDP (D itself: its
    gradient reducer must not wait for gradients that never come). ``ema``: the averaged
    generator, updated after G's optimizer step (``step(real, z, iteration)`` then needs the
    number of iterations done before this one, for the EMA schedule).
    """

    def __init__(
        self,
        G: nn.Module,
        D: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        *,
        autocast: Callable[[], contextlib.AbstractContextManager],
        scaler: Optional[torch.amp.GradScaler] = None,
        capturable: bool = True,
        G_forward: Optional[nn.Module] = None,
        D_forward: Optional[nn.Module] = None,
        D_frozen: Optional[nn.Module] = None,
        ema: Optional[GeneratorEMA] = None,
    ) -> None:
        self.G, self.D, self.opt_g, self.opt_d = G, D, opt_g, opt_d
        self.ema = ema
        self.autocast = autocast
        self.scaler = scaler
        self.capturable = capturable and (scaler is None or not scaler.is_enabled())
        self.G_forward = G_forward or G
        self.D_forward = D_forward or D
        self.D_frozen = D_frozen or self.D_forward
        self._g_params = [p for group in opt_g.param_groups for p in group["params"]]
        self._d_params = [p for group in opt_d.param_groups for p in group["params"]]
        self._update_g, self._update_d = (
            (AdamUpdate(opt_g), AdamUpdate(opt_d)) if self.capturable else (None, None)
        )
        if self.capturable:  # Adam's lazy state, created up front (a resumed optimizer has it)
            self._update_d.init_state(), self._update_g.init_state()
        self._call: Callable[[Tensor, Tensor], StepOutput] = (
            self.capturable_step if self.capturable else self.backward_step
        )

    def __call__(self, real: Tensor, z: Tensor, iteration: Optional[int] = None) -> StepOutput:
        if self.ema is not None:
            if iteration is None:
                raise ValueError(
                    "a step with an averaged generator needs the iteration (EMA schedule)"
                )
            # a device fill outside the graph: no recompilation per step
            self.ema.prepare(iteration)
        return self._call(real, z)

    def compile(self, mode: str = "default", backend: str = "inductor") -> "TrainStep":
        """Compile the iteration: the whole capturable step as one graph (``fullgraph=True``),
        or, for the backward spelling, G and D separately."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"--compile-mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
        options = {"backend": backend}
        if backend == "inductor":
            options["mode"] = mode
        if self.capturable:
            compiled = torch.compile(self.capturable_step, fullgraph=True, **options)

            def run(real: Tensor, z: Tensor) -> StepOutput:
                with compile_step_config():
                    return compiled(real, z)

            self._call = run
        else:
            self.G_forward = torch.compile(self.G_forward, **options)
            self.D_forward = torch.compile(self.D_forward, **options)
            self.D_frozen = (
                self.D_forward
                if self.D_frozen is self.D
                else torch.compile(self.D_frozen, **options)
            )
        return self

    # ---- the two spellings ---------------------------------------------------------------------

    def capturable_step(self, real: Tensor, z: Tensor) -> StepOutput:
        # Discriminator step: push D(x) up and D(G(z)) down.
        with self.autocast():
            fake = self.G(z)  # [b, 3, 32, 32]
            real_logits = self.D(real)  # [b]
            fake_logits = self.D(fake.detach())  # [b]
            loss_d = discriminator_loss(real_logits, fake_logits)
        self._update_d(list(torch.autograd.grad(loss_d, self._d_params)))

        # Generator step through the same fakes; only G's gradients are computed.
        with self.autocast():
            loss_g = generator_loss(self.D(fake))
        self._update_g(list(torch.autograd.grad(loss_g, self._g_params)))
        if self.ema is not None:
            self.ema.update()
        return StepOutput(
            loss_d.detach(), loss_g.detach(), real_logits.detach(), fake_logits.detach()
        )

    def backward_step(self, real: Tensor, z: Tensor) -> StepOutput:
        scaler = self.scaler
        with self.autocast():
            fake = self.G_forward(z)  # [b, 3, 32, 32]
            real_logits = self.D_forward(real)  # [b]
            fake_logits = self.D_forward(fake.detach())  # [b]
            loss_d = discriminator_loss(real_logits, fake_logits)
        self.opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        scaler.step(self.opt_d)

        # D's weights are frozen so that the backward pass skips their gradients.
        self.D.requires_grad_(False)
        try:
            with self.autocast():
                loss_g = generator_loss(self.D_frozen(fake))
            self.opt_g.zero_grad(set_to_none=True)
            scaler.scale(loss_g).backward()
            scaler.step(self.opt_g)
            scaler.update()
        finally:
            self.D.requires_grad_(True)
        if self.ema is not None:
            self.ema.update()
        return StepOutput(
            loss_d.detach(), loss_g.detach(), real_logits.detach(), fake_logits.detach()
        )


class StepWindow:
    """The numbers logged every ``--log-every`` iterations, summed on the device, and the first
    iteration whose losses or D outputs were not finite: the loop adds every step's outputs
    without reading anything on the host; ``take_means`` is the one read per window.

    The sums and count are part of a full checkpoint (``state_dict``), so that a resumed run's
    first logged window equals an uninterrupted run's.
    """

    NAMES = ("loss_D", "loss_G", "D_x", "D_G_z")

    def __init__(self, device) -> None:
        self.sums = torch.zeros(len(self.NAMES), device=device)  # [4]
        self.count = 0
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)  # -1: none

    @torch.no_grad()
    def add(self, out: StepOutput, iteration: int) -> None:
        # [4]
        numbers = torch.stack(
            [
                out.loss_d.float(),
                out.loss_g.float(),
                torch.sigmoid(out.real_logits.float()).mean(),
                torch.sigmoid(out.fake_logits.float()).mean(),
            ]
        )
        self.sums += numbers
        bad = ~torch.isfinite(numbers).all() & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(bad, iteration, self.first_nonfinite)
        self.count += 1

    def take_means(self) -> Tensor:
        """The window's means [4] (a device tensor), and a fresh window."""
        means = self.sums / self.count  # [4]
        self.sums = torch.zeros_like(self.sums)
        self.count = 0
        return means

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if "sums" in state:
            self.sums.copy_(state["sums"])
            self.count = int(state["count"])
