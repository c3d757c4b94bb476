"""What G_ema's normalization state does to its scores: ``--g-ema-stats copy`` vs ``standing``.

For each chosen generator snapshot of a stacked-digits run trained with ``--g-ema``, scores the
mode metrics (``modes``, ``kl_modes``, ``cfd``; same latents for every variant) of:

* ``G/batch`` and ``G/running``: the trained generator, for reference;
* ``G_ema/batch``: the averaged generator with its own batch statistics (the baseline of the
  ratios below: no running statistics involved, so no choice to make);
* ``G_ema/running/copy``: G_ema's weights with G's running statistics (StyleGAN's choice);
* ``G_ema/running/standing-N``: G_ema's weights with statistics recomputed from N batches of its
  own activations (BigGAN's standing statistics), for a few N.

Prints one JSON object; each variant's ``cfd`` also as a ratio to ``G_ema/batch`` of the same
snapshot. Not a speed benchmark: the numbers are scores, so machine load does not change them.

    python bench/bench_ema_stats.py experiments/stacked-digits-ema/mn-s0 --iterations 400,1000,2000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dcgan_mn.checkpoint import load_checkpoint, load_generator  # noqa: E402
from dcgan_mn.ema import EmaSchedule, GeneratorEMA  # noqa: E402
from dcgan_mn.metrics import Evaluator  # noqa: E402
from dcgan_mn.metrics.classifier import load_mode_classifier  # noqa: E402
from dcgan_mn.metrics.modes import ModeMetrics  # noqa: E402
from dcgan_mn.runfolder import RunFolder  # noqa: E402


def score(evaluator, G, mode: str, batch_size: int) -> dict:
    row = evaluator(G, sample_mode=mode, batch_size=batch_size)
    return {k: row[k] for k in ("modes", "kl_modes", "cfd")}


def variants(path: Path, standing: list[int]) -> dict:
    """{name: (generator, sample mode)} of one snapshot."""
    G, cfg, _ = load_generator(path)
    G_ema, _, _ = load_generator(path, ema=True)
    out = {"G/batch": (G, "batch"), "G/running": (G, "running"), "G_ema/batch": (G_ema, "batch")}
    copied = GeneratorEMA(G, EmaSchedule(1.0), stats="copy")
    copied.G_ema.load_state_dict(load_checkpoint(path)["generator_ema"])
    copied.ready_for_use()
    out["G_ema/running/copy"] = (copied.G_ema, "running")
    for n in standing:
        ema = GeneratorEMA(
            G, EmaSchedule(1.0), stats="standing", standing_batches=n, batch_size=cfg.batch_size
        )
        ema.G_ema.load_state_dict(load_checkpoint(path)["generator_ema"])
        ema.ready_for_use()
        out[f"G_ema/running/standing-{n}"] = (ema.G_ema, "running")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a stacked-digits run folder trained with --g-ema (its snapshots)")
    p.add_argument(
        "--iterations", default=None, help="comma list of snapshot iterations (default: all)"
    )
    p.add_argument("--samples", type=int, default=5000, help="samples per score")
    p.add_argument("--standing", default="4,16,64", help="standing-statistics batch counts to try")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    folder = RunFolder(Path(args.run))
    snapshots = dict(folder.snapshots())
    wanted = [int(i) for i in args.iterations.split(",")] if args.iterations else sorted(snapshots)
    missing = [i for i in wanted if i not in snapshots]
    if missing:
        sys.exit(f"{args.run}: no snapshot for iteration(s) {missing}; it has {sorted(snapshots)}")
    cfg = load_generator(snapshots[wanted[0]])[1]
    classifier = load_mode_classifier(cfg.dataset)
    evaluator = Evaluator(families=[ModeMetrics(classifier, num_samples=args.samples)], seed=0)
    standing = [int(n) for n in args.standing.split(",")]
    result = {
        "run": args.run,
        "samples": args.samples,
        "norms": cfg.norm_kinds(),
        "g_ema": cfg.g_ema,
        "g_ema_rampup": cfg.g_ema_rampup,
        "classifier_sha256": classifier.sha256,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "snapshots": {},
    }
    for it in wanted:
        rows = {
            name: score(evaluator, G, mode, cfg.batch_size)
            for name, (G, mode) in variants(snapshots[it], standing).items()
        }
        base = rows["G_ema/batch"]["cfd"]
        for row in rows.values():
            row["cfd_ratio_to_G_ema_batch"] = round(row["cfd"] / base, 3)
        result["snapshots"][str(it)] = rows
        print(
            f"iteration {it}: "
            + ", ".join(f"{k} {v['modes']}/{v['cfd']:.0f}" for k, v in rows.items()),
            file=sys.stderr,
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
