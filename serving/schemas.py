"""Request and response bodies of the HTTP API (pydantic, limits in ``Field``).

Coordinates are always XYXY in pixels of the original uploaded image (after its EXIF orientation is
applied), with the origin at the top-left corner.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
