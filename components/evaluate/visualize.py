"""Pictures people would rather look at: detections drawn on images, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None,
                    class_names: Sequence[str]) -> torch.Tensor:
    """image 3xHxW (uint8, or float in [0,1]); boxes Nx4 XYXY; labels N -> annotated 3xHxW uint8."""
    img = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    names = [class_names[int(i)] if int(i) < len(class_names) else str(int(i)) for i in labels]
    text = [f"{n} {float(s):.2f}" for n, s in zip(names, scores, strict=True)] if scores is not None else names
    colors = [PALETTE[int(i) % len(PALETTE)] for i in labels]
    if boxes.numel() == 0:
        return img.clone()
    return draw_bounding_boxes(img, boxes.float(), labels=text, colors=colors, width=2)


def save_png(image: torch.Tensor, path: Path) -> Path:
    """Write a 3xHxW uint8 tensor as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image.contiguous(), str(path))
    return path


def save_grid(images: Sequence[torch.Tensor], path: Path, *, nrow: int = 4) -> Path:
    """Tile same-sized 3xHxW uint8 images into one PNG."""
    grid = make_grid([i.float() / 255.0 for i in images], nrow=nrow, padding=2, pad_value=1.0)
    return save_png((grid * 255).round().to(torch.uint8), path)


def plot_history(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Per-epoch losses and metrics (list of dicts with an 'epoch' key) as a PNG line chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for row in history for k in row if k != "epoch"})
    loss_keys = [k for k in keys if "loss" in k]
    metric_keys = [k for k in keys if "loss" not in k and not k.startswith("lr")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, group, title in ((axes[0], loss_keys, "losses"), (axes[1], metric_keys, "metrics")):
        for key in group:
            pts = [(row["epoch"], row[key]) for row in history if key in row]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if group:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
