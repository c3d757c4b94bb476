"""One metric vocabulary: metrics.specs.METRICS is what directions, count keys and the collapse
flag read."""

import dataclasses

import pytest

from dcgan_mn import compare as C
from dcgan_mn import metrics as M
from dcgan_mn.metrics import inception, modes
from dcgan_mn.metrics.specs import METRICS, MetricSpec, metric_spec


def test_registry_is_the_one_source():
    base = {
        "fid",
        "kid",
        "precision",
        "recall",
        "density",
        "coverage",
        "inception_score",
        "modes",
        "kl_modes",
        "cfd",
    }
    # every metric again for G_ema (--g-ema)
    assert set(METRICS) == base | {f"{m}_ema" for m in base}
    assert {m for m, s in METRICS.items() if not s.averaged} == base
    spec = metric_spec("kl_modes")
    assert (spec.direction, spec.count_key, spec.can_collapse) == ("min", "mode_samples", False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.direction = "max"
    # The families' DIRECTIONS, the public helpers and compare's collapse list all read it.
    assert inception.DIRECTIONS == {
        m: s.direction
        for m, s in METRICS.items()
        if s.count_key == "num_samples" and not s.averaged
    }
    assert modes.DIRECTIONS == {"modes": "max", "kl_modes": "min", "cfd": "min"}
    for name, s in METRICS.items():
        assert M.metric_direction(name) == s.direction and M.metric_count_key(name) == s.count_key
    assert set(C.COLLAPSE_METRICS) == {m for m, s in METRICS.items() if s.can_collapse}
    assert M.metric_spec is metric_spec and M.MetricSpec is MetricSpec


def test_unknown_metric_names_the_known_ones(tmp_path):
    with pytest.raises(
        M.MetricsError, match=r"unknown metric 'fdi': known metrics are fid, kid, .*cfd"
    ):
        metric_spec("fdi")
    with pytest.raises(M.MetricsError, match="unknown metric"):
        M.metric_direction("fdi")  # once "min" by default: a typo compared the wrong way silently
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"iteration": 1, "fdi": 3.0}\n')
    with pytest.raises(C.CompareError, match="--metric 'fdi': unknown metric"):
        C.read_run(tmp_path / "r", metric="fdi")
    with pytest.raises(ValueError, match="direction"):
        MetricSpec("x", "up", "num_samples", False, "")


@pytest.mark.parametrize("name", list(METRICS))
def test_plain_name_is_gs_metric_of_the_same_measure(name):
    spec = metric_spec(name)
    plain = metric_spec(spec.plain_name)  # a registered metric of G
    assert not plain.averaged
    assert (plain.direction, plain.count_key) == (spec.direction, spec.count_key)
    assert spec.name == plain.name + ("_ema" if spec.averaged else "")
