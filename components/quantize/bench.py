"""``modelcommons bench quantize``: mAP@.5 per calibrator x mode, and float vs deployable-int8 latency.

For each calibrator (``minmax``, ``percentile``, ``kl``, ``log2``), calibrated on ``calib_images`` train
images of the dataset artifact, the validation split is scored (COCO mAP@.5, pycocotools) in four modes:

- ``float``: the float detector;
- ``hybrid`` / ``int8``: our engine (:class:`~.engine.QuantEngine`) in hybrid and integer-only int8;
- ``deploy``: the deployable int8 model (:mod:`.deploy`: PyTorch's x86 int8 kernels fed with our ranges),
  written with :func:`~.deploy.save_int8_model` and read back with :func:`~.deploy.load_int8_model`.

Latency: raw forward (no decoding/NMS) of the BN-folded float model and of the best calibrator's
deployable int8 model on the same real validation images at batch 1 and batch 8, ``repeats`` times
each after ``warmup`` runs, float and int8 interleaved (so load from other processes hits both alike),
``torch`` threads fixed to ``threads``; the speedup is the ratio of the median wall-clock latencies.
The medians of the calling thread's CPU time are reported beside them (``speedup_cpu``): with one
thread they exclude time lost to other processes on a shared machine.

Without ``data_dir``, a deterministic synthetic shapes dataset is generated at ``img_size`` (with the
generator's default 16-64 px objects) and imported with :func:`components.data.intake.intake`. The demo
detector is trained on 160 px images with 16-64 px objects: generating the validation images at the
benchmark's input size keeps the objects at the pixel scale the model was trained on (a larger input is
a larger field of view, not a zoom); letterboxing 160 px images up to 320 px would double every object
and measure a distribution shift instead of quantization.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from components.quantize.calibrate import CALIBRATORS

MODES = ("float", "hybrid", "int8", "deploy")
TARGET_SPEEDUP_B1 = 2.0
TARGET_MAP50_DROP = 1.0  # points
DEFAULT_MODEL_URI = "models:/detector@champion"


def resolve_bench_model(uri: str | None) -> tuple[str, Path]:
    """(uri, local model directory) of ``uri`` (default ``models:/detector@champion``); a directory is accepted.

    Raises :class:`components.tracking.resolve.ModelNotFoundError` with what to do when nothing is found.
    """
    from components.settings import get_settings
    from components.tracking.resolve import ModelNotFoundError, resolve_model

    uri = uri or DEFAULT_MODEL_URI
    try:
        return uri, resolve_model(uri).local_dir
    except ModelNotFoundError as exc:
        if uri != DEFAULT_MODEL_URI:
            raise
        raise ModelNotFoundError(
            f"no model given (--model-uri) and no {DEFAULT_MODEL_URI} registered in "
            f"{get_settings().effective_tracking_uri}: train and register one first (`modelcommons demo`, or "
            f"the detector-train pipeline) or pass --model-uri with a registered URI or a model directory "
            f"({exc})") from exc


def synthetic_dataset(out_dir: Path, *, img_size: int, val_images: int, seed: int = 0) -> Path:
    """A deterministic shapes dataset artifact in ``out_dir/dataset``: ``2 * val_images`` images, half val."""
    from components.data.intake import intake
    from components.data.shapes import generate_shapes
    from components.settings import Settings

    source = generate_shapes(out_dir / "source", count=2 * val_images, image_size=img_size, seed=seed,
                             progress=False)
    dataset = out_dir / "dataset"
    # A private home and no S3: the benchmark's scratch data is never uploaded anywhere.
    intake(source, dataset, val_fraction=0.5, seed=seed, settings=Settings(home=out_dir / "home", s3_endpoint=None),
           progress=False)
    return dataset


def _median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1000.0, 3)


@torch.inference_mode()
def measure_latency(float_model: Callable[[torch.Tensor], torch.Tensor],
                    int8_model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
                    repeats: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median forward latency (ms) of both models on ``images`` (Bx3xHxW), interleaved; plus the speedup."""
    for _ in range(warmup):
        float_model(images)
        int8_model(images)
    times: dict[str, list[float]] = {"float": [], "int8": []}
    cpu: dict[str, list[float]] = {"float": [], "int8": []}
    for _ in range(repeats):
        for name, model in (("float", float_model), ("int8", int8_model)):
            start, start_cpu = time.perf_counter(), time.thread_time()
            model(images)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
    float_ms, int8_ms = _median_ms(times["float"]), _median_ms(times["int8"])
    float_cpu, int8_cpu = _median_ms(cpu["float"]), _median_ms(cpu["int8"])
    # Wall time is the latency; the calling thread's CPU time (exact with one torch thread, whose kernels
    # run on the caller) also shows the speedup with other processes' load on a shared machine removed.
    return {"float_ms": float_ms, "int8_ms": int8_ms, "speedup": round(float_ms / int8_ms, 3),
            "float_cpu_ms": float_cpu, "int8_cpu_ms": int8_cpu,
            "speedup_cpu": round(float_cpu / max(int8_cpu, 1e-3), 3),
            "batch": images.shape[0], "repeats": repeats}


def bench_quantize(out: Path, *, model_dir: Path, model_uri: str | None = None, data_dir: Path | None = None,
                   img_size: int = 320, calib_images: int = 32, val_images: int = 100,
                   calibrators: Sequence[str] = CALIBRATORS, backend: str = "x86", repeats: int = 30,
                   warmup: int = 5, threads: int = 1, seed: int = 0,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark, write ``out`` (JSON) and ``out`` with ``.png`` (chart); return the report.

    ``model_dir``: a float detector directory (``config.json`` + ``model.safetensors``). ``data_dir``: a
    dataset artifact (default: generated, see module docstring; ``val_images`` sets its size). mAP@.5
    values are fractions in [0, 1]; ``map50_drop_best`` is in points (x100).
    """
    from components.data.loader import load_samples
    from components.evaluate.coco import coco_map, predict_coco
    from components.models.weights import load_detector
    from components.quantize.calibrate import calibrate, calibration_batches, check_method
    from components.quantize.deploy import check_backend, load_int8_model, save_int8_model
    from components.quantize.engine import QuantEngine
    from components.quantize.evaluate import map_by_precision
    from components.quantize.graph import QuantGraph

    for method in calibrators:
        check_method(method)
    check_backend(backend)
    if img_size % 16 or img_size < 32:
        raise ValueError(f"img_size must be a multiple of 16 and >= 32, got {img_size}")
    out = Path(out)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="mc-bench-quantize-") as tmp_name:
            tmp = Path(tmp_name)
            generated = data_dir is None
            if data_dir is None:
                log(f"generating a {2 * val_images}-image shapes dataset at {img_size} px")
                data_dir = synthetic_dataset(tmp / "data", img_size=img_size, val_images=val_images, seed=seed)
            model = load_detector(model_dir).eval()
            _, val = load_samples(data_dir, "val", img_size)
            if not val:
                raise ValueError(f"{data_dir}: the validation split is empty")
            batches = calibration_batches(data_dir, img_size=img_size, split="train", count=calib_images, seed=seed)
            ids = [s.image_id for s in val]
            log(f"float mAP on {len(val)} validation images")
            float_map50 = coco_map(data_dir, ids, predict_coco(model, val))["map50"]
            graph = QuantGraph(model)
            table: dict[str, dict[str, float]] = {}
            deployed: dict[str, Any] = {}
            for method in calibrators:
                log(f"{method}: calibrating on {sum(b.shape[0] for b in batches)} images, scoring hybrid/int8/deploy")
                calibration = calibrate(graph, batches, method=method)
                int8_dir = save_int8_model(model_dir, calibration, tmp / f"int8-{method}", backend=backend,
                                           calibrator=method)
                deployed[method] = load_int8_model(int8_dir)
                maps = map_by_precision(model, QuantEngine(graph, calibration), data_dir, val,
                                        precisions=("hybrid", "int8", "deploy"), deployed=deployed[method])
                table[method] = {"float": float_map50, **{k: v["map50"] for k, v in maps.items()}}
            best = max(calibrators, key=lambda m: table[m]["deploy"])  # first wins ties (CALIBRATORS order)
            fused = copy.deepcopy(model).fuse()  # the fair float baseline: BN folded too
            images = torch.stack([s.image for s in val[:8]])
            if images.shape[0] < 8:  # a tiny split: repeat images to fill the batch of 8
                images = images.repeat((8 + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:8]
            log(f"latency at batch 1 and 8, {img_size}x{img_size}, {threads} thread(s), {repeats} repeats")
            latency = {f"b{b}": measure_latency(fused, deployed[best], images[:b], repeats=repeats, warmup=warmup)
                       for b in (1, 8)}
    finally:
        torch.set_num_threads(previous_threads)
    drop = round((float_map50 - table[best]["deploy"]) * 100.0, 3)
    report: dict[str, Any] = {
        "int8_speedup_b1": latency["b1"]["speedup"],
        "int8_speedup_b8": latency["b8"]["speedup"],
        "best_calibrator": best,
        "map50_drop_best": drop,
        "map50_float": float_map50,
        "map50_deploy_best": table[best]["deploy"],
        "map50": table,
        "latency": latency,
        "targets": {"int8_speedup_b1_min": TARGET_SPEEDUP_B1, "map50_drop_best_max": TARGET_MAP50_DROP},
        "meets_targets": {"int8_speedup_b1": latency["b1"]["speedup"] >= TARGET_SPEEDUP_B1,
                          "map50_drop_best": drop <= TARGET_MAP50_DROP},
        "setup": {"model_uri": model_uri, "model_dir": str(model_dir),
                  "dataset": "generated shapes (val split)" if generated else str(data_dir),
                  "img_size": img_size, "val_images": len(val), "calib_images": calib_images,
                  "model_img_size": model.config.img_size, "preset": model.config.preset, "backend": backend,
                  "quantized_engine": torch.backends.quantized.engine, "threads": threads,
                  "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot_bench(report, out.with_suffix(".png"))
    return report


def render_table(report: dict[str, Any]) -> Any:
    """A rich Table of mAP@.5 (points) per calibrator x mode, with the deploy drop against float."""
    from rich.table import Table

    table = Table(title=f"mAP@.5 (points) at {report['setup']['img_size']} px - best: {report['best_calibrator']}")
    table.add_column("calibrator")
    for mode in MODES:
        table.add_column(mode, justify="right")
    table.add_column("deploy drop", justify="right")
    for method, row in report["map50"].items():
        table.add_row(method, *(f"{row[m] * 100:.2f}" for m in MODES), f"{(row['float'] - row['deploy']) * 100:+.2f}",
                      style="bold" if method == report["best_calibrator"] else None)
    return table


def render_latency_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"float vs deployable int8 latency ({report['setup']['threads']} thread(s))")
    for column in ("batch", "float ms", "int8 ms", "speedup", "speedup (thread CPU time)"):
        table.add_column(column, justify="right")
    for row in report["latency"].values():
        table.add_row(str(row["batch"]), f"{row['float_ms']:.2f}", f"{row['int8_ms']:.2f}", f"{row['speedup']:.2f}x",
                      f"{row['speedup_cpu']:.2f}x")
    return table


def plot_bench(report: dict[str, Any], path: Path) -> Path:
    """PNG: grouped bars of mAP@.5 per calibrator x mode, and the latency bars at batch 1 and 8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["map50"])
    fig, (ax_map, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values = [report["map50"][m][mode] * 100 for m in methods]
        bars = ax_map.bar([x + (i - (len(MODES) - 1) / 2) * width for x in range(len(methods))], values, width,
                          label=mode)
        ax_map.bar_label(bars, fmt="%.1f", fontsize=7)
    ax_map.set_xticks(range(len(methods)), methods)
    ax_map.set_ylabel("mAP@.5 (points)")
    ax_map.set_title(f"mAP@.5 by calibrator and mode ({report['setup']['val_images']} val images)")
    ax_map.legend(loc="lower right", fontsize=8)
    batches = list(report["latency"])
    for i, name in enumerate(("float", "int8")):
        values = [report["latency"][b][f"{name}_ms"] for b in batches]
        bars = ax_lat.bar([x + (i - 0.5) * 0.4 for x in range(len(batches))], values, 0.4, label=name)
        ax_lat.bar_label(bars, fmt="%.1f", fontsize=7)
    ax_lat.set_xticks(range(len(batches)), [f"batch {report['latency'][b]['batch']}\n"
                                            f"{report['latency'][b]['speedup']:.2f}x" for b in batches])
    ax_lat.set_ylabel("median ms per forward")
    ax_lat.set_title(f"latency at {report['setup']['img_size']} px (deploy int8: {report['best_calibrator']})")
    ax_lat.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
