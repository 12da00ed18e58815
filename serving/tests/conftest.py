"""Shared fixtures: a tiny saved detector and segmenter, and ONE real local Ray Serve for every HTTP test."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

CLASS_NAMES = ("circle", "rectangle", "triangle")
# Small limits so the over-limit cases stay small and fast.
MAX_IMAGE_BYTES = 300_000
MAX_IMAGE_PIXELS = 1_000_000
# Segment tests use SEG_W x SEG_H images; the embedding cache holds two of them (see embedding_cache_bytes).
SEG_W, SEG_H = 96, 80


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from components.models.detector import build_detector, detector_config
    from components.models.weights import save_detector

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "shapes-nano"
    config = detector_config("nano", num_classes=3, class_names=CLASS_NAMES)
    return save_detector(build_detector(config), directory)


@pytest.fixture(scope="session")
def segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``tiny`` segmenter with random weights, saved as a model directory named ``sam-tiny``."""
    import torch

    from components.segment.model import build_segmenter, save_segmenter, segmenter_config

    torch.manual_seed(0)
    config = segmenter_config("tiny")
    return save_segmenter(build_segmenter(config), config, tmp_path_factory.mktemp("models") / "sam-tiny")


def embedding_entry_bytes(width: int = SEG_W, height: int = SEG_H) -> int:
    """Bytes one cached image costs with the ``tiny`` preset: float32 embedding + uint8 RGB pixels."""
    from components.segment.model import segmenter_config

    config = segmenter_config("tiny")
    return 4 * config.prompt_embed_dim * config.embedding_size ** 2 + 3 * width * height


def embedding_cache_bytes() -> int:
    """Room for two SEG_W x SEG_H images, not three: small enough for the bound test to evict."""
    return embedding_entry_bytes() * 5 // 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def serve_url(model_dir: Path, segmenter_dir: Path) -> Iterator[str]:
    """Base URL of the application on a real local Ray Serve (127.0.0.1, a free port)."""
    from serving.app import ServeArgs
    from serving.server import run_server, shutdown_server

    args = ServeArgs(model_uri=str(model_dir), port=_free_port(), max_image_bytes=MAX_IMAGE_BYTES,
                     max_image_pixels=MAX_IMAGE_PIXELS, num_cpus=0.5, max_batch_size=16,
                     batch_wait_timeout_s=0.005, segmenter_model_uri=str(segmenter_dir),
                     embedding_cache_bytes=embedding_cache_bytes(), segmenter_num_cpus=0.5)
    url = run_server(args, blocking=False, num_cpus=2)
    try:
        yield url
    finally:
        shutdown_server()
