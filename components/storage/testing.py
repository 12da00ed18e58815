"""A real S3-compatible server on 127.0.0.1 for tests: moto's ``ThreadedMotoServer``.

Reusable from any test suite (the ``moto_s3`` fixture in ``components/storage/tests/conftest.py``
wraps it)::

    server, endpoint = start_moto_server()   # endpoint == "127.0.0.1:PORT"
    try: ...
    finally: server.stop()
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from components.settings import Settings

# moto accepts any credentials; fixed values keep tests reproducible.
ACCESS_KEY = "modelcommons-test"
SECRET_KEY = "modelcommons-test-secret"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_moto_server(port: int | None = None) -> tuple[Any, str]:
    """Start moto's S3 server on 127.0.0.1; returns ``(server, "127.0.0.1:PORT")``. Call ``server.stop()``."""
    from moto.server import ThreadedMotoServer  # dev dependency: import only when a test asks for it

    port = port if port is not None else free_port()
    # werkzeug logs every request at INFO, which would flood test output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"127.0.0.1:{port}"


@dataclass(frozen=True)
class MotoS3:
    """Where a running moto server listens, and the credentials to use."""

    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def settings(self, **overrides: Any) -> Settings:
        """:class:`Settings` pointing at this server (plain HTTP); ``overrides`` set other fields."""
        values: dict[str, Any] = {
            "s3_endpoint": self.endpoint,
            "s3_access_key": SecretStr(self.access_key),
            "s3_secret_key": SecretStr(self.secret_key),
            "s3_secure": False,
        }
        values.update(overrides)
        return Settings(**values)

    def environ(self, bucket: str = "modelcommons") -> dict[str, str]:
        """``MODELCOMMONS_S3_*`` environment for subprocesses (e.g. KFP local runs)."""
        return {
            "MODELCOMMONS_S3_ENDPOINT": self.endpoint,
            "MODELCOMMONS_S3_ACCESS_KEY": self.access_key,
            "MODELCOMMONS_S3_SECRET_KEY": self.secret_key,
            "MODELCOMMONS_S3_SECURE": "false",
            "MODELCOMMONS_S3_BUCKET": bucket,
        }
