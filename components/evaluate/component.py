"""KFP component ``evaluate``: COCO mAP + latency via :func:`components.evaluate.stage.run_evaluation`."""

from typing import NamedTuple

from kfp import dsl

from components.kfp_image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def evaluate_component(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Artifact],
    run_id: str = "",
) -> NamedTuple("EvalOutputs", [("map", float), ("map50", float)]):  # type: ignore[valid-type]
    """Evaluate on the validation split; ``report`` gets metrics.json and eval_predictions.png."""
    from collections import namedtuple
    from pathlib import Path

    from components.evaluate.stage import run_evaluation

    values = run_evaluation(Path(model.path), Path(dataset.path), Path(report.path), run_id=run_id or None)
    for key, value in values.items():
        metrics.log_metric(key, value)
    EvalOutputs = namedtuple("EvalOutputs", ["map", "map50"])
    return EvalOutputs(values["map"], values["map50"])
