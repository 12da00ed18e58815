"""The detector deployment body, in-process (no Ray): loading, batching, box mapping, reconfigure."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from serving.detector import (
    DetectorDeployment,
    DetectorUserConfig,
    DetectTask,
    ModelLoadError,
    UnknownModelError,
    load_model,
    run_batch,
)
from serving.schemas import DetectParams

from .conftest import CLASS_NAMES


def _image(width: int, height: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


def test_run_batch_maps_boxes_into_each_original_image(model_dir: Path) -> None:
    loaded = load_model(str(model_dir))
    # Untrained weights: a zero threshold guarantees boxes, and exercises the mapping back.
    params = DetectParams(score_threshold=0.0, max_detections=50)
    sizes = [(320, 240), (100, 300), (160, 160)]
    tasks = [DetectTask(image=_image(w, h, i), params=params) for i, (w, h) in enumerate(sizes)]
    results = run_batch(loaded, tasks, DetectorUserConfig())
    assert len(results) == 3
    for (w, h), result in zip(sizes, results, strict=True):
        r = result.response
        assert (r.width, r.height) == (w, h)
        assert r.model == "shapes-nano" and r.precision == "float" and r.version is None
        assert 0 < len(r.detections) <= 50
        for d in r.detections:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            assert d.class_name == CLASS_NAMES[d.class_id]
        assert result.png is None


def test_batch_results_equal_single_image_results(model_dir: Path) -> None:
    loaded = load_model(str(model_dir))
    params = DetectParams(score_threshold=0.0, max_detections=10)
    tasks = [DetectTask(image=_image(200, 150, i), params=params) for i in range(4)]
    batched = run_batch(loaded, tasks, DetectorUserConfig())
    for task, b in zip(tasks, batched, strict=True):
        (single,) = run_batch(loaded, [task], DetectorUserConfig())
        assert [d.class_id for d in single.response.detections] == [d.class_id for d in b.response.detections]
        for ds, db in zip(single.response.detections, b.response.detections, strict=True):
            assert ds.box == pytest.approx(db.box, abs=1e-3)


def test_per_request_threshold_overrides_default(model_dir: Path) -> None:
    loaded = load_model(str(model_dir))
    image = _image(160, 160)
    (all_boxes,) = run_batch(loaded, [DetectTask(image=image, params=DetectParams(score_threshold=0.0))],
                             DetectorUserConfig(max_detections=1000))
    (none,) = run_batch(loaded, [DetectTask(image=image, params=DetectParams(score_threshold=1.0))],
                        DetectorUserConfig())
    assert len(all_boxes.response.detections) > 0 and none.response.detections == []


def test_render_returns_png_of_original_size(model_dir: Path) -> None:
    loaded = load_model(str(model_dir))
    task = DetectTask(image=_image(90, 60), params=DetectParams(score_threshold=0.0, max_detections=3),
                      render=True)
    (result,) = run_batch(loaded, [task], DetectorUserConfig())
    assert result.png is not None
    with Image.open(io.BytesIO(result.png)) as im:
        assert im.format == "PNG" and im.size == (90, 60)


def test_missing_model_fails_loudly_with_the_uri(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"could not load model '.*nowhere'.*not a directory"):
        DetectorDeployment(model_uri=str(tmp_path / "nowhere"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="kind"):
        DetectorDeployment(model_uri=str(tmp_path / "broken"))


def test_reconfigure_validates_and_applies(model_dir: Path) -> None:
    dep = DetectorDeployment(model_uri=str(model_dir))
    dep.reconfigure({"score_threshold": 0.4, "max_batch_size": 1, "batch_wait_timeout_s": 0.0})
    info = dep.describe()
    assert (info.score_threshold, info.max_batch_size, info.batch_wait_timeout_s) == (0.4, 1, 0.0)
    assert info.class_names == list(CLASS_NAMES) and info.input_size == 160
    with pytest.raises(ValueError, match="score_threshold"):
        dep.reconfigure({"score_threshold": 3})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        dep.reconfigure({"bogus": 1})
    with pytest.raises(ModelLoadError, match="missing-model"):
        dep.reconfigure({"model_uri": str(model_dir.parent / "missing-model")})
    assert dep.describe().uri == str(model_dir)  # the old model keeps serving


def test_detect_refuses_a_model_it_has_not_loaded(model_dir: Path) -> None:
    dep = DetectorDeployment(model_uri=str(model_dir))
    task = DetectTask(image=_image(32, 32), params=DetectParams(model="other"))
    with pytest.raises(UnknownModelError, match="'other' is not loaded; this service serves 'shapes-nano'"):
        asyncio.run(dep.detect(task))
    assert dep._loaded.matches("shapes-nano") and dep._loaded.matches(str(model_dir))
