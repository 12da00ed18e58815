"""Roll a registered model out to the KubeRay ``RayService`` that serves it (patch, wait, report)."""
