"""A YOLO-style single-stage, anchor-free detector in plain PyTorch.

Backbone of Conv-BN-activation blocks with residual bottlenecks, a two-level FPN neck (strides 8 and
16) and a decoupled FCOS-style head per level: K class logits, 4 box distances (left, top, right,
bottom, in stride units, log-space) and one centerness logit per cell. Post-processing uses
torchvision's batched NMS.

Shapes used throughout:
- images: ``Bx3xHxW`` float in [0, 1] (H and W multiples of the largest stride);
- raw head output: ``BxNx(K+5)`` with N the number of cells over all levels;
- detections: per image, ``boxes`` Nx4 XYXY pixels, ``scores`` N, ``labels`` N (0-based class index).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # YOLOv2/v3 use slope 0.1; set below
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture of a detector. Saved as ``config.json`` next to the weights."""

    num_classes: int
    class_names: tuple[str, ...] = ()
    preset: str = "nano"
    widths: tuple[int, int, int, int] = (16, 32, 64, 96)  # channels at strides 2, 4, 8, 16
    depths: tuple[int, int, int] = (1, 1, 1)  # bottlenecks at strides 4, 8, 16
    head_width: int = 48
    activation: str = "leaky_relu"  # integer-friendly (piecewise linear), as in YOLOv3
    img_size: int = 160  # square input side after letterboxing; a multiple of 16
    strides: tuple[int, ...] = field(default=(8, 16))

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes={self.num_classes}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} unknown; allowed: {sorted(ACTIVATIONS)}")
        if self.img_size % max(self.strides) or self.img_size < 32:
            raise ValueError(f"img_size must be >= 32 and a multiple of {max(self.strides)}, got {self.img_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"detector config has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


PRESETS: dict[str, dict[str, Any]] = {
    # nano: trains on 2 CPU cores in about a minute on the demo data.
    "nano": {"widths": (16, 32, 64, 96), "depths": (1, 1, 1), "head_width": 48},
    "small": {"widths": (32, 64, 128, 192), "depths": (1, 2, 2), "head_width": 96},
    "medium": {"widths": (48, 96, 192, 320), "depths": (2, 3, 3), "head_width": 160},
}


def detector_config(preset: str, *, num_classes: int, class_names: tuple[str, ...] = (),
                    img_size: int = 160, activation: str = "leaky_relu") -> DetectorConfig:
    """Config of a named size preset (``nano``, ``small``, ``medium``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown detector preset {preset!r}; allowed: {sorted(PRESETS)}")
    return DetectorConfig(num_classes=num_classes, class_names=tuple(class_names), preset=preset,
                          img_size=img_size, activation=activation, **PRESETS[preset])


def _make_act(name: str) -> nn.Module:
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    return ACTIVATIONS[name](inplace=True)


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation. ``fuse()`` folds the BN into the conv."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1,
                 activation: str = "leaky_relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c_out)
        self.act = _make_act(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        """Fold BatchNorm into the conv (eval mode only); the block keeps its interface."""
        if isinstance(self.bn, nn.BatchNorm2d):
            if self.training:
                raise RuntimeError("fuse() needs eval mode: call model.eval() first")
            self.conv = fuse_conv_bn_eval(self.conv, self.bn)
            self.bn = nn.Identity()


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 expand, residual add."""

    def __init__(self, c: int, *, activation: str) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(c, c // 2, kernel=1, activation=activation)
        self.cv2 = ConvBNAct(c // 2, c, kernel=3, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class Stage(nn.Sequential):
    """Stride-2 downsampling conv followed by ``depth`` bottlenecks."""

    def __init__(self, c_in: int, c_out: int, depth: int, *, activation: str) -> None:
        layers: list[nn.Module] = [ConvBNAct(c_in, c_out, stride=2, activation=activation)]
        layers += [Bottleneck(c_out, activation=activation) for _ in range(depth)]
        super().__init__(*layers)


class Head(nn.Module):
    """Decoupled head for one level: class branch and box+centerness branch."""

    def __init__(self, c_in: int, width: int, num_classes: int, *, activation: str) -> None:
        super().__init__()
        self.stem = ConvBNAct(c_in, width, kernel=1, activation=activation)
        self.cls_conv = ConvBNAct(width, width, activation=activation)
        self.reg_conv = ConvBNAct(width, width, activation=activation)
        self.cls_pred = nn.Conv2d(width, num_classes, 1)
        self.reg_pred = nn.Conv2d(width, 5, 1)  # l, t, r, b, centerness
        assert self.cls_pred.bias is not None and self.reg_pred.bias is not None
        nn.init.constant_(self.cls_pred.bias, -4.6)  # prior p=0.01 keeps early focal loss stable
        nn.init.zeros_(self.reg_pred.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        cls = self.cls_pred(self.cls_conv(x))  # (B, K, h, w)
        reg = self.reg_pred(self.reg_conv(x))  # (B, 5, h, w)
        out = torch.cat([reg, cls], dim=1)  # (B, 5+K, h, w)
        return out.flatten(2).transpose(1, 2)  # (B, h*w, 5+K)


@dataclass
class Detections:
    """Detections of one image, in the pixel frame of the image given to ``predict``."""

    boxes: torch.Tensor  # Nx4 XYXY float
    scores: torch.Tensor  # N float in [0, 1]
    labels: torch.Tensor  # N int64, 0-based class index


class Detector(nn.Module):
    """YOLO-style detector. ``forward`` returns raw outputs; ``postprocess`` turns them into boxes."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        act = config.activation
        c1, c2, c3, c4 = config.widths
        d2, d3, d4 = config.depths
        self.stem = ConvBNAct(3, c1, stride=2, activation=act)  # /2
        self.stage2 = Stage(c1, c2, d2, activation=act)  # /4
        self.stage3 = Stage(c2, c3, d3, activation=act)  # /8  -> P3
        self.stage4 = Stage(c3, c4, d4, activation=act)  # /16 -> P4
        self.lateral = ConvBNAct(c4, c3, kernel=1, activation=act)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse_p3 = ConvBNAct(2 * c3, c3, activation=act)
        self.head_p3 = Head(c3, config.head_width, config.num_classes, activation=act)
        self.head_p4 = Head(c4, config.head_width, config.num_classes, activation=act)
        self._grid_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xHxW in [0, 1] -> raw BxNx(5+K): [l, t, r, b, ctr, cls...] logits."""
        x = self.stem(images)
        x = self.stage2(x)
        p3 = self.stage3(x)
        p4 = self.stage4(p3)
        top = self.upsample(self.lateral(p4))
        p3 = self.fuse_p3(torch.cat([p3, top], dim=1))
        return torch.cat([self.head_p3(p3), self.head_p4(p4)], dim=1)

    def grid(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centers (Nx2, pixels) and strides (N,) for an input of ``height`` x ``width``."""
        key = (height, width)
        if key not in self._grid_cache:
            centers: list[torch.Tensor] = []
            strides: list[torch.Tensor] = []
            for s in self.config.strides:
                h, w = height // s, width // s
                ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                c = torch.stack([xs, ys], dim=-1).reshape(-1, 2).float()
                centers.append((c + 0.5) * s)
                strides.append(torch.full((h * w,), float(s)))
            self._grid_cache[key] = (torch.cat(centers), torch.cat(strides))
        cached_centers, cached_strides = self._grid_cache[key]
        return cached_centers.to(device), cached_strides.to(device)

    def decode_boxes(self, raw: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """raw BxNx(5+K) -> BxNx4 XYXY pixel boxes."""
        centers, strides = self.grid(height, width, raw.device)
        dist = torch.exp(raw[..., :4].float().clamp(max=8.0)) * strides[:, None]  # (B, N, 4)
        return torch.cat([centers - dist[..., :2], centers + dist[..., 2:]], dim=-1)

    @torch.no_grad()
    def postprocess(self, raw: torch.Tensor, height: int, width: int, *, score_threshold: float = 0.25,
                    iou_threshold: float = 0.5, max_detections: int = 100) -> list[Detections]:
        """Raw outputs of ``forward`` for a BxCxHxW input -> one :class:`Detections` per image."""
        boxes = self.decode_boxes(raw, height, width)
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
        scores_all = torch.sqrt(raw[..., 5:].float().sigmoid() * raw[..., 4:5].float().sigmoid())
        results = []
        for b in range(raw.shape[0]):
            scores, labels = scores_all[b].max(dim=1)
            keep = scores > score_threshold
            bx, sc, lb = boxes[b][keep], scores[keep], labels[keep]
            keep = torchvision.ops.batched_nms(bx, sc, lb, iou_threshold)[:max_detections]
            results.append(Detections(boxes=bx[keep], scores=sc[keep], labels=lb[keep]))
        return results

    @torch.no_grad()
    def predict(self, images: torch.Tensor, **kwargs: Any) -> list[Detections]:
        """images: Bx3xHxW in [0, 1] (H, W multiples of 16) -> detections in that pixel frame."""
        return self.postprocess(self(images), images.shape[-2], images.shape[-1], **kwargs)

    def fuse(self) -> Detector:
        """Fold every BatchNorm into its conv, in place (eval mode). Returns self."""
        self.eval()
        for module in self.modules():
            if isinstance(module, ConvBNAct):
                module.fuse()
        return self


def build_detector(config: DetectorConfig) -> Detector:
    return Detector(config)
