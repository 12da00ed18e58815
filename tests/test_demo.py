"""End to end: `modelcommons demo` as a user runs it (smaller data and fewer epochs, same code path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from components.storage.testing import free_port


def test_demo_trains_registers_serves_and_writes_outputs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    summary_path = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "MODELCOMMONS_", "RAY_ADDRESS", "AWS_"))}
    env["MODELCOMMONS_HOME"] = str(home)
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", "--images", "60", "--epochs", "3", "--port", str(port),
         "--summary", str(summary_path)],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert set(summary) >= {"dataset", "detector", "endpoint", "timings_s", "outputs"}
    assert len(summary["dataset"]["sha256"]) == 64 and summary["dataset"]["images"] == 60
    det = summary["detector"]
    assert det["model"] == "detector" and det["version"] == "1" and det["alias"] == "champion"
    assert len(det["run_id"]) == 32
    assert 0.0 <= det["metrics"]["map"] <= det["metrics"]["map50"] <= 1.0
    assert summary["endpoint"] == f"http://127.0.0.1:{port}"
    assert {"generate_data", "pipeline_detector_train", "serve_start", "sample_requests", "total"} <= set(
        summary["timings_s"])
    pngs = [Path(p) for p in summary["outputs"] if p.endswith(".png")]
    jsons = [Path(p) for p in summary["outputs"] if p.endswith(".json")]
    assert len(pngs) == len(jsons) == 4
    for png, js in zip(sorted(pngs), sorted(jsons), strict=True):
        body = json.loads(js.read_text())
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (body["width"], body["height"])
        assert body["model"] == "detector" and body["version"] == "1"
        for d in body["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= body["width"] and 0 <= y1 <= y2 <= body["height"]
    # The int8 sibling: registered by detector-train's quantize step, served beside the float version.
    q = summary["int8"]
    assert (q["model"], q["version"], q["float_version"], q["calibrator"], q["backend"]) == (
        "detector", "2", "1", "percentile", "x86")
    assert q["metrics"]["float_map50"] == det["metrics"]["map50"] or abs(
        q["metrics"]["float_map50"] - det["metrics"]["map50"]) < 1e-6
    assert all(0.0 <= v <= 1.0 for v in q["metrics"].values())
    assert len(q["outputs"]) == 4
    for js in q["outputs"]:
        body = json.loads(Path(js).read_text())
        assert (body["precision"], body["version"], body["calibrator"]) == ("int8", "2", "percentile")
    assert "int8      detector v2" in proc.stdout
    assert "modelcommons ui" in proc.stdout
    assert (home / "mlflow.db").is_file()


def test_demo_rejects_bad_arguments() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--epochs", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "argument --epochs: 0 must be >= 1" in proc.stderr
