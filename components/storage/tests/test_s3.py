from __future__ import annotations

from pathlib import Path

import pytest

from components.settings import ConfigError, Settings
from components.storage import StorageError, download_prefix, minio_client, parse_s3_uri, upload_directory
from components.storage.testing import MotoS3


def test_parse_s3_uri_normalises_prefix() -> None:
    assert parse_s3_uri("s3://bucket/a/b") == ("bucket", "a/b/")
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket/") == ("bucket", "")


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("http://bucket/a", "not an S3 URI"),
        ("bucket/a", "not an S3 URI"),
        ("s3://Bad_Bucket/a", "not a valid S3 bucket name"),
        ("s3://ab/a", "not a valid S3 bucket name"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/a//b", "empty"),
    ],
)
def test_parse_s3_uri_rejects_bad_uris(uri: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_s3_uri(uri)


def test_minio_client_requires_configuration() -> None:
    with pytest.raises(ConfigError, match="MODELCOMMONS_S3_ENDPOINT"):
        minio_client(Settings(s3_endpoint=None))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_upload_then_download_roundtrip(moto_s3: MotoS3, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "images" / "sub").mkdir(parents=True)
    (src / "a.json").write_text('{"x": 1}')
    (src / "images" / "1.png").write_bytes(b"\x89PNG fake")
    (src / "images" / "sub" / "2.bin").write_bytes(bytes(range(256)))
    client = minio_client(moto_s3.settings())

    # The bucket does not exist yet: upload creates it.
    assert not client.bucket_exists("roundtrip")
    assert upload_directory(client, src, "s3://roundtrip/data/v1") == 3
    keys = sorted(o.object_name for o in client.list_objects("roundtrip", recursive=True))
    assert keys == ["data/v1/a.json", "data/v1/images/1.png", "data/v1/images/sub/2.bin"]

    # A sibling prefix sharing a string prefix must not leak into the download.
    upload_directory(client, src / "images" / "sub", "s3://roundtrip/data/v10")
    dest = tmp_path / "dest"
    paths = download_prefix(client, "s3://roundtrip/data/v1", dest)
    assert sorted(p.relative_to(dest).as_posix() for p in paths) == sorted(_tree(src))
    assert _tree(dest) == _tree(src)


def test_download_errors_name_the_uri(moto_s3: MotoS3, tmp_path: Path) -> None:
    client = minio_client(moto_s3.settings())
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x/: bucket 'no-such-bucket' does not exist"):
        download_prefix(client, "s3://no-such-bucket/x/", tmp_path)
    client.make_bucket("empty-bucket")
    with pytest.raises(StorageError, match=r"s3://empty-bucket/nothing/here: no objects under this prefix"):
        download_prefix(client, "s3://empty-bucket/nothing/here", tmp_path)


def test_upload_requires_a_directory(moto_s3: MotoS3, tmp_path: Path) -> None:
    client = minio_client(moto_s3.settings())
    with pytest.raises(StorageError, match="not a directory"):
        upload_directory(client, tmp_path / "missing", "s3://some-bucket/x")
