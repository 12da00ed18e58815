"""Hyperparameter sweeps over :class:`~components.train.trainer.TrainConfig`: grid, random, TPE.

A search space is YAML or JSON (a file path or the text itself)::

    method: grid            # grid | random | tpe (Bayesian, Optuna's TPE through Ray Tune)
    metric: map50           # map | map50 | map75 (validation, after training) | loss (last epoch)
    direction: maximize     # maximize | minimize
    trials: 8               # random and tpe: number of trials (grid: the size of the product)
    seed: 0                 # random and tpe: sampling seed
    parameters:             # names are TrainConfig fields
      sampler: {values: [uniform, recency_bias]}           # a list of choices (grid needs these)
      lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}   # random / tpe only
      batch_size: {distribution: int_uniform, low: 8, high: 32}   # inclusive bounds
      epochs: 3             # a plain value is fixed for every trial

Distributions: ``uniform``, ``loguniform`` (low > 0), ``int_uniform`` (integers), ``choice``
(with ``values``). Every trial's parameters are checked by constructing ``TrainConfig``, so a sweep
fails before training anything when a value is out of range.

Each trial is an MLflow run nested under the sweep's parent run (tag ``mlflow.parentRunId``), with
the trial's metric logged as ``sweep_metric``. :func:`select_best` reads the children back, picks the
best by metric and direction, and registers its model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.train.trainer import TrainConfig, TrainConfigError, train_detector

METHODS = ("grid", "random", "tpe")
METRICS = ("map", "map50", "map75", "loss")
DIRECTIONS = ("maximize", "minimize")
DISTRIBUTIONS = ("uniform", "loguniform", "int_uniform", "choice")
TUNABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "device")


class SearchSpaceError(ValueError):
    """The search space is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Param:
    """One searched parameter: a list of ``values``, or a numeric ``distribution`` over [low, high]."""

    name: str
    values: tuple[Any, ...] = ()
    distribution: str = "choice"
    low: float = 0.0
    high: float = 0.0

    def sample(self, rng: random.Random) -> Any:
        if self.distribution == "choice":
            return rng.choice(self.values)
        if self.distribution == "uniform":
            return rng.uniform(self.low, self.high)
        if self.distribution == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.randint(int(self.low), int(self.high))


@dataclass(frozen=True)
class SearchSpace:
    method: str
    metric: str
    direction: str
    params: tuple[Param, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    trials: int = 8
    seed: int = 0

    def trial_params(self) -> list[dict[str, Any]]:
        """Every trial's TrainConfig overrides (grid: the full product; random: ``trials`` draws; tpe: [])."""
        if self.method == "tpe":
            return []
        if self.method == "grid":
            names = [p.name for p in self.params]
            combos = itertools.product(*(p.values for p in self.params))
            return [{**self.fixed, **dict(zip(names, combo, strict=True))} for combo in combos]
        rng = random.Random(self.seed)
        return [{**self.fixed, **{p.name: p.sample(rng) for p in self.params}} for _ in range(self.trials)]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _param(name: str, spec: Any, method: str) -> Param | None:
    where = f"search space parameters.{name}"
    if name not in TUNABLE:
        raise SearchSpaceError(f"{where}: unknown parameter {name!r}; allowed: {', '.join(TUNABLE)}")
    if not isinstance(spec, dict):
        return None  # a fixed value
    unknown = set(spec) - {"values", "distribution", "low", "high"}
    if unknown:
        raise SearchSpaceError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: values, distribution, low, high")
    dist = spec.get("distribution", "choice")
    if dist not in DISTRIBUTIONS:
        raise SearchSpaceError(f"{where}: distribution {dist!r} is invalid; allowed: {', '.join(DISTRIBUTIONS)}")
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SearchSpaceError(f"{where}: 'values' must be a non-empty list (got {values!r})")
        return Param(name=name, values=tuple(values))
    if method == "grid":
        raise SearchSpaceError(f"{where}: a grid needs 'values' lists, not distribution {dist!r}")
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
        raise SearchSpaceError(f"{where}: distribution {dist!r} needs numeric 'low' and 'high' (got {low!r}, {high!r})")
    assert isinstance(low, int | float) and isinstance(high, int | float)
    if not low < high:
        raise SearchSpaceError(f"{where}: low={low} must be smaller than high={high}")
    if dist == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{where}: loguniform needs low > 0 (got {low})")
    if dist == "int_uniform" and not (float(low).is_integer() and float(high).is_integer()):
        raise SearchSpaceError(f"{where}: int_uniform needs integer bounds (got {low}, {high})")
    return Param(name=name, distribution=dist, low=float(low), high=float(high))


def _bound(p: Param, end: int) -> Any:
    if p.values:
        return p.values[-1 if end else 0]
    value = p.high if end else p.low
    return int(value) if p.distribution == "int_uniform" else value


def parse_search_space(data: Any) -> SearchSpace:
    """Validate a decoded YAML/JSON search space (see the module docstring)."""
    if not isinstance(data, dict):
        raise SearchSpaceError("search space must be a mapping with method, metric, direction, parameters; "
                               f"got {data!r}")
    unknown = set(data) - {"method", "metric", "direction", "trials", "seed", "parameters"}
    if unknown:
        raise SearchSpaceError(f"search space: unknown key(s) {sorted(unknown)}; allowed: method, metric, "
                               "direction, trials, seed, parameters")
    method = data.get("method", "grid")
    if method not in METHODS:
        raise SearchSpaceError(f"search space method={method!r} is invalid; allowed: {', '.join(METHODS)}")
    metric = data.get("metric", "map50")
    if metric not in METRICS:
        raise SearchSpaceError(f"search space metric={metric!r} is invalid; allowed: {', '.join(METRICS)}")
    direction = data.get("direction", "minimize" if metric == "loss" else "maximize")
    if direction not in DIRECTIONS:
        raise SearchSpaceError(f"search space direction={direction!r} is invalid; allowed: {', '.join(DIRECTIONS)}")
    trials, seed = data.get("trials", 8), data.get("seed", 0)
    if not isinstance(trials, int) or trials < 1:
        raise SearchSpaceError(f"search space trials={trials!r} is invalid: must be an integer >= 1")
    if not isinstance(seed, int):
        raise SearchSpaceError(f"search space seed={seed!r} is invalid: must be an integer")
    raw = data.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise SearchSpaceError("search space 'parameters' must be a non-empty mapping of TrainConfig fields")
    params, fixed = [], {}
    for name, spec in raw.items():
        param = _param(str(name), spec, method)
        if param is None:
            fixed[str(name)] = spec
        else:
            params.append(param)
    if not params:
        raise SearchSpaceError("search space has no searched parameter: give at least one 'values' list or "
                               "distribution (the grid would be empty)")
    space = SearchSpace(method=method, metric=metric, direction=direction, params=tuple(params), fixed=fixed,
                        trials=trials, seed=seed)
    # Check every concrete trial (and, for tpe, the bounds) against TrainConfig before anything trains.
    probes = space.trial_params()
    if not probes:  # tpe: check both ends of every range
        probes = [{**fixed, **{p.name: _bound(p, end) for p in params}} for end in (0, 1)]
    for overrides in probes:
        try:
            TrainConfig(**overrides)
        except TrainConfigError as exc:
            raise SearchSpaceError(f"search space gives an invalid trial {overrides}: {exc}") from exc
        except TypeError as exc:
            raise SearchSpaceError(f"search space gives an invalid trial {overrides}: {exc}") from exc
    return space


def load_search_space(source: str | Path) -> SearchSpace:
    """Read a search space from a YAML/JSON file path, or from the YAML/JSON text itself."""
    text = str(source)
    path = Path(text)
    try:
        is_file = "\n" not in text and len(text) < 4096 and path.is_file()
    except OSError:
        is_file = False
    if is_file:
        text = path.read_text(encoding="utf-8")
    elif "\n" not in text and text.strip().endswith((".yaml", ".yml", ".json")):
        raise SearchSpaceError(f"search space file {text!r} does not exist (give a path or the YAML/JSON text)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"search space {'file ' + str(path) if is_file else 'text'} is not valid YAML/JSON: "
                               f"{exc}") from exc
    return parse_search_space(data)


def start_sweep(space: SearchSpace, *, name: str = "sweep") -> str:
    """Create the parent MLflow run (left RUNNING for the trials to nest under); return its id."""
    import mlflow

    from components.tracking.setup import configure_mlflow

    configure_mlflow()
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"modelcommons.stage": "sweep", "sweep.method": space.method,
                         "sweep.metric": space.metric, "sweep.direction": space.direction})
        mlflow.log_dict(json.loads(space.to_json()), "sweep/search_space.json")
        run_id = str(run.info.run_id)
    mlflow.MlflowClient().update_run(run_id, status="RUNNING")  # stays open until select_best
    return run_id


def metric_of(space_metric: str, history: list[dict[str, float]], metrics: dict[str, float]) -> float:
    return float(history[-1]["loss"]) if space_metric == "loss" else float(metrics[space_metric])


def run_trial(dataset_dir: Path, out_dir: Path, overrides: dict[str, Any], *, parent_run_id: str, metric: str,
              index: int, track: bool = True) -> float:
    """Train one trial as a nested MLflow run; return its metric (also logged as ``sweep_metric``)."""
    config = TrainConfig(**overrides)
    result = train_detector(dataset_dir, out_dir, config, track=track, progress=False,
                            run_name=f"trial-{index}", parent_run_id=parent_run_id or None)
    value = metric_of(metric, result.history, result.metrics)
    if track and result.run_id:
        import mlflow

        with mlflow.start_run(run_id=result.run_id):
            mlflow.log_metric("sweep_metric", value)
            mlflow.set_tags({"sweep.trial": str(index), "sweep.params": json.dumps(overrides, sort_keys=True)})
    return value


@dataclass(frozen=True)
class SweepResult:
    run_id: str  # the best trial's run
    value: float
    params: dict[str, Any]
    model_uri: str
    trials: int
    version: str = ""
    alias: str = ""


def select_best(parent_run_id: str, space: SearchSpace, *, dataset_dir: Path | None = None,
                model_name: str = "detector") -> SweepResult:
    """Pick the best finished child run of ``parent_run_id``; register its model when ``dataset_dir`` is given."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.tracking.setup import configure_mlflow

    configure_mlflow()
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    scored = [r for r in children if "sweep_metric" in r.data.metrics and r.info.status == "FINISHED"]
    if not scored:
        client.set_terminated(parent_run_id, status="FAILED")
        raise RuntimeError(f"sweep {parent_run_id}: no finished trial logged sweep_metric")
    best = scored[0]
    for run in scored[1:]:
        if space.better(run.data.metrics["sweep_metric"], best.data.metrics["sweep_metric"]):
            best = run
    value = best.data.metrics["sweep_metric"]
    model_uri = best.data.tags.get("model_uri", "")
    params = json.loads(best.data.tags.get("sweep.params", "{}"))
    version = alias = ""
    if dataset_dir is not None and model_uri:
        from components.tracking.stage import run_registration

        metrics = {k.removeprefix("final_val_"): v for k, v in best.data.metrics.items()
                   if k.startswith("final_val_")}
        reg = run_registration(model_uri=model_uri, run_id=best.info.run_id, dataset_dir=dataset_dir,
                               metrics=metrics, name=model_name)
        version, alias = reg.version, reg.alias
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_metric(f"best_{space.metric}", value)
        mlflow.log_metric("trials", len(scored))
        mlflow.set_tags({"sweep.best_run_id": best.info.run_id, "sweep.best_params": json.dumps(params),
                         "registered_version": version, "registered_alias": alias})
    return SweepResult(run_id=best.info.run_id, value=value, params=params, model_uri=model_uri,
                       trials=len(scored), version=version, alias=alias)


def _tune_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for p in space.params:
        if p.distribution == "choice":
            out[p.name] = tune.choice(list(p.values))
        elif p.distribution == "uniform":
            out[p.name] = tune.uniform(p.low, p.high)
        elif p.distribution == "loguniform":
            out[p.name] = tune.loguniform(p.low, p.high)
        else:
            out[p.name] = tune.randint(int(p.low), int(p.high) + 1)  # randint's upper bound is exclusive
    return out


def run_tpe(dataset_dir: Path, work_dir: Path, space: SearchSpace, *, parent_run_id: str,
            max_concurrent: int = 1) -> int:
    """Run ``space.trials`` trials chosen by Optuna's TPE through Ray Tune; return how many finished.

    Every trial is a nested MLflow run like the grid/random ones; :func:`select_best` picks the winner.
    Uses the Ray cluster of ``RAY_ADDRESS`` or starts a local Ray.
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    dataset_dir, work_dir = Path(dataset_dir).resolve(), Path(work_dir).resolve()
    env = {k: v for k, v in os.environ.items() if k.startswith(("MODELCOMMONS_", "MLFLOW_", "AWS_"))}
    from components.settings import get_settings

    env["MODELCOMMONS_HOME"] = str(get_settings().home)

    def trainable(config: dict[str, Any]) -> None:
        os.environ.update(env)  # the trial actor may not share the driver's environment
        index = len(list(work_dir.glob("trial-*")))
        out = work_dir / f"trial-{index}-{os.getpid()}"
        value = run_trial(dataset_dir, out, {**space.fixed, **config}, parent_run_id=parent_run_id,
                          metric=space.metric, index=index)
        tune.report({space.metric: value})

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    mode = "max" if space.direction == "maximize" else "min"
    searcher = OptunaSearch(metric=space.metric, mode=mode,
                            sampler=optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=min(4, space.trials)))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=_tune_space(space),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=space.trials,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name="sweep-tpe", storage_path=str(work_dir / "ray_results"), verbose=0),
    )
    results = tuner.fit()
    errors = [results[i].error for i in range(len(results)) if results[i].error is not None]
    if errors and len(errors) == len(results):
        raise RuntimeError(f"every TPE trial failed; first error: {errors[0]}")
    return len(results) - len(errors)
