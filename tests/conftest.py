"""Fixtures for the integration tests under ``tests/``: the shared moto S3 server on 127.0.0.1."""

from __future__ import annotations

from components.storage.tests.conftest import moto_s3  # noqa: F401  (re-exported session fixture)
