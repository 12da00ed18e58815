"""Checkpoint and resume: a SIGKILL mid-epoch loses at most the current epoch, from disk or from S3."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from minio import Minio
from minio.error import S3Error

from components.storage.testing import MotoS3
from components.train.checkpoints import CheckpointStore
from components.train.trainer import TrainConfig, train_detector

EPOCHS = 3
RECIPE = {"epochs": EPOCHS, "batch_size": 8, "img_size": 96, "eval_every": 100, "sampler": "recency_bias",
          "sampler_warmup_epochs": 1}

SCRIPT = """
import sys
from pathlib import Path
from components.train.trainer import TrainConfig, train_detector
recipe = {recipe!r}
train_detector(Path(sys.argv[1]), Path(sys.argv[2]), TrainConfig(**recipe), track=False, progress=True,
               run_key=sys.argv[3])
"""


def _checkpoint_epoch(client: Minio, bucket: str, key: str, scratch: Path) -> int:
    try:
        client.fget_object(bucket, key, str(scratch))
    except S3Error:
        return 0
    return int(torch.load(scratch, weights_only=True)["epoch"])


def test_sigkill_mid_epoch_then_rerun_resumes_from_the_s3_checkpoint(
        tiny_dataset: Path, tmp_path: Path, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, run_key = "resume-test", "kill-resume-1"
    env = {**os.environ, **moto_s3.environ(bucket), "MODELCOMMONS_HOME": str(tmp_path / "home")}
    for key, value in env.items():
        if key.startswith("MODELCOMMONS_"):
            monkeypatch.setenv(key, value)
    client = Minio(moto_s3.endpoint, access_key=moto_s3.access_key, secret_key=moto_s3.secret_key, secure=False)
    key = f"checkpoints/{run_key}/checkpoint.pt"

    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(recipe=RECIPE), str(tiny_dataset),
                             str(tmp_path / "first"), run_key], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        done = 0
        while done < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            done = _checkpoint_epoch(client, bucket, key, tmp_path / "peek.pt")
        assert proc.poll() is None, "training ended before it could be killed"
        assert done >= 1, "no checkpoint appeared in S3"
        proc.send_signal(signal.SIGKILL)  # mid-epoch 2: epoch 1's checkpoint is in S3
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _checkpoint_epoch(client, bucket, key, tmp_path / "peek.pt")
    assert 1 <= at_kill < EPOCHS

    # The rerun uses a fresh output directory: it must find the checkpoint through the run key in S3.
    resumed = train_detector(tiny_dataset, tmp_path / "second", TrainConfig(**RECIPE), track=False,  # type: ignore[arg-type]
                             progress=False, run_key=run_key)
    assert resumed.resumed_from_epoch == at_kill  # only the epoch in progress was lost
    assert [row["epoch"] for row in resumed.history] == [float(e) for e in range(1, EPOCHS + 1)]
    assert (resumed.model_dir / "config.json").is_file() and (resumed.model_dir / "model.safetensors").is_file()
    assert _checkpoint_epoch(client, bucket, key, tmp_path / "peek.pt") == EPOCHS

    # Resuming replays exactly what an uninterrupted run does (RNG, sampler histories, optimiser restored).
    straight = train_detector(tiny_dataset, tmp_path / "straight", TrainConfig(**RECIPE), track=False,  # type: ignore[arg-type]
                              progress=False)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history], rel=1e-5)


def test_local_run_key_keeps_checkpoints_under_modelcommons_home(tmp_path: Path, mc_home: Path) -> None:
    store = CheckpointStore(tmp_path / "out", run_key="my-run")
    assert store.local == mc_home / "checkpoints" / "my-run" / "checkpoint.pt"
    assert store.load() is None
    store.save({"epoch": 3})
    assert CheckpointStore(tmp_path / "elsewhere", run_key="my-run").load() == {"epoch": 3}
    with pytest.raises(ValueError, match=re.escape("run_key='../x' is invalid")):
        CheckpointStore(tmp_path, run_key="../x")
