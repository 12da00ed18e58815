"""`modelcommons deploy` and the KFP `deploy` component against a local HTTP stand-in of the Kubernetes API.

No real cluster can run on this machine (no API server, no KubeRay operator), so these tests point a
kubeconfig at ``components.deploy.testing.RayServiceStandIn``: a threaded HTTP server on 127.0.0.1
that implements GET and merge-PATCH of ``/apis/ray.io/v1/namespaces/{ns}/rayservices/{name}`` and plays
the operator's status updates. The kubernetes python client, the MLflow registry (a real sqlite
store with a registered detector) and the RayService (the checked-in ``k8s/examples`` manifest) are real.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.deploy.testing import RayServiceStandIn
from components.storage.testing import free_port
from pipelines.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "k8s" / "examples" / "rayservice-cpu.yaml"
FAST = ["--poll-interval", "0.05", "--timeout", "10"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A MODELCOMMONS_HOME whose sqlite registry holds detector version 1 as champion."""
    import mlflow

    from components.models.detector import build_detector, detector_config
    from components.models.weights import save_detector
    from components.tracking.model_logging import log_detector_model
    from components.tracking.registry import register_model
    from components.tracking.setup import configure_mlflow

    home = tmp_path_factory.mktemp("deploy") / "mchome"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELCOMMONS_HOME", str(home))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MODELCOMMONS_TRACKING_URI", "KUBECONFIG",
                    "KUBERNETES_SERVICE_HOST"):
            mp.delenv(var, raising=False)
        model_dir = save_detector(build_detector(detector_config("nano", num_classes=1, class_names=("a",))),
                                  home.parent / "model")
        configure_mlflow()
        with mlflow.start_run() as run:
            uri = log_detector_model(model_dir)
        registration = register_model(uri, name="detector", run_id=run.info.run_id, metric="map", value=0.4,
                                      tags={})
        assert (registration.version, registration.alias) == ("1", "champion")
        yield home
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def _rayservice() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text().split("\n", 2)[2]))


def _kubeconfig(api: RayServiceStandIn, tmp_path: Path) -> list[str]:
    return ["--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig"))]


def _patches(api: RayServiceStandIn) -> list[tuple[str, str]]:
    return [r for r in api.requests if r[0] == "PATCH"]


def test_deploy_patches_model_uri_waits_for_running_and_reports(registry: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from serving.app import ServeArgs, serve_config

    with RayServiceStandIn(_rayservice(), after_patch="running", polls_to_settle=3) as api:
        before = api.serve_config
        code = main(["deploy", "--model", "detector@champion", *_kubeconfig(api, tmp_path), *FAST])
        out, err = capsys.readouterr()
        assert code == 0, err
        # Only args.model_uri changed, pinned to the version the alias names: exactly what serve_config
        # gives for the same arguments with the new model.
        args = before["applications"][0]["args"]
        expected = serve_config(ServeArgs.model_validate({**args, "model_uri": "models:/detector/1",
                                                          **before["http_options"]}))
        assert api.serve_config == expected
        assert before["applications"][0]["args"]["model_uri"] == "models:/detector@champion"
        [(content_type, body)] = api.patches
        assert content_type == "application/merge-patch+json"
        assert body["metadata"] == {"resourceVersion": "1000"} and set(body["spec"]) == {"serveConfigV2"}
        assert api.obj["metadata"]["generation"] == 2
        gets_after_patch = api.requests[api.requests.index(_patches(api)[0]) + 1:]
        assert len(gets_after_patch) == 3  # waited through "not observed" and DEPLOYING to RUNNING
        assert ("deployed models:/detector/1 (detector@champion: version 1) to RayService modelcommons/modelcommons, "
                "application modelcommons: application 'modelcommons' is RUNNING") in out
        assert "(was models:/detector@champion)" in out
        assert "pending: application 'modelcommons' is DEPLOYING" in err

        # The same model again: nothing to patch, the command checks that it runs and says so.
        assert main(["deploy", "--model", "models:/detector/1", *_kubeconfig(api, tmp_path), *FAST, "--json"]) == 0
        assert len(api.patches) == 1
        assert '"changed": false' in capsys.readouterr().out


@pytest.mark.parametrize("model, message", [
    ("detector@nobody", "model 'detector@nobody' is not in the registry"),
    ("ghost@champion", "model 'ghost@champion' is not in the registry"),
    ("detector/7", "model 'detector/7' is not in the registry"),
    ("detector", "expected a registered model as NAME@ALIAS"),
])
def test_unknown_model_or_alias_fails_before_touching_the_cluster(
        model: str, message: str, registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with RayServiceStandIn(_rayservice()) as api:
        before = api.obj
        assert main(["deploy", "--model", model, *_kubeconfig(api, tmp_path), *FAST]) == 2
        assert message in capsys.readouterr().err
        assert api.requests == [] and api.obj == before


def test_unreachable_api_server_fails_clearly(registry: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    with RayServiceStandIn(_rayservice()) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", server=f"http://127.0.0.1:{port}")
        assert main(["deploy", "--model", "detector@champion", "--kubeconfig", str(kubeconfig), *FAST]) == 1
        assert api.requests == []
    err = capsys.readouterr().err
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in err
    assert "Connection refused" in err or "Failed to establish a new connection" in err


def test_timeout_names_the_last_state_and_how_to_roll_back(registry: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with RayServiceStandIn(_rayservice(), after_patch="never") as api:
        argv = ["deploy", "--model", "detector@champion", *_kubeconfig(api, tmp_path), "--poll-interval", "0.1",
                "--timeout", "1"]
        assert main(argv) == 1
        assert len(api.patches) == 1
    err = capsys.readouterr().err
    assert "RayService modelcommons/modelcommons: models:/detector/1 not running after 1 s" in err
    assert "last state: application 'modelcommons' is DEPLOYING" in err
    assert "to go back, run: modelcommons deploy --model models:/detector@champion" in err


def test_deploy_failed_state_fails_at_once(registry: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with RayServiceStandIn(_rayservice(), after_patch="failed") as api:
        assert main(["deploy", "--model", "detector@champion", *_kubeconfig(api, tmp_path),
                     "--poll-interval", "0.05", "--timeout", "30"]) == 1
    err = capsys.readouterr().err
    assert "application 'modelcommons' is DEPLOY_FAILED on the active cluster" in err
    assert "ModelNotFoundError" in err  # Ray's own message is passed on


@pytest.mark.parametrize("extra, message", [
    (["--name", "other"], "RayService modelcommons/other not found on http://127.0.0.1:"),
    (["--app", "segmenter"], "serveConfigV2 has no application 'segmenter'; it has ['modelcommons']"),
])
def test_wrong_target_changes_nothing(extra: list[str], message: str, registry: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with RayServiceStandIn(_rayservice()) as api:
        before = api.obj
        assert main(["deploy", "--model", "detector@champion", *_kubeconfig(api, tmp_path), *FAST, *extra]) == 2
        assert api.patches == [] and api.obj == before
    assert message in capsys.readouterr().err


def test_default_app_name_is_the_serving_apps() -> None:
    from components.deploy.rayservice import DEFAULT_APP_NAME
    from serving.app import APP_NAME

    assert DEFAULT_APP_NAME == APP_NAME


def test_kfp_deploy_component_runs_under_the_local_runner(registry: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import local

    from components.deploy.component import deploy_component

    with RayServiceStandIn(_rayservice(), after_patch="running") as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   raise_on_error=True)

        task = deploy_component(model="detector@champion", poll_interval_s=0.05, timeout_s=20.0)
        assert task.outputs["model_uri"] == "models:/detector/1"
        assert task.outputs["version"] == "1"
        assert task.outputs["previous_model_uri"] == "models:/detector@champion"
        assert api.serve_config["applications"][0]["args"]["model_uri"] == "models:/detector/1"
