"""Atomic file writes and JSON(-lines) files: every file we write (checkpoints, config, reports, cached statistics)
appears whole or not at all, so a crash or Ctrl-C never leaves a half-written file behind; a
write that fails (ENOSPC, EACCES, EROFS, EDQUOT, ...) removes its temporary file and raises one
``WriteError`` naming the file and the reason."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

__all__ = [
    "WriteError",
    "atomic_write",
    "write_failure",
    "write_json_atomic",
    "append_jsonl",
    "read_jsonl",
]

PathLike = Union[str, Path]


from .errors import WriteError  # noqa: E402


def write_failure(path: Union[str, Path], e: OSError) -> WriteError:
    """The WriteError for ``e`` raised while writing ``path``."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in errno.errorcode:
        reason += f" [{errno.errorcode[e.errno]}]"
    return WriteError(path, reason, e.errno)


@contextlib.contextmanager
def atomic_write(path: Union[str, Path], mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically
    (``os.replace``), on an exception it is removed and ``path`` is untouched.

    ``fsync`` flushes the data to disk before the rename (for checkpoints, which must survive a
    power loss as well as a crash).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except WriteError:
        raise
    except OSError as e:
        raise write_failure(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            # mkstemp makes the file private (0600); end with what open() would have given.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_failure(path, e) from None
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_torch_atomic(path: PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically and durably (fsync'd before the rename)."""
    import io

    import torch

    # Serialize in memory, then write the bytes: a full disk then fails as an OSError with its
    # errno (torch.save writing to the file itself reports it as "unexpected pos").
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path, "wb", fsync=True) as f:
        f.write(buffer.getbuffer())
    return Path(path)


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write JSON to ``path`` atomically (a reader never sees half a file)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    return Path(path)


def _json_safe(value: Any) -> Any:
    """NaN/Inf are not JSON: write them as null so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_jsonl(path: PathLike, row: dict) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    line = json.dumps({k: _json_safe(v) for k, v in row.items()})
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_failure(path, e) from None


def read_jsonl(path: PathLike) -> list[dict]:
    """Rows of a JSON-lines file. A truncated last line (a crash mid-write) is skipped with a
    warning naming the file and line; a malformed line elsewhere is a ValueError naming them."""
    path = Path(path)
    if not path.is_file():
        return []
    numbered = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    rows = []
    for i, (line_no, line) in enumerate(numbered):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(numbered) - 1:
                raise ValueError(f"{path}: line {line_no} is not JSON") from None
            print(
                f"warning: {path}: ignoring line {line_no}, cut short (a crash mid-write?)",
                file=sys.stderr,
            )
    return rows
