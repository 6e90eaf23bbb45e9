"""Model exports on S3 (a moto server on loopback, real boto3 over HTTP): training's ``final/``
export is versioned, each object listed with its sha256, ``LATEST`` written last with a conditional
write; loaders download only a complete export and check every byte as it arrives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raggen.errors import DataError
from raggen.models import exports
from raggen.models.exports import EXPORT_MANIFEST, EXPORT_MARKER, POINTER, ROOT_MARKER
from raggen.models.loading import fetch_model_dir
from raggen.storage import PreconditionFailed, S3Store, open_store, sha256_file
from raggen.train.checkpointing import STATE_FILE, export_checkpoint, read_checkpoint, write_checkpoint
from raggen.train.evaluate import local_checkpoint

pytestmark = pytest.mark.integration


class FakeModel:
    def __init__(self, seed: int):
        self.seed = seed

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "config.json").write_text(json.dumps({"architectures": ["Fake"], "seed": self.seed}))
        Path(path, "model.safetensors").write_bytes(bytes(range(256)) * (8 + self.seed))


def _checkpoint(tmp_path: Path, step: int) -> Path:
    out = tmp_path / f"ckpt-{step}"
    write_checkpoint(out, models={"generator": FakeModel(step), "query_encoder": FakeModel(step + 1)}, step=step)
    return out


def test_export_to_s3_then_load_verified(tmp_path, s3_bucket):
    bucket, s3 = s3_bucket
    root = f"s3://{bucket}/runs/r1/final"
    src = _checkpoint(tmp_path, 3)
    uri = export_checkpoint(src, root, s3)
    name = uri.rsplit("/", 1)[1]
    store = open_store(root, s3)
    assert store.read_bytes(POINTER) == f"{name}\n".encode() and store.exists(ROOT_MARKER)
    manifest = json.loads(store.read_bytes(f"{name}/{EXPORT_MANIFEST}"))
    assert {f["path"]: f["sha256"] for f in manifest["files"]}["generator/model.safetensors"] == sha256_file(
        src / "generator" / "model.safetensors"
    )

    local = Path(fetch_model_dir(f"{root}/generator", s3))  # through LATEST
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    assert (local / "model.safetensors").read_bytes() == (src / "generator" / "model.safetensors").read_bytes()
    assert Path(fetch_model_dir(f"{uri}/query_encoder", s3)).joinpath("config.json").is_file()  # the export named
    with local_checkpoint(root, s3) as folder:  # `raggen eval --checkpoint s3://.../final`
        state = read_checkpoint(folder)
        assert state.step == 3 and sorted(state.model_dirs) == ["generator", "query_encoder"]


def test_a_tampered_or_missing_object_is_refused(tmp_path, s3_bucket):
    bucket, s3 = s3_bucket
    root = f"s3://{bucket}/runs/r2/final"
    name = export_checkpoint(_checkpoint(tmp_path, 3), root, s3).rsplit("/", 1)[1]
    store = open_store(root, s3)
    key = f"{name}/generator/model.safetensors"
    data = bytearray(store.read_bytes(key))
    data[100] ^= 0xFF
    store.write_bytes(key, bytes(data))
    with pytest.raises(DataError, match="generator/model.safetensors does not match its sha256") as info:
        fetch_model_dir(f"{root}/generator", s3)
    assert "\n" not in str(info.value)
    store.delete_file(f"{name}/query_encoder/config.json")
    with pytest.raises(DataError, match=r"incomplete model export \(query_encoder/config.json is missing\)"):
        fetch_model_dir(f"{root}/query_encoder", s3)


def test_a_crash_before_the_pointer_is_refused_and_the_old_export_keeps_serving(tmp_path, s3_bucket, monkeypatch):
    bucket, s3 = s3_bucket
    root = f"s3://{bucket}/runs/r3/final"

    def crash(store, name, **kwargs):
        raise KeyboardInterrupt("killed between the files and the pointer")

    with monkeypatch.context() as m:
        m.setattr(exports, "move_pointer", crash)
        with pytest.raises(KeyboardInterrupt):
            export_checkpoint(_checkpoint(tmp_path, 3), root, s3)
    with pytest.raises(DataError, match=r"final: incomplete model export \(no LATEST pointer"):
        fetch_model_dir(f"{root}/generator", s3)

    first = export_checkpoint(_checkpoint(tmp_path, 4), root, s3)
    real_upload = S3Store.upload_file
    uploaded = []

    def dies_midway(self, local_path, rel):
        if len(uploaded) == 2:
            raise OSError("connection reset")
        uploaded.append(rel)
        real_upload(self, local_path, rel)

    with monkeypatch.context() as m:
        m.setattr(S3Store, "upload_file", dies_midway)
        with pytest.raises(OSError):
            export_checkpoint(_checkpoint(tmp_path, 5), root, s3)
    partial = f"{root}/{uploaded[0].split('/')[0]}"
    assert fetch_model_dir(f"{root}/generator", s3)  # LATEST still names the step-4 export
    assert open_store(root, s3).read_bytes(POINTER).decode().strip() == first.rsplit("/", 1)[1]
    with pytest.raises(DataError, match="incomplete model export .*no export.json"):
        fetch_model_dir(f"{partial}/generator", s3)


def test_the_pointer_is_written_last_with_a_conditional_write(tmp_path, s3_bucket, monkeypatch):
    bucket, s3 = s3_bucket
    root = f"s3://{bucket}/runs/r4/final"
    writes = []
    real_write, real_upload = S3Store.write_bytes, S3Store.upload_file

    def write(self, rel, data, **kw):
        writes.append((rel, kw))
        return real_write(self, rel, data, **kw)

    def upload(self, local_path, rel):
        writes.append((rel, {}))
        real_upload(self, local_path, rel)

    monkeypatch.setattr(S3Store, "write_bytes", write)
    monkeypatch.setattr(S3Store, "upload_file", upload)
    name = export_checkpoint(_checkpoint(tmp_path, 3), root, s3).rsplit("/", 1)[1]
    names = [rel for rel, _ in writes]
    assert names[:2] == [ROOT_MARKER, f"{name}/{EXPORT_MARKER}"]
    assert names[-3:] == [f"{name}/{STATE_FILE}", f"{name}/{EXPORT_MANIFEST}", POINTER]
    assert writes[-1][1] == {"if_none_match": True} and writes[-2][1] == {"if_none_match": True}
    writes.clear()
    second = export_checkpoint(_checkpoint(tmp_path, 6), root, s3).rsplit("/", 1)[1]
    assert writes[-1][0] == POINTER and "if_match" in writes[-1][1]  # moved with If-Match on its ETag
    store = open_store(root, s3)
    with pytest.raises(PreconditionFailed):  # moto enforces the ETag: a stale writer loses
        real_write(store, POINTER, b"3-stale\n", if_match='"0123456789abcdef0123456789abcdef"')
    assert store.read_bytes(POINTER).decode().strip() == second


def test_unsafe_s3_names_are_refused(tmp_path, s3_bucket):
    bucket, s3 = s3_bucket
    for bad in (
        f"s3://{bucket}/runs/../etc/generator",
        f"s3://{bucket}//runs/final/generator",
        f"s3://{bucket}/runs/./final",
    ):
        with pytest.raises(ValueError, match="unsafe S3 prefix"):
            fetch_model_dir(bad, s3)
    src = _checkpoint(tmp_path, 3)
    with pytest.raises(ValueError, match="unsafe S3 prefix"):
        export_checkpoint(src, f"s3://{bucket}/runs/a//final", s3)
    root = f"s3://{bucket}/runs/r5/final"
    export_checkpoint(src, root, s3)
    store = open_store(root, s3)
    store.write_bytes(POINTER, b"../../other\n")
    with pytest.raises(DataError, match="LATEST: names '../../other', not an export"):
        fetch_model_dir(f"{root}/generator", s3)
    assert not os.path.exists(tmp_path / "other")


def test_serve_replicas_load_only_a_verified_export(tmp_path, s3_bucket, monkeypatch):
    """``serve.model_dir: s3://.../final``: the app args name ``final/<role>`` (no credentials in
    them: the replicas read those from their environment), and the deployments' own constructors
    load the export LATEST names, refusing it once an object is changed."""
    import torch

    from raggen.app.serving import app_args_from_config
    from raggen.config import load_config
    from raggen.models import Generator, make_tiny_encoder, make_tiny_generator
    from raggen.serve import deployments

    bucket, s3 = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["aws_secret_access_key"])
    ckpt = tmp_path / "ckpt"
    make_tiny_generator(str(ckpt / "generator"), d_model=32, layers=1, heads=2, ffn=64)
    make_tiny_encoder(str(ckpt / "query_encoder"), d_model=32, heads=2)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 2, "models": ["generator", "query_encoder"]}))
    root = f"s3://{bucket}/runs/served/final"
    name = export_checkpoint(ckpt, root, s3).rsplit("/", 1)[1]
    cfg = load_config(
        None,
        [
            f"serve.model_dir={root}",
            f"serve.s3.endpoint_url={s3['endpoint_url']}",
            f"serve.s3.region={s3['region_name']}",
        ],
    )
    args = app_args_from_config(cfg)
    assert args["generator"] == f"{root}/generator" and args["query_encoder"]["name_or_path"] == f"{root}/query_encoder"
    assert not {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"} & set(args["s3"] or {})

    replica = deployments.Generator.func_or_class(
        path=args["generator"], max_source_length=64, max_target_length=8, num_beams=1, s3=args["s3"]
    )
    reference = Generator.from_pretrained(str(ckpt / "generator"), max_source_length=64, max_target_length=8)
    batch = (["where?"], [["in the mill", "at sea"]], ["mill"])
    with torch.no_grad():
        assert torch.equal(replica.model.token_logprobs(*batch)[0], reference.token_logprobs(*batch)[0])

    store = open_store(root, s3)
    weights = next(k for k in store.list(f"{name}/generator") if k.endswith(".safetensors"))
    data = bytearray(store.read_bytes(weights))
    data[-10] ^= 0xFF
    store.write_bytes(weights, bytes(data))
    with pytest.raises(DataError, match=r"generator/model.safetensors does not match its sha256"):
        deployments.Generator.func_or_class(path=args["generator"], s3=args["s3"])
