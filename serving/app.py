"""The Ray Serve application: a FastAPI ingress composed with the detector deployment.

HTTP API (all errors are JSON ``{"detail": "..."}``):

- ``POST /v1/detect``: multipart form field ``image`` (a file), or a JSON body
  ``{"image_b64": ..., "score_threshold"?, "iou_threshold"?, "max_detections"?, "model"?}``.
  Query: ``format=json|image`` and the same optional knobs (a JSON body value wins over the query).
  Answers :class:`~serving.schemas.DetectResponse`, or ``image/png`` with the boxes drawn.
- ``GET /healthz``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text format).

``build_app(ServeArgs)`` builds the application; ``app_builder(dict)`` is the import path for
``serve run`` / a RayService ``serveConfigV2``; ``serve_config(ServeArgs)`` writes that config.
"""

# No ``from __future__ import annotations`` here: Ray Serve rebuilds the ingress methods, and FastAPI
# must then resolve their parameter annotations as real objects, not strings.
import asyncio
import base64
import binascii
import reprlib
import time
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.settings import Settings, get_settings
from serving import metrics
from serving.detector import (
    DetectorDeployment,
    DetectorUserConfig,
    DetectResult,
    DetectTask,
    UnknownModelError,
)
from serving.images import BadImageError, ImageLimits, ImageTooLargeError, check_byte_size, decode_image
from serving.schemas import (
    DetectJSONRequest,
    DetectParams,
    DetectResponse,
    ErrorMessage,
    Health,
    ModelList,
    OutputFormat,
)

APP_NAME = "modelcommons"
IMPORT_PATH = "serving.app:app_builder"
# Multipart boundaries and headers around the file; JSON keys and thresholds around the base64.
BODY_OVERHEAD_BYTES = 64 * 1024
HEALTH_TIMEOUT_S = 10.0


class ServeArgs(BaseModel):
    """Typed arguments of the serving application (defaults come from :class:`Settings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str = Field(min_length=1,
                           description="Model the detector loads, e.g. models:/detector@champion.")
    host: str = Field(default="127.0.0.1", description="HTTP proxy bind address.")
    port: int = Field(default=8000, ge=1, le=65535)
    num_cpus: float = Field(default=0.5, ge=0.0, description="CPUs per detector replica (fractions allowed).")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per detector replica (fractions allowed).")
    replicas: int = Field(default=1, ge=1, le=64, description="Detector replicas.")
    max_batch_size: int = Field(default=16, ge=1, le=256, description="1 switches dynamic batching off.")
    batch_wait_timeout_s: float = Field(default=0.01, ge=0.0, le=1.0)
    score_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=1000)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    ingress_num_cpus: float = Field(default=0.1, ge=0.0, description="CPUs of the HTTP ingress replica.")
    max_ongoing_requests: int = Field(default=64, ge=1, description="Concurrent requests per replica.")

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> "ServeArgs":
        """Arguments from ``MODELCOMMONS_*`` settings, with explicit ``overrides`` on top."""
        s = settings or get_settings()
        values: dict[str, Any] = {
            "model_uri": s.detector_model_uri, "host": s.serve_host, "port": s.serve_port,
            "num_cpus": s.serve_num_cpus, "num_gpus": s.serve_num_gpus, "replicas": s.serve_replicas,
            "max_batch_size": s.serve_max_batch_size, "batch_wait_timeout_s": s.serve_batch_wait_timeout_s,
            "max_image_bytes": s.max_image_bytes, "max_image_pixels": s.max_image_pixels,
        }
        values.update(overrides)
        return cls.model_validate(values)

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def detector_user_config(self) -> DetectorUserConfig:
        return DetectorUserConfig(model_uri=self.model_uri, score_threshold=self.score_threshold,
                                  iou_threshold=self.iou_threshold, max_detections=self.max_detections,
                                  max_batch_size=self.max_batch_size,
                                  batch_wait_timeout_s=self.batch_wait_timeout_s)


# ---- errors: every domain exception becomes a 4xx/5xx JSON body here, and only here -------------


class RequestFormatError(ValueError):
    """The request is not shaped as the API expects (missing field, wrong content type)."""

    def __init__(self, detail: str, status_code: int = 422) -> None:
        super().__init__(detail)
        self.status_code = status_code


class DetectorUnavailableError(RuntimeError):
    status_code = 503


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorMessage, "description": "Not a decodable image (unknown format, truncated)."},
    404: {"model": ErrorMessage, "description": "The requested model is not loaded."},
    413: {"model": ErrorMessage, "description": "Image over the byte or pixel limit."},
    415: {"model": ErrorMessage, "description": "Body is neither multipart/form-data nor JSON."},
    422: {"model": ErrorMessage, "description": "Missing field or parameter out of range."},
    503: {"model": ErrorMessage, "description": "The detector deployment is not available."},
}

app = FastAPI(
    title="ModelCommons serving",
    version="1",
    description="Object detection over HTTP. Errors are JSON {\"detail\": \"...\"}.",
)

def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside the detector replica, without Ray's wrapper and remote traceback."""
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


@app.exception_handler(BadImageError)
async def _bad_image(_: Request, exc: BadImageError) -> JSONResponse:
    return _error(exc.status_code, str(exc))


@app.exception_handler(UnknownModelError)
async def _unknown_model(_: Request, exc: UnknownModelError) -> JSONResponse:
    return _error(UnknownModelError.status_code, str(_cause(exc)))


@app.exception_handler(RequestFormatError)
async def _bad_request(_: Request, exc: RequestFormatError) -> JSONResponse:
    return _error(exc.status_code, str(exc))


@app.exception_handler(DetectorUnavailableError)
async def _unavailable(_: Request, exc: DetectorUnavailableError) -> JSONResponse:
    return _error(503, str(exc))


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default body is a list of error objects; the API promises one readable string.
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        got = ""
        if "input" in err and not isinstance(err["input"], dict | bytes):
            got = f" (got {reprlib.repr(err['input'])})"  # reprlib: never echo a megabyte back
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return _error(422, "; ".join(parts) or "invalid request")


@app.exception_handler(Exception)
async def _internal(_: Request, exc: Exception) -> JSONResponse:
    # Last resort, so even a bug answers JSON; the traceback goes to the replica log.
    return _error(500, f"internal error: {type(_cause(exc)).__name__}")


@app.exception_handler(StarletteHTTPException)
async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@app.middleware("http")
async def _count_requests(request: Request, call_next: Any) -> Response:
    try:
        response: Response = await call_next(request)
    except Exception:
        metrics.count_request(_endpoint(request), request.method, 500)
        raise
    metrics.count_request(_endpoint(request), request.method, response.status_code)
    return response


def _endpoint(request: Request) -> str:
    # The matched route template (not the raw path) keeps the label's values few.
    return str(getattr(request.scope.get("route"), "path", "unmatched"))


_DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"],
                           "properties": {"image": {"type": "string", "format": "binary"}}},
            },
            "application/json": {"schema": DetectJSONRequest.model_json_schema()},
        },
    }
}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it grows past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ImageTooLargeError(f"request body is over {limit} bytes; the image limit is "
                                     f"{limit - BODY_OVERHEAD_BYTES} bytes after base64 decoding "
                                     "(MODELCOMMONS_MAX_IMAGE_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.ingress(app)
class Ingress:
    """HTTP front door: validates and decodes input, calls the detector, maps errors, counts metrics."""

    def __init__(self, detector: DeploymentHandle, *, limits: ImageLimits) -> None:
        self._detector = detector
        self._limits = limits

    async def _image_bytes(self, request: Request) -> tuple[bytes, DetectParams | None]:
        """Raw image file bytes from a multipart or JSON request, plus the JSON body's parameters."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        b64_limit = (self._limits.max_bytes + 2) // 3 * 4 + BODY_OVERHEAD_BYTES
        declared = request.headers.get("content-length")
        if declared and declared.isdigit():
            limit = b64_limit if ctype == "application/json" else self._limits.max_bytes + BODY_OVERHEAD_BYTES
            if int(declared) > limit:
                raise ImageTooLargeError(
                    f"request body is {declared} bytes; the image limit is {self._limits.max_bytes} bytes "
                    "(MODELCOMMONS_MAX_IMAGE_BYTES)")
        if ctype == "multipart/form-data":
            async with request.form(max_files=1, max_fields=16) as form:
                upload = form.get("image")
                if upload is None:
                    raise RequestFormatError(
                        f"multipart field 'image' is missing (got fields {sorted(form.keys())}); "
                        "send the image file as form field 'image'")
                if not isinstance(upload, UploadFile):
                    raise RequestFormatError("multipart field 'image' must be a file, not a text value")
                if upload.size is not None:
                    check_byte_size(upload.size, self._limits)
                return await upload.read(), None
        if ctype == "application/json":
            body = await _read_body(request, b64_limit)
            try:
                req = DetectJSONRequest.model_validate_json(body)
            except ValidationError as exc:
                raise RequestValidationError(
                    [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
                ) from exc
            # Size before decoding: 4 base64 characters carry 3 bytes.
            check_byte_size(len(req.image_b64) * 3 // 4 - req.image_b64[-2:].count("="), self._limits)
            try:
                data = base64.b64decode(req.image_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadImageError(f"body.image_b64 is not valid base64: {exc}") from exc
            params = DetectParams.model_validate(req.model_dump(exclude={"image_b64"}, exclude_none=True))
            return data, params
        raise RequestFormatError(
            f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data with a file field "
            "'image', or application/json with 'image_b64'", status_code=415)

    @app.post("/v1/detect", response_model=DetectResponse, openapi_extra=_DETECT_BODY,
              responses={200: {"content": {"image/png": {}},
                               "description": "Detections as JSON, or the annotated PNG (format=image)."},
                         **ERROR_RESPONSES})
    async def detect(
        self,
        request: Request,
        format: Annotated[OutputFormat, Query(description="json: detections; image: annotated PNG")] = "json",
        score_threshold: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
        iou_threshold: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
        max_detections: Annotated[int | None, Query(ge=1, le=1000)] = None,
        model: Annotated[str | None, Query(min_length=1, max_length=256,
                                           description="Loaded model to use; unknown -> 404.")] = None,
    ) -> Response:
        """Detect objects in one image."""
        start = time.perf_counter()
        data, body_params = await self._image_bytes(request)
        image = await asyncio.to_thread(decode_image, data, self._limits)  # (3, H, W) uint8
        query = {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
                 "max_detections": max_detections, "model": model}
        if body_params is not None:
            query.update(body_params.model_dump(exclude_unset=True))
        params = DetectParams.model_validate(query)
        try:
            result: DetectResult = await self._detector.detect.remote(
                DetectTask(image=image, params=params, render=format == "image"))
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as exc:
            raise DetectorUnavailableError(f"detector deployment unavailable: {type(exc).__name__}") from exc
        resp = result.response
        metrics.observe_detect(resp.model, resp.version, time.perf_counter() - start, len(resp.detections))
        if result.png is not None:
            return Response(content=result.png, media_type="image/png",
                            headers={"X-Model": resp.model, "X-Detections": str(len(resp.detections))})
        return JSONResponse(resp.model_dump(mode="json"))

    @app.get("/healthz", response_model=Health, responses={503: ERROR_RESPONSES[503]})
    async def healthz(self) -> Health:
        """Ready when the detector answers with a loaded model."""
        info = await self._describe()
        return Health(status="ok", models=[info.name for info in info.models])

    @app.get("/v1/models", response_model=ModelList, responses={503: ERROR_RESPONSES[503]})
    async def models(self) -> ModelList:
        """The loaded model(s): name, version, alias, precision, URI, class names, runtime settings."""
        return await self._describe()

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text."}})
    async def metrics(self) -> Response:
        body, content_type = metrics.exposition()
        return Response(content=body, media_type=content_type)

    async def _describe(self) -> ModelList:
        try:
            info = await asyncio.wait_for(self._detector.describe.remote(), timeout=HEALTH_TIMEOUT_S)
        except (TimeoutError, RayActorError, RayTaskError, DeploymentUnavailableError) as exc:
            raise DetectorUnavailableError(f"detector deployment unavailable: {type(exc).__name__}") from exc
        return ModelList(models=[info])


def build_app(args: ServeArgs) -> Application:
    """The application graph: ``Ingress(detector=DetectorDeployment(...))`` with resources from ``args``."""
    detector = serve.deployment(name="detector")(DetectorDeployment).options(
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        user_config=args.detector_user_config().model_dump(),
        # A replica must accept at least a full batch at once, or batches never fill.
        max_ongoing_requests=max(args.max_ongoing_requests, args.max_batch_size),
    )
    ingress = serve.deployment(name="ingress")(Ingress).options(
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
        max_ongoing_requests=args.max_ongoing_requests,
    )
    return ingress.bind(detector.bind(model_uri=args.model_uri), limits=args.limits)


def app_builder(args: dict[str, Any]) -> Application:
    """Import path for ``serve run serving.app:app_builder`` and RayService ``serveConfigV2``.

    ``args`` override the ``MODELCOMMONS_*`` settings of the process building the app.
    """
    return build_app(ServeArgs.from_settings(**args))


def serve_config(args: ServeArgs, *, name: str = APP_NAME, route_prefix: str = "/") -> dict[str, Any]:
    """A Ray Serve config (``serve deploy`` file / RayService ``serveConfigV2``) for ``args``."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": args.host, "port": args.port},
        "applications": [{
            "name": name,
            "route_prefix": route_prefix,
            "import_path": IMPORT_PATH,
            "args": args.model_dump(mode="json", exclude={"host", "port"}),
        }],
    }
