"""Which run is this? Decided once, before anything is written, and handed to ``train()``.

A launch settles, in this order: the process group (under torchrun), the run's config (a new
run's, or the checkpoint's with the flags the user gave), its run folder, the checkpoint it
resumes from, the device and the autocast precision. Every bad input (an existing run name, a
corrupt checkpoint, a flag that conflicts with the resumed run, a world size that cannot resume
exactly) is refused here, so a refused launch leaves every run on disk as it was.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import checkpoint as ckpt
from .commands import python_command, script_path
from .config import TrainConfig, config_from_dict, default_run_name, resume_config
from .device import launched_with_torchrun, resolve_amp, resolve_device
from .distributed import DistInfo, broadcast_object, init_distributed
from .errors import CheckpointError, CheckpointUnreadable, ConfigError
from .fileio import write_failure
from .runfolder import RunFolder, resolve_resume

__all__ = [
    "Launch",
    "Resumed",
    "decide_launch",
    "resolve_run_dir",
    "check_ref",
    "check_out",
    "load_resume",
    "check_launch",
    "check_world_size",
    "decided_on_main",
]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Launch:
    """A decided launch: the run's config and folder, what it resumes from, where it computes."""

    cfg: TrainConfig
    folder: RunFolder
    dist_info: DistInfo
    device: torch.device
    amp: str  # the autocast precision in use ("none", "bf16", "fp16"), resolved from --amp
    amp_warning: Optional[str]  # e.g. bf16 on a CPU that emulates it
    payload: Optional[dict] = None  # the full checkpoint resumed from
    checkpoint: Optional[Path] = None  # its file
    restarting: bool = False  # --resume of a folder that never wrote a checkpoint
    set_aside: tuple[Path, ...] = ()  # unreadable newer checkpoints: renamed *.corrupt by open_run
    warnings: tuple[str, ...] = ()  # one line each for the user (rank 0 shows them)

    @property
    def continuing(self) -> bool:
        """An existing run folder (resumed, or restarted from its saved config)."""
        return self.payload is not None or self.restarting

    @property
    def start_iteration(self) -> int:
        return int(self.payload["iteration"]) if self.payload is not None else 0


def decide_launch(
    cfg: Optional[TrainConfig] = None,
    resume: Optional[PathLike] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> Launch:
    """The launch of a new run (``cfg``) or of ``--resume TARGET``.

    Resuming, the run keeps the checkpoint's config except for ``overrides`` (the flags the user
    gave); without ``overrides``, the fields in which ``cfg`` differs from the saved config are
    taken as the flags given (library callers pass a whole config)."""
    payload = path = None
    restarting = False
    set_aside: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()
    if resume is not None:  # the run's config first (read only: every rank reads the same files)
        resumed = load_resume(resume)
        run_dir, path, payload, saved = (
            resumed.run_dir,
            resumed.checkpoint,
            resumed.payload,
            resumed.config,
        )
        set_aside, warnings = resumed.set_aside, resumed.warnings
        restarting = payload is None
        if overrides is None:
            overrides = (
                {}
                if cfg is None
                else {
                    f.name: getattr(cfg, f.name)
                    for f in dataclasses.fields(cfg)
                    if f.name not in ("out", "run_name", "extra")
                    and getattr(cfg, f.name) != getattr(saved, f.name)
                }
            )
        cfg = resume_config(saved, overrides).replace(
            out=str(run_dir.parent), run_name=run_dir.name
        )
        if payload is not None and cfg.iters < payload["iteration"]:
            raise ConfigError(
                f"--iters {cfg.iters}: the resumed run is already at iteration "
                f"{payload['iteration']}"
            )
    elif cfg is None:
        raise ValueError("decide_launch: give a config or a run to resume")
    # The device, decided once from the run's own config; the process group is built on it.
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)  # DistInfo() without torchrun
    if resume is not None:
        check_world_size(payload, dist_info, resume)
    else:
        check_ref(cfg.ref)
        cfg, run_dir = decided_on_main(dist_info, lambda: resolve_run_dir(cfg))
    check_launch(cfg, dist_info)
    amp, amp_warning = resolve_amp(cfg.amp, device)
    return Launch(
        cfg=cfg,
        folder=RunFolder(run_dir),
        dist_info=dist_info,
        device=device,
        amp=amp,
        amp_warning=amp_warning,
        payload=payload,
        checkpoint=path,
        restarting=restarting,
        set_aside=set_aside,
        warnings=warnings,
    )


def resolve_run_dir(cfg: TrainConfig) -> tuple[TrainConfig, Path]:
    """(cfg with its run name filled in, the new run's folder), refusing an existing run and an
    ``--out`` that is (or lies under) a file."""
    out = Path(cfg.out).expanduser()
    check_out(cfg.out)
    if cfg.run_name is None:
        base = default_run_name(cfg)
        name, n = base, 1
        while (out / name).exists():  # two runs started in the same second
            n += 1
            name = f"{base}-{n}"
        cfg = cfg.replace(run_name=name)
    if not cfg.run_name or Path(cfg.run_name).name != cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(f"--run-name {cfg.run_name!r}: must be a plain folder name")
    run_dir = out / cfg.run_name
    try:
        taken = run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir()))
    except OSError as e:
        raise ConfigError(
            f"--out {cfg.out!r}: cannot read {run_dir} ({e.strerror or type(e).__name__})"
        ) from None
    if taken:
        raise ConfigError(
            f"--run-name {cfg.run_name!r}: {run_dir} already exists; continue that run with "
            f"--resume {run_dir}, or choose another --run-name"
        )
    return cfg, run_dir


def check_ref(ref: str) -> None:
    """``--ref`` names a reference ``build_evaluator`` can read, whether or not this run evaluates
    (the run's config freezes it: a resumed run cannot change it): a built-in name, an existing
    pytorch-fid ``.npz`` or an image folder (``metrics.reference.reference_identity``)."""
    from .digits import STACKED_SOURCES
    from .metrics.reference import BUILTIN_REFS

    names = (*BUILTIN_REFS, *STACKED_SOURCES)
    if ref in names:
        return
    p = Path(ref).expanduser()
    if p.suffix == ".npz" and p.is_file():
        return
    if p.suffix != ".npz" and p.is_dir():
        return
    what = (
        "no such statistics file"
        if p.suffix == ".npz"
        else "neither a built-in reference nor a folder"
    )
    raise ConfigError(
        f"--ref {ref!r}: {what}; expected {', '.join(names)}, an image folder or a "
        f"pytorch-fid .npz statistics file"
    )


def check_out(out: str) -> None:
    """``--out`` must be a folder or a path that can become one: neither it nor any folder above
    it may be a file, and its nearest existing folder must take a new folder (not read-only,
    immutable or virtual, as /proc is). One line naming --out, the path and the reason, before
    the evaluator is built (which can take minutes) and before anything is left on disk: the
    probe is an empty folder, removed at once. A failure only creating the run folder itself
    can tell (a race, a full disk) is still reported by ``RunFolder.create``."""
    import tempfile

    p = Path(out).expanduser()
    for ancestor in (p, *p.parents):
        try:
            if not ancestor.exists():
                continue
        except OSError:
            continue
        if not ancestor.is_dir():
            where = "is a file" if ancestor == p else f"lies under {ancestor}, which is a file"
            raise ConfigError(
                f"--out {out!r}: {where}, not a folder; give a folder for the run folders"
            )
        try:
            os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".dcgan_mn-probe-"))
        except OSError as e:
            if ancestor == p:
                raise ConfigError(
                    f"--out {out!r}: cannot create a run folder in it ({write_failure(p, e).reason})"
                ) from None
            raise ConfigError(
                f"--out {out!r}: cannot create {p.relative_to(ancestor).parts[0]!r} in {ancestor} "
                f"({write_failure(ancestor, e).reason})"
            ) from None
        return


@dataclass(frozen=True)
class Resumed:
    """What ``--resume TARGET`` continues from (see ``load_resume``)."""

    run_dir: Path
    checkpoint: Optional[Path]  # None: a folder without checkpoint, restarted from iteration 0
    payload: Optional[dict]
    config: TrainConfig
    set_aside: tuple[
        Path, ...
    ] = ()  # unreadable newer checkpoints, to be moved aside (never deleted)
    warnings: tuple[str, ...] = ()  # one line each, shown when the run starts


def load_resume(target: PathLike) -> Resumed:
    """What ``--resume TARGET`` (a run folder or a full checkpoint) continues from.

    A run folder with its ``config.json`` but no checkpoint yet (a run killed before its first
    one) gives no checkpoint and that config: the run restarts from iteration 0. A run folder
    whose newest checkpoints are unreadable (corrupt, truncated) continues from its newest
    readable one; the unreadable ones are listed in ``set_aside`` (``open_run`` renames them
    ``*.corrupt`` once it holds the folder). When none is readable, the newest one's error is
    raised and nothing is touched. A ``config.json`` that cannot be read next to a good
    checkpoint is a warning: the checkpoint's own config is the run's."""
    folder = RunFolder(Path(target).expanduser())
    if folder.path.is_dir() and not folder.checkpoints() and folder.config_file.is_file():
        try:
            cfg = config_from_dict(folder.read_config())
        except (ValueError, ConfigError) as e:
            raise CheckpointError(
                f"--resume {str(target)!r}: no checkpoint, and its {RunFolder.CONFIG} "
                f"is unreadable ({e})"
            ) from None
        return Resumed(folder.path, None, None, cfg)
    folder, path = resolve_resume(target)
    set_aside: list[Path] = []
    warnings: list[str] = []
    if Path(target).expanduser().is_dir():  # the folder: its newest readable checkpoint
        payload = None
        for _, candidate in reversed(folder.checkpoints()):
            try:
                payload = ckpt.load_checkpoint(candidate, map_location="cpu")
            except CheckpointUnreadable as e:
                if not set_aside:
                    first_error = e
                set_aside.append(candidate)
                continue
            path = candidate
            break
        if payload is None:  # none readable: refuse, touch nothing
            raise first_error
        if set_aside:
            warnings.append(
                f"unreadable checkpoint{'s' if len(set_aside) > 1 else ''} "
                f"{', '.join(p.name for p in reversed(set_aside))} (corrupt or truncated): moved aside as "
                f"{', '.join(p.name + '.corrupt' for p in reversed(set_aside))}; continuing from {path.name}"
            )
    else:
        payload = ckpt.load_checkpoint(path, map_location="cpu")
    if payload["kind"] != "full":
        raise CheckpointError(
            f"--resume {str(target)!r}: a generator-only snapshot cannot be resumed; use a "
            f"full checkpoint (ckpt-*.pt) or the run folder"
        )
    newer = [
        p.name for i, p in folder.checkpoints() if i > payload["iteration"] and p not in set_aside
    ]
    if newer:
        raise CheckpointError(
            f"--resume {str(target)!r}: the run folder has newer checkpoints ({', '.join(newer)}); "
            f"resume the folder itself, or copy this checkpoint into a new folder to branch off"
        )
    cfg = ckpt.checkpoint_config(payload, path)
    ckpt.build_generator(cfg, payload["generator"], path)  # weights that fit the config's model
    ckpt.check_discriminator(cfg, payload["discriminator"], path)
    if folder.config_file.exists():
        try:
            config_from_dict(folder.read_config())
        except (ValueError, TypeError, AttributeError, OSError, ConfigError) as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
            warnings.insert(
                0,
                f"{folder.config_file} is unreadable ({reason[:200]}); using the config saved "
                f"in {path.name} and rewriting {RunFolder.CONFIG} from it",
            )
    return Resumed(folder.path, path, payload, cfg, tuple(set_aside), tuple(warnings))


def check_launch(cfg: TrainConfig, dist_info: DistInfo) -> None:
    """Flags that depend on how the processes were launched (one line naming the flag)."""
    if cfg.sync_norm and not launched_with_torchrun():
        raise ConfigError(
            "--sync-norm: synchronizing norm statistics needs a distributed launch "
            f"({python_command('-m', 'torch.distributed.run', '--nproc_per_node', 'N')} "
            f"{script_path('train.py')} ...)"
        )
    if cfg.batch_size % dist_info.world_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size}: not divisible by the world size "
            f"{dist_info.world_size} (torchrun processes); it is the global batch"
        )


def decided_on_main(dist_info: DistInfo, decide: Callable[[], Any]) -> Any:
    """``decide()`` on rank 0, its result (or its error) on every rank.

    Used for what must agree and may race: the run folder's name (it holds the start time) and
    the check that it does not exist yet (rank 0 creates it)."""
    if not dist_info.enabled:
        return decide()
    outcome = None
    if dist_info.is_main:
        try:
            outcome = ("ok", decide())
        except (ConfigError, CheckpointError) as e:
            outcome = ("error", e)
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def check_world_size(payload: Optional[dict], dist_info: DistInfo, target: PathLike) -> None:
    """A checkpoint resumes exactly only on the world size that wrote it (per-rank RNG states
    and running statistics, per-rank batch slices)."""
    if payload is None:  # restarting from iteration 0: any world size
        return
    saved = int(payload.get("world_size", 1))
    if saved != dist_info.world_size:
        raise ConfigError(
            f"--resume {str(target)!r}: the run was trained on world size {saved} (processes), "
            f"this launch has {dist_info.world_size}; resume it with "
            f"{python_command('-m', 'torch.distributed.run', '--nproc_per_node', saved, script_path('train.py'), '--resume', target)} "
            f"(or without torchrun when it is 1)"
        )
