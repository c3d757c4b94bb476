"""Inception features for FID: pytorch-fid's FID InceptionV3, its weights, and the image protocol.

The network is pytorch-fid's own (``pytorch_fid.inception.InceptionV3`` building
``fid_inception_v3``); we only decide where its weights come from and feed it faster:

* weights: ``--inception-weights PATH`` (or ``$DCGAN_MN_INCEPTION_WEIGHTS``), else pytorch-fid's
  file in the torch hub cache (``<torch hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth``),
  downloaded once with its SHA-256 prefix checked as torch hub does. The SHA-256 of the file
  actually used travels with every number computed from it.
* images: uint8 [N, 3, H, W], exactly what a PNG holds. Generated images are quantized as
  ``torchvision.utils.save_image`` does (``quantize_images``); features are computed as
  ``python -m pytorch_fid`` does on the PNG files (``ToTensor`` = uint8 / 255, bilinear resize to
  299 and scaling to [-1, 1] inside the network, global average pooling for dims < 2048).
* speed, same numbers to fp32 rounding: channels-last memory format, BatchNorm folded into the
  preceding convolution (inference only), ``torch.inference_mode``, large batches, no DataLoader.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol, Union
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FID_WEIGHTS_URL",
    "WEIGHTS_ENV_VAR",
    "FEATURE_DIMS",
    "PROTOCOL_VERSION",
    "FID_PROTOCOLS",
    "clean_resize",
    "InceptionWeightsError",
    "InceptionWeights",
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "hub_cache_path",
    "url_hash_prefix",
    "sha256_file",
    "resolve_inception_weights",
    "load_fid_inception",
    "quantize_images",
]

# pytorch-fid's values (tests check they still are); pytorch_fid itself is imported only when
# the network is built, because it pulls in torchvision (a second of start-up).
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_ENV_VAR = "DCGAN_MN_INCEPTION_WEIGHTS"
FEATURE_DIMS = (64, 192, 768, 2048)  # pytorch_fid.inception.InceptionV3.BLOCK_INDEX_BY_DIM
# Everything between "an image" and "a feature vector" that is not the weights or the dims:
# bump it whenever quantization, resizing or pooling changes, so cached statistics are redone.
PROTOCOL_VERSION = "uint8-png/pytorch-fid-0.3-resize299-bilinear/v1"
# --fid-protocol: pytorch-fid's (bilinear resize of float images inside the network) or
# clean-fid's "clean" mode (PIL bicubic resize of each uint8 channel as float, before it).
FID_PROTOCOLS = {
    "pytorch-fid": PROTOCOL_VERSION,
    "clean": "uint8-png/clean-fid-pil-bicubic299-float/v1",
}

# torch.hub's convention: the file name ends in "-<first hex digits of its SHA-256>.<ext>".
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")


from .errors import InceptionWeightsError, InceptionWeightsInvalid  # noqa: E402


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    sha256: str
    standard: bool  # True iff this is pytorch-fid's published file (SHA-256 prefix matches)
    source: str  # "flag", "env", or "hub-cache"

    @property
    def named_as(self) -> str:
        """How the user gave the file, for messages: the flag, the variable, or the cache path."""
        if self.source == "flag":
            return f"--inception-weights {str(self.path)!r}"
        if self.source == "env":
            return f"${WEIGHTS_ENV_VAR} {str(self.path)!r}"
        return str(self.path)


class FeatureExtractor(Protocol):
    """What the metrics need from a feature network (tests inject small ones). Extractors may
    also say which ``fid_protocol`` they follow (default: pytorch-fid's)."""

    dims: int
    weights_sha256: str

    def __call__(self, images: Tensor) -> Tensor:  # uint8 [N, 3, H, W] -> float [N, dims]
        ...


# --------------------------------------------------------------------------------------------
# Weights: where they come from, and checking them.
# --------------------------------------------------------------------------------------------


def hub_cache_path(url: str = FID_WEIGHTS_URL) -> Path:
    """Where torch hub keeps ``url``'s file: ``<torch.hub.get_dir()>/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def url_hash_prefix(url: str) -> Optional[str]:
    """The SHA-256 prefix a torch-hub-style file name carries ('6726825d' for pytorch-fid)."""
    m = _HASH_IN_NAME.search(os.path.basename(urlparse(url).path))
    return m.group(1) if m and m.group(1) else None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Union[str, Path]) -> str:
    """Hex SHA-256 of a file (memoised per path, size and mtime: hashing 95 MB takes a while)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def resolve_inception_weights(
    path: Union[str, Path, None] = None,
    *,
    url: str = FID_WEIGHTS_URL,
    download: bool = True,
    progress: bool = True,
) -> InceptionWeights:
    """Find (and if needed download) the FID Inception weights; hash them.

    Order: ``path`` (the ``--inception-weights`` flag), then ``$DCGAN_MN_INCEPTION_WEIGHTS``,
    then the torch hub cache, downloading ``url`` into it when missing. A file given by flag or
    environment may be any FID Inception state dict; it is marked non-standard when its SHA-256
    is not pytorch-fid's (``load_fid_inception`` warns once the file has proved to be Inception
    weights at all). A file in the hub cache must match the hash prefix in its name, as torch hub
    requires of its downloads.
    """
    standard_prefix = url_hash_prefix(FID_WEIGHTS_URL)
    source = "flag"
    if path is None and os.environ.get(WEIGHTS_ENV_VAR):
        path, source = os.environ[WEIGHTS_ENV_VAR], "env"
    if path is not None:
        flag = "--inception-weights" if source == "flag" else f"${WEIGHTS_ENV_VAR}"
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"{flag} {str(path)!r}: no such file")
        sha = sha256_file(p)
        standard = bool(standard_prefix) and sha.startswith(standard_prefix)
        return InceptionWeights(p, sha, standard, source)

    dst = hub_cache_path(url)
    prefix = url_hash_prefix(url)
    if not dst.is_file():
        if not download:
            raise InceptionWeightsError(_missing_message(url, dst, "downloading is turned off"))
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            # torch hub writes to a temporary file, checks the SHA-256 prefix, then renames.
            torch.hub.download_url_to_file(url, str(dst), hash_prefix=prefix, progress=progress)
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:
            raise InceptionWeightsError(
                _missing_message(url, dst, f"{type(e).__name__}: {e}")
            ) from None
    sha = sha256_file(dst)
    if prefix and not sha.startswith(prefix):
        raise InceptionWeightsError(
            f"{dst}: SHA-256 {sha[:16]}... does not start with {prefix!r} as its name says: the file "
            f"is corrupt or not the FID weights; delete it (it is downloaded again from {url}) or "
            f"pass --inception-weights PATH"
        )
    standard = bool(standard_prefix) and sha.startswith(standard_prefix)
    return InceptionWeights(dst, sha, standard, "hub-cache")


def _missing_message(url: str, dst: Path, why: str) -> str:
    return (
        f"cannot get the FID Inception weights ({why}): download {url} to {dst} "
        f"(torch hub cache), or pass --inception-weights PATH (or set ${WEIGHTS_ENV_VAR})"
    )


@contextlib.contextmanager
def _pytorch_fid_loads(state_dict: dict) -> Iterator[None]:
    """Make pytorch-fid's ``fid_inception_v3`` take ``state_dict`` instead of downloading.

    pytorch-fid fetches its weights with a module-level ``load_state_dict_from_url`` call inside
    the network's constructor; swapping that one name lets us build the library's own network
    from a file we chose and checked.
    """
    import pytorch_fid.inception as _pfi

    original = _pfi.load_state_dict_from_url
    _pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        _pfi.load_state_dict_from_url = original


def load_fid_inception(weights: InceptionWeights, dims: int = 2048) -> nn.Module:
    """pytorch-fid's ``InceptionV3`` returning the block for ``dims``, weights from ``weights``.

    Resizing to 299 and scaling to [-1, 1] happen inside the network, as in pytorch-fid.
    """
    import pytorch_fid.inception as _pfi

    if dims not in FEATURE_DIMS:
        raise ValueError(f"--dims {dims!r}: expected one of {FEATURE_DIMS}")

    def invalid(what: str) -> InceptionWeightsInvalid:
        return InceptionWeightsInvalid(
            f"{weights.named_as}: not FID Inception weights ({what}); expected pytorch-fid's "
            f"{FID_WEIGHTS_URL.rsplit('/', 1)[-1]} ({FID_WEIGHTS_URL}) or another state dict of its InceptionV3"
        )

    try:
        state_dict = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; their text is torch's advice
        raise invalid(f"torch.load cannot read it as a state dict: {type(e).__name__}") from None
    if not isinstance(state_dict, dict):
        raise invalid(f"a {type(state_dict).__name__}, not a state dict")
    block = _pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    try:
        with _pytorch_fid_loads(state_dict):
            net = _pfi.InceptionV3([block], resize_input=True, normalize_input=True)
    except RuntimeError as e:
        # load_state_dict: "Error(s) in loading ...:", then missing / unexpected keys
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[min(1, len(lines) - 1)] if lines else type(e).__name__
        raise invalid(detail if len(detail) <= 120 else detail[:117] + "...") from None
    if not weights.standard and weights.source != "hub-cache":
        warnings.warn(
            f"Inception weights {weights.path} (sha256 {weights.sha256[:12]}...) are not pytorch-fid's FID "
            f"weights (sha256 {url_hash_prefix(FID_WEIGHTS_URL)}...): scores are not comparable with published FIDs",
            stacklevel=3,
        )
    # The 2015 graph's 1008-way classifier (pytorch-fid builds it, then keeps only the blocks):
    # its weight matrix, for the Inception Score. Like the original IS code (and torch-fidelity's
    # "logits_unbiased") we use pool3 @ W without the bias.
    fc = state_dict.get("fc.weight")
    net.register_buffer(
        "logits_weight", fc.detach().float().clone() if isinstance(fc, Tensor) else None
    )
    return net.eval()


def _fold_batchnorm_(net: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into its convolution (torchvision's BasicConv2d)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    from torchvision.models.inception import BasicConv2d

    for m in net.modules():
        if isinstance(m, BasicConv2d) and isinstance(m.bn, nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(m.conv, m.bn)
            m.bn = nn.Identity()
    return net


# --------------------------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------------------------


def quantize_images(x: Tensor) -> Tensor:
    """Generator output in [-1, 1], float [N, 3, H, W] -> uint8 [N, 3, H, W], as a PNG holds it.

    Bit-for-bit what ``torchvision.utils.save_image(x, f, normalize=True, value_range=(-1, 1))``
    (equivalently ``save_image((x + 1) / 2, f)``) writes: clamp, map to [0, 1], scale by 255,
    round half up (+0.5, then truncate), clamp to [0, 255].
    """
    x = torch.nan_to_num(x.detach().float(), nan=0.0)
    x = x.clamp(-1.0, 1.0).add(1.0).div(2.0)  # [0, 1]
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def clean_resize(images: Tensor, size: int = 299) -> Tensor:
    """clean-fid's "clean" resize: uint8 [N, 3, H, W] -> float32 [N, 3, size, size] in [0, 255],
    each channel resized by PIL's bicubic filter as a 32-bit float image, clipped, not
    quantized (``cleanfid.resize.make_resizer("PIL", False, "bicubic", (size, size))``)."""
    import numpy as np
    from PIL import Image

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    arr = images.cpu().numpy().astype(np.float32)  # [N, 3, H, W]
    out = np.empty((arr.shape[0], 3, size, size), dtype=np.float32)
    for i in range(arr.shape[0]):
        for c in range(3):
            img = Image.fromarray(arr[i, c], mode="F").resize((size, size), resample=Image.BICUBIC)
            out[i, c] = np.asarray(img).clip(0, 255)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# The extractor.
# --------------------------------------------------------------------------------------------


class InceptionFeatureExtractor:
    """uint8 images [N, 3, H, W] -> pytorch-fid's Inception features float32 [N, dims].

    Args:
        dims: 64, 192, 768 or 2048 (pool3, the FID standard).
        weights: an ``InceptionWeights``, a path, or None (flag / env / torch hub cache).
        device: where the network runs.
        batch_size: images per forward pass (default 500 on CUDA, 50 on CPU, where larger
            batches are slower).
        fold_bn, channels_last: speed-ups that change results only at fp32 rounding level.
        fid_protocol: "pytorch-fid" (default: the network's bilinear resize of float images) or
            "clean" (clean-fid's PIL bicubic resize to 299 first, on the CPU). The two give
            different absolute numbers; caches and rows keep them apart.
    """

    def __init__(
        self,
        dims: int = 2048,
        weights: Union[InceptionWeights, str, Path, None] = None,
        device: Union[str, torch.device] = "cpu",
        batch_size: Optional[int] = None,
        fold_bn: bool = True,
        channels_last: bool = True,
        progress: bool = True,
        fid_protocol: str = "pytorch-fid",
    ) -> None:
        if fid_protocol not in FID_PROTOCOLS:
            raise ValueError(
                f"--fid-protocol {fid_protocol!r}: expected one of {sorted(FID_PROTOCOLS)}"
            )
        self.fid_protocol = fid_protocol
        self.protocol = FID_PROTOCOLS[fid_protocol]
        if not isinstance(weights, InceptionWeights):
            weights = resolve_inception_weights(weights, progress=progress)
        self.weights = weights
        self.dims = dims
        self.weights_sha256 = weights.sha256
        self.device = torch.device(device)
        self.batch_size = batch_size or (500 if self.device.type == "cuda" else 50)
        self.channels_last = channels_last
        net = load_fid_inception(weights, dims)
        if fold_bn:
            _fold_batchnorm_(net)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net.to(self.device)

    @property
    def has_logits(self) -> bool:
        """Whether ``features_and_logits`` can give the 1008-way logits (pool3 features, and a
        weights file holding the classifier)."""
        return self.dims == 2048 and getattr(self.net, "logits_weight", None) is not None

    def __call__(self, images: Tensor) -> Tensor:
        return self._forward(images, logits=False)[0]

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(features [N, 2048], the 2015 graph's logits [N, 1008]) from one forward pass."""
        if not self.has_logits:
            raise ValueError(
                "Inception Score logits need --dims 2048 and weights with the classifier (fc.weight)"
            )
        return self._forward(images, logits=True)

    @torch.inference_mode()
    def _forward(self, images: Tensor, logits: bool) -> tuple[Tensor, Optional[Tensor]]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        out, out_logits = [], []
        for chunk in images.split(self.batch_size):
            # [B, 3, 299, 299]; the network's resize is then a no-op
            if self.fid_protocol == "clean":
                x = clean_resize(chunk).to(self.device).div_(255)
            else:
                # [B, 3, H, W] in [0, 1]
                x = chunk.to(self.device, non_blocking=True).float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feat = self.net(x)[0]  # [B, dims, h, w]
            if feat.shape[2] != 1 or feat.shape[3] != 1:  # dims < 2048: pytorch-fid pools
                feat = F.adaptive_avg_pool2d(feat, output_size=(1, 1))
            feat = feat.flatten(1).float()  # [B, dims]
            out.append(feat)
            if logits:
                out_logits.append(feat @ self.net.logits_weight.t())  # [B, 1008]
        if not out:
            empty = torch.empty(0, self.dims, device=self.device)
            return empty, (torch.empty(0, 1008, device=self.device) if logits else None)
        return torch.cat(out), (torch.cat(out_logits) if logits else None)
