"""Request and response bodies of the HTTP API (pydantic, limits in ``Field``).

Coordinates are always XYXY in pixels of the original uploaded image (after its EXIF orientation is
applied), with the origin at the top-left corner.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Hard ceiling on the base64 text of a JSON request; the configured byte limit is checked on top.
MAX_IMAGE_B64_CHARS = 64 * 1024 * 1024

OutputFormat = Literal["json", "image"]


class ErrorMessage(BaseModel):
    """Body of every 4xx/5xx answer."""

    detail: str = Field(description="What was wrong with the request, and what is allowed.")


class DetectParams(BaseModel):
    """Post-processing knobs a client may set per request; ``None`` keeps the deployment's default."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float | None = Field(default=None, ge=0.0, le=1.0,
                                          description="Drop detections scoring below this.")
    iou_threshold: float | None = Field(default=None, ge=0.0, le=1.0,
                                        description="NMS IoU above which the lower-scoring box is dropped.")
    max_detections: int | None = Field(default=None, ge=1, le=1000,
                                       description="Keep at most this many detections per image.")
    model: str | None = Field(default=None, min_length=1, max_length=256,
                              description="Name (or name@alias, name/version, URI) of the loaded model "
                                          "to use; an unknown name answers 404.")


class DetectJSONRequest(DetectParams):
    """JSON variant of ``POST /v1/detect``: the image travels base64-encoded."""

    image_b64: str = Field(min_length=1, max_length=MAX_IMAGE_B64_CHARS,
                           description="The encoded image file (PNG, JPEG, ...) in standard base64.")


class Detection(BaseModel):
    """One detected object."""

    box: tuple[float, float, float, float] = Field(
        description="x_min, y_min, x_max, y_max in original-image pixels (XYXY)."
    )
    score: float = Field(ge=0.0, le=1.0)
    class_id: int = Field(ge=0, description="0-based class index.")
    class_name: str = Field(description="Class name from the model config ('' if the model has none).")


class DetectResponse(BaseModel):
    """JSON answer of ``POST /v1/detect``."""

    model: str
    version: str | None
    alias: str | None
    precision: str
    width: int = Field(ge=1, description="Width of the uploaded image in pixels.")
    height: int = Field(ge=1, description="Height of the uploaded image in pixels.")
    detections: list[Detection]


class ModelInfo(BaseModel):
    """A loaded model, as listed by ``GET /v1/models``."""

    name: str
    version: str | None
    alias: str | None
    precision: str
    uri: str
    run_id: str | None
    task: Literal["detection"] = "detection"
    input_size: int = Field(ge=1, description="Side of the square letterboxed model input, pixels.")
    class_names: list[str]
    score_threshold: float
    iou_threshold: float
    max_detections: int
    max_batch_size: int
    batch_wait_timeout_s: float


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str] = Field(description="Names of the loaded models.")
