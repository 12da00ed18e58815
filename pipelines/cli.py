"""``modelcommons`` command line: the composition root that wires components, pipelines and serving."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
# Kept literal so `--help` needs no torch import; test_cli checks it equals components.models.detector.PRESETS.
DETECTOR_PRESETS = ("medium", "nano", "small")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelcommons",
        description="Train, evaluate, register and serve computer-vision models (see README.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # pipeline
    pipe = sub.add_parser("pipeline", help="compile, run locally, or submit a KFP pipeline")
    psub = pipe.add_subparsers(dest="action", required=True, metavar="ACTION")
    psub.add_parser("list", help="list pipelines and their parameters")
    comp = psub.add_parser("compile", help="write a pipeline's IR YAML")
    comp.add_argument("name")
    comp.add_argument("-o", "--output", type=Path, required=True, help="YAML file to write")
    run = psub.add_parser("run", help="run locally (kfp.local), or on a KFP server with --host")
    run.add_argument("name")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="pipeline parameter (repeatable)")
    run.add_argument("--host", help="Kubeflow Pipelines API URL: submit there instead of running locally")
    run.add_argument("--experiment", default="modelcommons", help="KFP experiment (with --host)")
    submit = psub.add_parser("submit", help="submit a run to a Kubeflow Pipelines server (kfp.Client)")
    submit.add_argument("name")
    submit.add_argument("--host", required=True, help="Kubeflow Pipelines API URL, e.g. http://ml-pipeline.kubeflow:8888")
    submit.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline parameter (repeatable)")
    submit.add_argument("--experiment", default="modelcommons", help="KFP experiment (created if missing)")
    submit.add_argument("--run-name", help="run display name (default: KFP's)")
    upload = psub.add_parser("upload", help="upload compiled pipelines (or a new version) to a KFP server")
    upload.add_argument("--host", required=True, help="Kubeflow Pipelines API URL")
    upload.add_argument("--name", help="only this pipeline (default: every pipeline)")
    upload.add_argument("--version", help="version name (default: <package version>-<git commit>)")
    # Task pods on a cluster take MLFLOW_TRACKING_URI and MODELCOMMONS_S3_* from the chart's ConfigMap/Secret.
    for action in (comp, run, submit, upload):
        action.add_argument("--env-from", metavar="NAME",
                            help="ConfigMap (and Secret) the task pods take MLflow/S3 settings from: the chart's "
                                 "pipelineEnv.name (default modelcommons-pipeline-env); 'none' for no env sources")
        action.add_argument("--env-secret", metavar="NAME",
                            help="Secret with the S3 keys when it is not named like the ConfigMap "
                                 "(the chart's pipelineEnv.existingSecret)")

    # deploy
    deploy = sub.add_parser("deploy", help="serve a registered model from the KubeRay RayService (patch, wait)")
    deploy.add_argument("--model", required=True,
                        help="registered model: NAME@ALIAS, NAME/VERSION or models:/... (e.g. detector@champion)")
    deploy.add_argument("--namespace", default="modelcommons", help="namespace of the RayService")
    deploy.add_argument("--name", default="modelcommons", help="RayService name")
    deploy.add_argument("--app", default="modelcommons", help="Serve application in serveConfigV2")
    deploy.add_argument("--timeout", type=_positive_float, default=600.0,
                        help="seconds to wait for the application to run")
    deploy.add_argument("--poll-interval", type=_positive_float, default=5.0, help="seconds between status reads")
    deploy.add_argument("--no-pin", action="store_true",
                        help="deploy the alias URI itself, not the version it names now")
    deploy.add_argument("--kubeconfig", type=Path, help="default: in-cluster, $KUBECONFIG or ~/.kube/config")
    deploy.add_argument("--context", help="kubeconfig context (default: current)")
    deploy.add_argument("--json", action="store_true", help="print the result as JSON")

    # data
    data = sub.add_parser("data", help="generate synthetic data, import a dataset")
    dsub = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    shapes = dsub.add_parser("shapes", help="generate the synthetic shapes dataset (COCO folder)")
    shapes.add_argument("output", type=Path)
    shapes.add_argument("--count", type=_positive_int, default=600)
    shapes.add_argument("--image-size", type=_positive_int, default=160)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--classes", default="circle,rectangle,triangle",
                        help="comma-separated subset of circle,rectangle,triangle")
    intake = dsub.add_parser("intake", help="validate and import a COCO/YOLO dataset (folder or s3://)")
    intake.add_argument("source")
    intake.add_argument("output", type=Path)
    intake.add_argument("--format", dest="fmt", choices=["auto", "coco", "yolo"], default="auto")
    intake.add_argument("--val-fraction", type=_fraction, default=0.2)
    intake.add_argument("--seed", type=int, default=0)
    intake.add_argument("--max-error-fraction", type=_fraction, default=0.05)
    intake.add_argument("--augment", action="store_true", help="rotate, blur, flip, flop: 1 image -> 5")

    # serve
    serve = sub.add_parser("serve", help="start the Ray Serve application (detector endpoint)")
    serve.add_argument("--model-uri", help="default: MODELCOMMONS_DETECTOR_MODEL_URI (models:/detector@champion)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_port)
    serve.add_argument("--num-cpus", type=float)
    serve.add_argument("--num-gpus", type=float)
    serve.add_argument("--replicas", type=_positive_int)
    serve.add_argument("--max-batch-size", type=_positive_int)
    serve.add_argument("--print-config", action="store_true",
                       help="print the Ray Serve config (serveConfigV2) as JSON and exit")

    # demo
    demo = sub.add_parser("demo", help="the main job: data -> pipeline -> endpoint -> sample outputs")
    demo.add_argument("--summary", type=Path, help="summary JSON path (default under MODELCOMMONS_HOME)")
    demo.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    demo.add_argument("--images", type=_positive_int, default=600)
    demo.add_argument("--epochs", type=_positive_int, default=40)
    demo.add_argument("--preset", default="nano", choices=DETECTOR_PRESETS, help="detector size preset")
    demo.add_argument("--port", type=_port, default=8000)
    demo.add_argument("--segmenter-epochs", type=_positive_int, default=16, help="epochs of the tiny segmenter")
    demo.add_argument("--no-quantize", action="store_true",
                      help="skip the int8 detector (quantize step, precision=int8 sample requests)")

    # ui
    ui = sub.add_parser("ui", help="start the MLflow UI on the configured store")
    ui.add_argument("--port", type=_port, default=5000)
    ui.add_argument("--host", default="127.0.0.1")

    # bench
    bench = sub.add_parser("bench", help="benchmarks; each writes JSON to --out")
    bsub = bench.add_subparsers(dest="action", required=True, metavar="NAME")
    bserve = bsub.add_parser("serve", help="HTTP latency/throughput vs raw forward; batching on vs off")
    bserve.add_argument("--out", type=Path, required=True)
    bserve.add_argument("--model-uri", help="default: a fresh untrained nano detector")
    bserve.add_argument("--requests", type=_positive_int, default=200, help="requests per level")
    bserve.add_argument("--port", type=_port, default=8011)
    bsegment = bsub.add_parser("segment", help="segmenter: cached vs uncached prompt latency, automatic mode, "
                                               "throughput at concurrency 1 and 8")
    bsegment.add_argument("--out", type=Path, required=True)
    bsegment.add_argument("--model-uri", help="segmenter to serve; default: a fresh untrained 'tiny' segmenter")
    bsegment.add_argument("--img-size", type=_positive_int, default=None,
                          help="input side of the default untrained 'tiny' segmenter, 32..256 (default 256, "
                               "the preset's largest: at 128 px its encoder costs only ~2x the prompt decoder)")
    bsegment.add_argument("--seed", type=int, default=0,
                          help="weight seed of the default untrained segmenter: its masks, so the size of its "
                               "answers, depend on the weights, and a fixed seed makes runs comparable")
    bsegment.add_argument("--requests", type=_positive_int, default=100, help="measured requests per level")
    bsegment.add_argument("--port", type=_port, default=8012)
    bquantize = bsub.add_parser("quantize", help="detector mAP@.5 per calibrator x mode (float, hybrid, int8, "
                                                 "deploy) and float vs deployable-int8 latency at batch 1 and 8")
    bquantize.add_argument("--out", type=Path, required=True, help="JSON file; the PNG chart is written beside it")
    bquantize.add_argument("--model-uri", help="float detector: registered URI or directory "
                                               "(default: models:/detector@champion)")
    bquantize.add_argument("--data", type=Path, help="dataset artifact directory (default: a generated shapes "
                                                     "dataset at --img-size)")
    bquantize.add_argument("--img-size", type=_positive_int, default=320, help="input side (multiple of 16)")
    bquantize.add_argument("--calib-images", type=_positive_int, default=32, help="train images to calibrate on")
    bquantize.add_argument("--val-images", type=_positive_int, default=100,
                           help="validation images of the generated dataset (ignored with --data)")
    bquantize.add_argument("--repeats", type=_positive_int, default=30, help="timed forwards per batch size")
    bquantize.add_argument("--threads", type=_positive_int, default=1, help="torch threads while measuring")
    bsampler = bsub.add_parser("sampler", help="batch samplers (uniform, recency_bias, ...) on digits + detector")
    bsampler.add_argument("--out", type=Path, required=True, help="JSON file; the PNG is written beside it")
    bsampler.add_argument("--seeds", type=_positive_int, default=3)
    bsampler.add_argument("--digits-epochs", type=_positive_int, default=30)
    bsampler.add_argument("--detector-epochs", type=_positive_int, default=12)
    bsampler.add_argument("--detector-images", type=_positive_int, default=128)
    bsampler.add_argument("--samplers", default="uniform,recency_bias,online_batch,active_bias",
                          help="comma-separated; must include uniform")
    bsampler.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    return parser


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from pipelines import runner
    from pipelines.cluster_env import env_from

    env = env_from(getattr(args, "env_from", None), getattr(args, "env_secret", None))
    if args.action == "list":
        for name in sorted(runner.pipelines()):
            params = runner.pipeline_parameters(name)
            shown = ", ".join(f"{k}:{t.__name__}" + ("" if d is runner.inspect.Parameter.empty else f"={d!r}")
                              for k, (t, d) in params.items())
            print(f"{name}({shown})")
        return 0
    if args.action == "compile":
        path = runner.compile_pipeline(args.name, args.output, env=env)
        print(f"wrote {path}")
        return 0
    if args.action == "upload":
        for line in runner.upload(host=args.host, name=args.name, version=args.version, env=env):
            print(line)
        return 0
    params = runner.parse_params(args.name, args.param)
    if args.action == "submit" or args.host:
        run_id = runner.submit(args.name, params, host=args.host, experiment=args.experiment,
                               run_name=getattr(args, "run_name", None), env=env)
        print(f"submitted {args.name} to {args.host}: run {run_id}")
        return 0
    outputs = runner.run_local(args.name, params)
    print(json.dumps(outputs, indent=2, default=str))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.action == "shapes":
        from components.data.shapes import generate_shapes

        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
        out = generate_shapes(args.output, count=args.count, image_size=args.image_size, seed=args.seed,
                              classes=classes)
        print(f"wrote {args.count} images to {out}")
        return 0
    from components.data.intake import intake

    result = intake(args.source, args.output, fmt=args.fmt, val_fraction=args.val_fraction, seed=args.seed,
                    max_error_fraction=args.max_error_fraction, augment=args.augment)
    m = result.manifest
    print(f"dataset {m.sha256[:12]}: {m.counts.images} images ({m.counts.train_images} train, "
          f"{m.counts.val_images} val), {m.counts.annotations} boxes, {m.counts.rejected} rejected "
          f"(see {args.output / 'rejections.json'})")
    return 0


def _serve_args(args: argparse.Namespace) -> object:
    from serving.app import ServeArgs

    overrides = {k: v for k, v in {
        "model_uri": args.model_uri, "host": args.host, "port": args.port, "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus, "replicas": args.replicas, "max_batch_size": args.max_batch_size,
    }.items() if v is not None}
    return ServeArgs.from_settings(**overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    from serving.app import serve_config
    from serving.server import run_server

    serve_args = _serve_args(args)
    if args.print_config:
        print(json.dumps(serve_config(serve_args), indent=2))  # type: ignore[arg-type]
        return 0
    run_server(serve_args, blocking=True)  # type: ignore[arg-type]
    return 0


def _check_serve_args(config: dict[str, Any]) -> None:
    """Refuse a serve config whose ModelCommons applications have args ``ServeArgs`` would not accept."""
    from serving.app import IMPORT_PATH, ServeArgs

    http = config.get("http_options") or {}
    bind = {key: http[key] for key in ("host", "port") if key in http}
    for app in config.get("applications") or []:
        if app.get("import_path") == IMPORT_PATH:
            ServeArgs.model_validate({**app.get("args", {}), **bind})


def _cmd_deploy(args: argparse.Namespace) -> int:
    from components.deploy.rayservice import deploy_model

    result = deploy_model(args.model, namespace=args.namespace, name=args.name, app_name=args.app,
                          timeout_s=args.timeout, poll_interval_s=args.poll_interval, pin_version=not args.no_pin,
                          kubeconfig=args.kubeconfig, context=args.context, check_config=_check_serve_args,
                          progress=lambda line: print(f"deploy: {line}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    what = "deployed" if result.changed else "already deployed"
    print(f"{what} {result.model_uri} ({args.model}: version {result.model_version}) to RayService "
          f"{result.namespace}/{result.rayservice}, application {result.app_name}: {result.state} after "
          f"{result.elapsed_s:.1f} s (was {result.previous_model_uri})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoOptions, run_demo

    run_demo(DemoOptions(images=args.images, epochs=args.epochs, preset=args.preset, port=args.port,
                         segmenter_epochs=args.segmenter_epochs, keep_serving=args.keep_serving,
                         summary=args.summary, quantize=not args.no_quantize))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from components.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", settings.effective_tracking_uri,
           "--host", args.host, "--port", str(args.port)]
    if not settings.use_s3:
        cmd += ["--default-artifact-root", settings.artifact_location]
    env = {**os.environ, **settings.s3_environment()}
    print(f"MLflow UI on http://{args.host}:{args.port} (store {settings.effective_tracking_uri})", flush=True)
    return subprocess.call(cmd, env=env)


def _cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    if args.action == "sampler":
        from components.train.bench_sampler import bench_sampler

        report = bench_sampler(args.out, seeds=args.seeds, digits_epochs=args.digits_epochs,
                               detector_epochs=args.detector_epochs, detector_images=args.detector_images,
                               samplers=[s.strip() for s in args.samplers.split(",") if s.strip()],
                               track=not args.no_track)
        for task in ("digits", "detector"):
            for name, row in report[task].items():
                ratio = row["time_to_uniform_acc_ratio"]
                print(f"{task:8s} {name:13s} error {row['final_error_mean']:.4f} ± {row['final_error_std']:.4f}  "
                      f"time-to-uniform-acc {'never' if ratio is None else f'{ratio:.2f}x'}  "
                      f"sampling {row['sampling_overhead_s_per_epoch'] * 1000:.1f} ms/epoch")
        print(report["verdict"])
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
        return 0

    if args.action == "segment":
        return _bench_segment(args)
    if args.action == "quantize":
        return _bench_quantize(args)

    from serving.app import ServeArgs
    from serving.bench import bench_serve

    model_uri = args.model_uri
    if model_uri is None:
        from components.models.detector import build_detector, detector_config
        from components.models.weights import save_detector

        tmp = Path(tempfile.mkdtemp(prefix="mc-bench-"))
        model_uri = str(save_detector(build_detector(detector_config(
            "nano", num_classes=3, class_names=("circle", "rectangle", "triangle"))), tmp))
    result = bench_serve(ServeArgs.from_settings(model_uri=model_uri, port=args.port),
                         requests_per_level=args.requests, out=args.out)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list | dict)}, indent=2))
    return 0


def _bench_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from components.quantize.bench import bench_quantize, render_latency_table, render_table, resolve_bench_model

    console = Console()
    model_uri, model_dir = resolve_bench_model(args.model_uri)
    report = bench_quantize(args.out, model_dir=model_dir, model_uri=model_uri, data_dir=args.data,
                            img_size=args.img_size, calib_images=args.calib_images, val_images=args.val_images,
                            repeats=args.repeats, threads=args.threads, log=lambda line: console.log(line))
    console.print(render_table(report))
    console.print(render_latency_table(report))
    console.print(json.dumps({k: report[k] for k in ("int8_speedup_b1", "int8_speedup_b8", "best_calibrator",
                                                     "map50_drop_best", "meets_targets")}, indent=2))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _bench_segment(args: argparse.Namespace) -> int:
    import tempfile

    from serving.app import ServeArgs
    from serving.bench_segment import BENCH_TINY_IMG_SIZE, bench_segment

    model_uri = args.model_uri
    if model_uri is None:
        import torch

        from components.segment.model import build_segmenter, save_segmenter, segmenter_config

        config = segmenter_config("tiny", img_size=args.img_size or BENCH_TINY_IMG_SIZE)
        torch.manual_seed(args.seed)
        model_uri = str(save_segmenter(build_segmenter(config), config,
                                       Path(tempfile.mkdtemp(prefix="mc-bench-")) / "sam-tiny"))
    elif args.img_size is not None:
        raise ValueError("--img-size applies only to the default untrained segmenter, not to --model-uri")
    result = bench_segment(ServeArgs.from_settings(model_uri="", segmenter_model_uri=model_uri, port=args.port),
                           requests=args.requests, out=args.out, seed=args.seed if args.model_uri is None else None)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list | dict)}, indent=2))
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``modelcommons`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"pipeline": _cmd_pipeline, "data": _cmd_data, "serve": _cmd_serve, "demo": _cmd_demo,
                "ui": _cmd_ui, "bench": _cmd_bench, "deploy": _cmd_deploy}
    from components.data.format import DatasetError
    from components.models.weights import ModelFileError
    from components.settings import ConfigError
    from components.tracking.resolve import ModelNotFoundError
    from components.train.trainer import TrainConfigError
    from pipelines.runner import PipelineParamError

    try:
        return handlers[args.command](args)
    except (ConfigError, DatasetError, ModelFileError, ModelNotFoundError, TrainConfigError,
            PipelineParamError, FileNotFoundError, ValueError) as exc:
        # Every domain error is a ValueError subclass whose message names the file, field or value.
        print(f"modelcommons {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # e.g. the service failed to start: say why, no traceback
        print(f"modelcommons {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
