"""One vocabulary of the metrics: what each is called, which way is better, which
``metrics.jsonl`` column holds its sample count, and whether a fall from its best reads as a
collapse.

Everything that needs to know a metric's direction or count key reads ``METRICS`` (through
``metric_spec``, ``metric_direction``, ``metric_count_key`` or a family's ``DIRECTIONS``), so a
new metric is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MetricsError

__all__ = [
    "MetricSpec",
    "METRICS",
    "metric_spec",
    "directions_of",
    "averaged_result",
    "primary_metric",
    "INCEPTION_COUNT_KEY",
    "MODE_COUNT_KEY",
    "EMA_SUFFIX",
]

INCEPTION_COUNT_KEY = "num_samples"  # the Inception family's column: FID, KID, PRDC, IS
MODE_COUNT_KEY = "mode_samples"  # the stacked-digit mode family's column: modes, kl_modes, cfd
EMA_SUFFIX = "_ema"  # the averaged generator's metrics (--g-ema): fid_ema, modes_ema, ...


@dataclass(frozen=True)
class MetricSpec:
    """One metric.

    * ``direction``: "min" (lower is better) or "max" (higher is better);
    * ``count_key``: the ``metrics.jsonl`` column that holds how many samples scored it;
    * ``can_collapse``: whether the ratio of a later value to the best value reads as mode
      collapse (``compare``'s collapse flag); False where the metric lives near a floor
      (kl_modes) or can be <= 0 (KID), so a ratio means nothing;
    * ``description``: one line for help texts and reports;
    * ``headline``: shown on the progress bar and the plain log lines during training;
    * ``averaged``: the metric of the averaged generator (``--g-ema``), ``<metric>_ema``: the
      same metric, scored on G_ema in the same evaluation (same samples count, same latents)."""

    name: str
    direction: str
    count_key: str
    can_collapse: bool
    description: str
    headline: bool = False
    averaged: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("min", "max"):
            raise ValueError(
                f"metric {self.name!r}: direction {self.direction!r} is not 'min' or 'max'"
            )

    @property
    def higher_is_better(self) -> bool:
        return self.direction == "max"

    @property
    def family(self) -> str:
        return "modes" if self.count_key == MODE_COUNT_KEY else "inception"

    @property
    def plain_name(self) -> str:
        """The same metric of G: ``modes`` for ``modes_ema``, ``modes`` for ``modes``."""
        return self.name[: -len(EMA_SUFFIX)] if self.averaged else self.name


def _spec(
    name, direction, count_key, can_collapse, description, headline=False
) -> tuple[str, MetricSpec]:
    return name, MetricSpec(name, direction, count_key, can_collapse, description, headline)


METRICS: dict[str, MetricSpec] = dict(
    [
        # The Inception family.
        _spec("fid", "min", INCEPTION_COUNT_KEY, True, "Fréchet Inception distance", headline=True),
        _spec(
            "kid",
            "min",
            INCEPTION_COUNT_KEY,
            False,
            "kernel Inception distance (unbiased, can be <= 0)",
        ),
        _spec(
            "precision",
            "max",
            INCEPTION_COUNT_KEY,
            False,
            "fraction of generated images inside the real manifold",
        ),
        _spec(
            "recall",
            "max",
            INCEPTION_COUNT_KEY,
            True,
            "fraction of real images inside the generated manifold",
        ),
        _spec("density", "max", INCEPTION_COUNT_KEY, False, "precision counted with multiplicity"),
        _spec(
            "coverage",
            "max",
            INCEPTION_COUNT_KEY,
            True,
            "fraction of real images with a generated neighbour",
        ),
        _spec("inception_score", "max", INCEPTION_COUNT_KEY, True, "Inception score"),
        # The stacked-digit mode family.
        _spec(
            "modes",
            "max",
            MODE_COUNT_KEY,
            True,
            "distinct digit triples among the samples (of 1000)",
            headline=True,
        ),
        _spec(
            "kl_modes",
            "min",
            MODE_COUNT_KEY,
            False,
            "KL of the triple distribution to uniform (nats)",
        ),
        _spec(
            "cfd",
            "min",
            MODE_COUNT_KEY,
            True,
            "Fréchet distance in the mode classifier's features",
            headline=True,
        ),
    ]
)
# Every metric again for the averaged generator: written as its own column, so compare, rescore,
# TensorBoard and HParams read it as any other metric.
METRICS.update(
    {
        f"{name}{EMA_SUFFIX}": MetricSpec(
            f"{name}{EMA_SUFFIX}",
            s.direction,
            s.count_key,
            s.can_collapse,
            f"{s.description}, of the averaged generator (--g-ema)",
            s.headline,
            averaged=True,
        )
        for name, s in list(METRICS.items())
    }
)
# result columns that are not metrics but belong to the generator scored
AVERAGED_EXTRAS = ("kid_std",)


def metric_spec(name: str) -> MetricSpec:
    """The spec of ``name``; a ``MetricsError`` naming the known metrics for an unknown one."""
    try:
        return METRICS[name]
    except KeyError:
        raise MetricsError(
            f"unknown metric {name!r}: known metrics are {', '.join(METRICS)}"
        ) from None


def primary_metric(scored) -> str:
    """The metric that picks a run's best snapshot (``best.pt``) when ``--best-metric`` is not
    given, from the metrics its evaluation scores: FID, else (mode metrics only) cfd."""
    return "fid" if "fid" in scored else "cfd"


def directions_of(count_key: str) -> dict[str, str]:
    """{metric: direction} of the family whose rows carry ``count_key``."""
    return {
        m.name: m.direction for m in METRICS.values() if m.count_key == count_key and not m.averaged
    }


def averaged_result(result: dict) -> dict:
    """An evaluation of G_ema as the columns of its row: each metric (and ``kid_std``) renamed
    ``<name>_ema``; the sample counts, sample mode and seed are the evaluation's own, shared
    with G's columns."""
    return {
        f"{k}{EMA_SUFFIX}": v
        for k, v in result.items()
        if (k in METRICS and not METRICS[k].averaged) or k in AVERAGED_EXTRAS
    }
