"""The command lines: the ones the tools print for the user to run next (resume a run, prepare
a node, re-score for compare, relaunch under torchrun), and the settings every command-line
tool's ``--help`` shares (``CLI_SETTINGS``).

A printed command starts with the interpreter running now (``sys.executable``), not ``python``:
the README installs into a venv it never activates, and there ``python`` is a Python without
torch, so a command that says ``python`` fails as printed. The scripts are named by their path
from the working directory (absolute when they lie elsewhere), so the command also runs from
where the user is. Every argument is shell-quoted.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

__all__ = ["CLI_SETTINGS", "python_command", "script_command", "script_path"]

# click ``context_settings`` of train.py, evaluate.py, sweep.py and the experiment scripts: one
# look for every --help (-h too, defaults shown, lines up to 100 columns).
CLI_SETTINGS = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "max_content_width": 100,
}

_REPO = Path(__file__).resolve().parents[1]  # train.py and evaluate.py sit beside the package


def script_path(script: str) -> str:
    """``train.py`` / ``evaluate.py`` as a path that works from the current directory: relative
    when the repository is at or below it, else absolute; the bare name where the package was
    installed without the scripts."""
    path = _REPO / script
    if not path.is_file():
        return script
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def python_command(*args) -> str:
    """``<this interpreter> args...`` as one shell line."""
    return shlex.join([sys.executable, *map(str, args)])


def script_command(script: str, *args) -> str:
    """``<this interpreter> <script> args...`` as one shell line (``script``: train.py or evaluate.py)."""
    return python_command(script_path(script), *args)
