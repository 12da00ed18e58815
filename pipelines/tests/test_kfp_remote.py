"""`pipeline submit` and `pipeline upload` through the real kfp.Client against a local HTTP stand-in of the
Kubeflow Pipelines v2beta1 API (no KFP server can run here). The stand-in stores what it receives, so
the tests check the uploaded IR YAML, the run's parameters and the experiment."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from pipelines.cli import main


class KfpStandIn:
    """healthz, pipelines (list/upload/upload_version/list versions), experiments, runs."""

    def __init__(self) -> None:
        self.pipelines: dict[str, dict[str, Any]] = {}  # id -> {display_name, versions: {id: (name, spec)}}
        self.experiments: dict[str, str] = {}  # id -> name
        self.runs: list[dict[str, Any]] = []
        self.platforms: dict[str, dict[str, Any]] = {}  # version id -> platform spec (second YAML document)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        kfp = self

        def name_filter(query: dict[str, list[str]]) -> str | None:
            if "filter" not in query:
                return None
            return str(json.loads(query["filter"][0])["predicates"][0]["stringValue"])

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, body: dict[str, Any], code: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if url.path == "/apis/v2beta1/healthz":
                    return self._send({"multi_user": False})
                if url.path == "/apis/v2beta1/pipelines":
                    wanted = name_filter(query)
                    found = [{"pipeline_id": pid, "display_name": p["display_name"]}
                             for pid, p in kfp.pipelines.items() if wanted in (None, p["display_name"])]
                    return self._send({"pipelines": found, "total_size": len(found)})
                if url.path.startswith("/apis/v2beta1/pipelines/") and url.path.endswith("/versions"):
                    pid = url.path.split("/")[4]
                    wanted = name_filter(query)
                    found = [{"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name}
                             for vid, (name, _) in kfp.pipelines[pid]["versions"].items() if wanted in (None, name)]
                    return self._send({"pipeline_versions": found, "total_size": len(found)})
                if url.path == "/apis/v2beta1/experiments":
                    wanted = name_filter(query)
                    found = [{"experiment_id": eid, "display_name": name}
                             for eid, name in kfp.experiments.items() if wanted in (None, name)]
                    return self._send({"experiments": found, "total_size": len(found)})
                return self._send({"error": f"no route {url.path}"}, 404)

            def do_POST(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if url.path in ("/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version"):
                    message = BytesParser(policy=HTTP).parsebytes(
                        f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + self._body())
                    [part] = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition")
                              == "uploadfile"]
                    # IR YAML: the pipeline spec, then the platform spec (Kubernetes env sources)
                    spec, *platform = yaml.safe_load_all(part.get_payload(decode=True))
                    name, vid = query["name"][0], str(uuid.uuid4())
                    kfp.platforms[vid] = platform[0] if platform else {}
                    if url.path.endswith("/upload"):
                        pid = str(uuid.uuid4())
                        kfp.pipelines[pid] = {"display_name": name, "versions": {vid: (name, spec)}}
                        return self._send({"pipeline_id": pid, "display_name": name})
                    pid = query["pipelineid"][0]
                    kfp.pipelines[pid]["versions"][vid] = (name, spec)
                    return self._send({"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name})
                if url.path == "/apis/v2beta1/experiments":
                    body = json.loads(self._body())
                    eid = str(uuid.uuid4())
                    kfp.experiments[eid] = body["display_name"]
                    return self._send({"experiment_id": eid, "display_name": body["display_name"]})
                if url.path == "/apis/v2beta1/runs":
                    body = json.loads(self._body())
                    body["run_id"] = str(uuid.uuid4())
                    kfp.runs.append(body)
                    return self._send(body)
                return self._send({"error": f"no route {url.path}"}, 404)

        return Handler


@pytest.fixture
def kfp_api() -> Iterator[KfpStandIn]:
    api = KfpStandIn()
    yield api
    api.server.shutdown()
    api.server.server_close()


def test_submit_creates_the_experiment_and_a_run_with_typed_parameters(
        kfp_api: KfpStandIn, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pipeline", "submit", "detector-train", "--host", kfp_api.url, "--param", "source=s3://b/raw/",
            "--param", "epochs=3", "--experiment", "nightly", "--run-name", "try-1"]
    assert main(argv) == 0, capsys.readouterr().err
    [run] = kfp_api.runs
    assert list(kfp_api.experiments.values()) == ["nightly"]
    assert run["experiment_id"] == next(iter(kfp_api.experiments)) and run["display_name"] == "try-1"
    assert run["runtime_config"]["parameters"] == {"source": "s3://b/raw/", "epochs": 3}
    # With a platform spec, the v2beta1 API takes {"pipeline_spec": ..., "platform_spec": ...}.
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "detector-train"
    executors = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train-component"]["configMapAsEnv"][0]["configMapName"] == "modelcommons-pipeline-env"
    assert f"submitted detector-train to {kfp_api.url}: run {run['run_id']}" in capsys.readouterr().out
    # `pipeline run --host` is the same submission.
    assert main(["pipeline", "run", "detector-train", "--host", kfp_api.url, "--param", "source=s3://b/x/"]) == 0
    assert len(kfp_api.runs) == 2 and list(kfp_api.experiments.values()) == ["nightly", "modelcommons"]


def test_upload_creates_then_adds_a_version_once(kfp_api: KfpStandIn, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.runner import pipelines

    assert main(["pipeline", "upload", "--host", kfp_api.url]) == 0
    by_name = {p["display_name"]: (pid, p) for pid, p in kfp_api.pipelines.items()}
    assert sorted(by_name) == sorted(pipelines())  # every pipeline, once
    pid, pipeline = by_name["detector-train"]
    [(first_version, spec)] = pipeline["versions"].values()
    assert first_version == "detector-train"  # KFP names a new pipeline's first version after it
    assert spec["pipelineInfo"]["name"] == "detector-train" and "comp-train-component" in spec["components"]
    assert f"detector-train: created pipeline {pid}" in capsys.readouterr().out
    [platform] = [kfp_api.platforms[vid] for vid in pipeline["versions"]]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train-component"]["secretAsEnv"][0]["secretName"] == "modelcommons-pipeline-env"

    assert main(["pipeline", "upload", "--host", kfp_api.url, "--version", "0.1.0-abc"]) == 0
    assert [n for n, _ in pipeline["versions"].values()] == ["detector-train", "0.1.0-abc"]
    again = ["pipeline", "upload", "--host", kfp_api.url, "--name", "detector-train", "--version", "0.1.0-abc"]
    assert main(again) == 0
    assert len(pipeline["versions"]) == 2  # re-running the upload Job changes nothing
    assert "version 0.1.0-abc is already on pipeline" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["pipeline", "submit", "detector-train", "--host", "kfp.example.com", "--param", "source=x"],
     "expected an http:// or https:// URL"),
    (["pipeline", "submit", "nope", "--host", "http://127.0.0.1:9"], "unknown pipeline 'nope'"),
    (["pipeline", "submit", "detector-train", "--host", "http://127.0.0.1:9"], "needs --param for: source"),
    (["pipeline", "upload", "--host", "http://127.0.0.1:9", "--name", "nope"], "unknown pipeline 'nope'"),
])
def test_bad_arguments_fail_before_any_request(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
