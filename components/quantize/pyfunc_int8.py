"""MLflow "models from code" definition of the deployable int8 detector: loaded without pickle.

Same contract as :mod:`components.models.pyfunc_detector`: ``mlflow.pyfunc.load_model(uri).predict(images)``
takes a float32 array Bx3xHxW in [0, 1] and returns a DataFrame with one row per detection: image_index,
x1, y1, x2, y2 (pixels of the given input), score, class_id, class_name. The ``detector`` artifact is an
int8 model directory written by :func:`components.quantize.deploy.save_int8_model`, loaded with
:func:`components.quantize.deploy.load_int8_model` (PyTorch's x86 quantized kernels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

COLUMNS = ["image_index", "x1", "y1", "x2", "y2", "score", "class_id", "class_name"]


def find_int8_dir(root: Path) -> Path:
    """The directory under ``root`` (itself included) that holds an int8 model."""
    from components.models.files import find_dir
    from components.quantize.deploy import QUANT_FILE, is_int8_model_dir

    if (found := find_dir(root, QUANT_FILE, is_int8_model_dir)) is None:
        raise FileNotFoundError(f"{root}: no int8 model directory ({QUANT_FILE}) under it")
    return found


class Int8DetectorPyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        from components.quantize.deploy import load_int8_model

        self.model = load_int8_model(find_int8_dir(Path(context.artifacts["detector"])))
        self.class_names = self.model.class_names

    def predict(self, context: Any, model_input: Any, params: Any = None) -> pd.DataFrame:
        # Untyped on purpose: MLflow would otherwise derive a second signature from the hints.
        del params
        if isinstance(model_input, dict):  # a named tensor signature delivers {"images": array}
            model_input = model_input["images"]
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        rows = []
        for i, det in enumerate(self.model.predict(images)):
            for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True):
                rows.append({"image_index": i, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
                             "score": score, "class_id": int(label),
                             "class_name": self.class_names[label] if label < len(self.class_names) else str(label)})
        return pd.DataFrame(rows, columns=COLUMNS)


mlflow.models.set_model(Int8DetectorPyfunc())
