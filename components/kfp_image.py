"""Container image the KFP components run in on a cluster (ignored by the local runner).

Set ``MODELCOMMONS_IMAGE`` when compiling pipelines for a cluster, e.g.
``MODELCOMMONS_IMAGE=registry.example.com/modelcommons:0.1.0 modelcommons pipeline compile ...``.
Only the standard library is imported here, so component modules stay light at import time.
"""

import os

BASE_IMAGE = os.environ.get("MODELCOMMONS_IMAGE", "modelcommons:0.1.0")
