"""Reusable S3 fixtures: a real moto S3 server on 127.0.0.1 (import ``moto_s3`` from here to reuse it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from components.storage.testing import MotoS3, start_moto_server


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One moto S3 server for the session; tests use their own bucket names to stay independent."""
    server, endpoint = start_moto_server()
    try:
        yield MotoS3(endpoint=endpoint)
    finally:
        server.stop()
