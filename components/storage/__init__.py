"""Object storage (S3 / MinIO through the minio SDK)."""

from components.storage.s3 import (
    StorageError,
    download_prefix,
    minio_client,
    parse_s3_uri,
    upload_directory,
)

__all__ = ["StorageError", "download_prefix", "minio_client", "parse_s3_uri", "upload_directory"]
