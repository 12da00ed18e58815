"""The CLI as a user meets it: help, exit codes and messages on bad input, `ui` serving the MLflow UI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from components.storage.testing import free_port
from pipelines.cli import main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("pipeline", "data", "serve", "demo", "ui", "bench"):
        assert command in out


@pytest.mark.parametrize("argv, message", [
    (["pipeline", "run", "detector-train", "--param", "source=/x", "--param", "epochs=many"],
     "parameter epochs='many': expected int"),
    (["pipeline", "run", "nope"], "unknown pipeline 'nope'"),
    (["data", "intake", "/definitely/missing", "/tmp/out-never"], "/definitely/missing"),
    (["data", "shapes", "/tmp/never", "--classes", "circle,hexagon"], "hexagon"),
    (["serve", "--model-uri", "/no/such/model", "--print-config", "--port", "8000"], None),
])
def test_bad_input_exits_2_naming_the_problem(argv: list[str], message: str | None, mc_home: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(argv)
    if message is None:  # printing a config needs no model: it is resolved where it is deployed
        assert code == 0
        return
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_preset_choices_match_the_model_presets() -> None:
    from components.models.detector import PRESETS
    from pipelines.cli import DETECTOR_PRESETS

    assert tuple(sorted(PRESETS)) == DETECTOR_PRESETS


def test_argparse_rejects_out_of_range_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["data", "intake", "src", "out", "--val-fraction", "1.5"])
    assert exc.value.code == 2
    assert "1.5 must be between 0 and 1" in capsys.readouterr().err


def test_ui_serves_the_mlflow_ui_on_the_embedded_store(mc_home: Path) -> None:
    port = free_port()
    env = {**os.environ, "MODELCOMMONS_HOME": str(mc_home)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "MLflow UI did not come up within 240 s"
            time.sleep(0.5)
        experiments = httpx.post(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                 json={"max_results": 10}, timeout=10)
        assert experiments.status_code == 200, experiments.text
        assert (mc_home / "mlflow.db").is_file()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
