"""Ray Train (TorchTrainer, DDP) with 2 CPU workers: same outputs as single-process training.

Runs in a subprocess with its own local Ray, so it never collides with the serving tests' session Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.train.distributed import check_resources
from components.train.trainer import TrainConfigError

SCRIPT = """
import json, sys
from pathlib import Path
from components.train.trainer import TrainConfig, TrainConfigError
from components.train.distributed import available_resources, train_detector_distributed
config = TrainConfig(epochs=2, batch_size=16, img_size=96, eval_every=1, sampler="recency_bias",
                     sampler_warmup_epochs=1)
cpus = available_resources()["CPU"]
try:
    train_detector_distributed(Path(sys.argv[1]), Path(sys.argv[2]), config, num_workers=int(cpus) + 1, track=False)
    too_many = "no error"
except TrainConfigError as exc:
    too_many = str(exc)
result = train_detector_distributed(Path(sys.argv[1]), Path(sys.argv[2]), config, num_workers=2, track=False)
print("RESULT" + json.dumps({"cpus": cpus, "too_many": too_many, "history": result.history,
                             "metrics": result.metrics, "model_dir": str(result.model_dir)}))
"""


def test_two_cpu_workers_train_and_write_the_standard_model_dir(tiny_dataset: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MODELCOMMONS_HOME": str(tmp_path / "home"), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_dataset), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT"):])
    assert "num_workers=3 is larger than the available resources" in out["too_many"] or out["cpus"] != 2
    assert "Ray cluster has" in out["too_many"]
    assert [row["epoch"] for row in out["history"]] == [1.0, 2.0]
    assert all(row["loss"] > 0 for row in out["history"]) and out["history"][1]["loss"] < out["history"][0]["loss"]
    model_dir = Path(out["model_dir"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((model_dir / "config.json").read_text())["kind"] == "detector"
    assert 0.0 <= out["metrics"]["map50"] <= 1.0
    # the rank-0 checkpoint is in the same place single-process training uses: a rerun resumes
    assert (tmp_path / "out" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("workers, gpu, match", [
    (4, False, "num_workers=4 is larger than the available resources: 4 workers x 1 CPU = 4 CPUs"),
    (2, True, "num_workers=2 is larger than the available resources: use_gpu needs one GPU per worker"),
    (0, False, "num_workers=0 is invalid"),
])
def test_too_many_workers_is_a_clear_error(workers: int, gpu: bool, match: str) -> None:
    with pytest.raises(TrainConfigError, match=match):
        check_resources(workers, use_gpu=gpu, cpus_per_worker=1.0, resources={"CPU": 2.0, "GPU": 0.0})
