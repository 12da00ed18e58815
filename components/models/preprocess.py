"""Image preprocessing shared by training, evaluation and serving."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD_VALUE = 114 / 255.0


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed in the square model input: ``model_xy = image_xy * scale + pad``."""

    scale: float
    pad_x: int
    pad_y: int
    width: int  # original image size
    height: int

    def boxes_to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """Nx4 XYXY boxes in model-input pixels -> original-image pixels, clipped to the image."""
        out = boxes.clone()
        out[:, 0::2] = ((out[:, 0::2] - self.pad_x) / self.scale).clamp(0, self.width)
        out[:, 1::2] = ((out[:, 1::2] - self.pad_y) / self.scale).clamp(0, self.height)
        return out

    def boxes_to_model(self, boxes: torch.Tensor) -> torch.Tensor:
        """Nx4 XYXY boxes in original-image pixels -> model-input pixels."""
        out = boxes.clone().float()
        out[:, 0::2] = out[:, 0::2] * self.scale + self.pad_x
        out[:, 1::2] = out[:, 1::2] * self.scale + self.pad_y
        return out


def letterbox(image: torch.Tensor, size: int) -> tuple[torch.Tensor, Letterbox]:
    """3xHxW uint8 (or float in [0,1]) -> (3 x size x size float in [0,1], placement).

    Keeps the aspect ratio, scales the longer side to ``size`` and pads the rest with grey.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a 3xHxW image, got shape {tuple(image.shape)}")
    img = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    _, h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=scale < 1)[0]
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    out = torch.full((3, size, size), PAD_VALUE, dtype=torch.float32)
    out[:, pad_y:pad_y + nh, pad_x:pad_x + nw] = img
    return out, Letterbox(scale=scale, pad_x=pad_x, pad_y=pad_y, width=w, height=h)
