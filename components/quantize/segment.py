"""Quantization of the segmenter: its ViT image encoder through the workbench, mIoU per precision, int8 export.

What is quantized, and why only the image encoder
-------------------------------------------------
The image encoder is where a SAM-style model spends its time (vit_b: ~90M of ~94M parameters and almost
all of the FLOPs, run once per image); the prompt encoder and mask decoder are small, run once per prompt
batch, take three inputs (embedding, dense positional encoding, prompt tokens) and return two outputs,
which :class:`~components.quantize.graph.QuantGraph` (one input tensor, one output tensor) does not model.
They stay float in every precision; only the encoder's output (the image embedding) differs.

``segment_anything``'s ``ImageEncoderViT`` cannot be traced by ``torch.fx`` as is (``Attention`` unpacks
``x.shape`` and branches on it, parameters are read inside ``forward``). :class:`QuantEncoder` rebuilds
the same computation from the same module objects (weights are shared, not copied) with static shapes,
and groups what has no integer kernel into leaf modules that declare their ``quant_kind`` (see
:mod:`.graph`). How each op runs per precision:

==========================  ==========  ================  ======================  =====================
op                          kind        hybrid            int8 (engine)           deployable (x86 FX)
==========================  ==========  ================  ======================  =====================
patch embed, neck convs     conv2d      int8 x int8       int8, fixed point       quantized Conv2d
qkv, proj, MLP lin1/lin2    linear      int8 x int8       int8, fixed point       quantized Linear
GELU                        gelu        float             256-entry int8 LUT      float
residual adds               add         float             TFLite integer add      quantized add
permute, window (un)part.   reshape /   float             pass-through (exact)    float (dequantized)
                            permute
+ absolute pos. embedding   pos_embed   float             float island            float
LayerNorm, LayerNorm2d      layer_norm  float             float island            float
attention core (q@k^T,      attention   float             float island            float
rel. pos, softmax, @v)
==========================  ==========  ================  ======================  =====================

A model-wide ``int8`` run of the engine raises :class:`~.errors.UnsupportedLayerError` at the first
float-only layer (the engine's ``int8`` means integer only). The segmenter's ``int8`` figures use
:func:`~.engine.int8_precisions` instead: every layer with an integer implementation in int8, the
``pos_embed``/``layer_norm``/``attention`` layers as float islands (int8 in, dequantize, float32,
requantize with the output's calibrated scale), shown as ``float`` layers in the report and graph.
LayerNorm needs a per-token mean and reciprocal square root and softmax an exponential and a division:
integer versions exist (I-BERT) but change the numerics, and the activation x activation matmuls would
need their own per-tensor scales for q, k, attention probabilities and v; all are left for later.

The deployable model quantizes exactly the conv/linear layers (and the residual adds) on PyTorch's x86
kernels with our calibrated ranges; everything else runs in float between dequantize/quantize pairs,
which is what FX graph-mode quantization does for ops given a ``None`` qconfig.

An int8 segmenter directory holds the float ``config.json`` + ``model.safetensors`` and
``quantization.json`` (:class:`~.deploy.Int8Spec` with ``kind="int8_segmenter"``); nothing is pickled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from segment_anything.modeling import ImageEncoderViT, Sam
from segment_anything.modeling.image_encoder import Attention, Block, add_decomposed_rel_pos
from torch import fx, nn

from components.quantize.calibrate import Calibration
from components.quantize.deploy import (
    Int8Spec,
    check_backend,
    check_calibrator,
    check_int8_dir,
    export_module_int8,
    rebuild_int8,
    use_backend,
    write_int8_dir,
)
from components.quantize.engine import Precision, QuantEngine, int8_precisions
from components.quantize.errors import CalibrationError
from components.quantize.graph import QuantGraph
from components.quantize.inspector import InspectorSession, ModelReport
from components.quantize.metrics import error_stats
from components.quantize.visualize import model_graph
from components.segment.data import SegSample, load_seg_samples
from components.segment.evaluate import evaluate_segmenter
from components.segment.model import PIXEL_MEAN, PIXEL_STD, SegmenterConfig, load_segmenter

if TYPE_CHECKING:
    from components.quantize.stage import QuantizeResult

FLOAT_ISLAND_KINDS = frozenset({"pos_embed", "layer_norm", "attention"})
ENGINE_PRECISIONS = ("float", "hybrid", "int8")
DEPLOY = "deploy"
PROMPTS = ("miou_point", "miou_box")

# ------------------------------------------------------------------------------------ traceable encoder


class PosEmbedAdd(nn.Module):
    """``x + pos_embed`` (BxHxWxC + 1xHxWxC): a float island (the embedding is a parameter, not an activation)."""

    quant_kind = "pos_embed"

    def __init__(self, pos_embed: nn.Parameter) -> None:
        super().__init__()
        self.pos_embed = pos_embed  # shared with the source encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_embed


class ChannelNorm(nn.Module):
    """A LayerNorm module (``nn.LayerNorm`` or SAM's channel-first ``LayerNorm2d``) as one ``layer_norm`` leaf."""

    quant_kind = "layer_norm"

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.norm(x))


class AttentionCore(nn.Module):
    """SAM's ``Attention.forward`` between ``qkv`` and ``proj``: BxHxWx3C -> BxHxWxC, a float island.

    Splits heads, ``softmax((q * scale) @ k^T + decomposed relative positions) @ v``, merges heads: the
    same operations, in the same order, as ``segment_anything.modeling.image_encoder.Attention``.
    """

    quant_kind = "attention"

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w  # shared parameters

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = qkv.shape
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, nh, HW, hd)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # (B*nh, HW, hd) each
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        return (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)


class WindowPartition(nn.Module):
    """BxHxWxC -> (B*nW)xwsxwsxC, zero-padded to whole windows (SAM's ``window_partition``): value-preserving."""

    quant_kind = "reshape"  # moves values and adds zeros (exact in int8): a pass-through

    def __init__(self, window_size: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.window_size, self.size = window_size, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import window_partition

        return window_partition(x, self.window_size)[0]


class WindowUnpartition(nn.Module):
    """Inverse of :class:`WindowPartition` (SAM's ``window_unpartition``): padding removed."""

    quant_kind = "reshape"

    def __init__(self, window_size: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.window_size, self.size = window_size, size
        ws = window_size
        self.padded = (size[0] + (ws - size[0] % ws) % ws, size[1] + (ws - size[1] % ws) % ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import window_unpartition

        return window_unpartition(x, self.window_size, self.padded, self.size)


class EncoderBlock(nn.Module):
    """SAM's ``Block`` with ``qkv`` and ``proj`` lifted out of ``Attention`` so they are quantized layers."""

    def __init__(self, block: Block, size: tuple[int, int]) -> None:
        super().__init__()
        self.norm1 = ChannelNorm(block.norm1)
        self.partition = WindowPartition(block.window_size, size) if block.window_size > 0 else None
        self.qkv = block.attn.qkv
        self.attn = AttentionCore(block.attn)
        self.proj = block.attn.proj
        self.unpartition = WindowUnpartition(block.window_size, size) if block.window_size > 0 else None
        self.norm2 = ChannelNorm(block.norm2)
        self.lin1, self.act, self.lin2 = block.mlp.lin1, block.mlp.act, block.mlp.lin2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.partition is not None:
            x = self.partition(x)
        x = self.proj(self.attn(self.qkv(x)))
        if self.unpartition is not None:
            x = self.unpartition(x)
        x = shortcut + x
        return x + self.lin2(self.act(self.lin1(self.norm2(x))))


class QuantEncoder(nn.Module):
    """A torch.fx-traceable view of an ``ImageEncoderViT`` sharing its modules: Bx3xSxS -> BxCxExE.

    Input: the preprocessed image (``Sam.preprocess``: normalised with the pixel mean/std, zero-padded
    to SxS); output: the image embedding, bit-for-bit what the source encoder returns.
    """

    def __init__(self, encoder: ImageEncoderViT) -> None:
        super().__init__()
        self.img_size = encoder.img_size
        self.patch_embed = encoder.patch_embed.proj
        side = encoder.img_size // self.patch_embed.stride[0]
        self.pos = PosEmbedAdd(encoder.pos_embed) if encoder.pos_embed is not None else None
        self.blocks = nn.ModuleList(EncoderBlock(cast(Block, b), (side, side)) for b in encoder.blocks)
        self.neck = nn.Sequential(*(ChannelNorm(m) if i % 2 else m for i, m in enumerate(encoder.neck)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # B x E x E x C
        if self.pos is not None:
            x = self.pos(x)
        for block in self.blocks:
            x = block(x)
        return cast(torch.Tensor, self.neck(x.permute(0, 3, 1, 2)))


def encoder_graph(model: Sam) -> QuantGraph:
    """The traced, quantizable graph of ``model``'s image encoder (a deep copy: ``model`` is not changed)."""
    return QuantGraph(QuantEncoder(model.image_encoder))


def preprocess_batch(model: Sam, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images (3xhxw float in [0, 255], longest side S) -> the encoder input Bx3xSxS (``Sam.preprocess``)."""
    return torch.stack([model.preprocess(image) for image in images])


def segmenter_calibration_batches(model: Sam, samples: Sequence[SegSample], *, count: int = 32,
                                  batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """``count`` samples (seeded choice) preprocessed into Bx3xSxS encoder batches."""
    if count < 1 or batch_size < 1:
        raise CalibrationError(f"count and batch_size must be >= 1, got count={count}, batch_size={batch_size}")
    if not samples:
        raise CalibrationError("calibration data is empty: no segmentation samples given")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    with torch.no_grad():
        images = preprocess_batch(model, [samples[i].input_image for i in order])
    return [images[s:s + batch_size] for s in range(0, len(images), batch_size)]


# -------------------------------------------------------------------------------------- evaluation


class _EncoderAdapter(nn.Module):
    """Stands in for ``Sam.image_encoder``: calls ``encode`` (Bx3xSxS -> BxCxExE); has ``img_size`` like SAM's."""

    def __init__(self, encode: Any, img_size: int) -> None:
        super().__init__()
        self.encode, self.img_size = encode, img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.encode(x))


def with_encoder(model: Sam, encode: Any) -> Sam:
    """A ``Sam`` sharing ``model``'s prompt encoder and mask decoder whose image encoder is ``encode``."""
    sam = Sam(image_encoder=cast(ImageEncoderViT, _EncoderAdapter(encode, model.image_encoder.img_size)),
              prompt_encoder=model.prompt_encoder, mask_decoder=model.mask_decoder,
              pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))
    sam.pixel_mean.copy_(model.pixel_mean)
    sam.pixel_std.copy_(model.pixel_std)
    return sam.eval()


def engine_precisions(engine: QuantEngine, precision: str) -> str | list[Precision]:
    """What the engine runs for a segmenter precision: ``int8`` means int8 with float islands."""
    return int8_precisions(engine.graph) if precision == "int8" else precision


def miou_by_precision(model: Sam, engine: QuantEngine, samples: Sequence[SegSample], *,
                      precisions: Sequence[str] = ENGINE_PRECISIONS, deployed: nn.Module | None = None
                      ) -> dict[str, dict[str, float]]:
    """``{precision: {"miou_point", "miou_box", "instances", "images"}}`` with the encoder run per precision.

    ``float`` is ``model`` itself; ``hybrid`` and ``int8`` run the encoder through ``engine`` (int8 with
    float islands, see the module docstring); ``deployed`` (an exported int8 encoder, Bx3xSxS ->
    BxCxExE) adds ``"deploy"``. Prompts, decoder and mask post-processing are
    :func:`components.segment.evaluate.evaluate_segmenter`'s, in float.
    """
    out: dict[str, dict[str, float]] = {}
    for precision in precisions:
        if precision == "float":
            out[precision] = evaluate_segmenter(model, samples).metrics
            continue
        mode = engine_precisions(engine, precision)
        out[precision] = evaluate_segmenter(with_encoder(model, lambda x, m=mode: engine.run(x, m)), samples).metrics
    if deployed is not None:
        out[DEPLOY] = evaluate_segmenter(with_encoder(model, deployed), samples).metrics
    return out


# ------------------------------------------------------------------------------------------ deploy


class Int8Encoder(nn.Module):
    """The exported int8 encoder (PyTorch quantized CPU kernels): Bx3xSxS float -> BxCxExE float."""

    def __init__(self, quantized: fx.GraphModule, *, backend: str, img_size: int) -> None:
        super().__init__()
        self.quantized, self.backend, self.img_size = quantized.eval(), backend, img_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_backend(self.backend)  # packed int8 weights run on the engine they were packed for
        return cast(torch.Tensor, self.quantized(x.float().cpu()))


def export_encoder_int8(model: Sam, calibration: Calibration, *, backend: str = "x86", per_channel: bool = True
                        ) -> Int8Encoder:
    """``model``'s image encoder on torch's int8 kernels, fed ``calibration``'s ranges (see module docstring)."""
    size = model.image_encoder.img_size
    export = export_module_int8(QuantEncoder(model.image_encoder), calibration,
                                example=torch.zeros(1, 3, size, size), backend=backend, per_channel=per_channel,
                                float_types=(nn.LayerNorm, nn.GELU))
    return Int8Encoder(export.module, backend=backend, img_size=size)


class Int8Segmenter:
    """An int8 segmenter directory loaded: the float ``Sam`` and a ``Sam`` view whose encoder is int8."""

    precision = "int8"

    def __init__(self, float_model: Sam, config: SegmenterConfig, encoder: Int8Encoder, spec: Int8Spec) -> None:
        self.float_model, self.config, self.encoder, self.spec = float_model, config, encoder, spec
        self.model = with_encoder(float_model, encoder)  # drop-in for Sam in segment.predict / evaluate


def save_int8_segmenter(model_dir: Path, calibration: Calibration, out_dir: Path, *, backend: str = "x86",
                        per_channel: bool = True, calibrator: str, percentile: float = 99.99) -> Path:
    """Write an int8 segmenter directory: the float files and ``quantization.json``; returns ``out_dir``.

    The same format as an int8 detector (:func:`~.deploy.write_int8_dir`, kind ``int8_segmenter``).
    The export runs once here so a model that cannot be exported fails now, not at load time.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_backend(backend)
    check_calibrator(calibrator, calibration)
    model, config = load_segmenter(model_dir)
    export_encoder_int8(model, calibration, backend=backend, per_channel=per_channel)
    return write_int8_dir(model_dir, out_dir, calibration, kind="int8_segmenter", backend=backend,
                          per_channel=per_channel, calibrator=calibrator, percentile=percentile,
                          img_size=config.img_size)


def load_int8_segmenter(path: Path) -> Int8Segmenter:
    """Rebuild the int8 segmenter in ``path`` from its float weights and ``quantization.json``.

    Raises :class:`~.deploy.Int8ModelError` naming the file and field (:func:`~.deploy.check_int8_dir`):
    missing files, another kind of int8 model, weights whose sha256 differs from the recorded one, an
    unknown backend, or ranges that do not fit.
    """
    path = Path(path)
    spec = check_int8_dir(path, "int8_segmenter")
    model, config = load_segmenter(path)
    encoder = rebuild_int8(path, lambda: export_encoder_int8(model, spec.calibration(), backend=spec.backend,
                                                             per_channel=spec.per_channel))
    return Int8Segmenter(model, config, encoder, spec)


# ------------------------------------------------------------------------------------------- stage


def run_segmenter_quantize(model_dir: Path, dataset_dir: Path, out_dir: Path, *, calibrator: str = "kl",
                           percentile: float = 99.99, per_channel: bool = True, calib_images: int = 64,
                           backend: str = "x86", int8_dir: Path | None = None, track: bool = True,
                           run_id: str | None = None, register: bool = False, model_name: str = "segmenter",
                           float_version: str | None = None, seed: int = 0, progress: bool = True
                           ) -> QuantizeResult:
    """The quantize stage for a float segmenter directory (``run_quantize`` dispatches here on its kind).

    Calibrates the image encoder on ``calib_images`` preprocessed images of the train split, evaluates
    point- and box-prompt mIoU on the val split with the encoder in float, hybrid, int8 (float islands)
    and deployable int8, writes the int8 segmenter directory and the reports, and with ``track`` logs an
    MLflow run (nested under the float run); with ``register`` the int8 model becomes a version of
    ``model_name`` tagged ``precision=int8``, ``calibrator``, ``float_version``, ``backend`` (no alias).

    Metrics: ``{float,hybrid,int8,deploy}_{miou_point,miou_box}``, ``miou_box_drop`` (float minus
    deployable box mIoU, in points: x100), ``embedding_sqnr_db_{hybrid,int8,deploy}`` on the first val image.
    """
    from components.quantize.stage import (
        QuantizeResult,
        calibrate_graph,
        check_arguments,
        check_splits,
        parent_run,
        track_quantize,
        write_files,
    )

    check_arguments(calibrator=calibrator, percentile=percentile, calib_images=calib_images, backend=backend,
                    register=register, track=track, float_version=float_version)
    model_dir, dataset_dir, out_dir = Path(model_dir), Path(dataset_dir), Path(out_dir)
    model, config = load_segmenter(model_dir)
    manifest = check_splits(dataset_dir)
    parent_run_id = parent_run(run_id, register=register, model_name=model_name, float_version=float_version)

    out_dir.mkdir(parents=True, exist_ok=True)
    _, train = load_seg_samples(dataset_dir, "train", config.img_size)
    batches = segmenter_calibration_batches(model, train, count=calib_images, seed=seed)
    graph = encoder_graph(model)
    calibration = calibrate_graph(graph, batches, calibrator=calibrator, percentile=percentile,
                                  per_channel=per_channel, progress=progress)
    engine = QuantEngine(graph, calibration)
    int8_path = save_int8_segmenter(model_dir, calibration, Path(int8_dir) if int8_dir else out_dir / "int8_model",
                                    backend=backend, per_channel=per_channel, calibrator=calibrator,
                                    percentile=percentile)
    deployed = load_int8_segmenter(int8_path)

    _, val = load_seg_samples(dataset_dir, "val", config.img_size)
    by_precision = miou_by_precision(model, engine, val, deployed=deployed.encoder)
    metrics = {f"{p}_{k}": v[k] for p, v in by_precision.items() for k in PROMPTS}
    metrics["miou_box_drop"] = 100.0 * (metrics["float_miou_box"] - metrics[f"{DEPLOY}_miou_box"])
    image = preprocess_batch(model, [val[0].input_image])
    with torch.no_grad():
        reference = model.image_encoder(image)
        for precision in ("hybrid", "int8"):
            sqnr = error_stats(reference, engine.run(image, engine_precisions(engine, precision))).sqnr_db
            metrics[f"embedding_sqnr_db_{precision}"] = _finite(sqnr)
        metrics[f"embedding_sqnr_db_{DEPLOY}"] = _finite(error_stats(reference, deployed.encoder(image)).sqnr_db)
    plan = int8_precisions(graph)
    report = _report(engine, image, plan)
    files = write_files(out_dir, calibration, report, metrics, model_graph(engine, image, plan),
                        summary_markdown(calibration, metrics, report, engine.graph, plan))
    result = QuantizeResult(model_dir=int8_path, out_dir=out_dir, calibration=calibration, metrics=metrics,
                            report=report, files=files)
    if not track:
        return result
    params = {"calibrator": calibrator, "percentile": percentile, "per_channel": per_channel,
              "calib_images": calibration.images, "img_size": config.img_size, "backend": backend, "seed": seed,
              "quantized_part": "image_encoder"}
    return track_quantize(result, manifest, params, parent_run_id=parent_run_id, register=register,
                          model_name=model_name, float_version=float_version, task="segmentation",
                          log_model=_log_int8_segmenter, metric="miou_box",
                          extra_tags={"quantized_part": "image_encoder"})


def _finite(value: float | None) -> float:
    return 999.0 if value is None or not math.isfinite(value) else float(value)  # None: identical outputs


def _report(engine: QuantEngine, image: torch.Tensor, plan: list[Precision]) -> ModelReport:
    """The per-layer report of the int8 plan (float islands included, as ``float`` layers)."""
    session = InspectorSession(engine, image, "float")
    session.precisions = list(plan)
    return session.report()


def summary_markdown(calibration: Calibration, metrics: dict[str, float], report: ModelReport, graph: QuantGraph,
                     plan: Sequence[Precision]) -> str:
    """A short Markdown page: mIoU per precision, embedding SQNR, float islands, worst layers."""
    islands: dict[str, int] = {}
    for layer, precision in zip(graph.layers, plan, strict=True):
        if precision == Precision.FLOAT:
            islands[layer.kind] = islands.get(layer.kind, 0) + 1
    lines = [f"# Segmenter quantization ({calibration.method}, {calibration.weight_granularity} weights, "
             f"{calibration.images} calibration images; image encoder only)", "",
             "| encoder | mIoU (point) | mIoU (box) | embedding SQNR (dB) |", "|---|---|---|---|"]
    labels = {"float": "float", "hybrid": "hybrid (engine)", "int8": "int8 (engine, float islands)",
              DEPLOY: "int8 (deployable, x86 kernels)"}
    for key, label in labels.items():
        sqnr = metrics.get(f"embedding_sqnr_db_{key}")
        lines.append(f"| {label} | {metrics[f'{key}_miou_point']:.4f} | {metrics[f'{key}_miou_box']:.4f} | "
                     f"{'-' if sqnr is None else f'{sqnr:.1f}'} |")
    lines += ["", f"Box mIoU drop, float to deployable int8: {metrics['miou_box_drop']:.2f} points.",
              "Float islands in int8: " + (", ".join(f"{k} x{n}" for k, n in sorted(islands.items())) or "none") + ".",
              "", "Layers with the lowest local SQNR: " + (", ".join(report.worst_layers) or "none") + "."]
    return "\n".join(lines) + "\n"


def _log_int8_segmenter(model_dir: Path) -> str:
    """Log the int8 segmenter directory as a pyfunc in the active run; returns its URI."""
    from components.segment.model_logging import log_segmenter_model

    return log_segmenter_model(model_dir)
