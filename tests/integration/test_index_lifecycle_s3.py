"""Index lifecycle on an S3 root (moto server over HTTP): list, set-latest, rm and their refusals."""

from __future__ import annotations

import pytest

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index import lifecycle as L
from raggen.index import manifest as M
from raggen.index.latest import list_versions, read_latest
from raggen.index.loading import verify_version
from raggen.index.publish import set_latest
from raggen.storage import open_store, s3_client
from tests.helpers import three_versions

pytestmark = pytest.mark.integration


def _keys(bucket: str, opts) -> list[str]:
    pages = s3_client(opts).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_list_set_latest_rm_on_s3(s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    root = f"s3://{bucket}/idx"
    three_versions(root, tmp_path, s3_options=opts)
    s3_client(opts).put_object(Bucket=bucket, Key="idx/v9/shard-00000.faiss", Body=b"partial")  # unfinished
    rows = L.list_index(root, s3_options=opts)
    assert [(r.version, r.latest, r.num_passages) for r in rows] == [
        ("v1", False, 30),
        ("v2", False, 40),
        ("v3", True, 50),
    ]
    store = open_store(root, opts)
    assert rows[1].size_bytes == sum(size for _, size, _ in store.list_with_info("v2"))
    assert L.format_versions(root, rows).splitlines()[-1] == "LATEST -> v3"

    with pytest.raises(ConfigError, match="rollback"):
        L.set_latest_version(root, "v1", s3_options=opts)
    L.set_latest_version(root, "v1", rollback=True, s3_options=opts)
    assert read_latest(root, opts) == "v1"

    before = [k for k in _keys(bucket, opts) if not k.startswith("idx/v2/")]
    L.remove_version(root, "v2", s3_options=opts)
    assert [k for k in _keys(bucket, opts) if k.startswith("idx/v2/")] == []
    assert _keys(bucket, opts) == before
    assert list_versions(root, opts) == ["v1", "v3"]
    verify_version(root, "v3", s3_options=opts)


def test_refusals_on_s3(s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    root = f"s3://{bucket}/idx"
    three_versions(root, tmp_path, s3_options=opts)
    set_latest(root, "v1", rollback=True, s3_options=opts)
    client = s3_client(opts)
    key = "idx/v2/shard-00001.parquet"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
    keys = _keys(bucket, opts)
    with pytest.raises(IndexIntegrityError, match="v2/shard-00001.parquet: sha256 mismatch"):
        L.set_latest_version(root, "v2", s3_options=opts)
    with pytest.raises(ConfigError, match="'v1' is the version LATEST names"):
        L.remove_version(root, "v1", s3_options=opts)
    with pytest.raises(ConfigError, match="'v5' is not published"):
        L.remove_version(root, "v5", s3_options=opts)
    with pytest.raises(ConfigError, match="'v5' is not published"):
        L.set_latest_version(root, "v5", s3_options=opts)
    client.put_object(Bucket=bucket, Key=f"idx/v3/{M.CLAIM_NAME}", Body=b"{}")
    with pytest.raises(ConfigError, match="being published"):
        L.remove_version(root, "v3", s3_options=opts)
    client.delete_object(Bucket=bucket, Key=f"idx/v3/{M.CLAIM_NAME}")
    assert _keys(bucket, opts) == keys and read_latest(root, opts) == "v1"
