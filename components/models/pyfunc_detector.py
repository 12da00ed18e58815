"""MLflow "models from code" definition of the detector: loaded without pickle.

``mlflow.pyfunc.load_model(uri).predict(images)`` takes a float32 array Bx3xHxW in [0, 1] (H, W multiples
of 16) and returns a DataFrame with one row per detection: image_index, x1, y1, x2, y2 (pixels of the
given input), score, class_id, class_name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class DetectorPyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        from components.models.weights import load_detector
        from components.quantize.deploy import is_int8_model_dir, load_int8_model
        from components.tracking.resolve import find_model_dir

        model_dir = find_model_dir(Path(context.artifacts["detector"]))
        # An int8 version (quantization.json beside the float files) runs on PyTorch's int8 kernels.
        self.model = load_int8_model(model_dir) if is_int8_model_dir(model_dir) else load_detector(model_dir)

    def predict(self, context: Any, model_input: Any, params: Any = None) -> pd.DataFrame:
        # Untyped on purpose: MLflow would otherwise derive a second signature from the hints.
        del params
        if isinstance(model_input, dict):  # a named tensor signature delivers {"images": array}
            model_input = model_input["images"]
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        dets = self.model.predict(images)
        names = self.model.config.class_names
        rows = []
        for i, det in enumerate(dets):
            for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True):
                rows.append({"image_index": i, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
                             "score": score, "class_id": int(label),
                             "class_name": names[label] if label < len(names) else str(label)})
        columns = ["image_index", "x1", "y1", "x2", "y2", "score", "class_id", "class_name"]
        return pd.DataFrame(rows, columns=columns)


mlflow.models.set_model(DetectorPyfunc())
