"""Inspector deployment: quantization STEP / CROSS / edit sessions over HTTP (``/v1/inspect``).

One replica holds a :class:`~components.quantize.store.SessionStore` (sessions are state: a second
replica would not know the first one's sessions), bounded in number and memory, expiring when unused.
A session runs one uploaded image, letterboxed to the model's square input, through a detector layer by
layer in float, hybrid or int8 (:class:`~components.quantize.inspector.InspectorSession`).

Models: the served detector (by default, or by its name), or any registry version named ``name@alias``
or ``name/version``. Never a path or bucket named by the client. Scales come from the model's int8
version (its ``quantization.json``) when it has one and no calibrator is asked for; otherwise the
uploaded image and four augmented copies (rotate, blur, flip, flop) are calibrated with the requested
calibrator (default :data:`DEFAULT_CALIBRATOR`), and the session says which it did.

``InspectorDeployment`` is a plain class (tested in-process too); ``serving.app.build_app`` makes it a
Ray Serve deployment. Every heavy call runs in a worker thread under the session's lock, so one user's
report does not stall another user's step. Domain errors are :mod:`components.quantize.errors`;
``serving.app`` maps them to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import torch
from torchvision import tv_tensors

from components.models.preprocess import letterbox
from components.quantize.calibrate import CALIBRATORS, Calibration, calibrate, check_method
from components.quantize.engine import Precision, QuantEngine
from components.quantize.errors import EditError, QuantizeError
from components.quantize.graph import QuantGraph
from components.quantize.inspector import InspectorSession, LayerReport, ModelReport
from components.quantize.store import SessionStore
from components.quantize.visualize import ModelGraph, layer_picture, model_graph, plot_report, render_graph
from serving.detector import LoadedModel, UnknownModelError, find_int8_dir, int8_sibling_uri, load_resolved
from serving.schemas import (
    CalibrationInfo,
    EditResponse,
    InspectModel,
    InspectorInfo,
    LayerResponse,
    LayerSummary,
    SessionCreateParams,
    SessionInfo,
    SessionStatus,
    WeightEditRequest,
)

if TYPE_CHECKING:
    from components.quantize.deploy import Int8Spec

# One image is weak evidence for clipping thresholds: minmax (no clipping) is the honest default;
# kl / percentile / log2 are one field away.
DEFAULT_CALIBRATOR = "minmax"
CALIBRATION_AUGMENTATIONS = ("rotate", "blur", "flip", "flop")
MAX_CACHED_MODELS = 2  # prepared (traced) models kept between sessions; each is one model's weights
LayerPicture = Literal["input", "output", "weight", "error"]
_REF_RE = re.compile(r"^(?:models:/)?(?P<name>[^/@\s]+)(?:@(?P<alias>[^/@\s]+)|/(?P<version>\d+))$")
# matplotlib's pyplot state is process-global: one chart at a time.
_PLOT_LOCK = threading.Lock()
T = TypeVar("T")


@dataclass(frozen=True)
class CreateTask:
    """``image``: the uploaded picture, ``3xHxW`` uint8 RGB as ``decode_image`` returns it."""

    image: torch.Tensor
    params: SessionCreateParams


@dataclass(frozen=True)
class PreparedModel:
    """A float detector traced for the engine (BN folded), with its int8 version's ranges when it has one."""

    loaded: LoadedModel
    graph: QuantGraph
    info: InspectModel
    int8_calibration: Calibration | None
    int8_version: str | None
    int8_uri: str | None


@dataclass(frozen=True)
class SessionMeta:
    """What a session was created from (kept beside it, and dropped with it)."""

    model: InspectModel
    precision: str
    calibration: CalibrationInfo
    image_width: int
    image_height: int
    layers: list[LayerSummary]


def augmented_copies(x: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
    """``x`` (3xSxS float in [0, 1]) rotated, blurred, flipped and flopped (``components.data.augment``)."""
    from components.data.augment import build_transform, rotation_angle

    angle = rotation_angle(seed)
    image = tv_tensors.Image(x)
    return [build_transform(op, angle=angle)(image).as_subclass(torch.Tensor) for op in CALIBRATION_AUGMENTATIONS]


def _png(draw: Callable[[Path], Path]) -> bytes:
    """Bytes of the PNG ``draw(path)`` writes (matplotlib, one at a time)."""
    with _PLOT_LOCK, tempfile.TemporaryDirectory(prefix="inspect-") as tmp:
        return draw(Path(tmp) / "chart.png").read_bytes()


def _number_leaves(values: list[object], where: str) -> None:
    """Refuse anything but (nested lists of) JSON numbers: booleans and strings would convert silently."""
    stack: list[object] = [values]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif type(item) not in (int, float):
            raise EditError(f"{where}: weights must be numbers, got {type(item).__name__} {item!r:.40}")


class InspectorDeployment:
    """Ray Serve deployment body of the inspector (plain class; see ``serving.app.build_app``)."""

    def __init__(self, *, served_model_uri: str | None = None, int8_model_uri: str | None = None,
                 max_sessions: int = 4, max_bytes: int = 512 * 2**20, ttl_s: float = 900.0,
                 default_calibrator: str = DEFAULT_CALIBRATOR) -> None:
        check_method(default_calibrator)
        self._store = SessionStore(max_sessions=max_sessions, max_bytes=max_bytes, ttl_s=ttl_s)
        self._served_uri = served_model_uri or None
        self._served_int8_uri = int8_model_uri or None
        self._default_calibrator = default_calibrator
        self._models: OrderedDict[str, PreparedModel] = OrderedDict()
        self._models_lock = threading.Lock()
        # Keyed by the session object: its entry goes when the store drops (closes, expires) the session.
        self._meta: weakref.WeakKeyDictionary[InspectorSession, SessionMeta] = weakref.WeakKeyDictionary()
        self._served: PreparedModel | None = None
        if self._served_uri:
            # Loaded now, like the detector: a bad model fails the deployment, not the first session.
            self._served = self._prepare(self._served_uri, self._served_int8_uri)

    # ------------------------------------------------------------------------------------------ models

    def _resolve_ref(self, ref: str | None) -> tuple[str, str | None]:
        """Model URI (and explicit int8 URI) a session's ``model`` field names; 404 for anything else."""
        if ref is None or (self._served is not None and self._served.loaded.matches(ref)):
            if self._served_uri is None:
                raise UnknownModelError("this service has no served detector: name a registered model in "
                                        "'model' as name@alias or name/version")
            return self._served_uri, self._served_int8_uri
        match = _REF_RE.match(ref)
        if match is None:
            served = f"; or the served model {self._served.loaded.name!r}" if self._served is not None else ""
            raise UnknownModelError(f"model {ref!r} is not a model reference: use name@alias or name/version "
                                    f"of a registered model (models:/ prefix optional){served}")
        name, alias, version = match["name"], match["alias"], match["version"]
        return (f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"), None

    def _prepare(self, uri: str, int8_uri: str | None) -> PreparedModel:
        """The float model at ``uri`` traced, with its int8 ranges; the last few are kept (by version)."""
        from components.tracking.resolve import ModelNotFoundError, resolve_model

        try:
            resolved = resolve_model(uri)
        except ModelNotFoundError as exc:
            raise UnknownModelError(str(exc)) from exc
        key = f"{uri}|{resolved.version}|{int8_uri}"  # an alias moved to another version is a new entry
        with self._models_lock:
            cached = self._models.get(key)
            if cached is not None:
                self._models.move_to_end(key)
                return cached
        prepared = self._prepare_loaded(load_resolved(resolved, device=torch.device("cpu")), int8_uri)
        with self._models_lock:
            self._models[key] = prepared
            while len(self._models) > MAX_CACHED_MODELS:
                self._models.popitem(last=False)
        return prepared

    @staticmethod
    def _prepare_loaded(loaded: LoadedModel, int8_uri: str | None) -> PreparedModel:
        from components.quantize.deploy import is_int8_model_dir, read_int8_spec
        from components.tracking.resolve import resolve_model

        r = loaded.resolved
        spec: Int8Spec | None = None
        int8_version: str | None = None
        if is_int8_model_dir(r.local_dir):  # the reference named an int8 version itself
            spec, int8_version, int8_uri = read_int8_spec(r.local_dir), r.version, r.uri
        else:
            int8_uri = int8_uri or int8_sibling_uri(r)
            if int8_uri is not None:
                int8_resolved = resolve_model(int8_uri)
                spec, int8_version = read_int8_spec(find_int8_dir(int8_resolved.local_dir)), int8_resolved.version
        config = loaded.detector.config
        info = InspectModel(name=loaded.name, version=r.version, alias=r.alias, uri=r.uri,
                            input_size=config.img_size, class_names=list(config.class_names))
        return PreparedModel(loaded=loaded, graph=QuantGraph(loaded.detector), info=info,
                             int8_calibration=spec.calibration() if spec is not None else None,
                             int8_version=int8_version, int8_uri=int8_uri)

    # ---------------------------------------------------------------------------------------- sessions

    def _create(self, task: CreateTask) -> SessionInfo:
        p = task.params
        if p.calibrator is not None:
            check_method(p.calibrator, p.percentile if p.percentile is not None else 99.99)
        if p.percentile is not None and p.calibrator != "percentile":
            raise QuantizeError(f"percentile={p.percentile} is only used with calibrator 'percentile', "
                                f"got calibrator {p.calibrator!r}")
        uri, int8_uri = self._resolve_ref(p.model)
        prepared = self._served if p.model is None and self._served is not None else self._prepare(uri, int8_uri)
        x, _ = letterbox(task.image, prepared.info.input_size)  # (3, S, S) float in [0, 1]
        if p.calibrator is None and prepared.int8_calibration is not None:
            calibration = prepared.int8_calibration
            source = CalibrationInfo(
                source="int8_version", method=calibration.method, percentile=calibration.percentile,
                images=calibration.images, weight_granularity=calibration.weight_granularity,
                int8_version=prepared.int8_version,
                note=f"ranges of the int8 version {prepared.int8_version or prepared.int8_uri} "
                     f"({calibration.method} on {calibration.images} images)")
        else:
            method = p.calibrator or self._default_calibrator
            batch = torch.stack([x, *augmented_copies(x)])  # (5, 3, S, S)
            calibration = calibrate(prepared.graph, [batch], method=method,
                                    percentile=p.percentile if p.percentile is not None else 99.99)
            why = "asked for" if p.calibrator else (
                "the default; the model has no int8 version" if prepared.int8_calibration is None
                else "the default")
            source = CalibrationInfo(
                source="image", method=method, percentile=calibration.percentile, images=calibration.images,
                weight_granularity=calibration.weight_granularity,
                note=f"calibrated with {method} ({why}) on the uploaded image and its {len(CALIBRATION_AUGMENTATIONS)} "
                     f"augmented copies ({', '.join(CALIBRATION_AUGMENTATIONS)})")
        engine = QuantEngine(prepared.graph, calibration)
        session = self._store.create(engine, x, p.precision)
        layers = [LayerSummary(index=layer.index, name=layer.name, op=layer.op, kind=layer.kind,
                               target=layer.target, inputs=list(layer.inputs),
                               output_shape=list(session.reference(layer.name).shape),
                               param_count=sum(t.numel() for t in session.graph.module(layer).parameters())
                               if layer.node.op == "call_module" else 0)
                  for layer in session.graph.layers]
        meta = SessionMeta(model=prepared.info, precision=p.precision, calibration=source,
                           image_width=int(task.image.shape[-1]), image_height=int(task.image.shape[-2]),
                           layers=layers)
        self._meta[session] = meta
        return self._info(session, meta)

    def _status(self, session: InspectorSession) -> SessionStatus:
        ttl = self._store.ttl_s
        return SessionStatus(**session.state().model_dump(), ttl_s=ttl,
                             expires_at=datetime.now(UTC) + timedelta(seconds=ttl))

    def _info(self, session: InspectorSession, meta: SessionMeta) -> SessionInfo:
        return SessionInfo(**self._status(session).model_dump(), model=meta.model,
                           precision=meta.precision,  # type: ignore[arg-type]  # a validated literal
                           calibration=meta.calibration, image_width=meta.image_width,
                           image_height=meta.image_height, layers=meta.layers)

    async def _with_session(self, session_id: str, work: Callable[[InspectorSession], T]) -> T:
        """Run ``work(session)`` in a worker thread, holding the session's lock (one call at a time each)."""
        session = self._store.get(session_id)  # SessionError (404) when unknown or expired

        def locked() -> T:
            with session.lock:
                return work(session)

        return await asyncio.to_thread(locked)

    # ------------------------------------------------------------------------- the deployment's methods

    async def create(self, task: CreateTask) -> SessionInfo:
        """A new session (see :class:`SessionInfo`); raises SessionLimitError (429) when the store is full."""
        return await asyncio.to_thread(self._create, task)

    async def info(self, session_id: str) -> SessionInfo:
        return await self._with_session(session_id, lambda s: self._info(s, self._meta[s]))

    async def step(self, session_id: str) -> LayerResponse:
        """Run the next layer; its report."""
        return await self._with_session(session_id, lambda s: self._layer_response(s, s.step()))

    async def run_to(self, session_id: str, index: int) -> LayerResponse:
        """Run up to and including layer ``index``; its report."""
        return await self._with_session(session_id, lambda s: self._layer_response(s, s.run_to(index)))

    async def layer(self, session_id: str, index: int, *, local: bool = True) -> LayerResponse:
        """Report of a layer that has run (SessionStateError 409 when it has not)."""
        return await self._with_session(session_id, lambda s: self._layer_response(s, s.inspect(index, local=local)))

    def _layer_response(self, session: InspectorSession, layer: LayerReport) -> LayerResponse:
        return LayerResponse(layer=layer, session=self._status(session))

    async def layer_image(self, session_id: str, index: int, which: LayerPicture) -> bytes:
        """PNG of a layer's first input, output, weights or error (output minus float) as channel grids."""
        return await self._with_session(
            session_id, lambda s: _png(lambda path: layer_picture(s, index, which, path)))

    async def edit(self, session_id: str, index: int, request: WeightEditRequest) -> EditResponse:
        """Set layer ``index``'s weights or scale one output channel; re-run the layer; report the change."""

        def work(s: InspectorSession) -> EditResponse:
            if request.values is not None:
                where = f"layer {index}"
                _number_leaves(request.values, where)
                try:
                    values = torch.tensor(request.values, dtype=getattr(torch, request.dtype))
                except (TypeError, ValueError, RuntimeError) as exc:  # ragged lists
                    raise EditError(f"{where}: 'values' is not a rectangular nested list of numbers: {exc}") from exc
                result = s.edit_weights(index, values=values)
            else:
                assert request.scale_channel is not None  # exactly one, checked by the schema
                c = request.scale_channel
                result = s.edit_weights(index, scale_channel=(c.channel, c.factor))
            return EditResponse(edit=result, session=self._status(s))

        return await self._with_session(session_id, work)

    async def cross(self, session_id: str, index: int, to: str) -> SessionStatus:
        """CROSS: layers ``index``.. run in ``to`` from now on (they re-run on the next step)."""

        def work(s: InspectorSession) -> SessionStatus:
            s.cross(index, to)
            return self._status(s)

        return await self._with_session(session_id, work)

    async def report(self, session_id: str, *, png: bool = False) -> ModelReport | bytes:
        """Run the remaining layers; the per-layer error report (or its chart as PNG bytes)."""

        def work(s: InspectorSession) -> ModelReport | bytes:
            report = s.report()
            return _png(lambda path: plot_report(report, path)) if png else report

        return await self._with_session(session_id, work)

    async def graph(self, session_id: str, *, png: bool = False) -> ModelGraph | bytes:
        """The model graph with this session's shapes, precisions and scales (or its picture as PNG bytes)."""

        def work(s: InspectorSession) -> ModelGraph | bytes:
            graph = model_graph(s.engine, s.image, list(s.precisions))
            return _png(lambda path: render_graph(graph, path)) if png else graph

        return await self._with_session(session_id, work)

    async def close(self, session_id: str) -> None:
        """Close a session (SessionError 404 when unknown, closed already, or expired)."""
        self._store.close(session_id)

    def describe(self) -> InspectorInfo:
        """Limits and use (``GET /v1/inspect``)."""
        served = self._served.loaded.name if self._served is not None else None
        return InspectorInfo(sessions=len(self._store), max_sessions=self._store.max_sessions,
                             bytes_reserved=self._store.bytes_reserved, max_bytes=self._store.max_bytes,
                             ttl_s=self._store.ttl_s, calibrators=list(CALIBRATORS),
                             default_calibrator=self._default_calibrator,
                             precisions=[p.value for p in Precision], served_model=served)
