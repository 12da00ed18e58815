"""Fixtures: a small detector with non-trivial folded BatchNorm, its calibration, and a quickly trained model."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from components.models.detector import Detector, detector_config
from components.quantize.calibrate import Calibration, calibrate
from components.quantize.engine import QuantEngine
from components.quantize.graph import QuantGraph

IMG = 64


@pytest.fixture(scope="package", autouse=True)
def _one_thread() -> Iterator[None]:
    # These tensors are small: on a shared 2-core machine, intra-op threads spin-wait far more than they
    # compute (measured: 5-10x slower wall time with the default thread count).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet_quantized_tensor_deprecation() -> None:
    # torch warns that quantized tensor constructors are deprecated; the reference kernels still need them.
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")


def make_detector(seed: int = 0, img_size: int = IMG) -> Detector:
    torch.manual_seed(seed)
    model = Detector(detector_config("nano", num_classes=3, img_size=img_size)).eval()
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial BN so folding matters
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)
    return model


@pytest.fixture(scope="module")
def detector() -> Detector:
    return make_detector()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    # Smooth-ish images (upsampled noise) look more like photos than white noise does.
    return [torch.nn.functional.interpolate(torch.rand(4, 3, IMG // 8, IMG // 8, generator=gen), size=IMG,
                                            mode="bilinear", align_corners=False) for _ in range(2)]


@pytest.fixture(scope="module")
def graph(detector: Detector) -> QuantGraph:
    return QuantGraph(detector)


@pytest.fixture(scope="module")
def calibration(graph: QuantGraph, images: list[torch.Tensor]) -> Calibration:
    return calibrate(graph, images, method="percentile")


@pytest.fixture(scope="module")
def engine(graph: QuantGraph, calibration: Calibration) -> QuantEngine:
    return QuantEngine(graph, calibration)


@pytest.fixture(scope="session")
def trained_model_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nano detector trained 15 epochs on the 96 px tiny dataset (about 20 s on 2 busy cores)."""
    from components.train.trainer import TrainConfig, train_detector

    out = tmp_path_factory.mktemp("quantize-train")
    config = TrainConfig(preset="nano", epochs=15, batch_size=8, img_size=96, eval_every=100, seed=0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures start before the package-wide _one_thread fixture
    try:
        return train_detector(tiny_dataset, out, config, track=False, progress=False).model_dir
    finally:
        torch.set_num_threads(previous)
