"""Segmenter deployment: promptable (SAM-style) segmentation with an image-embedding cache.

A request runs in three steps:

1. **Embedding.** The image's embedding is looked up in an LRU cache keyed by the sha256 of its
   decoded pixels (``image_id``). On a miss the image goes through the image encoder, batched across
   concurrent requests (``@serve.batch`` on :meth:`SegmenterDeployment._encode_batch`); concurrent
   requests for the same new image share one encoder run. A request may name a cached image by
   ``image_id`` alone; an unknown id is :class:`UnknownImageError` (HTTP 404).
2. **Prompt decoding.** Points (with labels) and boxes are checked against the image
   (:class:`PromptError`, HTTP 422), mapped to the model's input frame and decoded by the prompt
   encoder and mask decoder, batched across concurrent requests
   (``@serve.batch`` on :meth:`SegmenterDeployment._decode_batch`). With no prompt at all, automatic
   mode decodes a point grid, keeps masks whose predicted IoU and stability score pass the
   thresholds, and removes duplicates with NMS on the mask boxes (``torchvision.ops.batched_nms``).
3. **Answer.** Masks are upscaled to the original image, ranked by score, made disjoint and written
   as JSON (COCO RLE, bbox, area, polygon), a PNG label image or a blended PNG
   (:mod:`serving.segment_outputs`).

``SegmenterDeployment`` is a plain class; ``serving.app`` turns it into a Ray Serve deployment. The
cache lives in the replica: with several replicas, an ``image_id`` is known only to the replica that
encoded it, and another replica answers 404 (the client then sends the image again).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from serving.detector import ModelLoadError
from serving.embedding_cache import EmbeddingCache
from serving.schemas import (
    RLE,
    CacheInfo,
    SegmenterInfo,
    SegmentMask,
    SegmentOutput,
    SegmentParams,
    SegmentResponse,
)
from serving.segment_outputs import (
    blended_png,
    encode_rles,
    hard_segmentation,
    label_masks,
    label_png,
    mask_polygons,
    rle_bbox_area,
)

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from components.segment.model import SegmenterConfig
    from components.tracking.resolve import ResolvedModel

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# Upscaling logits to the original image costs 4 bytes per pixel per mask: cap one chunk's floats.
UPSCALE_CHUNK_FLOATS = 16 * 1024 * 1024


class UnknownImageError(LookupError):
    """``image_id`` names no cached embedding (never sent, or evicted). HTTP 404."""

    status_code = 404


class PromptError(ValueError):
    """Prompts that do not fit the image (outside it, degenerate boxes). HTTP 422."""

    status_code = 422


class SegmenterUserConfig(BaseModel):
    """Runtime settings delivered through ``reconfigure(user_config)`` (Ray Serve ``user_config``).

    The automatic-mode defaults are ``segment_anything``'s ``SamAutomaticMaskGenerator`` defaults,
    except ``points_per_side`` (16 instead of 32: a quarter of the decoder work on a CPU).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str | None = Field(default=None, min_length=1,
                                  description="Model to serve; None keeps the one given at start.")
    cache_bytes: int = Field(default=DEFAULT_CACHE_BYTES, ge=0, description="Embedding cache bound, bytes.")
    max_batch_size: int = Field(default=16, ge=1, le=256, description="Prompt-decoder batch; 1 = off.")
    # 0: a lone prompt never waits for company. The decoder step takes a few ms, so any wait costs a
    # cached prompt more than batching saves it; requests that arrive while a batch runs still queue
    # up and go together in the next one. The encoder step is worth waiting for.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=1.0, description="Prompt-decoder wait.")
    encoder_max_batch_size: int = Field(default=4, ge=1, le=64, description="Images per encoder batch.")
    encoder_batch_wait_timeout_s: float = Field(default=0.01, ge=0.0, le=1.0)
    points_per_side: int = Field(default=16, ge=1, le=64)
    points_per_batch: int = Field(default=64, ge=1, le=1024, description="Grid points per decoder pass.")
    pred_iou_thresh: float = Field(default=0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(default=0.95, ge=0.0, le=1.0)
    stability_score_offset: float = Field(default=1.0, gt=0.0)
    box_nms_thresh: float = Field(default=0.7, ge=0.0, le=1.0)
    max_masks: int = Field(default=100, ge=1, le=255)


@dataclass(frozen=True)
class SegmentTask:
    """One request. ``image`` is ``3xHxW`` uint8 RGB (``decode_image``), or None to use ``image_id``."""

    image_id: str  # sha256 of the decoded pixels (serving.embedding_cache.image_sha256)
    params: SegmentParams
    output: SegmentOutput = "json"
    image: torch.Tensor | None = None


@dataclass(frozen=True)
class SegmentResult:
    """The answer, rendered in the replica so the ingress only relays bytes.

    ``body`` is the JSON text of the full response (``output=json``) or the PNG (``mask``/``blended``);
    ``response`` carries only the header facts (model, image_id, cache_hit), its ``masks`` left empty.
    Serialising here, in the replica's worker thread, keeps the masks' RLEs and polygons from being
    pickled across the ingress hop, which a cached prompt would otherwise pay for twice.
    """

    response: SegmentResponse
    body: bytes
    media_type: str  # "application/json" or "image/png"

    @classmethod
    def from_response(cls, response: SegmentResponse) -> SegmentResult:
        return cls(response=response.model_copy(update={"masks": []}), body=response.model_dump_json().encode(),
                   media_type="application/json")

    @classmethod
    def from_png(cls, response: SegmentResponse, png: bytes) -> SegmentResult:
        return cls(response=response.model_copy(update={"masks": []}), body=png, media_type="image/png")


@dataclass(frozen=True)
class ImageEmbedding:
    """One encoded image: what a later prompt needs, so it never runs the encoder again."""

    features: torch.Tensor  # (1, C, h, w) image embedding
    image: torch.Tensor  # (3, H, W) uint8, kept for blended answers to image_id requests
    input_size: tuple[int, int]  # (h, w) after resizing the longest side to the model input, before padding

    @property
    def original_size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement() + self.image.nelement()


@dataclass(frozen=True)
class LoadedSegmenter:
    """A segmenter ready to run, with the registry facts it was resolved from."""

    model: Sam
    config: SegmenterConfig
    resolved: ResolvedModel
    device: torch.device

    @property
    def name(self) -> str:
        return self.resolved.display_name

    @property
    def img_size(self) -> int:
        return int(self.model.image_encoder.img_size)

    @cached_property
    def dense_pe(self) -> torch.Tensor:
        """``(1, C, E, E)`` positional encoding of the embedding grid: a constant of the model, which
        ``get_dense_pe`` would otherwise recompute (sin/cos over the grid) for every prompt decode."""
        with torch.no_grad():
            return self.model.prompt_encoder.get_dense_pe()


def load_segmenter_model(uri: str) -> LoadedSegmenter:
    """Resolve ``uri`` (``models:/name@alias``, ``runs:/``, ``s3://``, a directory) and load the segmenter.

    Raises :class:`~serving.detector.ModelLoadError` naming the URI and the cause.
    """
    from components.segment.model import load_segmenter
    from components.tracking.resolve import resolve_model  # MLflow import is slow: only when loading

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = resolve_model(uri)
        model, config = load_segmenter(resolved.local_dir, device=device)
    except Exception as exc:  # every cause (registry, network, files) means the same: do not serve
        raise ModelLoadError(f"segmenter could not load model {uri!r}: {type(exc).__name__}: {exc}") from exc
    return LoadedSegmenter(model=model, config=config, resolved=resolved, device=device)


# ---- step 1: image -> embedding -------------------------------------------------------------------


def encode_images(loaded: LoadedSegmenter, images: list[torch.Tensor]) -> list[ImageEmbedding]:
    """Run the image encoder once over ``images`` (each ``3xHxW`` uint8) and return one embedding each.

    Each image's longest side is resized to the model input by SAM's ``ResizeLongestSide.apply_image``
    (PIL bilinear on uint8, what ``SamPredictor`` and this project's training use, so served inputs
    match trained ones), then normalised and padded bottom/right by ``Sam.preprocess``.
    """
    model = loaded.model
    transform = ResizeLongestSide(loaded.img_size)
    inputs: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for image in images:
        resized = transform.apply_image(image.permute(1, 2, 0).numpy())  # (h, w, 3) uint8
        x = torch.from_numpy(resized).permute(2, 0, 1).to(loaded.device, torch.float32)  # (3, h, w)
        inputs.append(model.preprocess(x))  # (3, S, S)
        sizes.append((int(x.shape[-2]), int(x.shape[-1])))
    with torch.inference_mode():
        features = model.image_encoder(torch.stack(inputs))  # (B, C, S/p, S/p)
    # clone: a slice would keep the whole batch's storage alive and make nbytes a lie.
    return [ImageEmbedding(features=features[i:i + 1].clone(), image=image, input_size=sizes[i])
            for i, image in enumerate(images)]


# ---- step 2: prompts -> low-resolution mask logits -------------------------------------------------


@dataclass(frozen=True)
class PromptBatch:
    """``B`` prompts on one image, in original-image pixels."""

    coords: torch.Tensor | None  # (B, N, 2) XY
    labels: torch.Tensor | None  # (B, N) 1 foreground, 0 background
    boxes: torch.Tensor | None  # (B, 4) XYXY
    multimask: bool  # three candidate masks per prompt (then the best is kept): for a lone point

    @property
    def size(self) -> int:
        src = self.boxes if self.boxes is not None else self.coords
        return 0 if src is None else int(src.shape[0])

    @property
    def signature(self) -> tuple[int | None, bool, bool]:
        """Prompts with equal signatures stack along the batch dimension into one decoder pass."""
        return (None if self.coords is None else int(self.coords.shape[1]), self.boxes is not None,
                self.multimask)


def build_prompts(params: SegmentParams, width: int, height: int) -> PromptBatch:
    """Check ``params``' prompts against a ``width`` x ``height`` image and stack them as tensors.

    Raises :class:`PromptError` naming the first point or box that is outside the image or degenerate.
    """
    coords = labels = boxes = None
    if params.points is not None and params.labels is not None:
        for i, (x, y) in enumerate(params.points):
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptError(f"points[{i}] = [{x:g}, {y:g}] is outside the {width}x{height} image: "
                                  f"x must be in [0, {width}] and y in [0, {height}]")
        n_boxes = len(params.boxes or ()) or 1
        coords = torch.tensor(params.points, dtype=torch.float32).unsqueeze(0).repeat(n_boxes, 1, 1)
        labels = torch.tensor(params.labels, dtype=torch.int64).unsqueeze(0).repeat(n_boxes, 1)
    if params.boxes is not None:
        for i, (x0, y0, x1, y1) in enumerate(params.boxes):
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise PromptError(
                    f"boxes[{i}] = [{x0:g}, {y0:g}, {x1:g}, {y1:g}] does not fit the {width}x{height} image: "
                    f"need 0 <= x_min < x_max <= {width} and 0 <= y_min < y_max <= {height}")
        boxes = torch.tensor(params.boxes, dtype=torch.float32)
    # One point is ambiguous (part or whole?): ask for three masks and keep the best, as SAM advises.
    multimask = boxes is None and coords is not None and coords.shape[1] == 1
    return PromptBatch(coords=coords, labels=labels, boxes=boxes, multimask=multimask)


def decode_prompts(loaded: LoadedSegmenter, embedding: ImageEmbedding,
                   prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder -> low-res logits ``(B, C, l, l)`` and predicted IoU ``(B, C)``.

    ``C`` is 3 with ``prompts.multimask``, else 1; ``l`` is 4x the embedding side.
    """
    model, dev = loaded.model, loaded.device
    transform = ResizeLongestSide(loaded.img_size)
    points = None
    if prompts.coords is not None and prompts.labels is not None:
        points = (transform.apply_coords_torch(prompts.coords, embedding.original_size).to(dev),
                  prompts.labels.to(dev))
    boxes = None
    if prompts.boxes is not None:
        boxes = transform.apply_boxes_torch(prompts.boxes, embedding.original_size).to(dev)
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, iou = model.mask_decoder(
            image_embeddings=embedding.features.to(dev), image_pe=loaded.dense_pe,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=prompts.multimask)
    return low_res.cpu(), iou.cpu()


def decode_together(loaded: LoadedSegmenter, items: list[tuple[ImageEmbedding, PromptBatch]]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode many requests' prompts: one decoder pass per (image, prompt signature) group."""
    groups: dict[tuple[int, tuple[int | None, bool, bool]], list[int]] = {}
    for i, (embedding, prompts) in enumerate(items):
        groups.setdefault((id(embedding), prompts.signature), []).append(i)
    out: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(items)
    for members in groups.values():
        embedding = items[members[0]][0]
        parts = [items[i][1] for i in members]

        def cat(field: str, parts: list[PromptBatch] = parts) -> torch.Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values)

        merged = PromptBatch(coords=cat("coords"), labels=cat("labels"), boxes=cat("boxes"),
                             multimask=parts[0].multimask)
        low_res, iou = decode_prompts(loaded, embedding, merged)
        start = 0
        for i, part in zip(members, parts, strict=True):
            out[i] = (low_res[start:start + part.size], iou[start:start + part.size])
            start += part.size
    return out


# ---- step 3: logits -> ranked masks -> answer -----------------------------------------------------


@dataclass(frozen=True)
class Segments:
    """Masks in rank order (best first), before they are made disjoint."""

    masks: torch.Tensor  # (N, H, W) bool, original image size
    scores: torch.Tensor  # (N,) predicted IoU
    stability: torch.Tensor  # (N,) stability score at the original resolution
    prompt_index: list[int | None]
    points: list[tuple[float, float] | None]


def upscale_masks(loaded: LoadedSegmenter, embedding: ImageEmbedding, low_res: torch.Tensor,
                  offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, l, l)`` low-res logits -> ``(N, H, W)`` bool masks and ``(N,)`` stability scores.

    ``Sam.postprocess_masks`` removes the padding and resizes to the original image; chunks bound
    the float memory on large images.
    """
    height, width = embedding.original_size
    chunk = max(1, UPSCALE_CHUNK_FLOATS // (height * width))
    masks: list[torch.Tensor] = []
    stability: list[torch.Tensor] = []
    threshold = loaded.model.mask_threshold
    with torch.inference_mode():
        for part in low_res.split(chunk):
            logits = loaded.model.postprocess_masks(part.unsqueeze(1), embedding.input_size,
                                                    embedding.original_size)[:, 0]  # (n, H, W)
            stability.append(torch.nan_to_num(calculate_stability_score(logits, threshold, offset), nan=0.0))
            masks.append(logits > threshold)
    if not masks:
        return torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0)
    return torch.cat(masks), torch.cat(stability)


def prompted_segments(loaded: LoadedSegmenter, embedding: ImageEmbedding, prompts: PromptBatch,
                      low_res: torch.Tensor, iou: torch.Tensor, config: SegmenterUserConfig) -> Segments:
    """One mask per prompt (the best of three for a lone point), ranked by predicted IoU."""
    best = iou.argmax(dim=1)  # (B,)
    rows = torch.arange(low_res.shape[0])
    low_res, scores = low_res[rows, best], iou[rows, best]  # (B, l, l), (B,)
    order = torch.argsort(scores, descending=True, stable=True)
    masks, stability = upscale_masks(loaded, embedding, low_res[order], config.stability_score_offset)
    return Segments(masks=masks, scores=scores[order], stability=stability,
                    prompt_index=[int(i) for i in order], points=[None] * len(order))


@dataclass(frozen=True)
class AutoParams:
    points_per_side: int
    pred_iou_thresh: float
    stability_score_thresh: float
    box_nms_thresh: float
    max_masks: int

    @classmethod
    def of(cls, params: SegmentParams, config: SegmenterUserConfig) -> AutoParams:
        def pick(name: str) -> Any:
            value = getattr(params, name)
            return getattr(config, name) if value is None else value

        return cls(**{name: pick(name) for name in cls.__dataclass_fields__})


def automatic_segments(loaded: LoadedSegmenter, embedding: ImageEmbedding, auto: AutoParams,
                       config: SegmenterUserConfig) -> Segments:
    """Segment everything: decode a point grid, filter by predicted IoU and stability, then NMS.

    Filtering and NMS run on the decoder's low-resolution logits, cropped to the image (not the
    padding), so only the surviving masks are upscaled to the original image.
    """
    height, width = embedding.original_size
    h_in, w_in = embedding.input_size
    grid = torch.from_numpy(build_point_grid(auto.points_per_side)).float()  # (P, 2) in [0, 1]
    grid = grid * torch.tensor([width, height], dtype=torch.float32)  # original pixels
    threshold, offset = loaded.model.mask_threshold, config.stability_score_offset
    kept_logits, kept_scores, kept_boxes, kept_points = [], [], [], []
    for chunk in grid.split(config.points_per_batch):
        prompts = PromptBatch(coords=chunk.unsqueeze(1), labels=torch.ones(len(chunk), 1, dtype=torch.int64),
                              boxes=None, multimask=True)
        low_res, iou = decode_prompts(loaded, embedding, prompts)  # (b, 3, l, l), (b, 3)
        low_res, iou = low_res.flatten(0, 1), iou.flatten()
        points = chunk.repeat_interleave(low_res.shape[0] // len(chunk), dim=0)
        scale = low_res.shape[-1] / loaded.img_size  # low-res cells per input pixel
        crop_h, crop_w = math.ceil(h_in * scale), math.ceil(w_in * scale)
        cropped = low_res[:, :crop_h, :crop_w]
        stability = torch.nan_to_num(calculate_stability_score(cropped, threshold, offset), nan=0.0)
        binary = cropped > threshold
        keep = (iou > auto.pred_iou_thresh) & (stability >= auto.stability_score_thresh) & binary.flatten(1).any(1)
        if not keep.any():
            continue
        boxes = batched_mask_to_box(binary[keep]).float()  # (k, 4) XYXY low-res cells, max inclusive
        boxes[:, 2:] += 1
        boxes *= torch.tensor([width / crop_w, height / crop_h] * 2)  # to original pixels
        kept_logits.append(low_res[keep])
        kept_scores.append(iou[keep])
        kept_boxes.append(boxes)
        kept_points.append(points[keep])
    if not kept_logits:
        empty = torch.zeros(0)
        return Segments(masks=torch.zeros(0, height, width, dtype=torch.bool), scores=empty, stability=empty,
                        prompt_index=[], points=[])
    scores, boxes = torch.cat(kept_scores), torch.cat(kept_boxes)
    # One category: batched_nms with equal idxs is plain NMS (SAM uses it across crop layers).
    order = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), auto.box_nms_thresh)
    order = order[:auto.max_masks]  # batched_nms returns indices by decreasing score
    masks, stability = upscale_masks(loaded, embedding, torch.cat(kept_logits)[order], offset)
    points = torch.cat(kept_points)[order].tolist()
    return Segments(masks=masks, scores=scores[order], stability=stability, prompt_index=[None] * len(order),
                    points=[(round(p[0], 2), round(p[1], 2)) for p in points])


def render(segments: Segments, embedding: ImageEmbedding, output: SegmentOutput, *, drop_empty: bool,
           meta: Callable[[list[SegmentMask]], SegmentResponse]) -> SegmentResult:
    """Make the ranked masks disjoint and write them in the requested ``output`` form.

    ``drop_empty`` removes masks that lost all their pixels to higher-ranked ones (automatic mode);
    prompted mode keeps one entry per prompt, even an empty one.
    """
    label = hard_segmentation(segments.masks)  # (H, W) uint8
    hard = label_masks(label, len(segments.scores))  # (N, H, W) bool, disjoint
    keep = list(range(len(segments.scores)))
    if drop_empty:
        keep = [i for i in keep if bool(hard[i].any())]
        if len(keep) < len(segments.scores):
            hard = hard[keep]
            label = hard_segmentation(hard)  # renumber: disjoint, so the pixels stay where they are
    if output == "mask":
        return SegmentResult.from_png(meta([]), label_png(label))
    if output == "blended":
        return SegmentResult.from_png(meta([]), blended_png(embedding.image, hard))
    rles = encode_rles(hard)
    boxes, areas = rle_bbox_area(rles)
    # model_construct: values computed right here, of the declared types; validating a ragged mask's
    # tens of thousands of polygon coordinates again would cost a cached prompt ~0.4 ms.
    masks = [
        SegmentMask.model_construct(
            segmentation=RLE.model_construct(size=(int(rle["size"][0]), int(rle["size"][1])), counts=rle["counts"]),
            bbox=(float(box[0]), float(box[1]), float(box[2]), float(box[3])), area=int(area),
            score=float(segments.scores[i]), stability_score=float(segments.stability[i]),
            polygon=mask_polygons(hard[j]), prompt_index=segments.prompt_index[i], point=segments.points[i])
        for j, (i, rle, box, area) in enumerate(zip(keep, rles, boxes, areas, strict=True))
    ]
    return SegmentResult.from_response(meta(masks))


# ---- the deployment -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EncodeItem:
    loaded: LoadedSegmenter
    image: torch.Tensor


@dataclass(frozen=True)
class _DecodeItem:
    loaded: LoadedSegmenter
    embedding: ImageEmbedding
    prompts: PromptBatch
    finish: Callable[[torch.Tensor, torch.Tensor], SegmentResult]  # logits, IoU -> the rendered answer


class SegmenterDeployment:
    """Ray Serve deployment body for the segmenter (plain class; see ``serving.app.build_app``)."""

    def __init__(self, *, model_uri: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        # Loading here (not lazily) makes a bad model fail the deployment instead of every request.
        self._model_uri = model_uri
        self._config = SegmenterUserConfig(cache_bytes=cache_bytes)
        self._loaded = load_segmenter_model(model_uri)
        self._cache: EmbeddingCache[ImageEmbedding] = EmbeddingCache(cache_bytes)
        self._inflight: dict[str, asyncio.Future[ImageEmbedding]] = {}
        self._encoder_runs = 0
        self._decoder_requests = 0
        self._decoder_batches = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config``; reload the model (and empty the cache) only when ``model_uri`` changes."""
        try:
            config = SegmenterUserConfig.model_validate(user_config)
        except ValidationError as exc:
            raise ValueError(f"invalid segmenter user_config {user_config!r}: {exc}") from exc
        uri = config.model_uri or self._model_uri
        if uri != self._loaded.resolved.uri:
            self._loaded = load_segmenter_model(uri)  # load first, swap after
            self._cache.clear()  # embeddings belong to the encoder that made them
        self._model_uri = uri
        self._config = config
        self._cache.resize(config.cache_bytes)
        self._decode_batch.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
        self._decode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._encode_batch.set_max_batch_size(config.encoder_max_batch_size)  # type: ignore[attr-defined]
        self._encode_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            config.encoder_batch_wait_timeout_s)

    def describe(self) -> SegmenterInfo:
        """What this replica serves (``GET /v1/models``), with its cache counters."""
        r, c, stats = self._loaded.resolved, self._config, self._cache.stats()
        return SegmenterInfo(
            name=self._loaded.name, version=r.version, alias=r.alias, precision=r.precision, uri=r.uri,
            run_id=r.run_id, preset=self._loaded.config.preset, input_size=self._loaded.img_size,
            encoder_runs=self._encoder_runs, decoder_requests=self._decoder_requests,
            decoder_batches=self._decoder_batches,
            embedding_cache=CacheInfo(capacity_bytes=stats.capacity_bytes, bytes=stats.bytes,
                                      entries=stats.entries, hits=stats.hits, misses=stats.misses,
                                      evictions=stats.evictions, rejected=stats.rejected),
            max_batch_size=c.max_batch_size, batch_wait_timeout_s=c.batch_wait_timeout_s,
            points_per_side=c.points_per_side, pred_iou_thresh=c.pred_iou_thresh,
            stability_score_thresh=c.stability_score_thresh, box_nms_thresh=c.box_nms_thresh,
            max_masks=c.max_masks)

    def torch_threads(self) -> int:
        """Intra-op threads of this replica (Ray sets them from ``num_cpus``); the benchmark matches it."""
        return torch.get_num_threads()

    async def segment(self, task: SegmentTask) -> SegmentResult:
        """Answer one request; raises :class:`UnknownImageError` or :class:`PromptError` for bad input."""
        loaded, config = self._loaded, self._config
        embedding, hit = await self._embedding(task, loaded)
        height, width = embedding.original_size
        params = task.params
        prompts = build_prompts(params, width, height)

        def meta(masks: list[SegmentMask]) -> SegmentResponse:
            r = loaded.resolved
            mode: Literal["points", "boxes", "automatic"] = (
                "automatic" if params.automatic else "boxes" if params.boxes is not None else "points")
            return SegmentResponse(model=loaded.name, version=r.version, alias=r.alias, precision=r.precision,
                                   image_id=task.image_id, width=width, height=height, mode=mode,
                                   cache_hit=hit, masks=masks)

        if params.automatic:
            auto = AutoParams.of(params, config)

            def run_auto() -> SegmentResult:
                segments = automatic_segments(loaded, embedding, auto, config)
                return render(segments, embedding, task.output, drop_empty=True, meta=meta)

            return await asyncio.to_thread(run_auto)
        def finish(low_res: torch.Tensor, iou: torch.Tensor) -> SegmentResult:
            segments = prompted_segments(loaded, embedding, prompts, low_res, iou, config)
            return render(segments, embedding, task.output, drop_empty=False, meta=meta)

        outcome = await self._decode_batch(_DecodeItem(loaded=loaded, embedding=embedding, prompts=prompts,
                                                       finish=finish))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _embedding(self, task: SegmentTask, loaded: LoadedSegmenter) -> tuple[ImageEmbedding, bool]:
        """The cached embedding (hit=True), or a fresh one; concurrent misses on one image share a run."""
        key = task.image_id
        cached = self._cache.get(key)
        if cached is not None:
            return cached, True
        if task.image is None:
            stats = self._cache.stats()
            raise UnknownImageError(
                f"image_id {key!r} is not in the embedding cache (never sent to this replica, or evicted: the "
                f"cache holds {stats.entries} images in {stats.bytes} of {stats.capacity_bytes} bytes); "
                "send the image again, which answers the same image_id")
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._encode_batch(_EncodeItem(loaded=loaded, image=task.image)))
            self._inflight[key] = pending

            def finish(done: asyncio.Future[ImageEmbedding]) -> None:
                self._inflight.pop(key, None)
                if not done.cancelled() and done.exception() is None and self._loaded is loaded:
                    self._cache.put(key, done.result())

            pending.add_done_callback(finish)
        # shield: a client that disconnects must not cancel the encoder run other requests wait for.
        return await asyncio.shield(pending), False

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, items: list[_EncodeItem]) -> list[ImageEmbedding]:
        self._encoder_runs += len(items)
        results: list[ImageEmbedding | None] = [None] * len(items)
        by_model: dict[int, list[int]] = {}  # a reconfigure may land between two requests of one batch
        for i, item in enumerate(items):
            by_model.setdefault(id(item.loaded), []).append(i)
        for members in by_model.values():
            loaded = items[members[0]].loaded
            embeddings = await asyncio.to_thread(encode_images, loaded, [items[i].image for i in members])
            for i, embedding in zip(members, embeddings, strict=True):
                results[i] = embedding
        return [r for r in results if r is not None]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _decode_batch(self, items: list[_DecodeItem]) -> list[SegmentResult | BaseException]:
        # The decoder step of many requests at once, then each request's masks and answer, all in one
        # worker thread (one hop for a cached prompt) so the event loop keeps batching meanwhile.
        self._decoder_batches += 1
        self._decoder_requests += len(items)
        return await asyncio.to_thread(_decode_and_finish, items)


def _decode_and_finish(items: list[_DecodeItem]) -> list[SegmentResult | BaseException]:
    """Decode ``items`` (grouped by model; a reconfigure may land between two requests of one batch) and
    render each answer. A failure is returned in its item's place, so one bad request fails alone."""
    results: list[SegmentResult | BaseException] = [RuntimeError("not decoded")] * len(items)
    by_model: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_model.setdefault(id(item.loaded), []).append(i)
    for members in by_model.values():
        loaded = items[members[0]].loaded
        try:
            decoded = decode_together(loaded, [(items[i].embedding, items[i].prompts) for i in members])
        except Exception as exc:  # handed to every request of the group
            for i in members:
                results[i] = exc
            continue
        for i, (low_res, iou) in zip(members, decoded, strict=True):
            try:
                results[i] = items[i].finish(low_res, iou)
            except Exception as exc:  # re-raised in the request that owns it
                results[i] = exc
    return results
