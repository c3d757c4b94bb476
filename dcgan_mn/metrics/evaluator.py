"""The evaluator: one pass of generated (or given) images through a list of metric families.

What training calls every ``--fid-every`` iterations and what ``evaluate.py`` uses: generate
(seeded, chunked), quantize to uint8 as a PNG would, run each feature provider that a family
needs once per chunk, and let every family score its share of the pass.

A metric family (``inception.InceptionMetrics``, ``modes.ModeMetrics``) declares:

* ``needs``: the name of the feature provider it reads, and ``provider``: that provider
  (uint8 images [B, 3, H, W] -> its outputs; ``batch_size``: the images it takes at once);
  families that need the same provider share one call per chunk;
* ``num_samples``: how many images of the pass it scores (the first ones), and ``count_key``:
  the result key that reports the count (metric names carry it: ``fid_10k``, ``modes_26k``);
* ``directions``: its metrics and whether lower or higher is better;
* ``reset()``, ``update(offset, outputs)``, ``gather()`` (merge across torchrun ranks) and
  ``result() -> dict``.

Adding a metric family touches its own module and ``build_evaluator``'s list, nothing else.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from ..distributed import barrier, rank_and_world_size
from ..features import FeatureExtractor, quantize_images
from .errors import MetricsError
from .inception import InceptionMetrics
from .reference import ReferenceStats, load_reference
from .specs import EMA_SUFFIX, metric_spec, primary_metric

__all__ = [
    "Evaluator",
    "build_evaluator",
    "generated_images",
    "sample_count_tag",
    "metric_direction",
    "metric_count_key",
]


def sample_count_tag(num_samples: int) -> str:
    """10000 -> '10k', 50000 -> '50k', 2500 -> '2.5k', 500 -> '500' (metric names carry it)."""
    if num_samples >= 1000 and num_samples % 100 == 0:
        return f"{num_samples / 1000:g}k"
    return str(num_samples)


def metric_direction(metric: str) -> str:
    """'min' or 'max': which way ``metric`` is better (``specs.METRICS``; an unknown metric is a
    ``MetricsError`` naming the known ones)."""
    return metric_spec(metric).direction


def metric_count_key(metric: str) -> str:
    """The ``metrics.jsonl`` column that holds ``metric``'s sample count (``specs.METRICS``)."""
    return metric_spec(metric).count_key


def _head(outputs: Any, n: int) -> Any:
    """The first n rows of a provider's output (a tensor or a tuple of tensors)."""
    if isinstance(outputs, tuple):
        return tuple(o[:n] for o in outputs)
    return outputs[:n]


PADDING_SEED_OFFSET = 2**40  # latents that top up the last batch: seed s -> 2**40 + s


def generated_images(
    generator,
    *,
    num_samples: int,
    seed: int,
    sample_mode: str,
    batch_size: int,
    chunk_images: int = 256,
    shard: bool = True,
) -> Iterator[tuple[int, Tensor]]:
    """(offset, uint8 images [B, 3, 32, 32]) of the ``num_samples`` evaluation images of ``seed``:
    what every evaluation scores and ``evaluate.py samples`` writes.

    Latents come from their own seeded ``torch.Generator`` (the same z for every call). Every
    image comes from a full batch of ``batch_size`` (batch statistics as in training): the last
    batch is topped up with extra latents from a second stream and cut off. The global RNG (MN's
    k-means++ draws in batch mode) is forked and seeded per generator batch, so the images do
    not depend on ``chunk_images`` (how many are handed out at once) or on the rank count.
    ``shard``: under torchrun each rank yields its share of the chunks."""
    device = next(generator.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    z_all = torch.randn(num_samples, generator.z_dim, generator=gen)  # [num_samples, z_dim]
    num_batches = math.ceil(num_samples / batch_size)
    extra = num_batches * batch_size - num_samples
    if extra:  # a stream no evaluation seed uses for its own latents
        gen = torch.Generator().manual_seed(PADDING_SEED_OFFSET + seed)
        z_all = torch.cat([z_all, torch.randn(extra, generator.z_dim, generator=gen)])
    batches_per_chunk = max(1, chunk_images // batch_size)
    chunk_size = batches_per_chunk * batch_size
    num_chunks = math.ceil(z_all.shape[0] / chunk_size)
    rank, world = rank_and_world_size() if shard else (0, 1)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for c in range(rank, num_chunks, world):
            parts = []
            for b in range(c * batches_per_chunk, min((c + 1) * batches_per_chunk, num_batches)):
                torch.manual_seed(seed * 1_000_003 + b)
                z = z_all[b * batch_size : (b + 1) * batch_size].to(device)  # [batch_size, z_dim]
                parts.append(generator.sample(z, mode=sample_mode, batch_size=batch_size))
            images = torch.cat(parts)  # [<= chunk_size, 3, 32, 32]
            keep = min(images.shape[0], num_samples - c * chunk_size)
            yield c * chunk_size, quantize_images(images[:keep])


class Evaluator:
    """Scores generators (or images) with a list of metric families in one pass.

    ``Evaluator(extractor, reference, num_samples=...)`` is the Inception family alone (FID, KID,
    PRDC); ``families=[...]`` adds others (or, without an extractor, stands alone).

    ``evaluator(generator, sample_mode="batch", batch_size=64)`` draws as many latents as the
    hungriest family scores from its own seeded ``torch.Generator`` (the same z for every call,
    every run and every rank count), generates in chunks of whole ``batch_size`` batches with the
    global RNG forked and seeded per generator batch (MN's k-means++ draws), quantizes to uint8 as a PNG
    would, and feeds each family its first ``num_samples`` images. Under torchrun the chunks are
    split across ranks and the families gather: call it on every rank (with the unwrapped
    generator, not the DDP wrapper); every rank gets the same result.
    """

    def __init__(
        self,
        extractor: Optional[FeatureExtractor] = None,
        reference: Optional[ReferenceStats] = None,
        *,
        families: Sequence[Any] = (),
        seed: int = 0,
        progress: bool = False,
        **inception_options: Any,
    ) -> None:
        """``inception_options`` are ``InceptionMetrics``' own keywords (``num_samples``,
        ``prdc_k``, ``kid_subsets``, ...), for the Inception family the shorthand builds."""
        self.families: list[Any] = []
        if extractor is not None or reference is not None:
            if extractor is None or reference is None:
                raise ValueError("the Inception metrics need both an extractor and a reference")
            self.families.append(
                InceptionMetrics(extractor, reference, seed=seed, **inception_options)
            )
        elif inception_options:
            raise ValueError(
                f"{sorted(inception_options)}: options of the Inception metrics, "
                f"given without an extractor and a reference"
            )
        self.families.extend(families)
        if not self.families:
            raise ValueError("an evaluator needs at least one metric family")
        self.num_samples = max(f.num_samples for f in self.families)
        self.seed = seed
        self.progress = progress

    # --- what it measures ---

    @property
    def inception(self) -> Optional[InceptionMetrics]:
        return next((f for f in self.families if isinstance(f, InceptionMetrics)), None)

    @property
    def ref_key(self) -> Optional[str]:
        return self.inception.reference.key if self.inception else None

    @property
    def dims(self) -> Optional[int]:
        return self.inception.dims if self.inception else None

    @property
    def primary_metric(self) -> str:
        """The metric that picks a run's best snapshot: FID, else the mode classifier's cfd."""
        return primary_metric(self.directions)

    @property
    def directions(self) -> dict:
        return {k: v for f in self.families for k, v in f.directions.items()}

    def metric_names(self, result: dict) -> dict:
        """{result key: name with the sample count}, e.g. {'fid': 'fid_10k', 'modes': 'modes_26k',
        'fid_ema': 'fid_10k_ema'} (the averaged generator's columns keep their suffix last)."""
        names = {}
        for f in self.families:
            count = result.get(f.count_key)
            if count is None:
                continue
            keys = [*f.directions, *(("kid_std",) if f.count_key == "num_samples" else ())]
            for key in keys:
                for column, suffix in ((key, ""), (f"{key}{EMA_SUFFIX}", EMA_SUFFIX)):
                    if column in result:
                        names[column] = f"{key}_{sample_count_tag(int(count))}{suffix}"
        return names

    def with_seed(self, seed: int) -> "Evaluator":
        """The same evaluator (shared networks and references) scoring from evaluation seed
        ``seed``: other latents, other MN k-means draws, other KID subsets."""
        import copy

        other = copy.copy(self)
        other.seed = seed
        other.families = []
        for f in self.families:
            f = copy.copy(f)
            if hasattr(f, "seed"):
                f.seed = seed
            other.families.append(f)
        return other

    # --- generators ---

    def latents(self, z_dim: int) -> Tensor:
        """The fixed evaluation latents [num_samples, z_dim] (CPU; the same for every call)."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.num_samples, z_dim, generator=gen)

    def _chunk_images(self) -> int:
        return max(getattr(f, "batch_size", 256) for f in self.families)

    def _generated_batches(
        self, generator, sample_mode: str, batch_size: int
    ) -> Iterator[tuple[int, Tensor]]:
        yield from generated_images(
            generator,
            num_samples=self.num_samples,
            seed=self.seed,
            sample_mode=sample_mode,
            batch_size=batch_size,
            chunk_images=self._chunk_images(),
        )

    # --- the pass ---

    def _run(self, batches: Iterable[tuple[int, Tensor]], *, capped: bool, bar) -> dict:
        """Feed (offset, uint8 images) to every family; ``capped``: each sees only its first
        ``num_samples`` images. Returns the merged results."""
        for f in self.families:
            f.reset()
        seen = 0
        for offset, images in batches:
            want = {}  # family -> how many of these images it scores
            for f in self.families:
                n = images.shape[0] if not capped else min(images.shape[0], f.num_samples - offset)
                if n > 0:
                    want[f] = n
            outputs = {}  # provider name -> outputs for the longest prefix any family wants
            for f, n in want.items():
                if n > outputs.get(f.needs, (0, None))[0]:
                    outputs[f.needs] = (n, f.provider)
            outputs = {name: provider(images[:n]) for name, (n, provider) in outputs.items()}
            for f, n in want.items():
                f.update(offset, _head(outputs[f.needs], n))
            seen += images.shape[0]
            bar.update(images.shape[0] * rank_and_world_size()[1])
        if rank_and_world_size()[1] > 1:
            for f in self.families:
                f.gather()
        elif seen == 0:
            raise MetricsError("no images to compute features of")
        result: dict[str, Any] = {}
        for f in self.families:
            result.update(f.result())
        return result

    def __call__(self, generator, *, sample_mode: str, batch_size: int) -> dict:
        from tqdm import tqdm

        if batch_size < 1:
            raise MetricsError(f"--batch-size {batch_size}: must be >= 1")
        t0 = time.perf_counter()
        bar = tqdm(
            total=self.num_samples,
            desc=f"generate+features ({sample_mode})",
            unit="img",
            disable=not self.progress or rank_and_world_size()[0] != 0,
            file=sys.stderr,
            leave=False,
        )
        with bar:
            result = self._run(
                self._generated_batches(generator, sample_mode, batch_size), capped=True, bar=bar
            )
        result.update(
            sample_mode=sample_mode,
            batch_size=batch_size,
            seed=self.seed,
            eval_seconds=round(time.perf_counter() - t0, 3),
        )
        return result

    # --- images ---

    def score_images(self, batches: Iterable[Tensor], total: Optional[int] = None) -> dict:
        """Score every image of uint8 batches [B, 3, H, W] (e.g. an image folder)."""
        from tqdm import tqdm

        def with_offsets() -> Iterator[tuple[int, Tensor]]:
            offset = 0
            for images in batches:
                yield offset, images
                offset += images.shape[0]

        t0 = time.perf_counter()
        bar = tqdm(
            total=total,
            desc="images",
            unit="img",
            disable=not self.progress,
            file=sys.stderr,
            leave=False,
        )
        with bar:
            result = self._run(with_offsets(), capped=False, bar=bar)
        result["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return result


def build_evaluator(
    cfg,
    device: Union[str, torch.device],
    *,
    feature_extractor: Optional[FeatureExtractor] = None,
    mode_classifier=None,
    cache_dir: Union[str, Path, None] = None,
    seed: int = 0,
    progress: bool = False,
    require_inception: bool = False,
) -> Evaluator:
    """The periodic evaluator for a ``TrainConfig``.

    * Inception metrics: ``cfg.fid_samples`` samples against ``cfg.ref`` (statistics cached under
      ``cache_dir``, default ``default_cache_dir()``) with pytorch-fid's Inception at ``cfg.dims``
      (``cfg.inception_weights`` or the hub cache). On a stacked-digit dataset they are an extra:
      where the weights cannot be had they are left out without a word (mode metrics are the
      dataset's own; the run's config records what it evaluated), unless the weights were named
      (``cfg.inception_weights``) or FID was asked for (``require_inception``: the user's
      ``--inception-metrics``, or a resumed run that scored FID), which stop with the reason.
    * Mode metrics, on a stacked-digit dataset: ``cfg.mode_samples`` samples through the
      dataset's mode classifier (trained and cached on first use).

    Under torchrun rank 0 computes (or loads) the cached parts first; the other ranks then read
    them from the cache.
    """
    from ..digits import STACKED_SOURCES

    stacked = cfg.dataset in STACKED_SOURCES
    rank, world = rank_and_world_size()
    if world > 1 and rank != 0:
        barrier()  # rank 0 fills the caches first; the others then read them

    families: list[Any] = []
    extractor = feature_extractor
    if extractor is None and not getattr(cfg, "inception_metrics", True):
        pass  # --no-inception-metrics: mode metrics only, whatever weights this machine has
    elif extractor is None:
        from ..features import InceptionFeatureExtractor, InceptionWeightsError

        try:
            extractor = InceptionFeatureExtractor(
                cfg.dims,
                cfg.inception_weights,
                device=device,
                progress=progress,
                fid_protocol=cfg.fid_protocol,
            )
        except InceptionWeightsError:
            if not stacked or cfg.inception_weights or require_inception:
                raise
            extractor = None
    if extractor is not None:
        reference = load_reference(
            cfg.ref,
            extractor,
            data_root=cfg.data_root,
            cache_dir=cache_dir,
            progress=progress and rank == 0,
        )
        families.append(
            InceptionMetrics(extractor, reference, num_samples=cfg.fid_samples, seed=seed)
        )
    if stacked:
        from .classifier import load_mode_classifier
        from .modes import ModeMetrics

        classifier = mode_classifier or load_mode_classifier(
            cfg.dataset,
            data_root=cfg.data_root,
            cache_dir=cache_dir,
            device=device,
            progress=progress and rank == 0,
        )
        families.append(ModeMetrics(classifier, num_samples=cfg.mode_samples))

    if world > 1 and rank == 0:
        barrier()
    return Evaluator(families=families, seed=seed, progress=progress)
