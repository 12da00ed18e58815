"""Tensor-level prompting of a ``Sam`` model, shared by training and evaluation.

Unlike ``Sam.forward`` (no gradients, one call per image) these functions keep gradients and return all
four mask tokens, so training can supervise both the single-mask token (index 0) and the three
multimask tokens (1..3) the way SAM does, and evaluation can choose between them.

Shapes: ``E`` = image embedding side, ``L = 4 * E`` the low-resolution mask side, ``S`` = ``img_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam


def encode_images(model: Sam, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images (each 3xhxw float in [0, 255], max(h, w) == S) -> image embeddings BxCxExE.

    ``Sam.preprocess`` normalises with the model's pixel mean/std and pads bottom/right to SxS.
    """
    batch = torch.stack([model.preprocess(image.to(model.device)) for image in images])
    return model.image_encoder(batch)


def decode(model: Sam, embeddings: torch.Tensor, *, image_index: torch.Tensor | None = None,
           points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
           boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for a batch of prompts over one or more images: all four mask tokens.

    ``embeddings`` is BxCxExE (or CxExE for one image). ``points`` PxKx2 XY with ``point_labels`` PxK
    (1 foreground, 0 background), and/or ``boxes`` Qx4 XYXY, both in model-input pixels. Rows are P
    point prompts, then Q box prompts; a row never mixes both. ``image_index`` (P+Q, int64) names each
    row's image; omitted, every row belongs to image 0.

    Returns low-resolution mask logits (P+Q)x4xLxL and predicted IoUs (P+Q)x4. Token 0 is SAM's
    single-mask output, tokens 1..3 its multimask outputs.
    """
    if embeddings.dim() == 3:
        embeddings = embeddings[None]
    sparse: list[torch.Tensor] = []
    dense: list[torch.Tensor] = []
    if points is not None:
        if point_labels is None or point_labels.shape != points.shape[:2]:
            raise ValueError(f"point_labels must be PxK matching points {tuple(points.shape)}")
        s, d = model.prompt_encoder(points=(points.to(model.device), point_labels.to(model.device)),
                                    boxes=None, masks=None)
        sparse.append(s)
        dense.append(d)
    if boxes is not None:
        s, d = model.prompt_encoder(points=None, boxes=boxes.to(model.device), masks=None)
        sparse.append(s)
        dense.append(d)
    if not sparse:
        raise ValueError("decode needs point or box prompts")
    rows = sum(s.shape[0] for s in sparse)
    if image_index is None:
        image_index = torch.zeros(rows, dtype=torch.long)
    if image_index.shape != (rows,):
        raise ValueError(f"image_index must have one entry per prompt row ({rows}), got {tuple(image_index.shape)}")
    if len(sparse) == 2 and sparse[0].shape[1] != sparse[1].shape[1]:
        # Multi-point rows carry a different token count than box rows: decode them separately.
        n = sparse[0].shape[0]
        first = decode(model, embeddings, image_index=image_index[:n], points=points, point_labels=point_labels)
        second = decode(model, embeddings, image_index=image_index[n:], boxes=boxes)
        return torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])
    return _predict_masks_indexed(model, embeddings, image_index.to(model.device), torch.cat(sparse),
                                  torch.cat(dense))


def _predict_masks_indexed(model: Sam, embeddings: torch.Tensor, image_index: torch.Tensor,
                           sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` for prompts of many images in one call.

    The same computation, line for line, except that each prompt row picks its image embedding with
    ``image_index`` instead of ``repeat_interleave`` over a single image; one call per batch keeps the
    many small decoder ops from dominating a CPU training step.
    """
    decoder = model.mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)  # (P, 1 + num_mask_tokens + T, C)
    src = embeddings[image_index] + dense  # (P, C, E, E)
    pos_src = model.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:(1 + decoder.num_mask_tokens), :]
    src = src.transpose(1, 2).reshape(b, c, h, w)
    upscaled = decoder.output_upscaling(src)  # (P, C/8, L, L)
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                           dim=1)  # (P, num_mask_tokens, C/8)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)


def pick_masks(low_res: torch.Tensor, iou_pred: torch.Tensor, *, multimask: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's output rule: multimask -> the token among 1..3 with the highest predicted IoU; else token 0.

    ``low_res`` Px4xLxL, ``iou_pred`` Px4 -> (PxLxL logits, P scores).
    """
    if multimask:
        best = iou_pred[:, 1:].argmax(dim=1) + 1
    else:
        best = torch.zeros(low_res.shape[0], dtype=torch.long, device=low_res.device)
    rows = torch.arange(low_res.shape[0], device=low_res.device)
    return low_res[rows, best], iou_pred[rows, best]


def upscale_logits(model: Sam, low_res: torch.Tensor, input_size: tuple[int, int],
                   original_size: tuple[int, int]) -> torch.Tensor:
    """PxLxL (or PxCxLxL) logits -> logits at the original image size, padding removed (``Sam.postprocess_masks``)."""
    squeeze = low_res.dim() == 3
    x = low_res[:, None] if squeeze else low_res
    out = model.postprocess_masks(x, input_size=input_size, original_size=original_size)
    return out[:, 0] if squeeze else out


def input_res_logits(low_res: torch.Tensor, img_size: int) -> torch.Tensor:
    """Px4xLxL -> Px4xSxS logits at model-input resolution (padding kept), for the training loss."""
    return F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
