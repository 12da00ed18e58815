"""Detector deployment: loads one registered model per replica and answers batched detect calls.

``DetectorDeployment`` is a plain class so it can be tested and benchmarked in-process; ``serving.app``
turns it into a Ray Serve deployment. The model is loaded once in ``__init__`` and again when
``reconfigure`` receives a different ``model_uri``. Requests are grouped by ``@serve.batch``; one
batch is letterboxed to the model's square input, run in one forward pass, and each image's boxes are
mapped back to its own pixels.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from torchvision.utils import draw_bounding_boxes

from components.models.detector import Detections, Detector
from components.models.preprocess import Letterbox, letterbox
from serving.images import encode_png_bytes
from serving.schemas import Detection, DetectParams, DetectResponse, ModelInfo

if TYPE_CHECKING:
    from components.tracking.resolve import ResolvedModel

# Distinct colours for class ids (cycled); readable on natural images.
PALETTE: tuple[str, ...] = ("#ff3838", "#2c99a8", "#ffb21d", "#48f90a", "#9232f1", "#00c2ff",
                            "#ff37c7", "#cfd231", "#3473ff", "#ff9d97")


class ModelLoadError(RuntimeError):
    """The configured model could not be resolved or loaded; the replica must not serve."""


class UnknownModelError(LookupError):
    """A request named a model that this deployment has not loaded (HTTP 404)."""

    status_code = 404


class DetectorUserConfig(BaseModel):
    """Runtime settings delivered through ``reconfigure(user_config)`` (Ray Serve ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str | None = Field(default=None, min_length=1,
                                  description="Model to serve; None keeps the one given at start.")
    score_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=1000)
    max_batch_size: int = Field(default=16, ge=1, le=256, description="1 switches batching off.")
    batch_wait_timeout_s: float = Field(default=0.01, ge=0.0, le=1.0)


@dataclass(frozen=True)
class DetectTask:
    """One image to run: ``image`` is ``3xHxW`` uint8 RGB, as returned by ``decode_image``."""

    image: torch.Tensor
    params: DetectParams
    render: bool = False  # also return the image with boxes drawn, as PNG bytes


@dataclass(frozen=True)
class DetectResult:
    response: DetectResponse
    png: bytes | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A detector ready to run, with the registry facts it was resolved from."""

    detector: Detector
    resolved: ResolvedModel
    device: torch.device

    @property
    def name(self) -> str:
        # A plain directory has no registry name; its folder name is the next best handle.
        return self.resolved.name or self.resolved.local_dir.name

    @property
    def class_names(self) -> list[str]:
        return list(self.detector.config.class_names)

    def matches(self, ref: str) -> bool:
        """True when ``ref`` names this model: name, name@alias, name/version or the URI."""
        names = {self.name, self.resolved.uri}
        if self.resolved.alias:
            names.add(f"{self.name}@{self.resolved.alias}")
        if self.resolved.version:
            names.add(f"{self.name}/{self.resolved.version}")
        return ref in names


def load_model(uri: str) -> LoadedModel:
    """Resolve ``uri`` (``models:/name@alias``, ``runs:/``, ``s3://``, a directory) and load it.

    Raises :class:`ModelLoadError` naming the URI and the cause.
    """
    from components.models.weights import load_detector
    from components.tracking.resolve import resolve_model  # MLflow import is slow: only when loading

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = resolve_model(uri)
        detector = load_detector(resolved.local_dir, device=device)
    except Exception as exc:  # every cause (registry, network, files) means the same: do not serve
        raise ModelLoadError(f"detector could not load model {uri!r}: {type(exc).__name__}: {exc}") from exc
    return LoadedModel(detector=detector, resolved=resolved, device=device)


def _draw(image: torch.Tensor, dets: Detections, class_names: list[str]) -> bytes:
    """``3xHxW`` uint8 + detections in its pixels -> PNG bytes with labelled boxes."""
    if len(dets.boxes) == 0:
        return encode_png_bytes(image)
    labels = [
        f"{class_names[int(c)] if int(c) < len(class_names) else int(c)} {float(s):.2f}"
        for c, s in zip(dets.labels, dets.scores, strict=True)
    ]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in dets.labels]
    drawn = draw_bounding_boxes(image, dets.boxes, labels=labels, colors=colors, width=2)
    return encode_png_bytes(drawn)


def run_batch(loaded: LoadedModel, tasks: list[DetectTask],
              defaults: DetectorUserConfig) -> list[DetectResult]:
    """Letterbox every image, run ONE forward pass over the batch, post-process per image.

    Per-request thresholds override ``defaults``. Boxes are returned in each image's own pixels.
    """
    if not tasks:
        return []
    size = loaded.detector.config.img_size
    inputs: list[torch.Tensor] = []
    placements: list[Letterbox] = []
    for task in tasks:
        x, placement = letterbox(task.image, size)  # (3, S, S) float in [0, 1]
        inputs.append(x)
        placements.append(placement)
    batch = torch.stack(inputs).to(loaded.device)  # (B, 3, S, S)
    with torch.inference_mode():
        raw = loaded.detector(batch)  # (B, N, 5+K)
        results: list[DetectResult] = []
        for i, (task, placement) in enumerate(zip(tasks, placements, strict=True)):
            p = task.params
            (dets,) = loaded.detector.postprocess(
                raw[i:i + 1], size, size,
                score_threshold=defaults.score_threshold if p.score_threshold is None else p.score_threshold,
                iou_threshold=defaults.iou_threshold if p.iou_threshold is None else p.iou_threshold,
                max_detections=defaults.max_detections if p.max_detections is None else p.max_detections,
            )
            dets = Detections(boxes=placement.boxes_to_image(dets.boxes.cpu()), scores=dets.scores.cpu(),
                              labels=dets.labels.cpu())
            results.append(_result(loaded, task, dets))
    return results


def _result(loaded: LoadedModel, task: DetectTask, dets: Detections) -> DetectResult:
    names = loaded.class_names
    detections = [
        Detection(box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])), score=float(s),
                  class_id=int(c), class_name=names[int(c)] if int(c) < len(names) else "")
        for b, s, c in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist(), strict=True)
    ]
    r = loaded.resolved
    response = DetectResponse(model=loaded.name, version=r.version, alias=r.alias, precision=r.precision,
                              width=int(task.image.shape[-1]), height=int(task.image.shape[-2]),
                              detections=detections)
    png = _draw(task.image, dets, names) if task.render else None
    return DetectResult(response=response, png=png)


class DetectorDeployment:
    """Ray Serve deployment body for the detector (plain class; see ``serving.app.build_app``)."""

    def __init__(self, *, model_uri: str) -> None:
        # Loading here (not lazily) makes a bad model fail the deployment instead of every request.
        self._model_uri = model_uri
        self._config = DetectorUserConfig()
        self._loaded = load_model(model_uri)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config``; reload the model only when ``model_uri`` changes."""
        try:
            config = DetectorUserConfig.model_validate(user_config)
        except ValidationError as exc:
            raise ValueError(f"invalid detector user_config {user_config!r}: {exc}") from exc
        uri = config.model_uri or self._model_uri
        if uri != self._loaded.resolved.uri:
            # Load first, swap after: in-flight batches keep the model they started with.
            self._loaded = load_model(uri)
        self._model_uri = uri
        self._config = config
        self._detect_batch.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
        self._detect_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def describe(self) -> ModelInfo:
        """What this replica serves (``GET /v1/models``)."""
        r, c = self._loaded.resolved, self._config
        return ModelInfo(name=self._loaded.name, version=r.version, alias=r.alias, precision=r.precision,
                         uri=r.uri, run_id=r.run_id, input_size=self._loaded.detector.config.img_size,
                         class_names=self._loaded.class_names, score_threshold=c.score_threshold,
                         iou_threshold=c.iou_threshold, max_detections=c.max_detections,
                         max_batch_size=c.max_batch_size, batch_wait_timeout_s=c.batch_wait_timeout_s)

    def torch_threads(self) -> int:
        """Intra-op threads of this replica (Ray sets them from ``num_cpus``); the benchmark matches it."""
        return torch.get_num_threads()

    async def detect(self, task: DetectTask) -> DetectResult:
        """Detect objects in one image; raises :class:`UnknownModelError` for a foreign model name."""
        if task.params.model is not None and not self._loaded.matches(task.params.model):
            raise UnknownModelError(
                f"model {task.params.model!r} is not loaded; this service serves {self._loaded.name!r} "
                f"(version {self._loaded.resolved.version}, alias {self._loaded.resolved.alias}, "
                f"uri {self._loaded.resolved.uri!r})"
            )
        result: DetectResult = await self._detect_batch(task)
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _detect_batch(self, tasks: list[DetectTask]) -> list[DetectResult]:
        # The forward pass runs in a worker thread so the event loop keeps collecting the next batch.
        loaded, config = self._loaded, self._config
        return await asyncio.to_thread(run_batch, loaded, tasks, config)
