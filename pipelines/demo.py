"""``modelcommons demo``: synthetic data -> detector-train and segmenter-train pipelines -> one served
endpoint with both models -> sample outputs (detections, and hard/blended/JSON segmentations)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.settings import Settings, get_settings


@dataclass(frozen=True)
class DemoOptions:
    images: int = 600  # synthetic images (80% train, 20% val)
    image_size: int = 160
    data_seed: int = 0
    epochs: int = 40
    preset: str = "nano"
    port: int = 8000
    samples: int = 4  # sample requests whose annotated outputs are written
    segmenter_epochs: int = 16  # tiny: ~11 s an epoch on 480 train images (2 uncontended cores)
    segmenter_preset: str = "tiny"
    keep_serving: bool = False
    summary: Path | None = None
    quantize: bool = True  # detector-train's quantize step: an int8 sibling, served with precision=int8
    calibrator: str = "percentile"  # the best of the four in `bench quantize` on this data


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 2)


def run_demo(options: DemoOptions, *, settings: Settings | None = None) -> dict[str, Any]:
    """Run the main job and return (and write) the summary JSON."""
    import httpx

    from components.data.format import IMAGES_DIR
    from components.data.shapes import generate_shapes
    from pipelines.runner import run_local
    from serving.app import ServeArgs
    from serving.server import run_server, shutdown_server

    settings = settings or get_settings()
    settings.ensure_dirs()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = settings.outputs_dir / f"demo-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)

    source = settings.data_dir / f"shapes-n{options.images}-s{options.image_size}-seed{options.data_seed}"
    with _timed(timings, "generate_data"):
        if not (source / "annotations.json").is_file():
            generate_shapes(source, count=options.images, image_size=options.image_size, seed=options.data_seed)
    with _timed(timings, "pipeline_detector_train"):
        outputs = run_local("detector-train", {
            "source": str(source), "epochs": options.epochs, "preset": options.preset,
            "img_size": options.image_size, "model_name": "detector",
            "quantize": options.quantize, "calibrator": options.calibrator,
        }, settings=settings)
    run_id = str(outputs["run_id"])
    version, alias = str(outputs["version"]), str(outputs["alias"])
    dataset_sha = _dataset_sha(run_id, settings)
    # A second pipeline (its intake finds the same content, so the same dataset sha256) keeps each
    # model's time visible; the `demo` pipeline runs both from one intake on a cluster.
    with _timed(timings, "pipeline_segmenter_train"):
        seg = run_local("segmenter-train", {
            "source": str(source), "epochs": options.segmenter_epochs, "preset": options.segmenter_preset,
            "model_name": "segmenter",
        }, settings=settings)
    seg_version = str(seg["version"])

    summary: dict[str, Any] = {
        "dataset": {"sha256": dataset_sha, "images": options.images, "source": str(source)},
        "detector": {"run_id": run_id, "model": "detector", "version": version, "alias": alias,
                     "metrics": {"map": float(outputs["map"]), "map50": float(outputs["map50"])}},
        "segmenter": {"run_id": str(seg["run_id"]), "model": "segmenter", "version": seg_version,
                      "alias": str(seg["alias"]),
                      "metrics": {"miou_point": float(seg["miou_point"]), "miou_box": float(seg["miou_box"])},
                      "outputs": []},
        "int8": _int8_version(version, settings) if options.quantize else None,
        "endpoint": "",
        "timings_s": timings,
        "outputs": [],
    }
    # Serve exactly the version this run registered (it may have become challenger, not champion).
    args = ServeArgs.from_settings(settings, model_uri=f"models:/detector/{version}",
                                   segmenter_model_uri=f"models:/segmenter/{seg_version}", port=options.port)
    with _timed(timings, "serve_start"):
        url = run_server(args, blocking=False)
    summary["endpoint"] = url
    try:
        dataset_dir = _dataset_artifact(settings, dataset_sha)
        with _timed(timings, "sample_requests"), httpx.Client(base_url=url, timeout=60) as client:
            for info in _validation_images(dataset_dir, options.samples):
                image_path = dataset_dir / IMAGES_DIR / info["file_name"]
                data = image_path.read_bytes()
                resp = client.post("/v1/detect", files={"image": (info["file_name"], data, "image/png")})
                resp.raise_for_status()
                json_path = out_dir / f"{Path(info['file_name']).stem}.detections.json"
                json_path.write_text(json.dumps(resp.json(), indent=2))
                resp = client.post("/v1/detect", params={"format": "image"},
                                   files={"image": (info["file_name"], data, "image/png")})
                resp.raise_for_status()
                png_path = out_dir / f"{Path(info['file_name']).stem}.detections.png"
                png_path.write_bytes(resp.content)
                summary["outputs"] += [str(json_path), str(png_path)]
                if summary["int8"] is not None:
                    resp = client.post("/v1/detect", data={"precision": "int8"},
                                       files={"image": (info["file_name"], data, "image/png")})
                    resp.raise_for_status()
                    int8_path = out_dir / f"{Path(info['file_name']).stem}.detections.int8.json"
                    int8_path.write_text(json.dumps(resp.json(), indent=2))
                    summary["int8"]["outputs"].append(str(int8_path))
                summary["segmenter"]["outputs"] += _segment_sample(client, dataset_dir, info, out_dir)
        timings["total"] = round(time.perf_counter() - started, 2)
        summary_path = options.summary or (out_dir / "summary.json")
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2))
        summary["summary_path"] = str(summary_path)
        _print_report(summary, settings)
        if options.keep_serving:
            print(f"serving at {url} - press Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        shutdown_server()
    return summary


def _segment_sample(client: Any, dataset_dir: Path, info: dict[str, Any], out_dir: Path) -> list[str]:
    """Segment one validation image from its ground-truth boxes; write the JSON, mask and blended outputs.

    The first request sends the image; the next two send only its ``image_id``, so they reuse the
    cached image embedding. Returns the three paths.
    """
    from components.data.format import IMAGES_DIR, read_coco

    image_path = dataset_dir / IMAGES_DIR / info["file_name"]
    boxes = [[x, y, x + w, y + h] for a in read_coco(dataset_dir)["annotations"]
             if int(a["image_id"]) == int(info["id"]) for x, y, w, h in [a["bbox"]]]
    stem = Path(info["file_name"]).stem
    prompts = {"boxes": boxes} if boxes else {}
    resp = client.post("/v1/segment", params={"output": "json"},
                       files={"image": (info["file_name"], image_path.read_bytes(), "image/png")},
                       data={"prompts": json.dumps(prompts)})
    resp.raise_for_status()
    body = resp.json()
    written = [out_dir / f"{stem}.segment.json"]
    written[0].write_text(json.dumps(body, indent=2))
    for output in ("mask", "blended"):
        resp = client.post("/v1/segment", json={**prompts, "image_id": body["image_id"], "output": output})
        resp.raise_for_status()
        path = out_dir / f"{stem}.segment.{output}.png"
        path.write_bytes(resp.content)
        written.append(path)
    return [str(p) for p in written]


def _dataset_artifact(settings: Settings, sha256: str) -> Path:
    """The canonical dataset the pipeline's intake step wrote (newest with this sha256)."""
    from components.data.format import read_manifest

    manifests = sorted(settings.pipeline_root.glob("*/intake-component/dataset/manifest.json"),
                       key=lambda p: p.stat().st_mtime, reverse=True)
    for path in manifests:
        if read_manifest(path.parent).sha256 == sha256:
            return path.parent
    raise FileNotFoundError(f"no dataset artifact with sha256 {sha256} under {settings.pipeline_root}")


def _validation_images(dataset_dir: Path, count: int) -> list[dict[str, Any]]:
    """COCO image records of the first ``count`` validation images (never seen in training)."""
    from components.data.format import read_coco, read_manifest

    val = set(read_manifest(dataset_dir).split.val)
    return [info for info in read_coco(dataset_dir)["images"] if int(info["id"]) in val][:count]


def _dataset_sha(run_id: str, settings: Settings) -> str:
    from mlflow.tracking import MlflowClient

    from components.tracking.setup import configure_mlflow

    configure_mlflow(settings)
    return str(MlflowClient().get_run(run_id).data.tags.get("dataset_sha256", ""))


def _int8_version(float_version: str, settings: Settings) -> dict[str, Any]:
    """The int8 sibling the quantize step registered for ``detector`` version ``float_version``."""
    from components.tracking.registry import find_int8_version
    from components.tracking.setup import configure_mlflow

    configure_mlflow(settings)
    mv = find_int8_version("detector", float_version)
    if mv is None:
        raise RuntimeError(f"the quantize step registered no int8 version of detector version {float_version}")
    tags = mv.tags
    return {"model": "detector", "version": str(mv.version), "float_version": float_version,
            "calibrator": tags["calibrator"], "backend": tags["backend"],
            "metrics": {"map50": float(tags["metric.map50"]), "float_map50": float(tags["metric.float_map50"]),
                        "hybrid_map50": float(tags["metric.hybrid_map50"]),
                        "int8_engine_map50": float(tags["metric.int8_map50"])},
            "outputs": []}


def _print_report(summary: dict[str, Any], settings: Settings) -> None:
    det = summary["detector"]
    print("\n== ModelCommons demo ==")
    print(f"dataset   sha256={summary['dataset']['sha256'][:12]}  images={summary['dataset']['images']}")
    print(f"detector  {det['model']} v{det['version']} ({det['alias']})  mAP={det['metrics']['map']:.3f}  "
          f"mAP@.5={det['metrics']['map50']:.3f}  run={det['run_id']}")
    seg = summary["segmenter"]
    print(f"segmenter {seg['model']} v{seg['version']} ({seg['alias']})  "
          f"mIoU(point)={seg['metrics']['miou_point']:.3f}  mIoU(box)={seg['metrics']['miou_box']:.3f}  "
          f"run={seg['run_id']}")
    if (q := summary.get("int8")) is not None:
        m = q["metrics"]
        print(f"int8      {q['model']} v{q['version']} (from v{q['float_version']}, {q['calibrator']}, "
              f"{q['backend']})  "
              f"mAP@.5 float={m['float_map50']:.3f} hybrid={m['hybrid_map50']:.3f} "
              f"int8={m['int8_engine_map50']:.3f} deployed={m['map50']:.3f}")
    print(f"endpoint  {summary['endpoint']}/v1/detect, {summary['endpoint']}/v1/segment")
    print("timings   " + ", ".join(f"{k}={v}s" for k, v in summary["timings_s"].items()))
    files = summary["outputs"] + seg["outputs"] + (summary["int8"] or {}).get("outputs", [])
    print(f"outputs   {len(files)} files in {Path(files[0]).parent}" if files else "outputs   none")
    print(f"summary   {summary.get('summary_path')}")
    print(f"MLflow UI: run `modelcommons ui` and open http://127.0.0.1:5000 (store: {settings.effective_tracking_uri})")
