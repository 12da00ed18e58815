"""KFP component ``deploy``: thin wrapper over :func:`components.deploy.rayservice.deploy_model`.

Put it at the end of a pipeline to roll the newly registered model out. In the cluster the task pod
uses its service account (in-cluster config): bind it to the ``rayservice-deployer`` Role of
``k8s/base/rbac.yaml``. MLflow is reached through the pod's ``MLFLOW_TRACKING_URI``/``MODELCOMMONS_*``.
"""

from typing import NamedTuple

from kfp import dsl

from components.kfp_image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def deploy_component(
    model: str = "detector@champion",
    namespace: str = "modelcommons",
    rayservice: str = "modelcommons",
    app_name: str = "modelcommons",
    timeout_s: float = 900.0,
    poll_interval_s: float = 5.0,
    pin_version: bool = True,
) -> NamedTuple("DeployOutputs", [("model_uri", str), ("version", str), ("previous_model_uri", str)]):  # type: ignore[valid-type]
    """Point RayService ``namespace/rayservice`` at registered ``model`` and wait until it runs.

    Fails the task (DeployError/ModelNotFoundError) on an unknown model, an unreachable API server,
    DEPLOY_FAILED or a timeout, with the reason in the message.
    """
    from collections import namedtuple

    from components.deploy.rayservice import deploy_model

    result = deploy_model(model, namespace=namespace, name=rayservice, app_name=app_name, timeout_s=timeout_s,
                          poll_interval_s=poll_interval_s, pin_version=pin_version, progress=print)
    print(f"deployed {result.model_uri} to RayService {namespace}/{rayservice} in {result.elapsed_s:.1f} s")
    DeployOutputs = namedtuple("DeployOutputs", ["model_uri", "version", "previous_model_uri"])
    return DeployOutputs(result.model_uri, result.model_version, result.previous_model_uri or "")
