"""COCO mAP and output error of a detector run through the engine in float, hybrid and int8."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from components.data.loader import Sample
from components.evaluate.coco import coco_map, predict_coco
from components.models.detector import Detections, Detector
from components.quantize.engine import Precision, QuantEngine
from components.quantize.metrics import ErrorStats, error_stats

if TYPE_CHECKING:
    from components.quantize.deploy import Int8Detector


class EngineDetector:
    """A detector whose raw outputs come from ``engine`` in ``precision``; decoding and NMS stay ``model``'s.

    It has the two methods :func:`components.evaluate.coco.predict_coco` calls (``eval``, ``predict``).
    """

    def __init__(self, model: Detector, engine: QuantEngine, precision: str | Precision) -> None:
        self.model, self.engine, self.precision = model, engine, precision

    def eval(self) -> EngineDetector:
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor, **kwargs: Any) -> list[Detections]:
        """images Bx3xHxW in [0, 1] -> detections, as :meth:`Detector.predict`."""
        raw = self.engine.run(images, self.precision)
        return self.model.postprocess(raw, images.shape[-2], images.shape[-1], **kwargs)


def map_by_precision(model: Detector, engine: QuantEngine, dataset_dir: Path, samples: Sequence[Sample], *,
                     precisions: Sequence[str] = ("float", "hybrid", "int8"),
                     deployed: Int8Detector | None = None) -> dict[str, dict[str, float]]:
    """COCO ``map``/``map50``/``map75`` of ``samples`` (from ``dataset_dir``) for each precision.

    ``"deploy"`` among ``precisions`` scores ``deployed``, the model on PyTorch's int8 kernels.
    """
    if "deploy" in precisions and deployed is None:
        raise ValueError("precision 'deploy' needs the deployed int8 model (deployed=)")
    ids = [s.image_id for s in samples]
    out: dict[str, dict[str, float]] = {}
    for precision in precisions:
        # predict_coco is typed for Detector but only calls eval() and predict().
        detector = (model if precision == "float" else cast(Detector, deployed) if precision == "deploy"
                    else cast(Detector, EngineDetector(model, engine, precision)))
        out[precision] = coco_map(dataset_dir, ids, predict_coco(detector, samples))
    return out


@torch.no_grad()
def output_error(model: Detector, engine: QuantEngine, images: torch.Tensor, precision: str | Precision
                 ) -> ErrorStats:
    """Raw-output error (SQNR, cosine, MSE) of ``engine`` in ``precision`` against ``model`` in float."""
    model.eval()
    return error_stats(model(images), engine.run(images, precision))
