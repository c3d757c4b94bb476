"""Checkpoints: their schema, building, checking and migrating what they hold (``runfolder``
decides where they go and writes them; ``state.TrainingState`` fills and restores them).

A checkpoint is a plain dict of tensors and Python primitives, so ``torch.load(path,
weights_only=True)`` reads it (no pickled classes, nothing executed on load). Every one starts
with the same header and generator block:

    {"format": "dcgan_mn", "schema": 1, "kind": "full" | "generator",
     "config": TrainConfig.to_dict(), "iteration": int, "images_seen": int,
     "generator": G.state_dict(), "metrics": {...},  # metrics: the evaluation, on snapshots
     "generator_ema": G_ema.state_dict()}  # with --g-ema only

A ``"full"`` one adds the training state (``FULL_KEYS``: D, both optimizers, the loss scaler,
RNG states, data order, the grid's noise, the best so far, training seconds, the logging window)
and, under DDP, ``world_size`` and ``ranks`` (every rank's RNG states, logging window and running
statistics). ``full_payload`` writes that layout and ``full_checkpoint`` reads it back in
today's form, migrations applied: nothing else spells out its keys.
Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a
crash or a signal never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch

from .config import ConfigError, TrainConfig, config_from_dict
from .fileio import save_torch_atomic
from .models import Generator

__all__ = [
    "FORMAT",
    "SCHEMA",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "generator_payload",
    "FULL_KEYS",
    "full_payload",
    "FullCheckpoint",
    "full_checkpoint",
    "load_generator",
    "has_averaged_generator",
    "load_generators",
    "build_generator",
    "check_discriminator",
    "checkpoint_config",
    "migrate_best",
    "capture_rng_state",
    "restore_rng_state",
]

FORMAT = "dcgan_mn"
SCHEMA = 1
KINDS = ("full", "generator")

PathLike = Union[str, Path]


from .errors import CheckpointError, CheckpointUnreadable  # noqa: E402


# --------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------


def save_checkpoint(path: PathLike, payload: dict) -> Path:
    """``torch.save`` to ``path`` atomically and durably, with our format header."""
    return save_torch_atomic(path, {"format": FORMAT, "schema": SCHEMA, **payload})


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Read and check one of our checkpoints (``weights_only=True``: nothing is executed)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r}: not a file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
        AttributeError,
        TypeError,
        KeyError,
        IndexError,
    ) as e:
        # KeyError: torch's weights_only unpickler reading text (a memo index it never stored).
        raise CheckpointUnreadable(  # our sentence and the exception's class, not torch's internals
            f"checkpoint {str(path)!r}: unreadable: corrupt, truncated or not a torch file "
            f"({type(e).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r}: not a dcgan_mn checkpoint")
    if payload.get("schema") != SCHEMA:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: schema {payload.get('schema')!r}, this version reads schema {SCHEMA}"
        )
    if payload.get("kind") not in KINDS:
        raise CheckpointError(f"checkpoint {str(path)!r}: unknown kind {payload.get('kind')!r}")
    missing = [k for k in ("config", "iteration", "images_seen", "generator") if k not in payload]
    if payload["kind"] == "full":
        missing += [
            k for k in ("discriminator", "opt_g", "opt_d", "rng", "fixed_noise") if k not in payload
        ]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r}: incomplete, lacks {missing}")
    return payload


def checkpoint_config(payload: dict, path: PathLike = "") -> TrainConfig:
    """The TrainConfig stored in a loaded checkpoint."""
    try:
        return config_from_dict(payload["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its config is not valid here ({e})"
        ) from None


def migrate_best(best: Optional[dict]) -> dict:
    """A checkpoint's ``best`` record in today's form ``{"metric", "value", "iteration"}``
    (checkpoints written before runs could be ranked by cfd held ``{"fid", "iteration"}``)."""
    best = dict(best or {})
    if "fid" in best and "value" not in best:
        best = {"metric": "fid", "value": best["fid"], "iteration": best["iteration"]}
    return best


# The training state a full checkpoint adds to the generator block.
FULL_KEYS = (
    "discriminator", "opt_g", "opt_d", "scaler", "rng", "data", "fixed_noise", "best",
    "train_seconds", "log_window",
)  # fmt: skip


def full_payload(generator_block: dict, ranks: Optional[list] = None, **training: Any) -> dict:
    """A full checkpoint: a ``generator_payload`` block and the training state (every one of
    ``FULL_KEYS``); under DDP, ``ranks`` holds every rank's RNG states, logging window and
    running statistics (``{"rng", "log_window", "buffers"}``), rank 0 first."""
    if set(training) != set(FULL_KEYS):
        raise ValueError(f"full_payload: expected {FULL_KEYS}, got {tuple(sorted(training))}")
    payload = {**generator_block, "kind": "full", **training}
    if ranks is not None:
        payload.update(world_size=len(ranks), ranks=ranks)
    return payload


class FullCheckpoint(NamedTuple):
    """A full checkpoint's training state in today's form, as one process restores it."""

    iteration: int
    generator: dict
    generator_ema: Optional[dict]  # with --g-ema
    discriminator: dict
    opt_g: dict
    opt_d: dict
    scaler: Optional[dict]  # None: no fp16 loss scaling
    data: dict
    fixed_noise: torch.Tensor
    best: dict  # {"metric", "value", "iteration"}
    train_seconds: float
    rng: dict  # this process's RNG states
    log_window: dict
    buffers: Optional[dict]  # under DDP: this rank's own running statistics


def full_checkpoint(payload: dict, rank: Optional[int] = None) -> FullCheckpoint:
    """Read a loaded full checkpoint back: ``rank`` (under DDP) picks that rank's own streams and
    buffers. Migrations: ``best`` of checkpoints written before runs were ranked by cfd;
    ``train_seconds``, ``log_window`` and ``scaler`` that older checkpoints lack."""
    own = payload["ranks"][rank] if rank is not None else payload
    return FullCheckpoint(
        iteration=int(payload["iteration"]),
        generator=payload["generator"],
        generator_ema=payload.get("generator_ema"),
        discriminator=payload["discriminator"],
        opt_g=payload["opt_g"],
        opt_d=payload["opt_d"],
        scaler=payload.get("scaler") or None,
        data=payload["data"],
        fixed_noise=payload["fixed_noise"],
        best=migrate_best(payload.get("best")),
        train_seconds=float(payload.get("train_seconds", 0.0)),
        rng=own["rng"],
        log_window=own.get("log_window") or {},
        buffers=own.get("buffers") if rank is not None else None,
    )


def generator_payload(
    generator: torch.nn.Module, cfg: TrainConfig, iteration: int, images_seen: int, **extra: Any
) -> dict:
    """A generator-only snapshot (small: what re-scoring a run needs)."""
    return {
        "format": FORMAT,
        "schema": SCHEMA,
        "kind": "generator",
        "config": cfg.to_dict(),
        "iteration": int(iteration),
        "images_seen": int(images_seen),
        "generator": generator.state_dict(),
        **extra,
    }


def _misfit(module: torch.nn.Module, state: dict) -> str | None:
    """None when ``state`` loads into ``module`` strictly; else what does not fit: the line of
    torch's error that names the first mismatch (at most 200 characters)."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return (lines[1] if len(lines) > 1 else lines[0] if lines else "")[:200]
    return None


def build_generator(cfg: TrainConfig, state: dict, path: PathLike = "") -> Generator:
    """A Generator for ``cfg`` holding ``state``; a clear error when they do not fit."""
    gen = Generator(**cfg.model_kwargs())
    misfit = _misfit(gen, state)
    if misfit is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the generator weights do not fit the architecture of its "
            f"config (mn_layers={list(cfg.mn_layers)}, K={cfg.mn_components}, ngf={cfg.ngf}, "
            f"z_dim={cfg.z_dim}): {misfit}"
        )
    return gen


def check_discriminator(cfg: TrainConfig, state: dict, path: PathLike = "") -> None:
    """A clear error when a checkpoint's discriminator weights do not fit its config."""
    from .models import Discriminator

    misfit = _misfit(Discriminator(cfg.ndf), state)
    if misfit is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the discriminator weights do not fit ndf={cfg.ndf}: {misfit}"
        )


def load_generator(
    path: PathLike, device: Any = "cpu", *, ema: bool = False
) -> tuple[Generator, TrainConfig, int]:
    """(generator on ``device`` in train mode, its TrainConfig, iteration) from a full
    checkpoint or a generator snapshot; ``ema``: the averaged generator G_ema instead of G."""
    payload = load_checkpoint(path, map_location="cpu")
    cfg = checkpoint_config(payload, path)
    key = "generator_ema" if ema else "generator"
    if key not in payload:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: no averaged generator (its run was trained "
            f"without --g-ema); leave out --ema to use G"
        )
    gen = build_generator(cfg, payload[key], path).to(device)
    return gen, cfg, int(payload["iteration"])


def has_averaged_generator(path: PathLike) -> bool:
    """Does the checkpoint or snapshot at ``path`` hold G_ema (``--g-ema``)?"""
    return "generator_ema" in load_checkpoint(path, map_location="cpu")


def load_generators(
    path: PathLike, device: Any = "cpu"
) -> tuple[Generator, Optional[Generator], TrainConfig, int]:
    """(G, G_ema or None, config, iteration) from one read of a checkpoint or snapshot."""
    payload = load_checkpoint(path, map_location="cpu")
    cfg = checkpoint_config(payload, path)
    gen = build_generator(cfg, payload["generator"], path).to(device)
    ema = (
        build_generator(cfg, payload["generator_ema"], path).to(device)
        if "generator_ema" in payload
        else None
    )
    return gen, ema, cfg, int(payload["iteration"])


# --------------------------------------------------------------------------------------------
# Random number generator states (all of them, as plain tensors and lists)
# --------------------------------------------------------------------------------------------


def capture_rng_state(device: Any = None) -> dict:
    """torch CPU, CUDA (``device``'s, if it is a CUDA device), Python and NumPy RNG states."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_kind,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "cuda": None,
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: Any = None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
