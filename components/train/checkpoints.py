"""Where training checkpoints live: a local file, mirrored to S3/MinIO when a run identity is given.

Without a run identity the checkpoint is ``<out_dir>/checkpoint.pt`` (a rerun in the same directory
resumes). With ``run_key`` it belongs to the artifact store, so any rerun with the same key resumes,
wherever its output directory is (a KFP task gets a fresh one every run):

- S3 configured (``MODELCOMMONS_S3_ENDPOINT``): ``s3://<bucket>/checkpoints/<run_key>/checkpoint.pt``
  through the minio SDK, with a local working copy in ``<out_dir>``;
- otherwise ``$MODELCOMMONS_HOME/checkpoints/<run_key>/checkpoint.pt``.

Checkpoints are written atomically (temporary file, then rename; an S3 PUT replaces the object as a
whole), so a kill mid-write leaves the previous epoch's checkpoint readable. They hold tensors and
plain values only and are read with ``torch.load(..., weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from components.settings import Settings, get_settings

CHECKPOINT_FILE = "checkpoint.pt"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CheckpointStore:
    """Read and write the latest checkpoint of one training run."""

    def __init__(self, out_dir: Path, *, run_key: str | None = None, settings: Settings | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.run_key = run_key or None
        self.s3_uri: str | None = None
        self._settings = settings
        if self.run_key is None:
            self.local = self.out_dir / CHECKPOINT_FILE
            return
        if not _KEY_RE.match(self.run_key):
            raise ValueError(f"run_key={run_key!r} is invalid: use 1-128 letters, digits, '.', '_' or '-' "
                             "(it names the checkpoint folder)")
        settings = settings or get_settings()
        self._settings = settings
        if settings.use_s3:
            self.s3_uri = f"s3://{settings.s3_bucket}/checkpoints/{self.run_key}/"
            self.local = self.out_dir / CHECKPOINT_FILE
        else:
            self.local = settings.home / "checkpoints" / self.run_key / CHECKPOINT_FILE

    @property
    def location(self) -> str:
        return self.s3_uri + CHECKPOINT_FILE if self.s3_uri else str(self.local)

    def load(self) -> dict[str, Any] | None:
        """The latest checkpoint's state, or None when the run has none yet."""
        if self.s3_uri is not None:
            self._download()
        if not self.local.is_file():
            return None
        state: dict[str, Any] = torch.load(self.local, map_location="cpu", weights_only=True)
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.local.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.local.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.local)  # atomic: a kill mid-write leaves the previous checkpoint intact
        if self.s3_uri is not None:
            self._upload()

    def _client_and_key(self) -> tuple[Any, str, str]:
        from components.storage.s3 import minio_client, parse_s3_uri

        assert self.s3_uri is not None
        bucket, prefix = parse_s3_uri(self.s3_uri)
        return minio_client(self._settings), bucket, prefix + CHECKPOINT_FILE

    def _download(self) -> None:
        from minio.error import S3Error

        from components.storage.s3 import StorageError

        client, bucket, key = self._client_and_key()
        self.local.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.local.with_suffix(".download")
        try:
            client.fget_object(bucket, key, str(tmp))
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchBucket"}:
                return
            raise StorageError(f"{self.location}: S3 error {exc.code}: {exc.message}") from exc
        tmp.replace(self.local)

    def _upload(self) -> None:
        from minio.error import S3Error

        from components.storage.s3 import StorageError

        client, bucket, key = self._client_and_key()
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            client.fput_object(bucket, key, str(self.local), content_type="application/octet-stream")
        except S3Error as exc:
            raise StorageError(f"{self.location}: S3 error {exc.code}: {exc.message}") from exc
