"""S3 / MinIO helpers on the minio SDK, driven by :class:`components.settings.Settings`.

URIs are ``s3://<bucket>/<prefix>``. A prefix names a "folder": it is normalised to end with ``/``
so ``s3://b/data`` never matches ``s3://b/database/...``.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path, PurePosixPath

from minio import Minio
from minio.error import MinioException, S3Error

from components.settings import ConfigError, Settings, get_settings

# S3 bucket naming rules (lower case, 3-63 chars, letters/digits/dots/hyphens, alnum at both ends).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class StorageError(RuntimeError):
    """An S3 operation failed or found nothing; the message names the URI."""


def minio_client(settings: Settings | None = None) -> Minio:
    """A :class:`minio.Minio` client for the configured endpoint.

    Raises :class:`ConfigError` naming the ``MODELCOMMONS_S3_*`` variables when S3 is not configured.
    """
    settings = settings if settings is not None else get_settings()
    if not settings.s3_endpoint:
        raise ConfigError(
            "S3 is not configured: set MODELCOMMONS_S3_ENDPOINT (host:port), MODELCOMMONS_S3_ACCESS_KEY "
            "and MODELCOMMONS_S3_SECRET_KEY to read or write s3:// URIs"
        )
    if settings.s3_access_key is None or settings.s3_secret_key is None:  # Settings validates this too
        raise ConfigError("MODELCOMMONS_S3_ACCESS_KEY and MODELCOMMONS_S3_SECRET_KEY must both be set")
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=settings.s3_secure,
        region=settings.s3_region,
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix/")``.

    The prefix is ``""`` for the whole bucket, otherwise it ends with ``/``. Raises ``ValueError``
    for another scheme, a bad bucket name or ``..``/empty path segments.
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"{uri!r}: not an S3 URI; expected s3://<bucket>/<prefix>")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{uri!r}: bucket {bucket!r} is not a valid S3 bucket name "
            "(3-63 characters: lower-case letters, digits, '.', '-'; alphanumeric at both ends)"
        )
    prefix = prefix.strip("/")
    if not prefix:
        return bucket, ""
    parts = prefix.split("/")
    if any(part in {"", ".", ".."} for part in parts):
        raise ValueError(f"{uri!r}: prefix {prefix!r} has an empty, '.' or '..' path segment")
    return bucket, prefix + "/"


def download_prefix(client: Minio, uri: str, dest: Path) -> list[Path]:
    """Download every object under ``uri`` into ``dest``, keeping relative paths.

    Returns the local paths written, in key order. Raises :class:`StorageError` naming ``uri`` when the
    bucket does not exist or nothing is stored under the prefix.
    """
    bucket, prefix = parse_s3_uri(uri)
    dest = Path(dest)
    written: list[Path] = []
    try:
        for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
            key = obj.object_name
            if key is None or key.endswith("/"):  # "directory" marker objects carry no data
                continue
            rel = PurePosixPath(key[len(prefix) :])
            # Keys are untrusted: never let one escape dest.
            if rel.is_absolute() or any(part in {"", ".", ".."} for part in rel.parts):
                raise StorageError(f"s3://{bucket}/{key}: unsafe object key, refusing to download")
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            client.fget_object(bucket, key, str(target))
            written.append(target)
    except S3Error as exc:
        if exc.code == "NoSuchBucket":
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from exc
        raise StorageError(f"{uri}: S3 error {exc.code}: {exc.message}") from exc
    except (MinioException, OSError) as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"{uri}: download failed: {exc}") from exc
    if not written:
        raise StorageError(f"{uri}: no objects under this prefix")
    return written


def upload_directory(client: Minio, src: Path, uri: str) -> int:
    """Upload every file below ``src`` to ``uri`` (relative paths become key suffixes).

    Creates the bucket when missing. Returns the number of objects written.
    """
    bucket, prefix = parse_s3_uri(uri)
    src = Path(src)
    if not src.is_dir():
        raise StorageError(f"{src}: not a directory, cannot upload to {uri}")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        for path in files:
            key = prefix + path.relative_to(src).as_posix()
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            client.fput_object(bucket, key, str(path), content_type=content_type)
    except S3Error as exc:
        raise StorageError(f"{uri}: S3 error {exc.code}: {exc.message}") from exc
    except (MinioException, OSError) as exc:
        raise StorageError(f"{uri}: upload from {src} failed: {exc}") from exc
    return len(files)
