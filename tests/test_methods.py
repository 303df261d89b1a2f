"""Score methods are pluggable (pruner.scores.methods): a method is one module declaring its columns, what the passes
must form for it and how it combines the per-checkpoint components; a plug-in named in ``scores.plugins`` is
registered on the driver and on every Ray actor when the config is validated."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import small_job_config
from pruner.config import ConfigError, load_config
from pruner.io.layout import JobLayout
from pruner.scores.combine import combine, score_columns
from pruner.scores.methods import BUILTIN, METHODS, ScoreMethod, register, unregister


@pytest.fixture
def toy_registered():
    yield
    if "toy" in METHODS:
        unregister("toy")


def test_builtins_keep_the_column_order():
    """The score tables' column order is the registration order of the built-ins (as before the split)."""
    assert list(METHODS)[:len(BUILTIN)] == list(BUILTIN)
    comps = [{"loss": np.ones(2), "clip_score": np.ones(2), "sq_norm": np.ones(2), "l1_feat": np.ones(2),
              "tracin_target": np.ones(2), "tracin_pred": np.ones(2), "t1_target": np.ones(2), "t2_target": np.ones(2)}]
    cols = [c for c in combine(comps, [1.0], [-1.0], ["a", "b"]) if not c.startswith("c0_")]
    assert cols == ["diffin_target", "tracin_target", "tracin_pred", "tracin_self", "oga_l2", "oga_l1",
                    "baseline_loss", "baseline_clip_score", "baseline_random"]


def test_register_refuses_a_taken_name_or_column_or_no_combine(toy_registered):
    from toy_method import ToyMargin
    with pytest.raises(ValueError, match="already registered"):
        register(ToyMargin("tracin", ("other",)))
    with pytest.raises(ValueError, match="already belong"):
        register(ToyMargin("toy", ("oga_l2",)))
    with pytest.raises(ValueError, match="defines no combine"):  # refused at config time, not on the actors
        register(ScoreMethod("toy", ("toy_margin",)))
    assert "toy" not in METHODS
    with pytest.raises(ValueError, match="built-in"):
        unregister("oga")


def test_unknown_method_or_plugin_is_a_config_error(tmp_path, micro_trajectory):
    cfg = small_job_config(tmp_path, micro_trajectory)
    cfg["scores"]["methods"] = ["baselines", "toy"]
    with pytest.raises(ConfigError, match=r"unknown score method\(s\) \['toy'\]"):
        load_config(data=cfg)
    cfg["scores"]["plugins"] = ["tests.no_such_module"]
    with pytest.raises(ConfigError, match="plug-in 'tests.no_such_module'.*fix: a module importable"):
        load_config(data=cfg)


def test_a_toy_method_in_one_module_runs_in_a_real_job(tmp_path, micro_trajectory, toy_registered):
    """tests/toy_method.py, named in scores.plugins, ranks a real prune job (local Ray, 2 actors): its column is in
    every score table and the ranking, equals its definition, and the keep set is its top half."""
    from pruner.jobs.prune import run
    cfg = small_job_config(tmp_path, micro_trajectory)
    cfg["scores"]["plugins"] = ["tests.toy_method"]
    cfg["scores"]["methods"] = ["baselines", "toy"]
    cfg["select"] = {"score": "toy_margin", "keep_fraction": 0.5}
    job = load_config(data=cfg)
    assert score_columns(job.scores.methods, job.scores.diffin.targets, True)[-1] == "toy_margin"
    status, summary = run(job)
    assert status == 0
    ranking = pq.read_table(JobLayout(tmp_path / "jobs" / summary["job"]).ranking).to_pandas()
    np.testing.assert_array_equal(ranking["toy_margin"], ranking["baseline_clip_score"] + ranking["baseline_loss"])
    kept = ranking[ranking["kept"]]
    assert len(kept) == len(ranking) // 2 and kept["toy_margin"].min() >= ranking[~ranking["kept"]]["toy_margin"].max()
    assert summary["score"] == "toy_margin"


def test_retarget_refuses_a_plugin_scoring_against_the_target(tmp_path, micro_trajectory, monkeypatch):
    """A re-target recomputes only the built-in target-set columns, so a job with a plug-in method that scores
    against the target set is refused, naming the method and the fix, before any pass (its columns would be stale)."""
    from pruner.rescore import retarget
    (tmp_path / "toy_target_method.py").write_text(
        "from pruner.scores.methods import ScoreMethod\n"
        "class ToyTarget(ScoreMethod):\n"
        "    def combine(self, per_ckpt, weights, uids, seed):\n"
        "        return {}\n"
        "METHOD = ToyTarget('toy_t', ('toy_t_target',), target_set_columns=('toy_t_target',))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small_job_config(tmp_path, micro_trajectory)
    cfg["scores"]["plugins"] = ["toy_target_method"]
    cfg["scores"]["methods"] = ["baselines", "toy_t"]
    cfg["select"] = {"score": "baseline_clip_score", "keep_fraction": 0.5}
    try:
        layout = JobLayout(tmp_path / "job")
        layout.root.mkdir()
        layout.config.write_bytes(load_config(data=cfg).to_yaml())
        with pytest.raises(ValueError, match=r"plug-in method\(s\) \['toy_t'\] score against the target set.*fix: "
                                             r"re-run the job"):
            retarget(layout.root, [str(tmp_path / "nowhere")])
        assert sorted(p.name for p in layout.root.iterdir()) == ["config.yaml"]  # nothing written
    finally:
        if "toy_t" in METHODS:
            unregister("toy_t")
