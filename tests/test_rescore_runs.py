"""rescore_runs: one evaluator per evaluation setup across runs, and each warning once."""

import dataclasses
import warnings


from conftest import write_run
from dcgan_mn import metrics as M
from dcgan_mn import rescore as RS
from dcgan_mn.config import TrainConfig
from dcgan_mn.runfolder import RunFolder


class FakeEvaluator:
    directions = {"modes": "max", "kl_modes": "min", "cfd": "min"}

    def __init__(self, seed=0):
        self.seed = seed

    def with_seed(self, seed):
        return FakeEvaluator(seed)

    def __call__(self, generator, *, sample_mode, batch_size):
        return {
            "cfd": 10.0 + self.seed,
            "mode_samples": 100,
            "seed": self.seed,
            "sample_mode": sample_mode,
        }


def make_run(root, name, seed):
    cfg = dataclasses.asdict(TrainConfig(dataset="stacked-digits", seed=seed, mode_samples=100))
    rows = [
        {
            "iteration": it,
            "cfd": 5.0,
            "mode_samples": 100,
            "sample_mode": cfg["sample_mode"],
            "seed": 0,
        }
        for it in (2, 4)
    ]
    folder = RunFolder(write_run(root, name, rows, cfg))
    folder.snapshots_dir.mkdir()
    for it in (2, 4):
        folder.snapshot_file(it).write_bytes(b"")
    return folder.path


def test_one_evaluator_and_one_warning_for_many_runs(tmp_path, monkeypatch, capfd):
    built = []

    def build(cfg, device, **kw):
        built.append(cfg.seed)
        warnings.warn("Inception weights are not pytorch-fid's FID weights", UserWarning)
        return FakeEvaluator()

    monkeypatch.setattr(M, "build_evaluator", build)
    monkeypatch.setattr(RS, "load_generators", lambda path, device: (object(), None, None, None))
    runs = [make_run(tmp_path, f"r{i}", seed=i) for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as under pytest: every warning would show
        assert RS.rescore_runs(runs, "cfd", 2) == 3 * 2  # seed 1 at iterations 2 and 4, per run
    assert built == [0]  # the runs share one evaluation setup: one evaluator
    assert len([w for w in caught if "Inception weights" in str(w.message)]) == 1
    rows = RS.seed_rows(runs[2])
    assert sorted((r["iteration"], r["seed"], r["cfd"]) for r in rows) == [
        (2, 1, 11.0),
        (4, 1, 11.0),
    ]
