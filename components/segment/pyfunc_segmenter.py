"""MLflow "models from code" definition of the segmenter: loaded without pickle.

``mlflow.pyfunc.load_model(uri).predict({"image": HxWx3 uint8, "boxes": Nx4 float32})`` segments the
image with one box prompt per row (XYXY, pixels of the given image; SAM's single-mask output) and
returns a DataFrame with one row per box: prompt_index, score (predicted IoU), area (pixels),
x, y, w, h (the mask's tight box) and rle (COCO compressed RLE counts, pycocotools, column-major).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class SegmenterPyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        from components.segment.model import load_segmenter
        from components.tracking.resolve import find_model_dir

        model_dir = find_model_dir(Path(context.artifacts["segmenter"]))
        if (model_dir / "quantization.json").is_file():  # an int8 version: its encoder runs on int8 kernels
            from components.quantize.segment import load_int8_segmenter

            int8 = load_int8_segmenter(model_dir)
            self.model, self.config, self.precision = int8.model, int8.config, "int8"
        else:
            self.model, self.config = load_segmenter(model_dir)
            self.precision = "float"

    def predict(self, context: Any, model_input: Any, params: Any = None) -> pd.DataFrame:
        # Untyped on purpose: MLflow would otherwise derive a second signature from the hints.
        from pycocotools import mask as mask_utils
        from segment_anything.utils.transforms import ResizeLongestSide

        from components.segment.predict import decode, encode_images, pick_masks, upscale_logits

        del params
        image = np.asarray(model_input["image"], dtype=np.uint8)
        boxes = np.asarray(model_input["boxes"], dtype=np.float32).reshape(-1, 4)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 uint8, got shape {image.shape}")
        size = (int(image.shape[0]), int(image.shape[1]))
        resize = ResizeLongestSide(self.config.img_size)
        resized = resize.apply_image(image)
        input_size = (int(resized.shape[0]), int(resized.shape[1]))
        with torch.inference_mode():
            embedding = encode_images(self.model, [torch.from_numpy(resized).permute(2, 0, 1).float()])
            low_res, iou = decode(self.model, embedding,
                                  boxes=torch.from_numpy(resize.apply_boxes(boxes, size)).float())
            logits, scores = pick_masks(low_res, iou, multimask=False)
            masks = (upscale_logits(self.model, logits, input_size, size) > 0).numpy()
        rows = []
        for i, (mask, score) in enumerate(zip(masks, scores.tolist(), strict=True)):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            rows.append({"prompt_index": i, "score": float(score), "area": int(mask_utils.area(rle)),
                         "x": x, "y": y, "w": w, "h": h, "rle": rle["counts"].decode("ascii")})
        return pd.DataFrame(rows, columns=["prompt_index", "score", "area", "x", "y", "w", "h", "rle"])


mlflow.models.set_model(SegmenterPyfunc())
