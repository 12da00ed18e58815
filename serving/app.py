"""The Ray Serve application: a FastAPI ingress composed with the detector and segmenter deployments.

HTTP API (all errors are JSON ``{"detail": "..."}``):

- ``POST /v1/detect``: multipart form field ``image`` (a file), or a JSON body
  ``{"image_b64": ..., "score_threshold"?, "iou_threshold"?, "max_detections"?, "model"?}``.
  Query: ``format=json|image`` and the same optional knobs (a JSON body value wins over the query).
  Answers :class:`~serving.schemas.DetectResponse`, or ``image/png`` with the boxes drawn.
- ``POST /v1/segment``: multipart fields ``image`` (a file) and ``prompts`` (JSON text of
  :class:`~serving.schemas.SegmentParams`), or a JSON body :class:`~serving.schemas.SegmentJSONRequest`
  (``image_b64`` or ``image_id``, ``points``/``labels``, ``boxes``). Query ``output=json|mask|blended``
  (a body value wins). Answers :class:`~serving.schemas.SegmentResponse`, a PNG label image or a
  blended PNG. Only when the application has a segmenter (``segmenter_model_uri``); else 404.
- ``GET /healthz``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text format).
- ``/v1/inspect/...``: quantization inspector sessions (STEP, CROSS, weight edits, per-layer report, model
  graph) on the :class:`~serving.inspector.InspectorDeployment`; see the routes below. Only when
  ``inspector_max_sessions`` > 0; else 404.

``POST /v1/detect`` also takes ``precision=float|int8`` (query, form field or JSON field): int8 runs the
model's deployable int8 version when there is one (``GET /v1/models`` lists ``precisions``), else 404.

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
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.quantize.errors import (
    CalibrationError,
    EditError,
    LayerIndexError,
    QuantizeError,
    SessionError,
    SessionLimitError,
    SessionStateError,
    UnsupportedLayerError,
)
from components.quantize.inspector import ModelReport
from components.quantize.visualize import ModelGraph
from components.settings import Settings, get_settings
from serving import metrics
from serving.detector import (
    DetectorDeployment,
    DetectorUserConfig,
    DetectResult,
    DetectTask,
    PrecisionUnavailableError,
    UnknownModelError,
)
from serving.embedding_cache import image_sha256
from serving.images import BadImageError, ImageLimits, ImageTooLargeError, check_byte_size, decode_image
from serving.inspector import CreateTask, InspectorDeployment
from serving.schemas import (
    CrossRequest,
    DetectJSONRequest,
    DetectParams,
    DetectPrecision,
    DetectResponse,
    EditResponse,
    ErrorMessage,
    Health,
    InspectorInfo,
    LayerResponse,
    ModelInfo,
    ModelList,
    OutputFormat,
    RunToRequest,
    SegmenterInfo,
    SegmentJSONRequest,
    SegmentOutput,
    SegmentParams,
    SegmentResponse,
    SessionCreateJSONRequest,
    SessionCreateParams,
    SessionInfo,
    SessionStatus,
    WeightEditRequest,
)
from serving.segmenter import (
    DEFAULT_CACHE_BYTES,
    PromptError,
    SegmenterDeployment,
    SegmenterUserConfig,
    SegmentResult,
    SegmentTask,
    UnknownImageError,
)

APP_NAME = "modelcommons"
IMPORT_PATH = "serving.app:app_builder"
# Multipart boundaries and headers around the file; JSON keys and thresholds around the base64.
BODY_OVERHEAD_BYTES = 64 * 1024
HEALTH_TIMEOUT_S = 10.0


class ServeArgs(BaseModel):
    """Typed arguments of the serving application (defaults come from :class:`Settings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "" (not None) switches a model off: Helm drops null values, and the chart passes these fields as they are.
    model_uri: str = Field(default="", description="Model the detector loads, e.g. models:/detector@champion; "
                                                   "'' = no detector (POST /v1/detect answers 404).")
    segmenter_model_uri: str = Field(
        default="", description="Model the segmenter loads, e.g. models:/segmenter@champion; '' = no segmenter "
                                "(POST /v1/segment answers 404).")
    embedding_cache_bytes: int = Field(default=DEFAULT_CACHE_BYTES, ge=0,
                                       description="Bound of the segmenter's image-embedding cache, bytes.")
    segmenter_num_cpus: float = Field(default=0.5, ge=0.0, description="CPUs of the segmenter replica.")
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
    int8_model_uri: str = Field(
        default="", description="Int8 model directory/URI the detector serves for precision=int8; '' = the "
                                "registry's newest version tagged precision=int8 and float_version=<the "
                                "served version>, if any.")
    inspector_max_sessions: int = Field(default=4, ge=0, le=1024, description="Open quantization inspector "
                                                                              "sessions at most; 0 = no inspector.")
    inspector_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1,
                                     description="Memory all inspector sessions may hold together, bytes.")
    inspector_ttl_s: float = Field(default=900.0, gt=0.0, description="Inspector sessions expire after this "
                                                                      "many seconds unused.")
    inspector_num_cpus: float = Field(default=0.1, ge=0.0, description="CPUs of the inspector replica (one "
                                                                       "replica: sessions live in it).")
    inspector_max_edit_bytes: int = Field(default=32 * 1024 * 1024, ge=1024,
                                          description="Largest JSON body of a weight edit, bytes.")

    @model_validator(mode="after")
    def _serves_something(self) -> "ServeArgs":
        if not self.model_uri and not self.segmenter_model_uri:
            raise ValueError("nothing to serve: set model_uri (detector) and/or segmenter_model_uri")
        return self

    @model_validator(mode="after")
    def _int8_needs_its_float_model(self) -> "ServeArgs":
        if self.int8_model_uri and not self.model_uri:
            raise ValueError(f"int8_model_uri={self.int8_model_uri!r} needs model_uri: the int8 model is served "
                             "beside its float detector")
        return self

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> "ServeArgs":
        """Arguments from ``MODELCOMMONS_*`` settings, with explicit ``overrides`` on top."""
        s = settings or get_settings()
        values: dict[str, Any] = {
            "model_uri": s.detector_model_uri, "segmenter_model_uri": s.segmenter_model_uri,
            "embedding_cache_bytes": s.embedding_cache_bytes, "host": s.serve_host, "port": s.serve_port,
            "num_cpus": s.serve_num_cpus, "num_gpus": s.serve_num_gpus, "replicas": s.serve_replicas,
            "max_batch_size": s.serve_max_batch_size, "batch_wait_timeout_s": s.serve_batch_wait_timeout_s,
            "max_image_bytes": s.max_image_bytes, "max_image_pixels": s.max_image_pixels,
            "int8_model_uri": s.detector_int8_model_uri, "inspector_max_sessions": s.inspector_max_sessions,
            "inspector_max_bytes": s.inspector_max_bytes, "inspector_ttl_s": s.inspector_ttl_s,
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
                                  batch_wait_timeout_s=self.batch_wait_timeout_s,
                                  int8_model_uri=self.int8_model_uri or None)

    def segmenter_user_config(self) -> SegmenterUserConfig:
        # The prompt decoder keeps its own short batch wait (SegmenterUserConfig); the encoder, whose
        # step costs as much as a detector pass, waits like the detector.
        return SegmenterUserConfig(model_uri=self.segmenter_model_uri or None, cache_bytes=self.embedding_cache_bytes,
                                   max_batch_size=self.max_batch_size,
                                   encoder_batch_wait_timeout_s=self.batch_wait_timeout_s)


# ---- errors: every domain exception becomes a 4xx/5xx JSON body here, and only here -------------


class RequestFormatError(ValueError):
    """The request is not shaped as the API expects (missing field, wrong content type)."""

    def __init__(self, detail: str, status_code: int = 422) -> None:
        super().__init__(detail)
        self.status_code = status_code


class DetectorUnavailableError(RuntimeError):
    """A model deployment (detector or segmenter) does not answer. HTTP 503."""

    status_code = 503


class NotServedError(LookupError):
    """This application was built without the model an endpoint needs. HTTP 404."""

    status_code = 404


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorMessage, "description": "Not a decodable image (unknown format, truncated)."},
    404: {"model": ErrorMessage, "description": "The requested model is not loaded."},
    413: {"model": ErrorMessage, "description": "Image over the byte or pixel limit."},
    415: {"model": ErrorMessage, "description": "Body is neither multipart/form-data nor JSON."},
    422: {"model": ErrorMessage, "description": "Missing field or parameter out of range."},
    503: {"model": ErrorMessage, "description": "The detector deployment is not available."},
}
SEGMENT_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorMessage, "description": "Unknown image_id (never sent or evicted), or no segmenter."},
    422: {"model": ErrorMessage, "description": "Prompts outside the image, wrong shapes, labels that do not "
                                               "match the points, unknown output form."},
    503: {"model": ErrorMessage, "description": "The segmenter deployment is not available."},
}

app = FastAPI(
    title="ModelCommons serving",
    version="1",
    description="Object detection and promptable segmentation over HTTP. "
                "Errors are JSON {\"detail\": \"...\"}.",
)

def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside the detector replica, without Ray's wrapper and remote traceback."""
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


@app.exception_handler(BadImageError)
async def _bad_image(_: Request, exc: BadImageError) -> JSONResponse:
    return _error(exc.status_code, str(exc))


# Errors raised in a model deployment whose class carries its HTTP status (Ray may wrap them).
DEPLOYMENT_ERRORS = (UnknownModelError, UnknownImageError, PromptError, PrecisionUnavailableError)


async def _deployment_error(_: Request, exc: Exception) -> JSONResponse:
    # The handler was chosen by exc's class, so exc (wrapped or not) is one of DEPLOYMENT_ERRORS.
    return _error(next(kind.status_code for kind in DEPLOYMENT_ERRORS if isinstance(exc, kind)), str(_cause(exc)))


for _kind in DEPLOYMENT_ERRORS:
    app.add_exception_handler(_kind, _deployment_error)


# Most specific first: SessionError is also a KeyError, LayerIndexError an IndexError.
QUANTIZE_STATUS: tuple[tuple[type[QuantizeError], int], ...] = (
    (SessionLimitError, 429), (SessionStateError, 409), (SessionError, 404), (LayerIndexError, 404),
    (EditError, 422), (CalibrationError, 422), (UnsupportedLayerError, 422), (QuantizeError, 422),
)


@app.exception_handler(QuantizeError)
async def _quantize_error(_: Request, exc: QuantizeError) -> JSONResponse:
    cause = _cause(exc)
    status = next((code for kind, code in QUANTIZE_STATUS if isinstance(cause, kind)), 422)
    return _error(status, str(cause))


@app.exception_handler(NotServedError)
async def _not_served(_: Request, exc: NotServedError) -> JSONResponse:
    return _error(NotServedError.status_code, str(exc))


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
                           "properties": {"image": {"type": "string", "format": "binary"},
                                          "precision": {"type": "string", "enum": ["float", "int8"]}}},
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


def _validation_error(exc: ValidationError, loc: tuple[str, ...]) -> RequestValidationError:
    """A pydantic error on a body part, reported like FastAPI's own (``loc`` prefixed) -> 422."""
    return RequestValidationError([{**e, "loc": (*loc, *e["loc"])} for e in exc.errors(include_url=False)])


def _form_params(form: Any) -> DetectParams | None:
    """The DetectParams fields sent as multipart text fields (e.g. ``precision``), None when there are none.

    Any other field than ``image`` and those is refused (422): a misspelt option must not be ignored.
    """
    unknown = sorted(set(form.keys()) - {"image"} - set(DetectParams.model_fields))
    if unknown:
        raise RequestFormatError(f"unknown multipart field(s) {unknown}; send 'image' (a file) and optionally "
                                 f"{sorted(DetectParams.model_fields)} as text fields")
    fields = {k: v for k, v in form.items() if k in DetectParams.model_fields}
    if not fields:
        return None
    files = sorted(k for k, v in fields.items() if not isinstance(v, str))
    if files:
        raise RequestFormatError(f"multipart field(s) {files} must be text values, not files")
    try:
        return DetectParams.model_validate(fields)
    except ValidationError as exc:
        raise _validation_error(exc, ("form",)) from exc


# Defined before the ingress class: serve.ingress captures the module globals it sees then.
def _decode_and_hash(data: bytes, limits: ImageLimits) -> tuple[torch.Tensor, str]:
    """Untrusted image bytes -> (``3xHxW`` uint8 tensor, sha256 of its pixels = its image_id)."""
    image = decode_image(data, limits)
    return image, image_sha256(image)


_SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object",
                           "properties": {"image": {"type": "string", "format": "binary"},
                                          "prompts": {"type": "string",
                                                      "description": "JSON text of SegmentParams."}}},
            },
            "application/json": {"schema": SegmentJSONRequest.model_json_schema()},
        },
    }
}


INSPECT_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorMessage, "description": "Unknown, closed or expired session; layer index out of range; "
                                                "no inspector."},
    409: {"model": ErrorMessage, "description": "The session's state does not allow it yet (layer not run, "
                                                "every layer run already)."},
    422: {"model": ErrorMessage, "description": "Bad parameter (precision, index type, body shape)."},
    503: {"model": ErrorMessage, "description": "The inspector deployment is not available."},
}
INSPECT_CREATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorMessage, "description": "Unknown model reference, or no inspector."},
    422: {"model": ErrorMessage, "description": "Unknown calibrator or precision, bad percentile, a model the "
                                                "engine cannot run."},
    429: {"model": ErrorMessage, "description": "Too many open sessions, or the sessions' memory budget is used."},
    503: INSPECT_RESPONSES[503],
}
INSPECT_EDIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **INSPECT_RESPONSES,
    413: {"model": ErrorMessage, "description": "Body over inspector_max_edit_bytes."},
    415: {"model": ErrorMessage, "description": "Body is not JSON."},
    422: {"model": ErrorMessage, "description": "Values of the wrong shape or dtype, not numbers, or not finite; "
                                                "channel out of range; a layer without weights."},
}
_INSPECT_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"],
                           "properties": {"image": {"type": "string", "format": "binary"},
                                          **SessionCreateParams.model_json_schema()["properties"]}},
            },
            "application/json": {"schema": SessionCreateJSONRequest.model_json_schema()},
        },
    }
}
_INSPECT_EDIT_BODY = {
    "requestBody": {"required": True,
                    "content": {"application/json": {"schema": WeightEditRequest.model_json_schema()}}},
}


@serve.ingress(app)
class Ingress:
    """HTTP front door: validates and decodes input, calls the models, maps errors, counts metrics."""

    def __init__(self, detector: DeploymentHandle | None, *, limits: ImageLimits,
                 segmenter: DeploymentHandle | None = None, inspector: DeploymentHandle | None = None,
                 max_edit_bytes: int = 32 * 1024 * 1024) -> None:
        self._detector = detector
        self._segmenter = segmenter
        self._limits = limits
        self._inspector = inspector
        self._max_edit_bytes = max_edit_bytes

    def _content_type(self, request: Request) -> str:
        """The media type, after refusing (413) a declared body length over the image limit."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit():
            limit = self._b64_limit if ctype == "application/json" else self._limits.max_bytes + BODY_OVERHEAD_BYTES
            if int(declared) > limit:
                raise ImageTooLargeError(
                    f"request body is {declared} bytes; the image limit is {self._limits.max_bytes} bytes "
                    "(MODELCOMMONS_MAX_IMAGE_BYTES)")
        return ctype

    @property
    def _b64_limit(self) -> int:
        return (self._limits.max_bytes + 2) // 3 * 4 + BODY_OVERHEAD_BYTES

    def _b64_image(self, text: str) -> bytes:
        # Size before decoding: 4 base64 characters carry 3 bytes.
        check_byte_size(len(text) * 3 // 4 - text[-2:].count("="), self._limits)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadImageError(f"body.image_b64 is not valid base64: {exc}") from exc

    async def _image_bytes(self, request: Request) -> tuple[bytes, DetectParams | None]:
        """Raw image file bytes from a multipart or JSON request, plus the JSON body's parameters."""
        ctype = self._content_type(request)
        b64_limit = self._b64_limit
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
                return await upload.read(), _form_params(form)
        if ctype == "application/json":
            body = await _read_body(request, b64_limit)
            try:
                req = DetectJSONRequest.model_validate_json(body)
            except ValidationError as exc:
                raise _validation_error(exc, ("body",)) from exc
            data = self._b64_image(req.image_b64)
            params = DetectParams.model_validate(req.model_dump(exclude={"image_b64"}, exclude_none=True))
            return data, params
        raise RequestFormatError(
            f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data with a file field "
            "'image', or application/json with 'image_b64'", status_code=415)

    @app.post("/v1/detect", response_model=DetectResponse, openapi_extra=_DETECT_BODY,
              responses={200: {"content": {"image/png": {}},
                               "description": "Detections as JSON, or the annotated PNG (format=image)."},
                         **ERROR_RESPONSES,
                         404: {"model": ErrorMessage, "description": "The requested model is not loaded, or "
                                                                     "precision=int8 and it has no int8 version."}})
    async def detect(
        self,
        request: Request,
        format: Annotated[OutputFormat, Query(description="json: detections; image: annotated PNG")] = "json",
        score_threshold: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
        iou_threshold: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
        max_detections: Annotated[int | None, Query(ge=1, le=1000)] = None,
        model: Annotated[str | None, Query(min_length=1, max_length=256,
                                           description="Loaded model to use; unknown -> 404.")] = None,
        precision: Annotated[DetectPrecision | None, Query(
            description="float (default) or int8 (the model's int8 version; none -> 404). Also a form or "
                        "JSON field.")] = None,
    ) -> Response:
        """Detect objects in one image."""
        if self._detector is None:
            raise NotServedError("this service has no detector (ServeArgs.model_uri / "
                                 "MODELCOMMONS_DETECTOR_MODEL_URI is empty); POST /v1/segment may be served")
        start = time.perf_counter()
        data, body_params = await self._image_bytes(request)
        image = await asyncio.to_thread(decode_image, data, self._limits)  # (3, H, W) uint8
        query = {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
                 "max_detections": max_detections, "model": model, "precision": precision}
        if body_params is not None:
            query.update(body_params.model_dump(exclude_unset=True))
        params = DetectParams.model_validate(query)
        try:
            result: DetectResult = await self._detector.detect.remote(
                DetectTask(image=image, params=params, render=format == "image"))
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as exc:
            raise DetectorUnavailableError(f"detector deployment unavailable: {type(exc).__name__}") from exc
        resp = result.response
        metrics.observe_detect(resp.model, resp.version, time.perf_counter() - start, len(resp.detections),
                               resp.precision)
        if result.png is not None:
            return Response(content=result.png, media_type="image/png",
                            headers={"X-Model": resp.model, "X-Detections": str(len(resp.detections)),
                                     "X-Precision": resp.precision})
        return JSONResponse(resp.model_dump(mode="json"))

    async def _segment_input(self, request: Request) -> tuple[bytes | None, SegmentParams]:
        """Image file bytes (None when only an image_id is sent) and the prompts of a segment request."""
        ctype = self._content_type(request)
        data: bytes | None = None
        if ctype == "multipart/form-data":
            async with request.form(max_files=1, max_fields=16) as form:
                unknown = sorted(set(form.keys()) - {"image", "prompts"})
                if unknown:
                    raise RequestFormatError(f"unknown multipart field(s) {unknown}; send 'image' (a file) "
                                             "and 'prompts' (JSON text with points/labels/boxes/image_id)")
                upload, prompts = form.get("image"), form.get("prompts")
                if prompts is not None and not isinstance(prompts, str):
                    raise RequestFormatError("multipart field 'prompts' must be JSON text, not a file")
                try:
                    params = SegmentParams.model_validate_json(prompts or "{}")
                except ValidationError as exc:
                    raise _validation_error(exc, ("form", "prompts")) from exc
                if upload is not None:
                    if not isinstance(upload, UploadFile):
                        raise RequestFormatError("multipart field 'image' must be a file, not a text value")
                    if upload.size is not None:
                        check_byte_size(upload.size, self._limits)
                    data = await upload.read()
        elif ctype == "application/json":
            body = await _read_body(request, self._b64_limit)
            try:
                req = SegmentJSONRequest.model_validate_json(body)
            except ValidationError as exc:
                raise _validation_error(exc, ("body",)) from exc
            if req.image_b64 is not None:
                data = self._b64_image(req.image_b64)
            params = SegmentParams.model_validate(req.model_dump(exclude={"image_b64"}, exclude_unset=True))
        else:
            raise RequestFormatError(
                f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data with fields 'image' "
                "and 'prompts', or application/json with 'image_b64' or 'image_id'", status_code=415)
        if data is None and params.image_id is None:
            raise RequestFormatError("no image: send the image (multipart field 'image' or JSON 'image_b64') "
                                     "or the image_id of an earlier response")
        if data is not None and params.image_id is not None:
            raise RequestFormatError("send the image or an image_id, not both (the image's own image_id is "
                                     "its sha256 and is computed from it)")
        return data, params

    @app.post("/v1/segment", response_model=SegmentResponse, openapi_extra=_SEGMENT_BODY,
              responses={200: {"content": {"image/png": {}},
                               "description": "Masks as JSON; a PNG label image (output=mask); or the image "
                                              "with coloured masks (output=blended)."},
                         **SEGMENT_ERROR_RESPONSES})
    async def segment(
        self,
        request: Request,
        output: Annotated[SegmentOutput, Query(
            description="json: masks with RLE, bbox, area, polygon; mask: PNG label image "
                        "(0 background, i+1 for masks[i]); blended: PNG overlay")] = "json",
    ) -> Response:
        """Segment one image from point/box prompts, or everything in it when there is no prompt."""
        if self._segmenter is None:
            raise NotServedError("this service has no segmenter; start it with a segmenter model "
                                 "(ServeArgs.segmenter_model_uri / MODELCOMMONS_SEGMENTER_MODEL_URI)")
        data, params = await self._segment_input(request)
        image = None
        if data is not None:
            image, image_id = await asyncio.to_thread(_decode_and_hash, data, self._limits)
        else:
            assert params.image_id is not None  # checked by _segment_input
            image_id = params.image_id
        task = SegmentTask(image_id=image_id, params=params, output=params.output or output, image=image)
        try:
            result: SegmentResult = await self._segmenter.segment.remote(task)
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as exc:
            raise DetectorUnavailableError(f"segmenter deployment unavailable: {type(exc).__name__}") from exc
        resp = result.response
        return Response(content=result.body, media_type=result.media_type,
                        headers={"X-Model": resp.model, "X-Image-Id": resp.image_id,
                                 "X-Embedding-Cache": "hit" if resp.cache_hit else "miss"})

    @app.get("/healthz", response_model=Health, responses={503: ERROR_RESPONSES[503]})
    async def healthz(self) -> Health:
        """Ready when every configured model deployment answers with a loaded model."""
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
        models: list[ModelInfo | SegmenterInfo] = []
        for what, handle in (("detector", self._detector), ("segmenter", self._segmenter)):
            if handle is None:
                continue
            try:
                models.append(await asyncio.wait_for(handle.describe.remote(), timeout=HEALTH_TIMEOUT_S))
            except (TimeoutError, RayActorError, RayTaskError, DeploymentUnavailableError) as exc:
                raise DetectorUnavailableError(f"{what} deployment unavailable: {type(exc).__name__}") from exc
        return ModelList(models=models)

    # ---- /v1/inspect: quantization inspector sessions (serving.inspector.InspectorDeployment) --------

    async def _inspect(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` of the inspector deployment; 404 without an inspector, 503 when it is down."""
        if self._inspector is None:
            raise NotServedError("this service has no quantization inspector (ServeArgs.inspector_max_sessions / "
                                 "MODELCOMMONS_INSPECTOR_MAX_SESSIONS is 0)")
        try:
            return await getattr(self._inspector, method).remote(*args, **kwargs)
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as exc:
            raise DetectorUnavailableError(f"inspector deployment unavailable: {type(exc).__name__}") from exc

    async def _inspect_response(self, method: str, *args: Any, status_code: int = 200, **kwargs: Any) -> Response:
        """:meth:`_inspect`'s result as the HTTP response: PNG bytes as ``image/png``, a pydantic model as JSON."""
        result: BaseModel | bytes = await self._inspect(method, *args, **kwargs)
        if isinstance(result, bytes):
            return Response(content=result, media_type="image/png", status_code=status_code)
        return JSONResponse(result.model_dump(mode="json"), status_code=status_code)

    async def _session_input(self, request: Request) -> tuple[bytes, SessionCreateParams]:
        """Image bytes and options of a new inspector session (multipart or JSON)."""
        ctype = self._content_type(request)
        if ctype == "multipart/form-data":
            async with request.form(max_files=1, max_fields=16) as form:
                allowed = {"image", *SessionCreateParams.model_fields}
                unknown = sorted(set(form.keys()) - allowed)
                if unknown:
                    raise RequestFormatError(f"unknown multipart field(s) {unknown}; allowed: {sorted(allowed)}")
                upload = form.get("image")
                if upload is None:
                    raise RequestFormatError("multipart field 'image' is missing; send the image file as form "
                                             "field 'image'")
                if not isinstance(upload, UploadFile):
                    raise RequestFormatError("multipart field 'image' must be a file, not a text value")
                fields = {k: v for k, v in form.items() if k != "image"}
                files = sorted(k for k, v in fields.items() if not isinstance(v, str))
                if files:
                    raise RequestFormatError(f"multipart field(s) {files} must be text values, not files")
                try:
                    params = SessionCreateParams.model_validate(fields)
                except ValidationError as exc:
                    raise _validation_error(exc, ("form",)) from exc
                if upload.size is not None:
                    check_byte_size(upload.size, self._limits)
                return await upload.read(), params
        if ctype == "application/json":
            body = await _read_body(request, self._b64_limit)
            try:
                req = SessionCreateJSONRequest.model_validate_json(body)
            except ValidationError as exc:
                raise _validation_error(exc, ("body",)) from exc
            data = self._b64_image(req.image_b64)
            return data, SessionCreateParams.model_validate(req.model_dump(exclude={"image_b64"}, exclude_unset=True))
        raise RequestFormatError(
            f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data with a file field 'image' "
            "(and text fields model, precision, calibrator, percentile), or application/json with 'image_b64'",
            status_code=415)

    @app.get("/v1/inspect", response_model=InspectorInfo, responses={404: ERROR_RESPONSES[404]})
    async def inspect_info(self) -> Response:
        """Inspector limits (sessions, memory, expiry) and use; calibrators and precisions it accepts."""
        return await self._inspect_response("describe")

    @app.post("/v1/inspect/sessions", status_code=201, response_model=SessionInfo,
              openapi_extra=_INSPECT_CREATE_BODY, responses=INSPECT_CREATE_RESPONSES)
    async def inspect_create(self, request: Request) -> Response:
        """Open a session: one image through one model, layer by layer (nothing has run yet: position 0)."""
        data, params = await self._session_input(request)
        image = await asyncio.to_thread(decode_image, data, self._limits)  # (3, H, W) uint8
        return await self._inspect_response("create", CreateTask(image=image, params=params), status_code=201)

    @app.get("/v1/inspect/sessions/{session_id}", response_model=SessionInfo, responses=INSPECT_RESPONSES)
    async def inspect_session(self, session_id: Annotated[str, Path(max_length=64)]) -> Response:
        """The session's model, calibration, layer list, position and expiry."""
        return await self._inspect_response("info", session_id)

    @app.delete("/v1/inspect/sessions/{session_id}", status_code=204, response_class=Response,
                responses=INSPECT_RESPONSES)
    async def inspect_close(self, session_id: Annotated[str, Path(max_length=64)]) -> Response:
        """Close the session and free its memory."""
        await self._inspect("close", session_id)
        return Response(status_code=204)

    @app.post("/v1/inspect/sessions/{session_id}/step", response_model=LayerResponse, responses=INSPECT_RESPONSES)
    async def inspect_step(self, session_id: Annotated[str, Path(max_length=64)]) -> Response:
        """STEP: run the next layer (index = position) and report it; 409 after the last layer."""
        return await self._inspect_response("step", session_id)

    @app.post("/v1/inspect/sessions/{session_id}/run_to", response_model=LayerResponse,
              responses=INSPECT_RESPONSES)
    async def inspect_run_to(self, session_id: Annotated[str, Path(max_length=64)], body: RunToRequest) -> Response:
        """Run every layer up to and including ``index`` and report that layer."""
        return await self._inspect_response("run_to", session_id, body.index)

    @app.get("/v1/inspect/sessions/{session_id}/layers/{index}", response_model=LayerResponse,
             responses=INSPECT_RESPONSES)
    async def inspect_layer(
        self, session_id: Annotated[str, Path(max_length=64)], index: int,
        local: Annotated[bool, Query(description="Also run the layer alone on float inputs (local_error).")] = True,
    ) -> Response:
        """Report of layer ``index`` (it must have run: 409 otherwise): type, shapes, parameters, scales,
        input/output/weight statistics with histograms and saturation, float-vs-quantized error."""
        return await self._inspect_response("layer", session_id, index, local=local)

    @app.get("/v1/inspect/sessions/{session_id}/layers/{index}/image", response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "Channel grid as PNG."},
                        **INSPECT_RESPONSES})
    async def inspect_layer_image(
        self, session_id: Annotated[str, Path(max_length=64)], index: int,
        which: Annotated[Literal["input", "output", "weight", "error"], Query(
            description="first input, output, weights, or output minus the float run")] = "output",
    ) -> Response:
        """Picture of a layer's tensor: up to 16 channels as a grid of heat maps."""
        return await self._inspect_response("layer_image", session_id, index, which)

    @app.post("/v1/inspect/sessions/{session_id}/layers/{index}/weights", response_model=EditResponse,
              openapi_extra=_INSPECT_EDIT_BODY, responses=INSPECT_EDIT_RESPONSES)
    async def inspect_edit(self, session_id: Annotated[str, Path(max_length=64)], index: int,
                           request: Request) -> Response:
        """Edit layer ``index``'s weights (all values, or one output channel scaled), re-run it, show the change.
        Layers after it must run again (``session.position`` = index + 1)."""
        edit = await self._edit_body(request)
        return await self._inspect_response("edit", session_id, index, edit)

    async def _edit_body(self, request: Request) -> WeightEditRequest:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestFormatError(f"unsupported content type {ctype or '(none)'!r}: send the edit as "
                                     "application/json", status_code=415)
        limit = self._max_edit_bytes
        too_big = (f"weight edit body is over {limit} bytes (ServeArgs.inspector_max_edit_bytes); edit fewer "
                   "values or scale a channel")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestFormatError(too_big, status_code=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestFormatError(too_big, status_code=413)
            chunks.append(chunk)
        try:
            return WeightEditRequest.model_validate_json(b"".join(chunks))
        except ValidationError as exc:
            raise _validation_error(exc, ("body",)) from exc

    @app.post("/v1/inspect/sessions/{session_id}/cross", response_model=SessionStatus, responses=INSPECT_RESPONSES)
    async def inspect_cross(self, session_id: Annotated[str, Path(max_length=64)], body: CrossRequest) -> Response:
        """CROSS: layers ``index``.. run in ``to`` from now on; they (re-)run on the next step/run_to."""
        return await self._inspect_response("cross", session_id, body.index, body.to)

    @app.get("/v1/inspect/sessions/{session_id}/report", response_model=ModelReport,
             responses={200: {"content": {"image/png": {}}, "description": "Report as JSON, or its chart (png)."},
                        **INSPECT_RESPONSES})
    async def inspect_report(
        self, session_id: Annotated[str, Path(max_length=64)],
        format: Annotated[Literal["json", "png"], Query(description="json: ModelReport; png: SQNR chart")] = "json",
    ) -> Response:
        """Run the remaining layers; per-layer float-vs-quantized error of the whole model."""
        return await self._inspect_response("report", session_id, png=format == "png")

    @app.get("/v1/inspect/sessions/{session_id}/graph", response_model=ModelGraph,
             responses={200: {"content": {"image/png": {}}, "description": "Graph as JSON, or its picture (png)."},
                        **INSPECT_RESPONSES})
    async def inspect_graph(
        self, session_id: Annotated[str, Path(max_length=64)],
        format: Annotated[Literal["json", "png"], Query(description="json: ModelGraph; png: picture")] = "json",
    ) -> Response:
        """Model graph: nodes (op, shapes, parameter count, this session's precision, scales) and edges."""
        return await self._inspect_response("graph", session_id, png=format == "png")


def build_app(args: ServeArgs) -> Application:
    """The application graph: ``Ingress(DetectorDeployment(...), segmenter=SegmenterDeployment(...),
    inspector=InspectorDeployment(...))``.

    Either model may be absent (an empty URI), the inspector too (``inspector_max_sessions=0``);
    resources come from ``args``.
    """
    detector_app = None
    if args.model_uri:
        detector = serve.deployment(name="detector")(DetectorDeployment).options(
            num_replicas=args.replicas,
            ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
            user_config=args.detector_user_config().model_dump(),
            # A replica must accept at least a full batch at once, or batches never fill.
            max_ongoing_requests=max(args.max_ongoing_requests, args.max_batch_size),
        )
        # int8_model_uri only when set: the deployment finds a registry int8 version by itself.
        int8 = {"int8_model_uri": args.int8_model_uri} if args.int8_model_uri else {}
        detector_app = detector.bind(model_uri=args.model_uri, **int8)
    segmenter_app = None
    if args.segmenter_model_uri:
        # One replica: the embedding cache lives in the replica, so more replicas would miss image_ids.
        segmenter = serve.deployment(name="segmenter")(SegmenterDeployment).options(
            num_replicas=1,
            ray_actor_options={"num_cpus": args.segmenter_num_cpus, "num_gpus": args.num_gpus},
            user_config=args.segmenter_user_config().model_dump(),
            max_ongoing_requests=max(args.max_ongoing_requests, args.max_batch_size),
        )
        segmenter_app = segmenter.bind(model_uri=args.segmenter_model_uri, cache_bytes=args.embedding_cache_bytes)
    inspector_app = None
    if args.inspector_max_sessions > 0:
        # One replica: sessions are state held in it.
        inspector = serve.deployment(name="inspector")(InspectorDeployment).options(
            num_replicas=1, ray_actor_options={"num_cpus": args.inspector_num_cpus},
            max_ongoing_requests=args.max_ongoing_requests,
        )
        inspector_app = inspector.bind(
            served_model_uri=args.model_uri or None, int8_model_uri=args.int8_model_uri or None,
            max_sessions=args.inspector_max_sessions, max_bytes=args.inspector_max_bytes,
            ttl_s=args.inspector_ttl_s)
    ingress = serve.deployment(name="ingress")(Ingress).options(
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
        max_ongoing_requests=args.max_ongoing_requests,
    )
    return ingress.bind(detector_app, limits=args.limits, segmenter=segmenter_app, inspector=inspector_app,
                        max_edit_bytes=args.inspector_max_edit_bytes)


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
