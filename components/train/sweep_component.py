"""KFP components of the ``sweep`` pipeline: plan, start, trial (fanned out), tpe, select.

Thin wrappers over :mod:`components.train.sweep`; stdlib + ``kfp`` imports only at the top.
The trial list is the single output of ``sweep_plan`` (kfp.local resolves a ParallelFor over a
task's single ``Output``), each item a JSON object of TrainConfig overrides.
"""

from typing import NamedTuple

from kfp import dsl

from components.kfp_image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def sweep_plan_component(space: str, parent_run_id: str) -> list:
    """Each grid/random trial of the search space (tpe: []).

    Each item is JSON ``{"index": i, "params": {TrainConfig overrides}, "parent_run_id": ...}``: the
    loop body gets everything from its item (kfp.local resolves other task outputs inside a
    ParallelFor to the loop item).
    """
    import json

    from components.train.sweep import load_search_space

    trials = load_search_space(space).trial_params()
    return [json.dumps({"index": i, "params": t, "parent_run_id": parent_run_id}, sort_keys=True)
            for i, t in enumerate(trials)]


@dsl.component(base_image=BASE_IMAGE)
def sweep_start_component(space: str, sweep_name: str = "sweep") -> str:
    """Validate the search space; create the parent MLflow run every trial nests under; return its id."""
    from components.train.sweep import load_search_space, start_sweep

    return start_sweep(load_search_space(space), name=sweep_name)


@dsl.component(base_image=BASE_IMAGE)
def sweep_trial_component(dataset: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model], trial: str,
                          space: str) -> float:
    """Train one trial (a ``sweep_plan`` item) as a nested MLflow run; return its metric."""
    import json
    from pathlib import Path

    from components.train.sweep import load_search_space, run_trial

    item = json.loads(trial)
    overrides = item["params"]
    value = run_trial(Path(dataset.path), Path(model.path), overrides, parent_run_id=item["parent_run_id"],
                      metric=load_search_space(space).metric, index=int(item["index"]))
    model.metadata.update({"sweep_metric": value, **{f"param_{k}": v for k, v in overrides.items()}})
    return value


@dsl.component(base_image=BASE_IMAGE)
def sweep_tpe_component(dataset: dsl.Input[dsl.Dataset], workdir: dsl.Output[dsl.Artifact], space: str,
                        parent_run_id: str) -> int:
    """method: tpe: run all trials through Ray Tune + Optuna TPE inside this one component (else no-op)."""
    from pathlib import Path

    Path(workdir.path).mkdir(parents=True, exist_ok=True)
    import yaml  # peek at the method first: grid/random sweeps skip importing torch and Ray here

    source = Path(space) if "\n" not in space and Path(space).is_file() else None
    raw = yaml.safe_load(source.read_text(encoding="utf-8") if source else space)
    if not isinstance(raw, dict) or raw.get("method", "grid") != "tpe":
        return 0

    from components.train.sweep import load_search_space, run_tpe

    return run_tpe(Path(dataset.path), Path(workdir.path), load_search_space(space), parent_run_id=parent_run_id)


@dsl.component(base_image=BASE_IMAGE)
def sweep_select_component(
    dataset: dsl.Input[dsl.Dataset], parent_run_id: str, space: str, model_name: str = "detector",
) -> NamedTuple("SelectOutputs", [("best_run_id", str), ("best_value", float), ("best_params", str),  # type: ignore[valid-type]
                                  ("trials", int), ("version", str), ("alias", str)]):
    """Pick the best trial by the space's metric and direction; register its model (champion rule)."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from components.train.sweep import load_search_space, select_best

    best = select_best(parent_run_id, load_search_space(space), dataset_dir=Path(dataset.path),
                       model_name=model_name)
    SelectOutputs = namedtuple("SelectOutputs", ["best_run_id", "best_value", "best_params", "trials", "version",
                                                 "alias"])
    return SelectOutputs(best.run_id, best.value, json.dumps(best.params, sort_keys=True), best.trials,
                         best.version, best.alias)
