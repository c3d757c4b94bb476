"""Each vocabulary (the names a flag accepts) is spelled out in exactly one module; config, the
CLIs and their help texts read it from there (docs/design.md, "Vocabularies").

A second spelling is a tuple, list or set literal holding every one of the vocabulary's names,
anywhere in the package or the CLIs (a ``click.Choice([...])`` included); literals naming a few
of them (``("modes", "kl_modes", "cfd")``, ``{"bn", "mn"}``) are choices among them, not copies.
The metrics' vocabulary is the ``MetricSpec`` registry (``dcgan_mn/metrics/specs.py``), which
defines one spec at a time and so has no such literal to find."""

import ast
from pathlib import Path

import pytest

from dcgan_mn.config import AMP_MODES, COMPILE_MODES, STACKED_GRIDS
from dcgan_mn.data import DATASETS
from dcgan_mn.digits import STACKED_SOURCES
from dcgan_mn.ema import EMA_STATS
from dcgan_mn.features import FEATURE_DIMS, FID_PROTOCOLS
from dcgan_mn.models import G_ARCHS, SAMPLE_MODES
from dcgan_mn.norms import ESTIMATORS, NORM_KINDS, POINTS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    [*(ROOT / "dcgan_mn").rglob("*.py"), ROOT / "train.py", ROOT / "evaluate.py", ROOT / "sweep.py"]
)

# vocabulary -> (its names, the one module that spells them out)
VOCABULARIES = {
    "datasets": (DATASETS, "dcgan_mn/data.py"),
    "stacked sources": (STACKED_SOURCES, "dcgan_mn/digits.py"),
    "feature dims": (FEATURE_DIMS, "dcgan_mn/features.py"),
    "FID protocols": (tuple(FID_PROTOCOLS), "dcgan_mn/features.py"),
    "norm kinds": (NORM_KINDS, "dcgan_mn/norms/__init__.py"),
    "estimators": (ESTIMATORS, "dcgan_mn/norms/estimators.py"),
    "points": (POINTS, "dcgan_mn/norms/mixture.py"),
    "sample modes": (SAMPLE_MODES, "dcgan_mn/models.py"),
    "generator architectures": (tuple(G_ARCHS), "dcgan_mn/models.py"),
    "G_ema statistics": (EMA_STATS, "dcgan_mn/ema.py"),
    "precisions": (AMP_MODES, "dcgan_mn/config.py"),
    "compile modes": (COMPILE_MODES, "dcgan_mn/config.py"),
    "stacked grids": (STACKED_GRIDS, "dcgan_mn/config.py"),
}


def _spellings(names) -> set[str]:
    """The files holding a tuple, list or set literal of constants that has all of ``names``."""
    names = set(names)
    found = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                values = {i.value for i in node.elts if isinstance(i, ast.Constant)}
                if names <= values:
                    found.add(path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("vocabulary", sorted(VOCABULARIES))
def test_each_vocabulary_is_spelled_out_in_one_module(vocabulary):
    names, owner = VOCABULARIES[vocabulary]
    assert len(names) >= 2
    found = _spellings(names)
    assert found <= {owner}, f"{vocabulary} spelled out outside {owner}: {sorted(found - {owner})}"
