"""KFP component ``register``: wraps :func:`components.tracking.stage.run_registration`."""

from typing import NamedTuple

from kfp import dsl

from components.kfp_image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def register_component(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    run_id: str,
    model_uri: str,
    map: float,
    map50: float,
    model_name: str = "detector",
) -> NamedTuple("RegisterOutputs", [("name", str), ("version", str), ("alias", str)]):  # type: ignore[valid-type]
    """Register the trained model; ``champion`` moves only when mAP beats the current champion."""
    from collections import namedtuple
    from pathlib import Path

    from components.tracking.stage import run_registration

    reg = run_registration(model_uri=model_uri, run_id=run_id, dataset_dir=Path(dataset.path),
                           metrics={"map": map, "map50": map50}, name=model_name)
    RegisterOutputs = namedtuple("RegisterOutputs", ["name", "version", "alias"])
    return RegisterOutputs(reg.name, reg.version, reg.alias)
