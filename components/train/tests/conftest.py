"""Training-test fixtures: the shared moto S3 server (checkpoints in the artifact store)."""

from __future__ import annotations

from components.storage.tests.conftest import moto_s3  # noqa: F401  (re-exported session fixture)
