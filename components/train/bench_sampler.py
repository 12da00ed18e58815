"""Benchmark of the batch samplers: does Recency Bias beat uniform batches here, as the paper reports?

Two tasks, every sampler with the same seeds:

- ``digits``: scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes; no download),
  a fixed stratified split (1347 train / 450 test, ``random_state=0``) and a small CNN trained with
  Adam. Test error = 1 - accuracy.
- ``detector``: the synthetic ``shapes`` detection task with the nano detector. Test error =
  1 - mAP@0.5 on the validation split.

Per sampler: final test error (mean, std over seeds); the wall time and epochs until the seed-mean
test accuracy first reaches uniform's final seed-mean accuracy, and the ratio of that time to
uniform's own (null if never reached); the sampling overhead per epoch (time spent choosing batches
and recording feedback). Wall time counts training only, not the per-epoch test evaluation.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.train.samplers import SAMPLERS, Feedback, build_sampler


@dataclass(frozen=True)
class Curve:
    """One training run: test error and cumulative training seconds after each epoch."""

    errors: list[float]
    times: list[float]  # cumulative wall seconds
    cpu_times: list[float]  # cumulative process CPU seconds (robust to other load on a shared machine)
    sampling_s: list[float]  # per epoch


class DigitsCNN(nn.Module):
    """Bx1x8x8 float in [0, 1] -> Bx10 logits (about 40k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 32x4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train Nx1x8x8, y_train N, x_test Mx1x8x8, y_test M): the fixed split every run uses."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(list(range(len(y))), test_size=0.25, random_state=0,
                                           stratify=data.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train_digits(sampler_name: str, seed: int, *, epochs: int, batch_size: int = 64, lr: float = 1e-3,
                 data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Curve:
    """Train the digits CNN with one sampler; feedback comes from the training forward pass."""
    x_train, y_train, x_test, y_test = data or digits_split()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = build_sampler(sampler_name, num_samples=len(y_train), batch_size=batch_size, epochs=epochs,
                            num_labels=10, generator=gen)
    errors, times, cpu_times, sampling = [], [], [], []
    elapsed = cpu = 0.0
    for epoch in range(epochs):
        model.train()
        sampler.set_epoch(epoch)
        started, cpu_started = time.perf_counter(), time.process_time()
        spent = 0.0
        batches = iter(sampler)
        for _ in range(len(sampler)):
            t0 = time.perf_counter()
            idx = torch.tensor(next(batches))
            spent += time.perf_counter() - t0
            logits = model(x_train[idx])
            losses = F.cross_entropy(logits, y_train[idx], reduction="none")
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            opt.step()
            t0 = time.perf_counter()
            with torch.no_grad():
                probs = logits.softmax(dim=1)
                sampler.observe(Feedback(indices=idx, predicted=probs.argmax(dim=1),
                                         true_prob=probs.gather(1, y_train[idx, None]).squeeze(1),
                                         loss=losses.detach()))
            spent += time.perf_counter() - t0
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(dim=1) == y_test).float().mean())
        errors.append(1.0 - accuracy)
        times.append(elapsed)
        cpu_times.append(cpu)
        sampling.append(spent)
    return Curve(errors=errors, times=times, cpu_times=cpu_times, sampling_s=sampling)


def train_detector_curve(sampler_name: str, seed: int, *, dataset_dir: Path, epochs: int, work: Path,
                         batch_size: int = 16, img_size: int = 96) -> Curve:
    """Train the nano detector with one sampler; error = 1 - validation mAP@0.5 after each epoch."""
    from components.train.trainer import TrainConfig, train_detector

    config = TrainConfig(epochs=epochs, batch_size=batch_size, img_size=img_size, seed=seed, eval_every=1,
                         sampler=sampler_name)
    result = train_detector(dataset_dir, work / f"{sampler_name}-{seed}", config, track=False, progress=False)
    return Curve(errors=[1.0 - row["val_map50"] for row in result.history],
                 times=_cumsum([row["epoch_time_s"] for row in result.history]),
                 cpu_times=_cumsum([row["epoch_cpu_s"] for row in result.history]),
                 sampling_s=[row["sampling_time_s"] for row in result.history])


def _cumsum(values: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def _mean_curve(curves: list[Curve]) -> tuple[list[float], list[float], list[float]]:
    n = len(curves[0].errors)
    errors = [statistics.fmean(c.errors[i] for c in curves) for i in range(n)]
    times = [statistics.fmean(c.times[i] for c in curves) for i in range(n)]
    cpu = [statistics.fmean(c.cpu_times[i] for c in curves) for i in range(n)]
    return errors, times, cpu


def summarize(curves: dict[str, list[Curve]]) -> dict[str, dict[str, Any]]:
    """Per-sampler figures; ``uniform`` must be among the keys (it sets the target accuracy)."""
    uniform_errors, uniform_times, uniform_cpu = _mean_curve(curves["uniform"])
    target = uniform_errors[-1]  # uniform's final seed-mean error = its final accuracy, as an error

    def reach(errors: list[float], times: list[float]) -> tuple[int | None, float | None]:
        for i, err in enumerate(errors):
            if err <= target + 1e-12:
                return i + 1, times[i]
        return None, None

    uniform_epochs, uniform_time = reach(uniform_errors, uniform_times)
    _, uniform_cpu_time = reach(uniform_errors, uniform_cpu)
    out: dict[str, dict[str, Any]] = {}
    for name, runs in curves.items():
        finals = [c.errors[-1] for c in runs]
        errors, times, cpu = _mean_curve(runs)
        epochs_to, time_to = reach(errors, times)
        _, cpu_to = reach(errors, cpu)
        sampling = [s for c in runs for s in c.sampling_s]
        epoch_times = [c.times[-1] / len(c.times) for c in runs]
        out[name] = {
            "final_error_mean": statistics.fmean(finals),
            "final_error_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_errors": finals,
            "time_to_uniform_acc_s": time_to,
            "time_to_uniform_acc_ratio": (time_to / uniform_time) if time_to is not None and uniform_time else None,
            "time_to_uniform_acc_ratio_cpu": (cpu_to / uniform_cpu_time) if cpu_to is not None and uniform_cpu_time
            else None,
            "epochs_to_uniform_acc": epochs_to,
            # load on a shared machine distorts wall time; epochs are immune to it (but ignore overhead)
            "epochs_to_uniform_acc_ratio": (epochs_to / uniform_epochs) if epochs_to and uniform_epochs else None,
            "sampling_overhead_s_per_epoch": statistics.fmean(sampling),
            "sampling_overhead_fraction": statistics.fmean(sampling) / statistics.fmean(epoch_times),
            "train_time_s_mean": statistics.fmean(c.times[-1] for c in runs),
            "train_cpu_s_mean": statistics.fmean(c.cpu_times[-1] for c in runs),
            "seeds": len(runs),
            "mean_error_curve": errors,
            "mean_time_curve_s": times,
        }
    return out


def verdict(task: str, table: dict[str, dict[str, Any]]) -> str:
    """One honest sentence: does recency_bias beat uniform on error and on time here?"""
    if "recency_bias" not in table:
        return f"{task}: recency_bias was not run."
    rb, un = table["recency_bias"], table["uniform"]
    diff = rb["final_error_mean"] - un["final_error_mean"]
    noise = math.hypot(rb["final_error_std"], un["final_error_std"])
    lower = diff < 0
    significant = noise > 0 and abs(diff) > noise
    ratio = rb["time_to_uniform_acc_ratio"]
    faster = ratio is not None and ratio < 1.0
    rel = diff / un["final_error_mean"] * 100 if un["final_error_mean"] > 0 else 0.0
    parts = [
        f"{task}: recency_bias final error {rb['final_error_mean']:.4f} ± {rb['final_error_std']:.4f} vs uniform "
        f"{un['final_error_mean']:.4f} ± {un['final_error_std']:.4f} ({rel:+.1f}%, "
        + ("one seed: no spread to compare with" if noise == 0 else
           f"{'within' if not significant else 'beyond'} one combined std") + ")",
        "time to uniform's final accuracy: " + ("never reached" if ratio is None else
                                                f"{ratio:.2f}x uniform's wall time, "
                                                f"{rb['epochs_to_uniform_acc_ratio']:.2f}x its epochs"),
    ]
    if lower and faster and significant:
        conclusion = "the paper's direction (lower error, less time) reproduces"
    elif lower and faster:
        conclusion = "the paper's direction shows, but the error gap is within seed noise"
    elif lower or faster:
        conclusion = "the paper's direction reproduces only in part"
    else:
        conclusion = "the paper's direction does not reproduce"
    return "; ".join(parts) + f": {conclusion}."


def plot_curves(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    """PNG: seed-mean test error against cumulative training seconds, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (task, table) in zip(axes[0], results.items(), strict=True):
        for name, row in table.items():
            ax.plot(row["mean_time_curve_s"], row["mean_error_curve"], marker=".", label=name)
        ax.set_title(f"{task}: test error vs wall time (mean of {next(iter(table.values()))['seeds']} seeds)")
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("test error" + (" (1 - mAP@0.5)" if task == "detector" else " (1 - accuracy)"))
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_sampler(out: Path, *, seeds: int = 3, digits_epochs: int = 30, detector_epochs: int = 12,
                  detector_images: int = 128, samplers: Sequence[str] = SAMPLERS, track: bool = True,
                  progress: bool = True) -> dict[str, Any]:
    """Run the benchmark, write JSON to ``out`` and the PNG beside it, log both to MLflow."""
    if "uniform" not in samplers:
        raise ValueError(f"samplers={list(samplers)!r} must include 'uniform' (it sets the target accuracy)")
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown sampler(s) {unknown}; allowed: {', '.join(SAMPLERS)}")
    if seeds < 1 or digits_epochs < 1 or detector_epochs < 1:
        raise ValueError("seeds, digits_epochs and detector_epochs must be >= 1")
    started = time.perf_counter()
    out = Path(out)
    data = digits_split()
    # Seed-major order: background load on a shared machine then hits every sampler alike.
    digits: dict[str, list[Curve]] = {name: [] for name in samplers}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 40k-parameter CNN gains nothing from threads; one thread times steadily
    try:
        for seed in range(seeds):
            for name in samplers:
                digits[name].append(train_digits(name, seed, epochs=digits_epochs, data=data))
                if progress:
                    print(f"digits seed {seed} {name}: final error {digits[name][-1].errors[-1]:.4f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    detector: dict[str, list[Curve]] = {name: [] for name in samplers}
    with tempfile.TemporaryDirectory(prefix="mc-bench-sampler-") as tmp:
        from components.data.intake import intake
        from components.data.shapes import generate_shapes
        from components.settings import Settings

        work = Path(tmp)
        src = generate_shapes(work / "src", count=detector_images, image_size=96, max_size=40, seed=0,
                              progress=False)
        dataset = work / "ds"
        intake(src, dataset, settings=Settings(home=work / "home", s3_endpoint=None), progress=False)
        for seed in range(seeds):
            for name in samplers:
                detector[name].append(train_detector_curve(name, seed, dataset_dir=dataset,
                                                           epochs=detector_epochs, work=work))
                if progress:
                    print(f"detector seed {seed} {name}: final error {detector[name][-1].errors[-1]:.4f}",
                          flush=True)
    results = {"digits": summarize(digits), "detector": summarize(detector)}
    report: dict[str, Any] = {
        **results,
        "verdict": " ".join(verdict(task, table) for task, table in results.items()),
        "setup": {"seeds": seeds, "digits_epochs": digits_epochs, "digits_batch_size": 64,
                  "digits_split": "load_digits, stratified 75/25, random_state=0 (1347 train / 450 test)",
                  "detector_epochs": detector_epochs, "detector_images": detector_images,
                  "detector_img_size": 96, "detector_batch_size": 16, "detector_preset": "nano",
                  "sampler_defaults": {"q": 10, "s_e0": 100.0, "warmup_epochs": "min(15, round(0.15 * epochs))"},
                  "torch_threads": {"digits": 1, "detector": torch.get_num_threads()},
                  "wall_time_s": time.perf_counter() - started},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    png = plot_curves(results, out.with_suffix(".png"))
    if track:
        report["mlflow_run_id"] = _log_to_mlflow(report, out, png)
        out.write_text(json.dumps(report, indent=2))
    return report


def _log_to_mlflow(report: dict[str, Any], out: Path, png: Path) -> str:
    import mlflow

    from components.tracking.setup import configure_mlflow

    configure_mlflow()
    with mlflow.start_run(run_name="bench-sampler") as run:
        mlflow.set_tags({"modelcommons.stage": "bench", "bench": "sampler"})
        mlflow.log_params({k: v for k, v in report["setup"].items() if not isinstance(v, dict | str)})
        for task in ("digits", "detector"):
            for name, row in report[task].items():
                mlflow.log_metric(f"{task}.{name}.final_error_mean", row["final_error_mean"])
                if row["time_to_uniform_acc_ratio"] is not None:
                    mlflow.log_metric(f"{task}.{name}.time_to_uniform_acc_ratio", row["time_to_uniform_acc_ratio"])
        mlflow.log_artifact(str(out), artifact_path="bench")
        mlflow.log_artifact(str(png), artifact_path="bench")
        return str(run.info.run_id)
