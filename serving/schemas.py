"""Request and response bodies of the HTTP API (pydantic, limits in ``Field``).

Coordinates are always XYXY in pixels of the original uploaded image (after its EXIF orientation is
applied), with the origin at the top-left corner.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.quantize.inspector import EditResult, LayerReport, SessionState

# Hard ceiling on the base64 text of a JSON request; the configured byte limit is checked on top.
MAX_IMAGE_B64_CHARS = 64 * 1024 * 1024

OutputFormat = Literal["json", "image"]
# Precisions of POST /v1/detect: the float model, or its deployable int8 version (real int8 CPU kernels).
DetectPrecision = Literal["float", "int8"]


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
    precision: DetectPrecision | None = Field(
        default=None, description="float (the default) or int8: the model's int8 version, when it has one "
                                  "(GET /v1/models lists 'precisions'); int8 without one answers 404.")


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
    calibrator: str | None = Field(default=None, description="precision int8: the calibration method of the "
                                                             "int8 version that ran; None for float.")


class Int8Info(BaseModel):
    """The deployable int8 version a detector replica serves beside its float model."""

    name: str | None = Field(description="Registered model name (None for a plain directory).")
    version: str | None = Field(description="Registry version of the int8 model (None outside the registry).")
    float_version: str | None = Field(description="The float version it was quantized from (its "
                                                  "'float_version' tag).")
    uri: str
    calibrator: str = Field(description="Activation calibration method: minmax, percentile, kl or log2.")
    backend: str = Field(description="PyTorch quantized backend the int8 kernels run on, e.g. x86.")
    source: Literal["registry", "int8_model_uri"] = Field(
        description="registry: the newest version tagged precision=int8 and float_version=<the float "
                    "version>; int8_model_uri: set explicitly in the serving configuration.")


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
    precisions: list[str] = Field(default_factory=lambda: ["float"],
                                  description="Values POST /v1/detect accepts for 'precision'.")
    int8: Int8Info | None = Field(default=None, description="The int8 version served beside the float model.")
    int8_error: str | None = Field(default=None, description="Why an int8 version found in the registry "
                                                             "could not be loaded (float still serves).")


class CacheInfo(BaseModel):
    """Counters of a segmenter replica's image-embedding cache (an LRU bounded in bytes)."""

    capacity_bytes: int = Field(ge=0)
    bytes: int = Field(ge=0, description="Bytes held now; never above capacity_bytes.")
    entries: int = Field(ge=0)
    hits: int = Field(ge=0)
    misses: int = Field(ge=0)
    evictions: int = Field(ge=0)
    rejected: int = Field(ge=0, description="Embeddings larger than the whole capacity, never stored.")


class SegmenterInfo(BaseModel):
    """The loaded segmenter, as listed by ``GET /v1/models``."""

    name: str
    version: str | None
    alias: str | None
    precision: str
    uri: str
    run_id: str | None
    task: Literal["segmentation"] = "segmentation"
    preset: str
    input_size: int = Field(ge=1, description="Longest image side after resizing for the encoder, pixels.")
    encoder_runs: int = Field(ge=0, description="Images this replica has run through the image encoder.")
    decoder_requests: int = Field(ge=0, description="Prompted requests through the batched prompt decoder.")
    decoder_batches: int = Field(ge=0, description="Batches those requests were grouped into.")
    embedding_cache: CacheInfo
    max_batch_size: int
    batch_wait_timeout_s: float
    points_per_side: int
    pred_iou_thresh: float
    stability_score_thresh: float
    box_nms_thresh: float
    max_masks: int


class ModelList(BaseModel):
    models: list[Annotated[ModelInfo | SegmenterInfo, Field(discriminator="task")]]


# ---- POST /v1/segment -----------------------------------------------------------------------------

SegmentOutput = Literal["json", "mask", "blended"]
IMAGE_ID_PATTERN = r"^[0-9a-f]{64}$"
MAX_PROMPT_POINTS = 64
MAX_PROMPT_BOXES = 64
# The mask PNG is an 8-bit label image: label 0 is background, so at most 255 masks.
MAX_MASKS = 255


class SegmentParams(BaseModel):
    """Prompts and knobs of ``POST /v1/segment`` (the JSON body, or the multipart ``prompts`` field).

    Prompts, in original-image pixels (XY, origin top-left):

    - ``points`` with one ``labels`` entry each (1 foreground, 0 background): one prompt, one mask;
    - ``boxes`` (XYXY): one prompt and one mask per box; ``points`` may refine a single box;
    - neither: automatic "segment everything" over a ``points_per_side`` x ``points_per_side`` grid.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image_id: str | None = Field(default=None, pattern=IMAGE_ID_PATTERN,
                                 description="image_id of an earlier response, sent instead of the image.")
    points: list[tuple[float, float]] | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPT_POINTS, description="Point prompts, [x, y] pixels.")
    labels: list[Literal[0, 1]] | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPT_POINTS,
        description="One per point: 1 foreground, 0 background.")
    boxes: list[tuple[float, float, float, float]] | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPT_BOXES,
        description="Box prompts, [x_min, y_min, x_max, y_max] pixels.")
    output: SegmentOutput | None = Field(default=None, description="json | mask | blended (wins over ?output=).")
    points_per_side: int | None = Field(default=None, ge=1, le=64, description="Automatic mode: grid size.")
    pred_iou_thresh: float | None = Field(default=None, ge=0.0, le=1.0,
                                          description="Automatic mode: drop masks with a lower predicted IoU.")
    stability_score_thresh: float | None = Field(default=None, ge=0.0, le=1.0,
                                                 description="Automatic mode: drop less stable masks.")
    box_nms_thresh: float | None = Field(default=None, ge=0.0, le=1.0,
                                         description="Automatic mode: NMS IoU threshold on mask boxes.")
    max_masks: int | None = Field(default=None, ge=1, le=MAX_MASKS, description="Automatic mode: keep at most.")

    @model_validator(mode="after")
    def _prompts_are_consistent(self) -> SegmentParams:
        n_points = len(self.points or ())
        if self.labels is not None and self.points is None:
            raise ValueError(f"labels ({len(self.labels)}) were given without points; send 'points' as "
                             "[[x, y], ...] with one label each")
        if self.points is not None:
            if self.labels is None:
                raise ValueError(f"points ({n_points}) need 'labels': one per point, 1 = foreground, "
                                 "0 = background")
            if len(self.labels) != n_points:
                raise ValueError(f"labels has {len(self.labels)} entries but points has {n_points}; "
                                 "give exactly one label (1 = foreground, 0 = background) per point")
        if self.points is not None and self.boxes is not None and len(self.boxes) > 1:
            raise ValueError(f"points can refine one box only, got {len(self.boxes)} boxes; send the boxes "
                             "alone (one mask each) or one box with its points")
        return self

    @property
    def automatic(self) -> bool:
        """No prompt at all: segment everything."""
        return self.points is None and self.boxes is None


class SegmentJSONRequest(SegmentParams):
    """JSON variant of ``POST /v1/segment``: the image travels base64-encoded, or is named by ``image_id``."""

    image_b64: str | None = Field(default=None, min_length=1, max_length=MAX_IMAGE_B64_CHARS,
                                  description="The encoded image file (PNG, JPEG, ...) in standard base64.")


class RLE(BaseModel):
    """COCO run-length encoding (pycocotools ``mask.encode``), column-major, counts as a string."""

    size: tuple[int, int] = Field(description="[height, width] of the image.")
    counts: str


class SegmentMask(BaseModel):
    """One segment. Segments are disjoint: where masks overlap, the higher-scoring one keeps the pixels."""

    segmentation: RLE
    bbox: tuple[float, float, float, float] = Field(description="x, y, width, height in pixels (COCO XYWH).")
    area: int = Field(ge=0, description="Pixels in the segment.")
    score: float = Field(description="The model's predicted IoU of the mask.")
    stability_score: float = Field(ge=0.0, le=1.0,
                                   description="IoU of the mask thresholded at logit +1 and at -1.")
    polygon: list[list[float]] = Field(
        description="Outer boundaries as COCO polygons [x1, y1, x2, y2, ...] in pixel-edge coordinates; "
                    "holes are carried by the RLE only.")
    prompt_index: int | None = Field(description="Index of the box prompt (0 for a points-only prompt); "
                                                 "None in automatic mode.")
    point: tuple[float, float] | None = Field(default=None,
                                              description="Automatic mode: the grid point that produced it.")


class SegmentResponse(BaseModel):
    """JSON answer of ``POST /v1/segment``. ``masks`` are ordered by score; label i+1 of the mask PNG is
    ``masks[i]``."""

    model: str
    version: str | None
    alias: str | None
    precision: str
    image_id: str = Field(description="sha256 of the decoded pixels; send it instead of the image next time.")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    mode: Literal["points", "boxes", "automatic"]
    cache_hit: bool = Field(description="True when the image embedding came from the cache (no encoder run).")
    masks: list[SegmentMask]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str] = Field(description="Names of the loaded models.")


# ---- /v1/inspect: the quantization inspector (STEP / CROSS / edit sessions) -----------------------

InspectPrecision = Literal["float", "hybrid", "int8"]
EditDtype = Literal["float32", "float64"]
MAX_MODEL_REF_CHARS = 256


class SessionCreateParams(BaseModel):
    """Options of ``POST /v1/inspect/sessions`` (multipart text fields, or the JSON body)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(
        default=None, min_length=1, max_length=MAX_MODEL_REF_CHARS,
        description="Registered model as name@alias or name/version (models:/ prefix optional), or the name "
                    "of the served detector; default: the served detector.")
    precision: InspectPrecision = Field(default="int8", description="Precision every layer starts in; "
                                                                    "CROSS changes it from a layer onward.")
    calibrator: str | None = Field(
        default=None, min_length=1, max_length=32,
        description="minmax, percentile, kl or log2: calibrate on the uploaded image (and four augmented "
                    "copies) with it. Default: the ranges of the model's int8 version when it has one, else "
                    "the service's default calibrator on the image.")
    percentile: float | None = Field(default=None, ge=50.0, le=100.0,
                                     description="Calibrator 'percentile' only (default 99.99).")


class SessionCreateJSONRequest(SessionCreateParams):
    """JSON variant of ``POST /v1/inspect/sessions``: the image travels base64-encoded."""

    image_b64: str = Field(min_length=1, max_length=MAX_IMAGE_B64_CHARS,
                           description="The encoded image file (PNG, JPEG, ...) in standard base64.")


class CalibrationInfo(BaseModel):
    """Where a session's int8 scales come from."""

    source: Literal["int8_version", "image"] = Field(
        description="int8_version: the activation ranges of the model's int8 version (its quantization.json); "
                    "image: calibrated on the uploaded image and its augmented copies.")
    method: str = Field(description="minmax, percentile, kl or log2.")
    percentile: float | None = None
    images: int = Field(ge=1, description="Calibration images the ranges were computed from.")
    weight_granularity: str = Field(description="per_channel or per_tensor weight scales.")
    int8_version: str | None = Field(default=None, description="Registry version of that int8 model.")
    note: str = Field(description="The same, in one sentence for a person.")


class InspectModel(BaseModel):
    """The model a session inspects."""

    name: str
    version: str | None
    alias: str | None
    uri: str
    input_size: int = Field(ge=1, description="Side of the square letterboxed input the session runs on.")
    class_names: list[str]


class LayerSummary(BaseModel):
    """One layer of the traced (BatchNorm-folded) model, in execution order."""

    index: int
    name: str = Field(description="Layer name; also the name of the tensor it produces.")
    op: str = Field(description="Module class or function, e.g. Conv2d, LeakyReLU, add, cat.")
    kind: str
    target: str = Field(description="Module path or function name.")
    inputs: list[str] = Field(description="Names of the tensors it reads.")
    output_shape: list[int]
    param_count: int = Field(ge=0)


class SessionStatus(SessionState):
    """A session's position and per-layer precisions, and when it expires if left unused."""

    expires_at: datetime = Field(description="UTC time the session expires unless used again before.")
    ttl_s: float = Field(description="Seconds of no use after which a session expires.")


class SessionInfo(SessionStatus):
    """Answer of ``POST /v1/inspect/sessions`` and ``GET /v1/inspect/sessions/{id}``."""

    model: InspectModel
    precision: InspectPrecision = Field(description="The precision the session was created with.")
    calibration: CalibrationInfo
    image_width: int = Field(ge=1, description="Width of the uploaded image, pixels.")
    image_height: int = Field(ge=1, description="Height of the uploaded image, pixels.")
    layers: list[LayerSummary]


class LayerResponse(BaseModel):
    """A layer's report (after STEP, run_to, or inspecting a layer that has run) and the session's status."""

    session: SessionStatus
    layer: LayerReport


class RunToRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(description="Run every layer up to and including this one (0-based).")


class CrossRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(description="First layer that runs in the new precision.")
    to: InspectPrecision = Field(description="Precision of layers index.. from now on.")


class ScaleChannel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    channel: int = Field(ge=0, description="Output channel (row of the weight) to scale.")
    factor: float = Field(description="Multiply that channel's weights by this.")


class WeightEditRequest(BaseModel):
    """Body of ``POST /v1/inspect/sessions/{id}/layers/{k}/weights``: exactly one of values, scale_channel."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    values: list[Any] | None = Field(
        default=None, min_length=1,
        description="New weights as nested lists in the layer's weight shape (Conv2d: out x in/groups x kh x "
                    "kw; Linear: out x in), numbers only.")
    dtype: EditDtype = Field(default="float32", description="Element type of 'values' (float only).")
    scale_channel: ScaleChannel | None = None

    @model_validator(mode="after")
    def _one_edit(self) -> WeightEditRequest:
        if (self.values is None) == (self.scale_channel is None):
            raise ValueError("give exactly one of 'values' (nested lists of the weight's shape) or "
                             "'scale_channel' ({'channel': c, 'factor': f})")
        return self


class EditResponse(BaseModel):
    """The edited layer re-run: its new report and how its output changed. Later layers must re-run."""

    session: SessionStatus
    edit: EditResult


class InspectorInfo(BaseModel):
    """``GET /v1/inspect``: limits and current use of the inspector."""

    sessions: int = Field(ge=0, description="Open sessions now.")
    max_sessions: int = Field(ge=1)
    bytes_reserved: int = Field(ge=0, description="Memory held by open sessions, bytes.")
    max_bytes: int = Field(ge=1)
    ttl_s: float
    calibrators: list[str]
    default_calibrator: str
    precisions: list[str]
    served_model: str | None = Field(description="Model used when a session names none.")
