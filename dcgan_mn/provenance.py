"""What changes numbers besides the config: library versions, the device, the CPU.

A run folder keeps a manifest, ``provenance.jsonl``: one line per distinct environment the run
(or its re-scoring) ran in, each with a short ``env_key``. Every ``metrics.jsonl`` and
``eval_seeds.jsonl`` row carries the ``env_key`` of the environment that computed it, so two
numbers can be told apart years later, and ``compare`` can warn when it compares numbers from
different environments.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

from .runfolder import RunFolder, as_run_folder

__all__ = ["LIBRARIES", "environment", "env_key", "record_environment", "read_environments"]

LIBRARIES = ("torch", "torchvision", "pytorch-fid", "numpy", "scipy", "scikit-learn", "pillow")


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _code_version() -> str:
    """This code's git commit (with "+dirty" for uncommitted changes), else the package version."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return _version("dcgan_mn") or "unknown"


def environment(device=None) -> dict:
    """The versions and hardware that can change a number computed here."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    env = {
        "python": platform.python_version(),
        **{name: _version(name) for name in LIBRARIES},
        "dcgan_mn": _code_version(),
        "device": device.type,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def env_key(env: dict) -> str:
    """A short key of an environment (the same dict -> the same key)."""
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]


def read_environments(run: Union[RunFolder, str, Path]) -> dict[str, dict]:
    """{env_key: environment} of a run folder's manifest (empty without one)."""
    return {
        row["env_key"]: row["environment"]
        for row in as_run_folder(run).provenance_rows()
        if "env_key" in row and "environment" in row
    }


def record_environment(run: Union[RunFolder, str, Path], env: dict, iteration: int) -> str:
    """Add ``env`` to the run's manifest unless it is already there; returns its key."""
    folder = as_run_folder(run)
    key = env_key(env)
    if key not in read_environments(folder):
        folder.append_provenance({"env_key": key, "first_iteration": iteration, "environment": env})
    return key
