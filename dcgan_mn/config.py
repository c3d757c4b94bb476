"""The run configuration: one frozen dataclass, the single source of truth.

It is built once from the CLI, validated, written to ``<run>/config.json`` and into every
checkpoint, and read back on resume. Progress is counted in iterations (= generator updates,
the paper's unit); one iteration is one D step then one G step on ``batch_size`` images.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .data import DATASETS
from .digits import DEFAULT_STACK_SIZE, STACKED_SOURCES
from .ema import EMA_STATS
from .features import FEATURE_DIMS, FID_PROTOCOLS
from .models import G_ARCHS, NUM_G_NORM_LAYERS, SAMPLE_MODES, parse_mn_layers
from .norms import ESTIMATORS, MN_OPTIONS, NORM_KINDS, POINTS, norm_specs

__all__ = [
    "TrainConfig",
    "ConfigError",
    "config_from_dict",
    "flag_name",
    "RESUME_FIXED",
    "resume_config",
    "default_run_name",
    "default_sample_every",
]

AMP_MODES = ("none", "bf16", "fp16", "auto")  # auto: bf16 where the hardware has it, else none
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile(mode=...)
STACKED_GRIDS = ("digits", "rgb")  # how a stacked run's sample grid draws a sample


from .errors import ConfigError  # noqa: E402  (re-exported: the CLIs catch it from here)


@dataclass(frozen=True)
class TrainConfig:
    # --- model ---
    # generator architecture: dcgan32 (docs/design.md) | tf-dcgan (TTUR's DCGAN)
    g_arch: str = "dcgan32"
    z_dim: int = 100
    ngf: int = 64
    ndf: int = 64
    mn_layers: tuple[int, ...] = (0, 1)  # generator norm layers that are MN (0 = nearest z)
    # The norm of every generator layer (0 first), one of NORM_KINDS; None: MN in mn_layers and
    # BN elsewhere. When given, mn_layers is where it says "mn".
    g_norms: Optional[tuple[str, ...]] = None
    mode_components: int = 2  # K of Mode Normalization layers (modes per layer)
    mn_components: int = 3  # K
    mn_fit_points: int = 1024  # points clustered per batch by k-means++
    mn_kmeans_iters: int = 2  # Lloyd iterations after seeding
    mn_estimator: str = "kmeans"  # how the batch mixture is fitted: kmeans (our assumption) | em
    mn_em_iters: int = 3  # EM iterations after seeding (mn_estimator = em)
    mn_point: str = "vector"  # a mixture over C-vectors (our reading) | one 1-D mixture per channel
    mn_posterior_grad: bool = True  # gradients through the posteriors (False: constants)
    mn_lambda_scale: bool = True  # keep the Fisher-vector factor 1 / sqrt(lambda_k)
    # --- optimisation ---
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 64  # global batch (all ranks together)
    iters: int = 100_000  # generator updates
    seed: int = 0
    device: str = "auto"  # auto -> cuda if available, else cpu
    # --- data ---
    dataset: str = "cifar10"
    data_root: str = "data"
    hflip: bool = False
    stack_size: Optional[int] = None  # stacked datasets: images drawn (None -> DEFAULT_STACK_SIZE)
    stack_seed: int = 0  # stacked datasets: seed of the drawn digit triples
    # --- run folder, logging, checkpoints ---
    out: str = "checkpoints"
    run_name: Optional[str] = None
    sample_mode: str = "batch"  # how grids and metrics sample the generator
    sample_every: Optional[int] = None  # None: default_sample_every(iters)
    stacked_grid: str = (
        "digits"  # stacked datasets: a sample's digits side by side | as one RGB image
    )
    log_every: int = 100
    ckpt_every: int = 2000
    keep_last: int = 3
    # --- periodic evaluation ---
    fid_every: int = 2000  # 0 turns periodic evaluation off
    fid_samples: int = 10_000
    ref: str = "cifar10-train"
    inception_weights: Optional[str] = None
    inception_metrics: bool = (
        True  # False: a stacked run evaluates mode metrics only, on any machine
    )
    dims: int = 2048
    fid_protocol: str = "pytorch-fid"  # or "clean": clean-fid's PIL-bicubic resize before Inception
    mode_samples: int = 26_000  # stacked datasets: samples per mode-metric evaluation (PacGAN's)
    best_metric: Optional[str] = (
        None  # what best.pt follows; None: FID, else the mode classifier's cfd
    )
    # --- averaged generator (dcgan_mn.ema) ---
    g_ema: float = 0.0  # half-life of G_ema in iterations; 0: no averaged generator
    g_ema_rampup: float = (
        0.0  # > 0: half-life at most rampup * (iteration - g_ema_start) (StyleGAN2-ADA)
    )
    g_ema_start: int = 0  # before this iteration G_ema copies G (StudioGAN's g_ema_start)
    g_ema_stats: str = "copy"  # G_ema's norm statistics: copy (G's buffers) | standing (recomputed)
    g_ema_standing_batches: int = 16  # batches of the standing-statistics pass
    # --- speed (GPU-oriented, all correct on CPU) ---
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune
    # --- distributed ---
    sync_norm: bool = False
    # Free-form record of derived facts (reference-statistics key, world size, ...), filled in
    # by the training code; not a user setting.
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Normalise mn_layers from any accepted spelling ('0,1', 'all', list) to a tuple.
        if self.g_arch not in G_ARCHS:
            raise ConfigError(f"--g-arch {self.g_arch!r}: expected one of {', '.join(G_ARCHS)}")
        try:
            layers = parse_mn_layers(self.mn_layers, G_ARCHS[self.g_arch])
        except ValueError as e:
            raise ConfigError(f"--mn-layers: {e}") from None
        object.__setattr__(self, "mn_layers", layers)
        if self.g_norms is not None:
            norms = self.g_norms.split(",") if isinstance(self.g_norms, str) else list(self.g_norms)
            norms = tuple(n.strip() for n in norms)
            layers = G_ARCHS[self.g_arch]
            if len(norms) != layers or any(n not in NORM_KINDS for n in norms):
                raise ConfigError(
                    f"--g-norms {','.join(norms)!r}: expected {layers} comma-separated norms "
                    f"(one per {self.g_arch} norm layer, 0 nearest z), each one of "
                    f"{', '.join(NORM_KINDS)}"
                )
            object.__setattr__(self, "g_norms", norms)
            object.__setattr__(
                self, "mn_layers", tuple(i for i, n in enumerate(norms) if n == "mn")
            )
        if self.dataset in STACKED_SOURCES and self.stack_size is None:
            object.__setattr__(self, "stack_size", DEFAULT_STACK_SIZE)
        if self.sample_every is None:
            object.__setattr__(self, "sample_every", default_sample_every(self.iters))
        self.validate()

    def validate(self) -> None:
        """Refuse a setting no run can use, in one line naming the flag and the value: the
        lower bounds, the vocabularies, then the settings that exclude each other."""

        def need(cond: bool, field_name: str, what: str, value: Any = None) -> None:
            if not cond:
                shown = getattr(self, field_name) if value is None else value
                raise ConfigError(f"{flag_name(field_name)} {shown!r}: {what}")

        for name, lowest, why in _AT_LEAST:
            value = getattr(self, name)
            need(value is None or value >= lowest, name, f"must be >= {lowest}{why}")
        for name, choices in _ONE_OF:
            need(
                getattr(self, name) in choices,
                name,
                f"expected one of {', '.join(map(str, choices))}",
            )

        kinds = self.norm_kinds()
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        need(
            self.mn_fit_points >= self.mn_components,
            "mn_fit_points",
            f"must be >= --mn-components ({self.mn_components})",
        )
        need(
            not (self.sync_norm and "mode" in kinds),
            "g_norms",
            "--sync-norm synchronizes BN and MN statistics only (Mode Normalization would use each "
            "rank's batch alone)",
            value=",".join(kinds),
        )
        need(
            not (self.sync_norm and self.mn_point != "vector"),
            "mn_point",
            "--sync-norm synchronizes the vector reading only",
        )
        if not (self.inception_metrics or self.dataset in STACKED_SOURCES):
            raise ConfigError(
                f"--no-inception-metrics {self.dataset!r}: leaves nothing to evaluate except on a "
                "stacked dataset (mode metrics)"
            )
        if self.best_metric is not None:
            from .metrics.specs import EMA_SUFFIX, METRICS

            need(
                self.best_metric in METRICS, "best_metric", f"expected one of {', '.join(METRICS)}"
            )
            need(
                self.g_ema > 0 or not self.best_metric.endswith(EMA_SUFFIX),
                "best_metric",
                "names the averaged generator's metric: give --g-ema too",
            )
        need(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "device",
            "expected auto, cpu, cuda or cuda:N",
        )

    # --- serialisation ---

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mn_layers"] = list(self.mn_layers)
        d["g_norms"] = list(self.g_norms) if self.g_norms is not None else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def norm_kinds(self) -> tuple[str, ...]:
        """The norm of every generator layer, 0 first (``g_norms``, or MN in ``mn_layers``)."""
        if self.g_norms is not None:
            return self.g_norms
        return tuple("mn" if i in self.mn_layers else "bn" for i in range(G_ARCHS[self.g_arch]))

    def model_kwargs(self) -> dict:
        """Arguments of ``models.Generator`` that this config fixes: the norms as one
        ``NormSpec`` a layer, decided here and nowhere below."""
        mn_options = {name: getattr(self, f"mn_{name}") for name in MN_OPTIONS}  # mn_point -> point
        norms = norm_specs(
            self.norm_kinds(), self.mn_components, self.mode_components, **mn_options
        )
        return dict(z_dim=self.z_dim, ngf=self.ngf, arch=self.g_arch, norms=norms)


def default_sample_every(iters: int) -> int:
    """``--sample-every`` when not given: ten grids a run, at most one per 1000 iterations, so a
    short run shows how its samples develop and a 100k run writes no more grids than before."""
    return max(1, min(1000, iters // 10))


def config_from_dict(d: dict) -> TrainConfig:
    """Inverse of ``TrainConfig.to_dict``; unknown keys (from a newer version) are an error."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"config has unknown keys {unknown}")
    d = dict(d)
    if "mn_layers" in d:
        d["mn_layers"] = tuple(d["mn_layers"])
    if d.get("g_norms") is not None:
        d["g_norms"] = tuple(d["g_norms"])
    return TrainConfig(**d)


def flag_name(field_name: str) -> str:
    """The CLI flag of a config field: ``mn_layers`` -> ``--mn-layers``."""
    return "--" + field_name.replace("_", "-")


# The lower bounds validate() checks, as (field, lowest, why): a field may be None (unset).
_AT_LEAST = (
    ("z_dim", 1, ""),
    ("ngf", 1, ""),
    ("ndf", 1, ""),
    ("mn_components", 1, " (K, MN's components a layer)"),
    ("mode_components", 1, " (K, Mode Normalization's modes a layer)"),
    ("mn_kmeans_iters", 0, ""),
    ("mn_em_iters", 0, ""),
    ("batch_size", 2, " (batch statistics need more than one sample)"),
    (
        "iters",
        1,
        " (a run trains at least one iteration; --dry-run shows the config without training)",
    ),
    ("seed", 0, ""),
    ("stack_size", 1, ""),
    ("stack_seed", 0, ""),
    ("mode_samples", 2, " (mode metrics need at least 2 samples)"),
    ("sample_every", 0, " (0 turns it off)"),
    ("log_every", 0, " (0 turns it off)"),
    ("ckpt_every", 0, " (0 turns it off)"),
    ("fid_every", 0, " (0 turns it off)"),
    ("keep_last", 1, ""),
    ("fid_samples", 2, " (FID needs at least 2 samples)"),
    ("g_ema", 0, " (a half-life in iterations; 0 turns it off)"),
    ("g_ema_rampup", 0, " (0: no ramp-up)"),
    ("g_ema_start", 0, ""),
    ("g_ema_standing_batches", 1, ""),
)
# The fields validate() checks against their vocabulary, each named by its owner module.
_ONE_OF = (
    ("mn_estimator", ESTIMATORS),
    ("mn_point", POINTS),
    ("dataset", DATASETS),
    ("sample_mode", SAMPLE_MODES),
    ("stacked_grid", STACKED_GRIDS),
    ("dims", FEATURE_DIMS),
    ("fid_protocol", tuple(FID_PROTOCOLS)),
    ("g_ema_stats", EMA_STATS),
    ("amp", AMP_MODES),
    ("compile_mode", COMPILE_MODES),
)

# What a resumed run must keep: the model, the optimisation, the data and the evaluation
# protocol. Everything else (length, device, logging cadence, speed switches) may change.
RESUME_FIXED = (
    "g_arch",
    "z_dim",
    "ngf",
    "ndf",
    "mn_layers",
    "g_norms",
    "mode_components",
    "mn_components",
    "mn_fit_points",
    "mn_kmeans_iters",
    "mn_estimator",
    "mn_em_iters",
    "mn_point",
    "mn_posterior_grad",
    "mn_lambda_scale",
    "lr",
    "beta1",
    "beta2",
    "batch_size",
    "seed",
    "dataset",
    "hflip",
    "stack_size",
    "stack_seed",
    "sample_mode",
    "ref",
    "dims",
    "mode_samples",
    "fid_protocol",
    "g_ema",
    "g_ema_rampup",
    "g_ema_start",
)


def resume_config(saved: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with the flags the user gave.

    A flag that would change a ``RESUME_FIXED`` field is refused (one line naming flag, value
    and the checkpoint's value); ``--out`` and ``--run-name`` are refused because the run folder
    is the checkpoint's. Giving a fixed flag its saved value is fine.
    """
    for name in ("out", "run_name"):
        if name in overrides:
            raise ConfigError(
                f"{flag_name(name)} {overrides[name]!r}: cannot be combined with --resume "
                f"(the run continues in the checkpoint's folder)"
            )
    probe = dataclasses.replace(saved, **overrides)  # validates and normalises the values
    if "g_norms" in overrides and probe.norm_kinds() == saved.norm_kinds():
        probe = dataclasses.replace(probe, g_norms=saved.g_norms)  # the same norms, spelt out
    for name in RESUME_FIXED:
        if name in overrides and getattr(probe, name) != getattr(saved, name):
            value = getattr(probe, name)
            was = getattr(saved, name)
            if name == "mn_layers":
                value, was = ",".join(map(str, value)) or "none", ",".join(map(str, was)) or "none"
            if name == "g_norms":
                value, was = ",".join(probe.norm_kinds()), ",".join(saved.norm_kinds())
            raise ConfigError(
                f"{flag_name(name)} {value!r}: conflicts with the resumed run's {name}={was!r} "
                f"(the model, optimisation, data and evaluation protocol are fixed by --resume)"
            )
    return probe


def default_run_name(cfg: TrainConfig, when: Optional[float] = None) -> str:
    """``20250101-120000-mn01-k3-s0``: time, MN layers, K and seed (BN-only runs: ``bn``)."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    arch = f"mn{''.join(map(str, cfg.mn_layers))}-k{cfg.mn_components}" if cfg.mn_layers else "bn"
    if set(cfg.norm_kinds()) - {"bn", "mn"}:  # other norms: every layer's, e.g. mode-mode-bn
        arch = "-".join(cfg.norm_kinds())
    if cfg.g_arch != "dcgan32":
        arch = f"{cfg.g_arch}-{arch}"
    return f"{stamp}-{arch}-s{cfg.seed}"


assert NUM_G_NORM_LAYERS == 3  # the config's help texts assume the 3-layer 32x32 generator
