"""A SAM-style promptable segmenter built from ``segment_anything.modeling`` parts.

The model is ``segment_anything.modeling.Sam``: an ``ImageEncoderViT`` image encoder, a
``PromptEncoder`` and a ``MaskDecoder`` over a ``TwoWayTransformer``. Named presets:

- ``tiny``: a small ViT at 128 px input that trains on 2 CPU cores in minutes (this project's own size);
- ``vit_b``, ``vit_l``, ``vit_h``: the official Segment Anything shapes at 1024 px, built exactly as
  ``segment_anything.build_sam`` does, so the official checkpoints load with strict keys.

Shapes and formats (as in ``segment_anything``):

- image input to :meth:`Sam.preprocess`: ``3xHxW`` float in [0, 255] RGB, longest side resized to
  ``img_size`` (``segment_anything.utils.transforms.ResizeLongestSide``), padded bottom/right;
- image embeddings: ``Bx(prompt_embed_dim)x(img_size/patch)x(img_size/patch)``;
- point prompts ``BxNx2`` XY and labels ``BxN`` (1 foreground, 0 background), boxes ``Bx4`` XYXY,
  both in model-input pixels;
- low-resolution mask logits ``BxCx(4*img_size/patch)x(4*img_size/patch)``, C = 3 with multimask output.

A model directory (what training writes and the registry stores) holds::

    config.json          {"kind": "segmenter", "format_version": 1, "config": {...SegmenterConfig...}}
    model.safetensors    the state_dict

No code here downloads weights: official checkpoints come from a local path or an ``s3://`` URI.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from components.models.files import WEIGHTS_FILE, ModelFileError, read_model_config, read_weights, save_model_dir

SEGMENTER_PRESETS: tuple[str, ...] = ("tiny", "vit_b", "vit_l", "vit_h")
OFFICIAL_PRESETS: tuple[str, ...] = ("vit_b", "vit_l", "vit_h")
KIND = "segmenter"
FORMAT_VERSION = 1
# segment_anything's pixel statistics (ImageNet, 0-255 scale); not part of the state_dict.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SegmenterConfig:
    """Architecture of a segmenter. Saved as ``config.json`` next to the weights.

    Use :func:`segmenter_config` for a named preset; the fields are the ``segment_anything`` constructor
    arguments, so a reader can map each one to ``build_sam._build_sam``.
    """

    preset: str = "tiny"
    img_size: int = 128  # square model input (longest side after resize); multiple of patch_size
    patch_size: int = 8  # tiny: 8 px patches keep a 16x16 embedding, so low-res masks are 64x64
    encoder_embed_dim: int = 96
    encoder_depth: int = 4
    encoder_num_heads: int = 4
    encoder_global_attn_indexes: tuple[int, ...] = ()
    window_size: int = 0  # 0 = global attention in every block (cheap at 256 tokens)
    use_rel_pos: bool = True
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 64  # also the encoder's out_chans and the decoder's transformer width
    decoder_depth: int = 2
    decoder_mlp_dim: int = 256
    decoder_num_heads: int = 4
    mask_in_chans: int = 16
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 64
    num_multimask_outputs: int = 3
    # Scale of the random Fourier features that encode prompt and image positions (SAM: 1.0). Larger
    # values give sharper position matching between prompt tokens and image tokens.
    pe_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.preset not in SEGMENTER_PRESETS:
            raise ValueError(f"unknown segmenter preset {self.preset!r}; allowed: {list(SEGMENTER_PRESETS)}")
        if self.pe_scale <= 0:
            raise ValueError(f"pe_scale must be > 0, got {self.pe_scale}")
        if self.patch_size < 1 or self.img_size < self.patch_size or self.img_size % self.patch_size:
            raise ValueError(
                f"img_size must be a positive multiple of patch_size={self.patch_size}, got {self.img_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(f"encoder_embed_dim={self.encoder_embed_dim} must be divisible by "
                             f"encoder_num_heads={self.encoder_num_heads}")
        # TwoWayTransformer's cross attention halves the width before splitting into heads.
        if (self.prompt_embed_dim // 2) % self.decoder_num_heads or self.prompt_embed_dim % 8:
            raise ValueError(f"prompt_embed_dim={self.prompt_embed_dim} must be a multiple of 8 and of "
                             f"2*decoder_num_heads={2 * self.decoder_num_heads}")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(f"encoder_global_attn_indexes {bad} outside 0..{self.encoder_depth - 1}")

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding, in tokens."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4x the embedding, as in SAM)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming unknown keys or bad values."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"segmenter config has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        kwargs = dict(data)
        if "encoder_global_attn_indexes" in kwargs:
            kwargs["encoder_global_attn_indexes"] = tuple(int(i) for i in kwargs["encoder_global_attn_indexes"])
        return cls(**kwargs)


# The official shapes, from segment_anything.build_sam (image 1024 px, patch 16, window 14, prompt dim 256).
_OFFICIAL_COMMON: dict[str, Any] = {
    "img_size": 1024, "patch_size": 16, "window_size": 14, "use_rel_pos": True, "mlp_ratio": 4.0,
    "prompt_embed_dim": 256, "decoder_depth": 2, "decoder_mlp_dim": 2048, "decoder_num_heads": 8,
    "mask_in_chans": 16, "iou_head_depth": 3, "iou_head_hidden_dim": 256, "num_multimask_outputs": 3,
}
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "vit_b": {**_OFFICIAL_COMMON, "encoder_embed_dim": 768, "encoder_depth": 12, "encoder_num_heads": 12,
              "encoder_global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {**_OFFICIAL_COMMON, "encoder_embed_dim": 1024, "encoder_depth": 24, "encoder_num_heads": 16,
              "encoder_global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {**_OFFICIAL_COMMON, "encoder_embed_dim": 1280, "encoder_depth": 32, "encoder_num_heads": 16,
              "encoder_global_attn_indexes": (7, 15, 23, 31)},
}


def segmenter_config(preset: str, *, img_size: int | None = None) -> SegmenterConfig:
    """Config of a named preset.

    ``img_size`` may change the ``tiny`` input side (a multiple of 8, at most 256). The official presets
    are fixed at 1024 px because their position embeddings are part of the checkpoint.
    """
    if preset not in _PRESETS:
        raise ValueError(f"unknown segmenter preset {preset!r}; allowed: {list(SEGMENTER_PRESETS)}")
    values = dict(_PRESETS[preset])
    if img_size is not None:
        if preset in OFFICIAL_PRESETS and img_size != 1024:
            raise ValueError(f"preset {preset!r} has the official input size 1024; got img_size={img_size}")
        if preset == "tiny" and not 32 <= img_size <= 256:
            raise ValueError(f"preset 'tiny' takes img_size in 32..256, got {img_size}")
        values["img_size"] = img_size
    return SegmenterConfig(preset=preset, **values)


def build_segmenter(config: SegmenterConfig) -> Sam:
    """Build an untrained ``Sam`` for ``config`` (eval mode, on the CPU).

    For the official presets this is module-for-module what ``segment_anything.build_sam_vit_*`` builds,
    so the state_dict keys and shapes are identical.
    """
    encoder = ImageEncoderViT(
        depth=config.encoder_depth,
        embed_dim=config.encoder_embed_dim,
        img_size=config.img_size,
        mlp_ratio=config.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config.encoder_num_heads,
        patch_size=config.patch_size,
        qkv_bias=True,
        use_rel_pos=config.use_rel_pos,
        global_attn_indexes=config.encoder_global_attn_indexes,
        window_size=config.window_size,
        out_chans=config.prompt_embed_dim,
    )
    side = config.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(side, side),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=config.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=config.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
        ),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    if config.pe_scale != 1.0:
        # PromptEncoder builds PositionEmbeddingRandom(scale=1): the same as scaling its Gaussian matrix.
        with torch.no_grad():
            prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(config.pe_scale)
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder,
              pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))
    return sam.eval()


def load_state_strict(config: SegmenterConfig, state: dict[str, torch.Tensor], *, source: str) -> Sam:
    """Build a ``config`` segmenter holding ``state``, with strict keys and shapes.

    The model is built on the ``meta`` device and the loaded tensors are assigned, so a large preset never
    spends time and memory on a random initialisation that is thrown away. Raises
    :class:`ModelFileError` naming ``source`` and listing the missing and unexpected keys (or the keys
    whose shapes differ), so a checkpoint of another preset is easy to recognise.
    """
    with torch.device("meta"):
        model = build_segmenter(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{source}: keys do not match a {config.preset!r} segmenter: {len(missing)} missing "
            f"{_preview(missing)}, {len(unexpected)} unexpected {_preview(unexpected)}")
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelFileError(f"{source}: {len(wrong)} tensor shape(s) do not match a {config.preset!r} "
                             f"segmenter: {_preview(wrong)}")
    state = {k: v.to(dtype=expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # pixel_mean/pixel_std are non-persistent buffers (not in any checkpoint): recreate them off meta.
    model.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
    model.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)
    return model.eval()


def _preview(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def save_segmenter(model: Sam, config: SegmenterConfig, directory: Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``; return the directory."""
    return save_model_dir(model, directory, kind=KIND, format_version=FORMAT_VERSION, config=config.to_dict(),
                          metadata={"preset": config.preset})


def read_segmenter_config(directory: Path) -> SegmenterConfig:
    """Parse ``<directory>/config.json``; raise :class:`ModelFileError` naming the file and field."""
    return read_model_config(directory, kind=KIND, format_version=FORMAT_VERSION, parse=SegmenterConfig.from_dict)


def load_segmenter(directory: Path, *, device: str | torch.device = "cpu") -> tuple[Sam, SegmenterConfig]:
    """Build the segmenter from ``config.json`` and load ``model.safetensors`` with strict keys.

    Returns the model in eval mode on ``device`` and its config.
    """
    directory = Path(directory)
    config = read_segmenter_config(directory)
    state = read_weights(directory, device="cpu")
    model = load_state_strict(config, state, source=str(directory / WEIGHTS_FILE))
    return model.to(device), config


def load_sam_checkpoint(path_or_uri: str | Path, preset: str, *, device: str | torch.device = "cpu") -> Sam:
    """Load an official SAM checkpoint (``torch.save(sam.state_dict())``) into a ``preset`` model.

    ``path_or_uri`` is a local file or ``s3://bucket/key`` (read through the minio SDK with the
    ``MODELCOMMONS_S3_*`` settings). The file is read with ``torch.load(weights_only=True)``: tensors
    only, never arbitrary pickled objects. Keys must match exactly; otherwise :class:`ModelFileError`
    lists the missing and unexpected keys. Nothing is ever downloaded from the internet.
    """
    config = segmenter_config(preset)
    source = str(path_or_uri)
    if source.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="sam-ckpt-") as tmp:
            local = _fetch_s3_object(source, Path(tmp))
            state = _torch_load_state(local, source)
    elif "://" in source:
        raise ModelFileError(f"{source}: only local paths and s3:// URIs are accepted for SAM checkpoints")
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelFileError(f"{path}: SAM checkpoint file not found")
        state = _torch_load_state(path, source)
    return load_state_strict(config, state, source=source).to(device)


def _torch_load_state(path: Path, source: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for disallowed globals, RuntimeError for corrupt zips
        raise ModelFileError(f"{source}: not a readable weights-only torch checkpoint: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{source}: expected a state_dict (a mapping of names to tensors), "
                             f"got {type(state).__name__}")
    return state


def _fetch_s3_object(uri: str, dest_dir: Path) -> Path:
    # Heavy optional dependency paths stay inside the function: local loading needs no S3 settings.
    from minio.error import MinioException, S3Error

    from components.storage import StorageError, minio_client, parse_s3_uri

    try:
        bucket, prefix = parse_s3_uri(uri)
    except ValueError as exc:
        raise ModelFileError(str(exc)) from exc
    key = prefix.rstrip("/")
    if not key:
        raise ModelFileError(f"{uri}: names a bucket, not a checkpoint object (s3://<bucket>/<key>)")
    target = dest_dir / Path(key).name
    try:
        minio_client().fget_object(bucket, key, str(target))
    except S3Error as exc:
        raise StorageError(f"{uri}: cannot read SAM checkpoint: S3 error {exc.code}: {exc.message}") from exc
    except (MinioException, OSError) as exc:
        raise StorageError(f"{uri}: cannot read SAM checkpoint: {exc}") from exc
    return target
