"""Sweeps: search-space validation and TPE through Ray Tune + Optuna (the pipeline: pipelines/tests/test_sweep.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.train.sweep import SearchSpaceError, load_search_space, parse_search_space

BASE = {"epochs": 1, "batch_size": 16, "img_size": 96}


def test_grid_is_the_full_product_with_fixed_values() -> None:
    space = load_search_space("""
method: grid
metric: map50
parameters:
  sampler: {values: [uniform, recency_bias]}
  lr: {values: [0.001, 0.003, 0.01]}
  epochs: 2
""")
    trials = space.trial_params()
    assert len(trials) == 6
    assert {(t["sampler"], t["lr"]) for t in trials} == {(s, lr) for s in ("uniform", "recency_bias")
                                                         for lr in (0.001, 0.003, 0.01)}
    assert all(t["epochs"] == 2 for t in trials)
    assert space.direction == "maximize"


def test_random_draws_are_seeded_and_inside_the_bounds(tmp_path: Path) -> None:
    text = json.dumps({"method": "random", "metric": "loss", "trials": 5, "seed": 7, "parameters": {
        "lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2},
        "batch_size": {"distribution": "int_uniform", "low": 8, "high": 16},
        "sampler_s_e0": {"distribution": "uniform", "low": 2, "high": 50}}})
    path = tmp_path / "space.json"
    path.write_text(text)
    a, b = load_search_space(path).trial_params(), load_search_space(text).trial_params()
    assert a == b and len(a) == 5
    assert all(1e-4 <= t["lr"] <= 1e-2 and 8 <= t["batch_size"] <= 16 and isinstance(t["batch_size"], int)
               for t in a)
    assert load_search_space(path).direction == "minimize"  # loss defaults to minimize


@pytest.mark.parametrize("space, match", [
    ({"parameters": {"learning_rate": {"values": [0.1]}}}, "unknown parameter 'learning_rate'; allowed: preset"),
    ({"parameters": {"lr": {"values": []}}}, r"parameters.lr: 'values' must be a non-empty list"),
    ({"parameters": {"epochs": 3}}, "no searched parameter"),
    ({"method": "random", "parameters": {"lr": {"distribution": "gaussian", "low": 0, "high": 1}}},
     "distribution 'gaussian' is invalid; allowed: uniform, loguniform, int_uniform, choice"),
    ({"method": "random", "parameters": {"lr": {"distribution": "loguniform", "low": 0, "high": 1}}},
     "loguniform needs low > 0"),
    ({"method": "random", "parameters": {"lr": {"distribution": "uniform", "low": 1, "high": 0.1}}},
     "low=1 must be smaller than high=0.1"),
    ({"method": "grid", "parameters": {"lr": {"distribution": "uniform", "low": 0.1, "high": 0.2}}},
     "a grid needs 'values' lists"),
    ({"method": "bayes", "parameters": {"lr": {"values": [0.1]}}}, "method='bayes' is invalid"),
    ({"metric": "accuracy", "parameters": {"lr": {"values": [0.1]}}}, "metric='accuracy' is invalid"),
    ({"parameters": {"sampler": {"values": ["uniform", "focal"]}}}, "unknown sampler 'focal'"),
    ({"parameters": {"sampler_q": {"values": [0, 5]}}}, "sampler_q=0 is invalid"),
])
def test_invalid_search_space_is_a_clear_error(space: dict[str, object], match: str) -> None:
    with pytest.raises(SearchSpaceError, match=match):
        parse_search_space(space)


def test_not_yaml_or_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match="not valid YAML/JSON"):
        load_search_space("method: [grid")
    with pytest.raises(SearchSpaceError, match=r"space\.yaml' does not exist"):
        load_search_space(str(tmp_path / "space.yaml"))


TPE_SCRIPT = """
import json, sys
from pathlib import Path
from components.train.sweep import load_search_space, run_tpe, select_best, start_sweep
space = load_search_space(sys.argv[2])
parent = start_sweep(space)
finished = run_tpe(Path(sys.argv[1]), Path(sys.argv[3]), space, parent_run_id=parent)
best = select_best(parent, space)
print("RESULT" + json.dumps({"finished": finished, "trials": best.trials, "lr": best.params.get("lr"),
                             "value": best.value}))
"""


def test_tpe_runs_trials_through_ray_tune_with_optuna(tiny_dataset: Path, tmp_path: Path) -> None:
    space = tmp_path / "tpe.yaml"
    space.write_text(json.dumps({"method": "tpe", "metric": "loss", "trials": 2, "seed": 1, "parameters": {
        **BASE, "lr": {"distribution": "loguniform", "low": 1e-3, "high": 1e-2}}}))
    env = {**os.environ, "MODELCOMMONS_HOME": str(tmp_path / "home"), "RAY_ADDRESS": ""}
    for var in ("MLFLOW_TRACKING_URI", "MODELCOMMONS_TRACKING_URI", "MODELCOMMONS_S3_ENDPOINT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", TPE_SCRIPT, str(tiny_dataset), str(space), str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT"):])
    assert out["finished"] == 2 and out["trials"] == 2
    assert 1e-3 <= out["lr"] <= 1e-2 and out["value"] > 0
