"""Pipeline ``sweep``: intake -> hyperparameter trials (grid/random fanned out, or TPE) -> best registered.

``space`` is a search space in YAML or JSON, as text or a path readable by the components (see
:mod:`components.train.sweep`). Grid and random trials fan out with ``dsl.ParallelFor`` (each a
nested MLflow run under one parent run); ``method: tpe`` runs its trials through Ray Tune with an
Optuna TPE searcher inside one component. The best trial by ``metric``/``direction`` is registered
(champion/challenger rule as in ``detector-train``).
"""

from typing import NamedTuple

from kfp import dsl

from components.data.component import intake_component
from components.train.sweep_component import (
    sweep_plan_component,
    sweep_select_component,
    sweep_start_component,
    sweep_tpe_component,
    sweep_trial_component,
)
from pipelines.cluster_env import with_cluster_env


@dsl.pipeline(name="sweep",
              description="Hyperparameter sweep of detector training (grid, random or TPE); registers the best.")
def sweep(
    source: str,
    space: str,
    fmt: str = "auto",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    max_error_fraction: float = 0.05,
    model_name: str = "detector",
) -> NamedTuple("Outputs", [("best_run_id", str), ("best_value", float), ("best_params", str),  # type: ignore[valid-type]
                            ("trials", int), ("version", str), ("alias", str)]):
    start = sweep_start_component(space=space)  # fails fast on an invalid space, before intake
    with_cluster_env(start).set_display_name("start")
    intake = intake_component(source=source, fmt=fmt, val_fraction=val_fraction, seed=split_seed,
                              max_error_fraction=max_error_fraction, augment=False)
    with_cluster_env(intake).set_display_name("intake").after(start)
    plan = sweep_plan_component(space=space, parent_run_id=start.output)
    with_cluster_env(plan).set_display_name("plan")
    tpe = sweep_tpe_component(dataset=intake.outputs["dataset"], space=space, parent_run_id=start.output)
    with_cluster_env(tpe).set_display_name("tpe")
    # At most 2 trials at once: a static limit (KFP needs a literal); each trial is a whole training run.
    with dsl.ParallelFor(plan.output, parallelism=2) as trial:
        run = sweep_trial_component(dataset=intake.outputs["dataset"], trial=trial, space=space)
        with_cluster_env(run).set_display_name("trial")
    select = sweep_select_component(dataset=intake.outputs["dataset"], parent_run_id=start.output, space=space,
                                    model_name=model_name).after(tpe).after(run)
    with_cluster_env(select).set_display_name("select")
    Outputs = NamedTuple("Outputs", [("best_run_id", str), ("best_value", float), ("best_params", str),  # noqa: UP014
                                     ("trials", int), ("version", str), ("alias", str)])
    return Outputs(select.outputs["best_run_id"], select.outputs["best_value"], select.outputs["best_params"],
                   select.outputs["trials"], select.outputs["version"], select.outputs["alias"])
