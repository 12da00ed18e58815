"""Detector deployment: loads one registered model per replica and answers batched detect calls.

``DetectorDeployment`` is a plain class so it can be tested and benchmarked in-process; ``serving.app``
turns it into a Ray Serve deployment. The model is loaded once in ``__init__`` and again when
``reconfigure`` receives a different ``model_uri``. Requests are grouped by ``@serve.batch``; one
batch is letterboxed to the model's square input, run in one forward pass, and each image's boxes are
mapped back to its own pixels.

Beside the float model a replica serves its deployable int8 version (``precision=int8``), when one
exists: the newest registry version of the same name tagged ``precision=int8`` and ``float_version=<the
resolved float version>``, or the explicit ``int8_model_uri``. A batch is split by precision, one
forward pass per precision: the int8 model runs on PyTorch's quantized CPU kernels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from torchvision.utils import draw_bounding_boxes

from components.models.detector import Detections, Detector
from components.models.preprocess import Letterbox, letterbox
from serving.images import encode_png_bytes
from serving.schemas import Detection, DetectParams, DetectResponse, Int8Info, ModelInfo

if TYPE_CHECKING:
    from components.quantize.deploy import Int8Detector
    from components.settings import Settings
    from components.tracking.resolve import ResolvedModel

log = logging.getLogger(__name__)

# Distinct colours for class ids (cycled); readable on natural images.
PALETTE: tuple[str, ...] = ("#ff3838", "#2c99a8", "#ffb21d", "#48f90a", "#9232f1", "#00c2ff",
                            "#ff37c7", "#cfd231", "#3473ff", "#ff9d97")


class ModelLoadError(RuntimeError):
    """The configured model could not be resolved or loaded; the replica must not serve."""


class UnknownModelError(LookupError):
    """A request named a model that this deployment has not loaded (HTTP 404)."""

    status_code = 404


class PrecisionUnavailableError(LookupError):
    """``precision=int8`` was requested but this deployment has no int8 version of its model (HTTP 404)."""

    status_code = 404


class DetectorUserConfig(BaseModel):
    """Runtime settings delivered through ``reconfigure(user_config)`` (Ray Serve ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str | None = Field(default=None, min_length=1,
                                  description="Model to serve; None keeps the one given at start.")
    int8_model_uri: str | None = Field(
        default=None, min_length=1,
        description="Int8 model served for precision=int8; None = the registry's int8 version of model_uri.")
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
        return self.resolved.display_name

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


# ---- the int8 version: found in the registry beside the float version, or named explicitly --------


@dataclass(frozen=True)
class Int8Variant:
    """A deployable int8 detector (``components.quantize.deploy``) served beside a float model."""

    model: Int8Detector
    resolved: ResolvedModel
    local_dir: Path  # the int8 model directory (holds quantization.json)
    calibrator: str
    backend: str
    float_version: str | None
    source: str  # "registry" or "int8_model_uri"

    def info(self) -> Int8Info:
        return Int8Info(name=self.resolved.name, version=self.resolved.version, float_version=self.float_version,
                        uri=self.resolved.uri, calibrator=self.calibrator, backend=self.backend,
                        source=self.source)  # type: ignore[arg-type]  # one of the two literals


def find_int8_version(name: str, float_version: str, *, settings: Settings | None = None) -> str | None:
    """The newest int8 version of ``name`` quantized from ``float_version``
    (:func:`components.tracking.registry.find_int8_version`), or None when there is none."""
    from components.tracking.registry import find_int8_version as find
    from components.tracking.setup import configure_mlflow

    configure_mlflow(settings)
    found = find(name, float_version)
    return None if found is None else str(found.version)


def int8_sibling_uri(resolved: ResolvedModel, *, settings: Settings | None = None) -> str | None:
    """``models:/NAME/V`` of the int8 version of a registry float model (see :func:`find_int8_version`)."""
    if not (resolved.name and resolved.version and resolved.uri.startswith("models:/")):
        return None
    if resolved.precision != "float":
        return None
    version = find_int8_version(resolved.name, resolved.version, settings=settings)
    return None if version is None else f"models:/{resolved.name}/{version}"


def find_int8_dir(root: Path) -> Path:
    """:func:`components.quantize.deploy.find_int8_dir`, failing as a :class:`ModelLoadError`."""
    from components.quantize.deploy import Int8ModelError
    from components.quantize.deploy import find_int8_dir as find

    try:
        return find(root)
    except Int8ModelError as exc:
        raise ModelLoadError(str(exc)) from exc


def load_int8_variant(uri: str, *, source: str) -> Int8Variant:
    """Resolve and load the int8 model at ``uri``; :class:`ModelLoadError` names the URI and the cause."""
    from components.quantize.deploy import load_int8_model, read_int8_spec
    from components.tracking.resolve import resolve_model

    try:
        resolved = resolve_model(uri)
        local = find_int8_dir(resolved.local_dir)
        spec = read_int8_spec(local)
        model = load_int8_model(local)  # quantized kernels: CPU only, whatever the float model runs on
    except Exception as exc:  # registry, files or kernels: the int8 version cannot serve
        raise ModelLoadError(f"detector could not load int8 model {uri!r}: {type(exc).__name__}: {exc}") from exc
    return Int8Variant(model=model, resolved=resolved, local_dir=local, calibrator=str(spec.calibrator),
                       backend=str(spec.backend), float_version=resolved.float_version, source=source)


def load_int8_for(loaded: LoadedModel, int8_model_uri: str | None) -> tuple[Int8Variant | None, str | None]:
    """The int8 version to serve beside ``loaded``, and why a registry int8 version could not load.

    An explicit ``int8_model_uri`` must load (:class:`ModelLoadError` otherwise: the operator asked for
    it). A version found in the registry that fails to load is logged and reported, and float still serves.
    """
    if int8_model_uri:
        return load_int8_variant(int8_model_uri, source="int8_model_uri"), None
    try:
        uri = int8_sibling_uri(loaded.resolved)
    except Exception as exc:  # a registry hiccup must not take the float model down
        log.warning("looking up the int8 version of %s failed: %s", loaded.resolved.uri, exc)
        return None, f"registry lookup failed: {type(exc).__name__}: {exc}"
    if uri is None:
        return None, None
    try:
        return load_int8_variant(uri, source="registry"), None
    except ModelLoadError as exc:
        log.warning("%s", exc)
        return None, str(exc)


def load_resolved(resolved: ResolvedModel, *, device: torch.device) -> LoadedModel:
    """Load the float detector of an already resolved model (see :func:`load_model`)."""
    from components.models.weights import load_detector

    try:
        detector = load_detector(resolved.local_dir, device=device)
    except Exception as exc:
        raise ModelLoadError(f"could not load model {resolved.uri!r} from {resolved.local_dir}: "
                             f"{type(exc).__name__}: {exc}") from exc
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
    return _detect(loaded, tasks, defaults, forward=loaded.detector, decoder=loaded.detector, device=loaded.device)


def run_int8_batch(loaded: LoadedModel, int8: Int8Variant, tasks: list[DetectTask],
                   defaults: DetectorUserConfig) -> list[DetectResult]:
    """:func:`run_batch` on the int8 model: ONE forward pass on the quantized CPU kernels, then the float
    model's decoding and NMS per image (per-request thresholds, boxes in each image's own pixels)."""
    # The int8 forward runs on CPU kernels and returns float (B, N, 5+K); decoding is the float model's.
    return _detect(loaded, tasks, defaults, forward=int8.model.forward, decoder=int8.model.float_model,
                   device=None, int8=int8)


def _detect(loaded: LoadedModel, tasks: list[DetectTask], defaults: DetectorUserConfig, *,
            forward: Callable[[torch.Tensor], torch.Tensor], decoder: Detector, device: torch.device | None,
            int8: Int8Variant | None = None) -> list[DetectResult]:
    """Letterbox ``tasks`` to the float model's size, ``forward`` the (B, 3, S, S) batch (moved to ``device``
    unless None) to raw (B, N, 5+K) outputs, decode each with ``decoder.postprocess`` (per-request
    thresholds) and map boxes back to each image's own pixels."""
    if not tasks:
        return []
    size = loaded.detector.config.img_size
    inputs: list[torch.Tensor] = []
    placements: list[Letterbox] = []
    for task in tasks:
        x, placement = letterbox(task.image, size)  # (3, S, S) float in [0, 1]
        inputs.append(x)
        placements.append(placement)
    batch = torch.stack(inputs)  # (B, 3, S, S)
    if device is not None:
        batch = batch.to(device)
    with torch.inference_mode():
        raw = forward(batch)  # (B, N, 5+K)
        results: list[DetectResult] = []
        for i, (task, placement) in enumerate(zip(tasks, placements, strict=True)):
            p = task.params
            (dets,) = decoder.postprocess(
                raw[i:i + 1], size, size,
                score_threshold=defaults.score_threshold if p.score_threshold is None else p.score_threshold,
                iou_threshold=defaults.iou_threshold if p.iou_threshold is None else p.iou_threshold,
                max_detections=defaults.max_detections if p.max_detections is None else p.max_detections,
            )
            dets = Detections(boxes=placement.boxes_to_image(dets.boxes.cpu()), scores=dets.scores.cpu(),
                              labels=dets.labels.cpu())
            results.append(_result(loaded, task, dets, int8=int8))
    return results


def run_mixed_batch(loaded: LoadedModel, int8: Int8Variant | None, tasks: list[DetectTask],
                    defaults: DetectorUserConfig) -> list[DetectResult]:
    """Split one batch by precision (never mixed in one forward pass); results in the order of ``tasks``."""
    float_idx = [i for i, t in enumerate(tasks) if t.params.precision != "int8"]
    int8_idx = [i for i, t in enumerate(tasks) if t.params.precision == "int8"]
    results: dict[int, DetectResult] = {}
    if float_idx:
        results.update(zip(float_idx, run_batch(loaded, [tasks[i] for i in float_idx], defaults), strict=True))
    if int8_idx:
        if int8 is None:  # checked before batching; a reconfigure may have dropped it since
            raise PrecisionUnavailableError(f"model {loaded.name!r} has no int8 version loaded any more")
        results.update(zip(int8_idx, run_int8_batch(loaded, int8, [tasks[i] for i in int8_idx], defaults),
                           strict=True))
    return [results[i] for i in range(len(tasks))]


def _result(loaded: LoadedModel, task: DetectTask, dets: Detections, *,
            int8: Int8Variant | None = None) -> DetectResult:
    names = loaded.class_names
    detections = [
        Detection(box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])), score=float(s),
                  class_id=int(c), class_name=names[int(c)] if int(c) < len(names) else "")
        for b, s, c in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist(), strict=True)
    ]
    r = loaded.resolved
    version, precision, calibrator = r.version, r.precision, None
    if int8 is not None:  # the version that ran; the alias stays the float model's (it was resolved through it)
        version, precision, calibrator = int8.resolved.version, "int8", int8.calibrator
    response = DetectResponse(model=loaded.name, version=version, alias=r.alias, precision=precision,
                              width=int(task.image.shape[-1]), height=int(task.image.shape[-2]),
                              detections=detections, calibrator=calibrator)
    png = _draw(task.image, dets, names) if task.render else None
    return DetectResult(response=response, png=png)


class DetectorDeployment:
    """Ray Serve deployment body for the detector (plain class; see ``serving.app.build_app``)."""

    def __init__(self, *, model_uri: str, int8_model_uri: str | None = None) -> None:
        # Loading here (not lazily) makes a bad model fail the deployment instead of every request.
        self._model_uri = model_uri
        self._config = DetectorUserConfig(int8_model_uri=int8_model_uri or None)
        self._loaded = load_model(model_uri)
        self._int8, self._int8_error = load_int8_for(self._loaded, self._config.int8_model_uri)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config``; reload the model only when ``model_uri`` changes."""
        try:
            config = DetectorUserConfig.model_validate(user_config)
        except ValidationError as exc:
            raise ValueError(f"invalid detector user_config {user_config!r}: {exc}") from exc
        uri = config.model_uri or self._model_uri
        int8_uri = config.int8_model_uri
        if uri != self._loaded.resolved.uri:
            # Load first, swap after: in-flight batches keep the model they started with.
            loaded = load_model(uri)
            self._int8, self._int8_error = load_int8_for(loaded, int8_uri)
            self._loaded = loaded
        elif int8_uri != self._config.int8_model_uri:
            self._int8, self._int8_error = load_int8_for(self._loaded, int8_uri)
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
                         max_batch_size=c.max_batch_size, batch_wait_timeout_s=c.batch_wait_timeout_s,
                         precisions=["float", "int8"] if self._int8 is not None else ["float"],
                         int8=self._int8.info() if self._int8 is not None else None,
                         int8_error=self._int8_error)

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
        if task.params.precision == "int8" and self._int8 is None:
            r = self._loaded.resolved
            where = (f"the registry has no version of {r.name!r} tagged precision=int8 and "
                     f"float_version={r.version}" if r.name and r.version else
                     "it is not a registry model and no int8_model_uri is configured")
            why = f"; an int8 version failed to load: {self._int8_error}" if self._int8_error else ""
            raise PrecisionUnavailableError(
                f"precision 'int8' is not available for model {self._loaded.name!r} (version {r.version}): {where}"
                f"{why}; available precisions: ['float']")
        result: DetectResult = await self._detect_batch(task)
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _detect_batch(self, tasks: list[DetectTask]) -> list[DetectResult]:
        # The forward pass runs in a worker thread so the event loop keeps collecting the next batch.
        loaded, int8, config = self._loaded, self._int8, self._config
        return await asyncio.to_thread(run_mixed_batch, loaded, int8, tasks, config)
