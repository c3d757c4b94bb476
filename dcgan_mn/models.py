"""DCGAN generator and discriminator for 32x32 images, with per-layer BN -> MN replacement.

Generator architectures (``arch``; norm layers indexed from the one nearest z, each BatchNorm or
Mixture Normalization as ``mn_layers`` says):

* ``dcgan32`` (docs/design.md, pytorch/examples style): z [N, z_dim] -> ConvT(4x4) 4x4x(8 ngf) ->
  norm0 -> ReLU -> ConvT 8x8x(4 ngf) -> norm1 -> ReLU -> ConvT 16x16x(2 ngf) -> norm2 -> ReLU
  -> ConvT 32x32x3 -> tanh. Three norm layers.
* ``tf-dcgan``: the TensorFlow DCGAN of the TTUR paper's CIFAR-10 FID baseline (Heusel et al.
  2017, ``bioinf-jku/TTUR/DCGAN_FID_batched``, itself carpedm20's DCGAN-tensorflow) at 32x32:
  z -> Linear 2x2x(8 ngf) -> norm0 -> ReLU -> ConvT(5x5, stride 2, TF "SAME") 4x4x(4 ngf) ->
  norm1 -> ReLU -> 8x8x(2 ngf) -> norm2 -> ReLU -> 16x16x(ngf) -> norm3 -> ReLU -> 32x32x3 ->
  tanh; every linear and transposed convolution has a bias; weights N(0, 0.02), biases 0,
  norm gains 1 (TensorFlow's batch_norm init). Four norm layers.

Discriminator: conv 3->ndf (LeakyReLU 0.2, no norm) -> 2 ndf BN -> 4 ndf BN -> 1 logit.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .norms import NORM_KINDS, MixtureNorm2d, ModeNorm2d, NormSpec, norm_specs
from .sync import unsynchronized

__all__ = [
    "NUM_G_NORM_LAYERS",
    "G_ARCHS",
    "SAMPLE_MODES",
    "parse_mn_layers",
    "Generator",
    "Discriminator",
    "dcgan_init_",
    "preserved_norm_state",
]

NUM_G_NORM_LAYERS = 3  # dcgan32's
G_ARCHS = {"dcgan32": 3, "tf-dcgan": 4}  # generator architecture -> number of norm layers
SAMPLE_MODES = ("batch", "running")


def parse_mn_layers(
    spec: Union[str, Iterable[int], None], num_layers: int = NUM_G_NORM_LAYERS
) -> tuple[int, ...]:
    """'0,1' / 'none' / 'all' / an iterable of ints -> a sorted tuple of generator layer indices
    in 0..num_layers-1. Raises ValueError naming the bad index or token.
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "none"):
            return ()
        if text == "all":
            return tuple(range(num_layers))
        items = []
        for tok in text.split(","):
            tok = tok.strip()
            try:
                items.append(int(tok))
            except ValueError:
                raise ValueError(
                    f"invalid MN layer {tok!r} in {spec!r}: expected comma-separated indices "
                    f"in 0..{num_layers - 1}, 'none' or 'all'"
                ) from None
    else:
        items = [int(i) for i in spec]
    for i in items:
        if not 0 <= i < num_layers:
            raise ValueError(
                f"unknown generator norm layer {i} in {spec!r}: the generator has layers "
                f"0..{num_layers - 1} (0 is nearest z)"
            )
    if len(set(items)) != len(items):
        raise ValueError(f"duplicate generator norm layer in {spec!r}")
    return tuple(sorted(items))


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02); norm gains ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, MixtureNorm2d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _tf_dcgan_init_(module: nn.Module) -> None:
    """TTUR / DCGAN-tensorflow initialisation: linear and transposed-convolution weights
    ~ N(0, 0.02), biases 0; norm gains 1 and biases 0 (TensorFlow's batch_norm defaults)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, MixtureNorm2d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _Project(nn.Module):
    """z [N, z_dim] -> Linear -> [N, C, S, S] (tf-dcgan's first layer, reshaped channels-first)."""

    def __init__(self, z_dim: int, channels: int, size: int) -> None:
        super().__init__()
        self.channels, self.size = channels, size
        self.linear = nn.Linear(z_dim, channels * size * size)

    def forward(self, z: Tensor) -> Tensor:
        # TensorFlow reshapes the linear output [N, S*S*C] as NHWC; read it the same way.
        h = self.linear(z.flatten(1))  # [N, S*S*C]
        # [N, C, S, S]
        return h.view(-1, self.size, self.size, self.channels).permute(0, 3, 1, 2).contiguous()


class _ConvTransposeSame(nn.ConvTranspose2d):
    """TensorFlow's ``conv2d_transpose(..., strides=2, padding="SAME")`` with a 5x5 kernel:
    output 2H x 2W. TF's forward SAME convolution pads one row above and two below; its transpose
    is PyTorch's with padding 1, less the last row and column."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 5, stride=2, padding=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[:, :, :-1, :-1]  # [N, C_out, 2H, 2W]


class Generator(nn.Module):
    """DCGAN generator z [N, z_dim] -> images [N, 3, 32, 32] in [-1, 1] (``arch``: see above)."""

    def __init__(
        self,
        z_dim: int = 100,
        ngf: int = 64,
        mn_layers: Union[str, Sequence[int], None] = (0, 1),
        num_components: int = 3,
        arch: str = "dcgan32",
        norms: Optional[Sequence[Union[str, NormSpec]]] = None,
        mode_components: int = 2,
        **mn_kwargs,
    ) -> None:
        """The norms, one a layer (0 nearest z): ``norms`` as ``NormSpec`` objects (what the config
        builds), or, for callers with names, as kinds (with ``num_components``,
        ``mode_components`` and the MN options ``mn_kwargs``) or MN in ``mn_layers`` and BN
        elsewhere."""
        super().__init__()
        if arch not in G_ARCHS:
            raise ValueError(
                f"unknown generator architecture {arch!r}; expected one of {tuple(G_ARCHS)}"
            )
        self.z_dim = z_dim
        self.ngf = ngf
        self.arch = arch
        widths = (
            [8 * ngf, 4 * ngf, 2 * ngf] if arch == "dcgan32" else [8 * ngf, 4 * ngf, 2 * ngf, ngf]
        )
        self._norm_index: list[int] = []  # positions of the norm layers in self.net
        if norms is None or not all(isinstance(n, NormSpec) for n in norms):  # names: specs, once
            mn = parse_mn_layers(mn_layers, G_ARCHS[arch])
            kinds = (
                tuple(norms)
                if norms is not None
                else tuple("mn" if i in mn else "bn" for i in range(G_ARCHS[arch]))
            )
            if len(kinds) != G_ARCHS[arch] or any(k not in NORM_KINDS for k in kinds):
                raise ValueError(
                    f"norms {kinds!r}: expected {G_ARCHS[arch]} of {', '.join(NORM_KINDS)} for {arch}"
                )
            norms = norm_specs(kinds, num_components, mode_components, **mn_kwargs)
        elif len(norms) != G_ARCHS[arch]:
            raise ValueError(f"norms: {len(norms)} given, {arch} has {G_ARCHS[arch]} norm layers")
        self.norms = tuple(spec.kind for spec in norms)
        self.mn_layers = tuple(i for i, kind in enumerate(self.norms) if kind == "mn")
        self.num_components = next(
            (spec.num_components for spec in norms if spec.kind == "mn"), num_components
        )
        # Each norm is built where it sits, between the convolutions: construction order is RNG order.

        if arch == "tf-dcgan":
            layers: list[nn.Module] = [_Project(z_dim, widths[0], 2)]  # [N, 8ngf, 2, 2]
            for i in range(4):
                layers += [norms[i](widths[i]), nn.ReLU(inplace=True)]
                out = widths[i + 1] if i + 1 < 4 else 3
                layers.append(_ConvTransposeSame(widths[i], out))  # [N, out, 2^(i+2), 2^(i+2)]
            self.net = nn.Sequential(*layers, nn.Tanh())
            self._norm_index = [1, 4, 7, 10]
            _tf_dcgan_init_(self)
            return
        self._norm_index = [1, 4, 7]
        self.net = nn.Sequential(
            nn.ConvTranspose2d(z_dim, widths[0], 4, 1, 0, bias=False),  # [N, 8ngf, 4, 4]
            norms[0](widths[0]),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(widths[0], widths[1], 4, 2, 1, bias=False),  # [N, 4ngf, 8, 8]
            norms[1](widths[1]),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(widths[1], widths[2], 4, 2, 1, bias=False),  # [N, 2ngf, 16, 16]
            norms[2](widths[2]),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(widths[2], 3, 4, 2, 1, bias=False),  # [N, 3, 32, 32]
            nn.Tanh(),
        )
        dcgan_init_(self)

    @property
    def norm_layers(self) -> list[nn.Module]:
        """The generator's norm layers, index 0 nearest z."""
        return [self.net[i] for i in self._norm_index]

    @property
    def norm_kinds(self) -> str:
        """The norm of each layer, index 0 first: ``"mn,mn,bn"``."""
        return ",".join(self.norms)

    def norm_telemetry(self) -> dict[str, float]:
        """The MN and Mode Normalization layers' telemetry as TensorBoard scalars (one host read
        per layer: call it at log time, not per step). Mixture weights and gate weights are
        unlabelled, so they are logged sorted."""
        values: dict[str, float] = {}
        for i, layer in enumerate(self.norm_layers):
            t = layer.telemetry() if isinstance(layer, (MixtureNorm2d, ModeNorm2d)) else None
            if t and isinstance(layer, MixtureNorm2d):
                values[f"mn/layer{i}/posterior_entropy"] = t["posterior_entropy"].item()
                values[f"mn/layer{i}/effective_components"] = t["effective_components"].item()
                weights, tag = t["mixture_weight"], f"mn/layer{i}/weight_sorted"
            elif t:
                values[f"mode/layer{i}/gate_entropy"] = t["gate_entropy"].item()
                weights, tag = t["gate_weight"], f"mode/layer{i}/gate_weight_sorted"
            else:
                continue
            for k, w in enumerate(sorted(weights.tolist(), reverse=True)):
                values[f"{tag}_{k}"] = w
        return values

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(
                f"Generator expects z of shape [N, {self.z_dim}], got {tuple(z.shape)}"
            )
        return self.net(z[:, :, None, None])  # [N, 3, 32, 32]

    @torch.no_grad()
    def sample(self, z: Tensor, mode: str = "batch", batch_size: int | None = None) -> Tensor:
        """Generate images for z [N, z_dim] without changing any buffer or the global RNG.

        ``mode="batch"``: norm layers use batch statistics (the computation of training), in
        chunks of ``batch_size`` (default: all of z at once); ``mode="running"``: eval mode,
        running statistics. Synchronized norm layers (``--sync-norm``) use this process's chunk
        only, so sampling never waits for other ranks. Returns [N, 3, 32, 32] in [-1, 1].
        """
        if mode not in SAMPLE_MODES:
            raise ValueError(f"unknown sample mode {mode!r}; expected one of {SAMPLE_MODES}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"sample batch_size must be >= 1, got {batch_size}")
        chunk = batch_size or max(z.shape[0], 1)
        was_training = self.training
        devices = [z.device] if z.device.type == "cuda" else []
        try:
            with (
                preserved_norm_state(self),
                torch.random.fork_rng(devices=devices),
                unsynchronized(self),
            ):
                self.train(mode == "batch")
                return torch.cat([self(zc) for zc in z.split(chunk)])
        finally:
            self.train(was_training)


@contextlib.contextmanager
def preserved_norm_state(module: nn.Module) -> Iterator[None]:
    """Restore every buffer and norm telemetry (MN's and Mode Normalization's ``last_*``
    records) of ``module`` on exit (sampling is read-only)."""
    saved = {name: b.clone() for name, b in module.named_buffers()}
    telemetry = [
        (m, {k: v for k, v in vars(m).items() if k.startswith("last_")})
        for m in module.modules()
        if isinstance(m, (MixtureNorm2d, ModeNorm2d))
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])
        for m, records in telemetry:
            for k, v in records.items():
                setattr(m, k, v)


class Discriminator(nn.Module):
    """DCGAN discriminator images [N, 3, 32, 32] -> one logit per image [N]."""

    def __init__(self, ndf: int = 64) -> None:
        super().__init__()
        self.ndf = ndf
        self.net = nn.Sequential(
            nn.Conv2d(3, ndf, 4, 2, 1, bias=False),  # [N, ndf, 16, 16]
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False),  # [N, 2ndf, 8, 8]
            nn.BatchNorm2d(2 * ndf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * ndf, 4 * ndf, 4, 2, 1, bias=False),  # [N, 4ndf, 4, 4]
            nn.BatchNorm2d(4 * ndf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * ndf, 1, 4, 1, 0, bias=False),  # [N, 1, 1, 1]
        )
        dcgan_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()  # [N]
