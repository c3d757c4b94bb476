#!/usr/bin/env python
"""Where the config travels: the import floors of the package and the calls that carry a run's
config, traced through a tiny real training run. Prints JSON.

    python bench/cfg_path.py

* **floors**: each ``dcgan_mn`` module's floor in the import graph (0: imports no other module
  of the package; else one above the highest module it imports, imports inside functions
  included), and the import circles (none expected).
* **the config's path**: every call into a ``dcgan_mn`` function that receives the run's config
  (a ``TrainConfig``, or an object holding one as ``.cfg``: the launch, the training state)
  while ``train()`` sets up, runs 2 iterations, evaluates, saves, and ends. A call **climbs back**
  when its callee's module sits on a higher floor than its caller's (control going back up: a
  callback, or an import pointing up); it **re-enters** when its callee's module is already on
  the call stack below the caller (a ping-pong such as checkpoint -> runfolder -> checkpoint).
  Returns are not counted: a return is how a layered call ends.
"""

from __future__ import annotations

import ast
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PACKAGE = ROOT / "dcgan_mn"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports (anywhere in the file)}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                stem = (
                    (f"{base}.{node.module}" if node.module else base)
                    if node.level
                    else node.module
                )
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def floors(graph: dict[str, set[str]]) -> tuple[dict[str, int], list[list[str]]]:
    """Floor of every module and the import circles found (a module on a circle gets the floor
    its other imports give it)."""
    floor: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> int:
        if m in floor:
            return floor[m]
        if m in stack:
            circles.append(stack[stack.index(m) :] + [m])
            return -1
        below = [visit(d, stack + [m]) for d in graph[m]]
        floor[m] = 1 + max(below, default=-1)
        return floor[m]

    for m in sorted(graph):
        visit(m, [])
    return floor, circles


def trace_config_path(floor: dict[str, int]) -> dict:
    import torch

    from dcgan_mn.config import TrainConfig
    from dcgan_mn.training import train

    def carries_config(frame) -> bool:
        for value in frame.f_locals.values():
            if isinstance(value, TrainConfig) or isinstance(
                getattr(value, "cfg", None), TrainConfig
            ):
                return True
        return False

    def module_of(frame):
        name = frame.f_globals.get("__name__", "")
        return name if name in floor else None

    calls, climbs, reentries = [], [], []
    stack: list[str] = []  # modules of the config-carrying calls in progress

    def profile(frame, event, arg):
        if event == "call":
            callee = module_of(frame)
            if callee is None or not carries_config(frame):
                return
            caller = stack[-1] if stack else None
            calls.append((caller, callee, frame.f_code.co_name))
            if caller is not None and callee != caller:
                if floor[callee] > floor[caller]:
                    climbs.append(f"{caller} -> {callee}.{frame.f_code.co_name}")
                if callee in stack[:-1]:
                    reentries.append(f"{' -> '.join(stack)} -> {callee}.{frame.f_code.co_name}")
            stack.append(callee)
            _open[id(frame)] = True
        elif event == "return" and _open.pop(id(frame), False):
            stack.pop()

    _open: dict[int, bool] = {}

    class Evaluator:  # a tiny stand-in: the point is the path, not the score
        primary_metric = "fid"
        directions = {"fid": "min"}

        def __call__(self, generator, *, sample_mode, batch_size):
            return {"fid": 1.0, "num_samples": 8}

    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out=out,
            run_name="r",
            iters=2,
            batch_size=8,
            ngf=8,
            ndf=8,
            mn_fit_points=64,
            fid_every=2,
            ckpt_every=2,
            log_every=1,
            sample_every=2,
            device="cpu",
        )
        sys.setprofile(profile)
        try:
            train(cfg, evaluator=Evaluator(), images=images, progress=False)
        finally:
            sys.setprofile(None)
    return {
        "calls_carrying_config": len(calls),
        "modules_entered": dict(Counter(callee for _, callee, _ in calls)),
        "climbs_back": len(climbs),
        "climbs_back_list": climbs,
        "reentries": len(reentries),
        "reentries_list": reentries,
    }


def main() -> None:
    graph = import_graph()
    floor, circles = floors(graph)
    up = [
        f"{m} -> {d}" for m, ds in graph.items() for d in ds if floor.get(d, -1) >= floor.get(m, 0)
    ]
    report = {
        "floors": dict(sorted(floor.items(), key=lambda kv: (kv[1], kv[0]))),
        "import_circles": circles,
        "imports_not_pointing_down": up,
        **trace_config_path(floor),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
