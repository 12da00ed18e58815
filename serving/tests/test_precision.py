"""``precision=float|int8`` on the detector: the int8 version found in a real sqlite MLflow registry by its
tags, batches split by precision, and the HTTP API of a second application on the shared local Ray Serve."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import httpx
import pytest
import torch
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from components.models.preprocess import letterbox
from serving.schemas import DetectParams, DetectResponse, ModelInfo, ModelList

CLASSES = ("circle", "rectangle", "triangle")
IMG = 96  # model input side: small, so calibration and the int8 export take a second


def scene_png(width: int = 160, height: int = 120, *, seed: int = 0) -> bytes:
    """A flat background with two filled shapes (positions vary with ``seed``)."""
    im = Image.new("RGB", (width, height), (90, 100, 90))
    draw = ImageDraw.Draw(im)
    dx = 7 * seed % 30
    draw.ellipse((10 + dx, 20, 60 + dx, 70), fill=(220, 30, 30))
    draw.rectangle((80, 30 + dx // 2, 140, 90), fill=(30, 40, 210))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def decoded(png: bytes) -> torch.Tensor:
    """PNG bytes -> 3xHxW uint8, as the ingress decodes them."""
    from serving.images import ImageLimits, decode_image

    return decode_image(png, ImageLimits(max_bytes=10**7, max_pixels=10**7))


def build_model_pair(root: Path, *, calibrator: str = "kl") -> tuple[Path, Path]:
    """A float nano detector directory (``root/shapes-q``) and its int8 model directory (``root/shapes-q-int8``),
    calibrated on a few drawn scenes."""
    from components.models.detector import build_detector, detector_config
    from components.models.weights import save_detector
    from components.quantize.calibrate import calibrate
    from components.quantize.deploy import save_int8_model

    torch.manual_seed(0)
    model = build_detector(detector_config("nano", num_classes=3, class_names=CLASSES, img_size=IMG)).eval()
    float_dir = save_detector(model, root / "shapes-q")
    batch = torch.stack([letterbox(decoded(scene_png(seed=s)), IMG)[0] for s in range(4)])
    calibration = calibrate(model, [batch], method=calibrator)
    int8_dir = save_int8_model(float_dir, calibration, root / "shapes-q-int8", calibrator=calibrator)
    return float_dir, int8_dir


def register_version(directory: Path, tags: dict[str, str], *, name: str = "detector") -> str:
    """Log ``directory`` as a run artifact and register it as a new version of ``name``; its number."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from components.tracking.setup import configure_mlflow

    configure_mlflow()
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(directory), "model")
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                     tags=tags)
    return str(mv.version)


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_model_pair(tmp_path_factory.mktemp("precision"))


def _task(png: bytes, precision: str | None):
    from serving.detector import DetectTask

    return DetectTask(image=decoded(png), params=DetectParams(score_threshold=0.0, max_detections=5,
                                                              precision=precision))  # type: ignore[arg-type]


# ---- in-process: registry lookup and batching ---------------------------------------------------------


def test_registry_int8_version_is_found_by_its_tags(mc_home: Path, model_pair: tuple[Path, Path]) -> None:
    from mlflow.tracking import MlflowClient

    from serving.detector import DetectorDeployment, PrecisionUnavailableError
    from serving.inspector import CreateTask, InspectorDeployment
    from serving.schemas import SessionCreateParams

    float_dir, int8_dir = model_pair
    v1 = register_version(float_dir, {"precision": "float"})
    MlflowClient().set_registered_model_alias("detector", "champion", v1)
    v2 = register_version(float_dir, {"precision": "float"})  # a second float version, never quantized
    # int8 versions of v1: an older one, the newest (v4), and one of another float version (v5).
    register_version(int8_dir, {"precision": "int8", "float_version": v1, "calibrator": "kl", "backend": "x86"})
    v4 = register_version(int8_dir, {"precision": "int8", "float_version": v1, "calibrator": "kl",
                                     "backend": "x86"})
    register_version(int8_dir, {"precision": "int8", "float_version": "99", "calibrator": "kl", "backend": "x86"})

    served = DetectorDeployment(model_uri="models:/detector@champion")
    info = served.describe()
    assert info.precisions == ["float", "int8"]
    assert info.int8 is not None
    assert (info.int8.version, info.int8.float_version, info.int8.calibrator, info.int8.backend,
            info.int8.source) == (v4, v1, "kl", "x86", "registry")

    lonely = DetectorDeployment(model_uri=f"models:/detector/{v2}")
    assert lonely.describe().precisions == ["float"] and lonely.describe().int8 is None
    import asyncio

    with pytest.raises(PrecisionUnavailableError) as err:
        asyncio.run(lonely.detect(_task(scene_png(), "int8")))
    message = str(err.value)
    assert "'detector'" in message and f"float_version={v2}" in message and "['float']" in message, message

    # The inspector takes its scales from the same int8 version when the session names no calibrator.
    inspector = InspectorDeployment(max_sessions=2)
    image = decoded(scene_png())
    by_alias = asyncio.run(inspector.create(CreateTask(image=image, params=SessionCreateParams(
        model="detector@champion"))))
    assert by_alias.calibration.source == "int8_version" and by_alias.calibration.int8_version == v4
    assert (by_alias.model.name, by_alias.model.version, by_alias.model.alias) == ("detector", v1, "champion")
    plain = asyncio.run(inspector.create(CreateTask(image=image, params=SessionCreateParams(
        model=f"detector/{v2}"))))
    assert plain.calibration.source == "image" and plain.calibration.method == "minmax"
    assert plain.calibration.images == 5  # the image and its four augmented copies


def test_a_mixed_batch_runs_one_forward_pass_per_precision(model_pair: tuple[Path, Path]) -> None:
    from serving.detector import DetectorDeployment, run_mixed_batch

    float_dir, int8_dir = model_pair
    deployment = DetectorDeployment(model_uri=str(float_dir), int8_model_uri=str(int8_dir))
    loaded, int8 = deployment._loaded, deployment._int8
    assert int8 is not None
    calls: dict[str, list[int]] = {"float": [], "int8": []}
    hooks = [loaded.detector.register_forward_hook(lambda _m, args, _o: calls["float"].append(len(args[0])))]
    runner = int8.model.runner  # a frozen TorchScript graph: no forward hooks, so count at the call

    def counted(images: torch.Tensor) -> torch.Tensor:
        calls["int8"].append(len(images))
        return cast(torch.Tensor, runner(images))

    int8.model.runner = counted  # type: ignore[assignment]
    pngs = [scene_png(seed=s) for s in range(4)]
    precisions = ["int8", "float", None, "int8"]
    try:
        results = run_mixed_batch(loaded, int8, [_task(p, q) for p, q in zip(pngs, precisions, strict=True)],
                                  deployment._config)
    finally:
        int8.model.runner = runner
        for hook in hooks:
            hook.remove()
    assert calls == {"float": [2], "int8": [2]}  # never one forward pass over both precisions
    assert [r.response.precision for r in results] == ["int8", "float", "float", "int8"]
    assert [r.response.calibrator for r in results] == ["kl", None, None, "kl"]
    # Each int8 answer is the int8 model's own prediction on that image, mapped back to its pixels.
    reference = int8.model  # its own predict: one image, its own decoding and NMS
    for png, result in ((pngs[0], results[0]), (pngs[3], results[3])):
        x, placement = letterbox(decoded(png), IMG)
        (dets,) = reference.predict(x[None], score_threshold=0.0, iou_threshold=0.5, max_detections=5)
        expected = placement.boxes_to_image(dets.boxes)
        got = torch.tensor([d.box for d in result.response.detections])
        assert got.shape == expected.shape and len(got) > 0
        torch.testing.assert_close(got, expected.float(), atol=1e-3, rtol=0)
        assert [d.class_id for d in result.response.detections] == dets.labels.tolist()


# ---- over HTTP: an application with an explicit int8_model_uri beside the shared one -------------------


@pytest.fixture(scope="module")
def int8_url(serve_url: str, model_pair: tuple[Path, Path]) -> Iterator[str]:
    from ray import serve

    from serving.app import ServeArgs
    from serving.server import run_server

    float_dir, int8_dir = model_pair
    args = ServeArgs(model_uri=str(float_dir), int8_model_uri=str(int8_dir), num_cpus=0.25,
                     inspector_max_sessions=0, max_batch_size=8, batch_wait_timeout_s=0.05)
    url = run_server(args, blocking=False, app_name="precision", route_prefix="/precision")
    try:
        yield url
    finally:
        serve.delete("precision")


def _detect(url: str, png: bytes, **params: str | float) -> httpx.Response:
    query: dict[str, str | float] = {"score_threshold": 0.0, "max_detections": 5, **params}
    return httpx.post(f"{url}/v1/detect", files={"image": ("x.png", png, "image/png")}, params=query, timeout=60)


def test_detect_with_precision_int8_says_int8(int8_url: str) -> None:
    png = scene_png()
    as_query = _detect(int8_url, png, precision="int8")
    assert as_query.status_code == 200, as_query.text
    body = DetectResponse.model_validate(as_query.json())
    assert (body.model, body.precision, body.calibrator) == ("shapes-q", "int8", "kl")
    assert body.detections and (body.width, body.height) == (160, 120)
    # The same request as a form field and as a JSON field; all three ran the same int8 model.
    as_form = httpx.post(f"{int8_url}/v1/detect", files={"image": ("x.png", png, "image/png")},
                         data={"precision": "int8", "score_threshold": "0.0", "max_detections": "5"}, timeout=60)
    as_json = httpx.post(f"{int8_url}/v1/detect", json={"image_b64": base64.b64encode(png).decode(),
                                                        "precision": "int8", "score_threshold": 0.0,
                                                        "max_detections": 5}, timeout=60)
    for r in (as_form, as_json):
        assert r.status_code == 200, r.text
        assert r.json() == as_query.json()
    as_float = _detect(int8_url, png)
    assert as_float.status_code == 200 and as_float.json()["precision"] == "float"
    assert as_float.json()["calibrator"] is None
    picture = _detect(int8_url, png, precision="int8", format="image")
    assert picture.status_code == 200 and picture.headers["x-precision"] == "int8"


def test_concurrent_float_and_int8_requests_each_get_their_precision(int8_url: str) -> None:
    pngs = [scene_png(seed=s) for s in range(8)]
    single = {(i, q): _detect(int8_url, pngs[i], precision=q).json() for i in range(8) for q in ("float", "int8")
              if (i + (q == "int8")) % 2 == 0}

    def one(key: tuple[int, str]) -> tuple[int, dict]:
        r = _detect(int8_url, pngs[key[0]], precision=key[1])
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = dict(zip(single, pool.map(one, single), strict=True))
    for key, (status, body) in answers.items():
        assert status == 200, body
        assert body["precision"] == key[1]
        got = [d["box"] for d in body["detections"]]
        want = [d["box"] for d in single[key]["detections"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-3, rtol=0)


def test_models_lists_precisions_and_the_int8_version(int8_url: str, serve_url: str,
                                                      model_pair: tuple[Path, Path]) -> None:
    r = httpx.get(f"{int8_url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    (info,) = ModelList.model_validate(r.json()).models
    assert isinstance(info, ModelInfo)
    assert info.precisions == ["float", "int8"] and info.int8 is not None
    assert (info.int8.uri, info.int8.calibrator, info.int8.backend, info.int8.source, info.int8.version) == (
        str(model_pair[1]), "kl", "x86", "int8_model_uri", None)
    shared = ModelList.model_validate(httpx.get(f"{serve_url}/v1/models", timeout=30).json()).models[0]
    assert isinstance(shared, ModelInfo) and shared.precisions == ["float"] and shared.int8 is None


BAD = [
    ("int8 without an int8 version", "serve", {"precision": "int8"}, 404,
     "precision 'int8' is not available for model 'shapes-nano'"),
    ("unknown precision", "int8", {"precision": "fp16"}, 422, "query.precision"),
    ("unknown precision (form)", "int8-form", {"precision": "int4"}, 422, "form.precision"),
]


@pytest.mark.parametrize(("case", "where", "params", "status", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_precision_is_a_4xx_and_the_service_keeps_serving(int8_url: str, serve_url: str, case: str,
                                                              where: str, params: dict, status: int,
                                                              message: str) -> None:
    url = serve_url if where == "serve" else int8_url
    if where == "int8-form":
        r = httpx.post(f"{url}/v1/detect", files={"image": ("x.png", scene_png(), "image/png")}, data=params,
                       timeout=30)
    else:
        r = _detect(url, scene_png(), **params)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.json()
    if where == "serve":
        assert "available precisions: ['float']" in r.json()["detail"]
    assert _detect(url, scene_png()).status_code == 200


def test_latency_is_labelled_with_the_precision(int8_url: str) -> None:
    def count(text: str) -> float:
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "modelcommons_detect_precision_latency_seconds_count"
                   and s.labels == {"model": "shapes-q", "precision": "int8"})

    # Each ingress replica keeps its own registry; this app has one ingress replica.
    before = count(httpx.get(f"{int8_url}/metrics", timeout=30).text)
    assert _detect(int8_url, scene_png(), precision="int8").status_code == 200
    assert count(httpx.get(f"{int8_url}/metrics", timeout=30).text) == before + 1
