"""train.py with test seams injected, for launches in real processes (torchrun): what the
tests need to see or break, passed as ``train(step_hook=...)`` rather than read from the
environment inside the training loop.

    python -m torch.distributed.run ... tests/ddp_worker.py [--test-dump DIR] [--test-fault RANK:ITER] TRAIN_FLAGS...

* ``--test-dump DIR``: when training returns, each rank saves what it holds (G's and D's state
  dicts, G_ema's or None, the iteration) to ``DIR/rank<r>.pt``;
* ``--test-fault RANK:ITER``: that rank dies (``os._exit(3)``, as a crashed process) right after
  iteration ITER.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    import dcgan_mn.state as S
    import dcgan_mn.training as T

    args, dump, fault = list(sys.argv[1:]), None, None
    for flag in ("--test-dump", "--test-fault"):
        if flag in args:
            i = args.index(flag)
            value = args[i + 1]
            del args[i : i + 2]
            if flag == "--test-dump":
                dump = Path(value)
            else:
                fault = tuple(int(x) for x in value.split(":"))
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; this is the test's own process
    seen: dict = {}

    def step_hook(iteration, G, D):
        seen.update(G=G, D=D)
        if fault == (rank, iteration):
            os._exit(3)

    real_train = T.train
    real_state_init = S.TrainingState.__init__

    def state_init(self, *a, **kw):  # the training state, for its averaged generator
        real_state_init(self, *a, **kw)
        seen["state"] = self

    S.TrainingState.__init__ = state_init

    def train(cfg, **kw):
        result = real_train(cfg, step_hook=step_hook, **kw)
        if dump is not None and seen:
            dump.mkdir(parents=True, exist_ok=True)
            ema = seen["state"].ema
            torch.save(
                {
                    "generator": seen["G"].state_dict(),
                    "discriminator": seen["D"].state_dict(),
                    "generator_ema": ema.state_dict() if ema is not None else None,
                    "iteration": result.iteration,
                },
                dump / f"rank{rank}.pt",
            )
        return result

    T.train = train  # train.py imports it from the module when its command runs
    spec = importlib.util.spec_from_file_location("_train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args=args)


if __name__ == "__main__":
    main()
